"""Every runtime repair of fairseq and torch, in one place, each guarded and applied at most once.

Applied when the plugin is imported (``--user-dir b2t_fairseq``, ``import b2t_fairseq`` or any
console command), so fairseq's spawned GPU workers get them too. No fairseq file is changed: each
repair wraps or replaces one name, and names the fairseq code it relies on; tests/test_repairs.py
fails if that code changes shape.

1. ``torch.load`` of fairseq checkpoints (torch >= 2.6 defaults to ``weights_only=True``, which refuses
   the pickled ``argparse.Namespace`` and numpy scalars): allow exactly those globals.
   Relies on: ``torch.serialization.add_safe_globals``.
2. Remainder batches (``fairseq.data.data_utils.batch_by_size``): fairseq after 0.12.2 silently drops
   the last batch whose size is not a multiple of ``--required-batch-size-multiple`` (fairseq-generate
   translated 16 of 21 test sentences); we keep it, as 0.12.2 and the authors' 0.9.0 did.
3. Checkpoints (``fairseq.checkpoint_utils.PathManager.copy``, ``load_checkpoint_to_cpu``,
   ``_upgrade_state_dict`` and ``BaseFairseqModel.load_state_dict``): fairseq copies a saved checkpoint
   onto ``checkpoint_last.pt``/``checkpoint_best.pt`` in place, so a kill mid-copy leaves a truncated
   file; the copies become atomic, and every checkpoint is checked (zip directory and CRCs) before it
   is loaded: a damaged one is a :class:`CheckpointError`. A checkpoint of the authors' fairseq-0.9
   fork is converted on load (authors.py), and a B2T checkpoint is refused by a model that is not B2T
   (it would silently run as Post-LN).
4. ``collective_timeout(seconds)`` (not applied at import; the torchrun launcher calls it for
   ``--heartbeat-timeout``): ``torch.distributed.init_process_group``/``new_group`` get that timeout,
   so a worker blocked in a gloo collective fails instead of waiting torch's default 30 minutes.
"""


import argparse
import datetime
import functools
import logging
import os
import pickle
import shutil
import zipfile
import zlib

import numpy as np
import torch

from .errors import B2TError
from .util import atomic_open

logger = logging.getLogger(__name__)


# --- 1. torch.load of fairseq checkpoints -----------------------------------------------------

def _numpy_globals():
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


# --- 2. remainder batches ----------------------------------------------------------------------

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


# --- 3. checkpoints that survive a kill -------------------------------------------------------




class CheckpointError(B2TError):
    """A checkpoint file that cannot be read; ``path`` names it, ``reason`` says why.

    ``kind`` is "corrupt" (truncated or damaged bytes) or "unsafe" (torch's weights-only loader
    refuses an object in it); the console commands add the fix that fits their flags.
    """

    def __init__(self, path, reason, kind="corrupt"):
        self.path, self.reason, self.kind = path, reason, kind
        super().__init__(f"checkpoint {path} cannot be read ({reason})")


def atomic_copy(src, dst):
    """Copy src to dst so that dst is, at every moment, either the old file or the complete new one."""
    with open(src, "rb") as fsrc, atomic_open(dst, "wb") as fdst:
        shutil.copyfileobj(fsrc, fdst, 1 << 20)
    return True


# what torch.save writes first in its pre-1.6 (non-zip) format: a pickled magic number
_LEGACY_MAGIC = bytes.fromhex("80028a0a6cfc9c46f9206aa85019")


