"""Let torch >= 2.6 load fairseq checkpoints.

torch 2.6 switched ``torch.load`` to ``weights_only=True``; fairseq's checkpoints pickle an
``argparse.Namespace`` (and, in older ones, numpy scalars), which the safe unpickler refuses, so
generate, validate, resume and ``from_pretrained`` all fail. We allow exactly those globals.
"""

import argparse

import torch


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


allow_fairseq_checkpoints()
