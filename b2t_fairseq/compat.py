"""Fixes that make fairseq-fixed behave on today's stack, applied when the plugin is imported.

1. torch 2.6 switched ``torch.load`` to ``weights_only=True``; fairseq's checkpoints pickle an
   ``argparse.Namespace`` (and, in older ones, numpy scalars), which the safe unpickler refuses, so
   generate, validate, resume and ``from_pretrained`` all fail. We allow exactly those globals.
2. fairseq after 0.12.2 silently drops the last batch of every epoch when its size is not a
   multiple of ``--required-batch-size-multiple`` (default 8): fairseq-generate translates 16 of 21
   test sentences, validation skips sentences too, and BLEU is computed on a subset. We keep that
   batch, as fairseq 0.12.2 (and the authors' 0.9.0) did.
3. fairseq copies each saved checkpoint onto ``checkpoint_last.pt``/``checkpoint_best.pt`` in place,
   so a kill mid-copy leaves a truncated file; safe_checkpoint.py makes the copies atomic and checks
   every checkpoint before it is loaded. Installed here, at import, so that fairseq's spawned GPU
   workers and plain ``fairseq-train --user-dir`` get it too.
"""

import argparse
import functools

import numpy as np

import torch

from . import safe_checkpoint


def _numpy_globals():
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is a fairseq dependency
        return []
    found = [np.ndarray, np.dtype]
    for mod, name in (("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                      ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar")):
        try:
            found.append(getattr(__import__(mod, fromlist=[name]), name))
        except (ImportError, AttributeError):
            pass
    # dtype classes such as numpy.dtypes.Float64DType appear in pickled numpy scalars
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        found.extend(getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType"))
    return found


def allow_fairseq_checkpoints():
    add = getattr(torch.serialization, "add_safe_globals", None)
    if add is not None:  # torch < 2.4 has no weights_only default to fix
        add([argparse.Namespace] + _numpy_globals())


def keep_remainder_batches():
    from fairseq.data import data_utils

    drops = data_utils.batch_by_size
    if getattr(drops, "b2t_keeps_remainder", False):
        return

    @functools.wraps(drops)
    def batch_by_size(indices, *args, **kwargs):
        if not isinstance(indices, np.ndarray):
            indices = np.fromiter(indices, dtype=np.int64, count=-1)
        batches = drops(indices, *args, **kwargs)
        fixed_shapes = kwargs.get("fixed_shapes", args[5] if len(args) > 5 else None)
        covered = sum(len(b) for b in batches)
        if fixed_shapes is None and covered < len(indices):
            # batches are consecutive slices of indices: what is missing is the dropped tail
            batches = list(batches) + [indices[covered:]]
        return batches

    batch_by_size.b2t_keeps_remainder = True
    data_utils.batch_by_size = batch_by_size


allow_fairseq_checkpoints()
keep_remainder_batches()
safe_checkpoint.install()