def find_damage(path):
    """Why the file at path is not an intact torch checkpoint, or None if it looks intact.

    torch.save writes a zip archive with a CRC per record; torch.load checks neither the CRCs nor,
    for some truncations, the length, so a damaged file can load and give a silently broken model.
    Reading the archive once more costs about as long as the CRC of its size (~1 s a GB).
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(len(_LEGACY_MAGIC))
    if head == _LEGACY_MAGIC:
        return None  # an old non-zip checkpoint: nothing to check it with
    if not zipfile.is_zipfile(path):
        return f"truncated or not a checkpoint: {size} bytes without a zip directory"
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, EOFError, OSError, zlib.error, ValueError) as e:
        return f"damaged zip archive, {size} bytes: {e}"
    return f"corrupt: CRC mismatch in {bad}" if bad else None


_loading = []  # the checkpoint path being loaded (for messages from the upgrade hook)
_layer_type_of = {}  # id(state["model"]) -> layer type of the checkpoint it came from ('b2t', 'pre', 'post')


def _readable(load):
    def load_checkpoint_to_cpu(path, *args, **kwargs):
        local = os.path.expanduser(path)
        damage = find_damage(local) if os.path.isfile(local) else None
        if damage:
            raise CheckpointError(path, damage)
        _loading.append(path)
        try:
            return load(path, *args, **kwargs)
        except pickle.UnpicklingError as e:
            if "Weights only load failed" not in str(e):
                raise
            raise CheckpointError(path, "torch.load(weights_only=True) refuses an object in it: not a fairseq "
                                        "checkpoint, or one from an untrusted source", kind="unsafe") from e
        finally:
            _loading.pop()

    load_checkpoint_to_cpu.b2t_wrapped = True
    return load_checkpoint_to_cpu


def _importing(upgrade):
    """fairseq's checkpoint upgrade, preceded by the conversion of the authors' fork checkpoints."""
    def _upgrade_state_dict(state):
        from . import authors as imp

        where = f"checkpoint {_loading[-1]}" if _loading else "the checkpoint"
        if imp.is_fork_checkpoint(state):
            state = imp.convert_state(state, where=where)
            logger.info("%s: converted from the authors' fairseq-0.9 fork (%s)", where, state["args"].b2t_imported_from)
        state = upgrade(state)
        if isinstance(state.get("model"), dict):
            if len(_layer_type_of) > 8:  # ids of dicts long gone: keep the table small
                _layer_type_of.clear()
            _layer_type_of[id(state["model"])] = (imp.layer_type_of_state(state), where)
        return state

    _upgrade_state_dict.b2t_wrapped = True
    return _upgrade_state_dict


def _model_layer_type(model):
    """The layer type of a built model: 'b2t', 'deepnorm', 'admin', 'pre', 'post', or None if mixed/unknown."""
    from .layers import (AdminDecoderLayer, AdminEncoderLayer, B2TDecoderLayer, B2TEncoderLayer,
                         DeepNormDecoderLayer, DeepNormEncoderLayer)

    kinds = {B2TEncoderLayer: "b2t", B2TDecoderLayer: "b2t", DeepNormEncoderLayer: "deepnorm",
             DeepNormDecoderLayer: "deepnorm", AdminEncoderLayer: "admin", AdminDecoderLayer: "admin"}
    types = set()
    for m in model.modules():
        if type(m) in kinds:
            types.add(kinds[type(m)])
        elif hasattr(m, "normalize_before") and hasattr(m, "final_layer_norm"):
            types.add("pre" if m.normalize_before else "post")
    return types.pop() if len(types) == 1 else None


LABEL = {"b2t": "B2T", "deepnorm": "DeepNorm", "admin": "Admin", "pre": "Pre-LN", "post": "Post-LN"}


def _b2t_guard(load_state_dict):
    """Refuse a B2T (or DeepNorm, Admin) checkpoint's weights for a model of another layer type: the
    parameter names are the same, so it would load silently and run as the wrong model. (A Post-LN
    checkpoint may still initialize another layer type, e.g. to fine-tune it as B2T.)"""
    def guarded_load_state_dict(self, state_dict, *args, **kwargs):
        ckpt_type, where = _layer_type_of.pop(id(state_dict), (None, None))
        if ckpt_type in ("b2t", "deepnorm", "admin"):
            model_type = _model_layer_type(self)
            if model_type not in (None, ckpt_type):
                fix = ("pass --arch transformer_b2t (or the authors' --arch transformer_wmt_en_de "
                       "--residual-bottom-to-top with b2t-train), and convert a checkpoint of the authors' fork "
                       "once with b2t-import-checkpoint IN.pt OUT.pt") if ckpt_type == "b2t" else \
                      f"pass --arch transformer_{ckpt_type} (or --ln-position {ckpt_type})"
                raise B2TError(f"{where} holds a {LABEL[ckpt_type]} model but the model built from the command "
                               f"line is {LABEL[model_type]}, so it would run as the wrong model; {fix}")
        return load_state_dict(self, state_dict, *args, **kwargs)

    guarded_load_state_dict.b2t_wrapped = True
    return guarded_load_state_dict


def safe_checkpoints():
    """Make fairseq's checkpoint copies atomic and its checkpoint load errors one line (idempotent)."""
    from fairseq import checkpoint_utils
    from fairseq.file_io import PathManager

    if not getattr(checkpoint_utils.PathManager, "b2t_atomic", False):
        class AtomicCopyPathManager(PathManager):
            b2t_atomic = True

            @staticmethod
            def copy(src_path, dst_path, overwrite=False):
                if not PathManager.supports_rename(dst_path):  # remote storage: keep fairseq's way
                    return PathManager.copy(src_path, dst_path, overwrite=overwrite)
                return atomic_copy(src_path, dst_path)

        checkpoint_utils.PathManager = AtomicCopyPathManager
    if not getattr(checkpoint_utils.load_checkpoint_to_cpu, "b2t_wrapped", False):
        checkpoint_utils.load_checkpoint_to_cpu = _readable(checkpoint_utils.load_checkpoint_to_cpu)
    if not getattr(checkpoint_utils._upgrade_state_dict, "b2t_wrapped", False):
        checkpoint_utils._upgrade_state_dict = _importing(checkpoint_utils._upgrade_state_dict)
    from fairseq.models.fairseq_model import BaseFairseqModel

    if not getattr(BaseFairseqModel.load_state_dict, "b2t_wrapped", False):
        BaseFairseqModel.load_state_dict = _b2t_guard(BaseFairseqModel.load_state_dict)

# --- 4. collective timeout (for the torchrun launcher) ----------------------------------------

def collective_timeout(seconds):
    """Make the process groups of this process (fairseq's default one and the data-parallel group
    it creates with new_group) time out after this many seconds instead of torch's default."""
    import torch.distributed as dist

    def with_timeout(make):
        if getattr(make, "b2t_timeout", None) is not None:
            make = make.b2t_original

        def make_group(*args, **kwargs):
            if kwargs.get("timeout") is None:
                kwargs["timeout"] = datetime.timedelta(seconds=seconds)
            return make(*args, **kwargs)
        make_group.b2t_timeout, make_group.b2t_original = seconds, make
        return make_group

    dist.init_process_group = with_timeout(dist.init_process_group)
    dist.new_group = with_timeout(dist.new_group)


def apply():
    """Apply repairs 1-3 (idempotent); called when the plugin is imported."""
    allow_fairseq_checkpoints()
    keep_remainder_batches()
    safe_checkpoints()
