"""Checkpoints that survive a kill, and a clear error for one that did not.

fairseq writes the first checkpoint of a save atomically (``torch.save`` to ``NAME.tmp``, then a
rename), but then *copies* it to the other names of that save (``checkpoint_best.pt``,
``checkpoint_last.pt``) with a plain ``shutil.copyfile``: a process killed during that copy leaves
a truncated ``checkpoint_last.pt``, and the next run, which resumes from it, cannot start.
``install()`` makes those copies atomic too (copy to ``NAME.tmp``, then rename over the old file),
and checks every checkpoint before ``torch.load`` reads it (zip directory and CRCs): a truncated or
damaged file becomes a :class:`CheckpointError` that names it, instead of a traceback or, worse,
a model with silently broken weights. It also converts checkpoints of the authors' fairseq-0.9 fork
when fairseq loads them (commands/import_checkpoint.py), and refuses to load a B2T checkpoint into a
model that is not B2T (e.g. ``--restore-file`` into stock ``transformer_wmt_en_de``). Nothing in
fairseq's files is changed: ``install`` swaps three names inside ``fairseq.checkpoint_utils`` and wraps
``BaseFairseqModel.load_state_dict``, once per process.
"""

import logging
import os
import pickle
import shutil
import zipfile
import zlib

from .errors import B2TError

logger = logging.getLogger(__name__)


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
    tmp = f"{dst}.tmp"
    shutil.copyfile(src, tmp)
    with open(tmp, "rb+") as f:  # on disk before the rename, so a node crash cannot leave a hole either
        os.fsync(f.fileno())
    os.replace(tmp, dst)
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
        from .commands import import_checkpoint as imp

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
    from .layers import B2TDecoderLayer, B2TEncoderLayer

    types = set()
    for m in model.modules():
        if isinstance(m, (B2TEncoderLayer, B2TDecoderLayer)):
            return "b2t"
        if hasattr(m, "normalize_before") and hasattr(m, "final_layer_norm"):
            types.add("pre" if m.normalize_before else "post")
    return types.pop() if len(types) == 1 else None


def _b2t_guard(load_state_dict):
    """Refuse a B2T checkpoint's weights for a model whose layers are not B2T (it would run as Post-LN)."""
    def guarded_load_state_dict(self, state_dict, *args, **kwargs):
        ckpt_type, where = _layer_type_of.pop(id(state_dict), (None, None))
        if ckpt_type == "b2t":
            model_type = _model_layer_type(self)
            if model_type not in (None, "b2t"):
                raise B2TError(f"{where} holds a B2T model (residual_bottom_to_top=True) but the model built from "
                               f"the command line is {'Pre' if model_type == 'pre' else 'Post'}-LN, so it would run "
                               "as the wrong model; pass --arch transformer_b2t (or the authors' --arch "
                               "transformer_wmt_en_de --residual-bottom-to-top with b2t-train), and convert a "
                               "checkpoint of the authors' fork once with b2t-import-checkpoint IN.pt OUT.pt")
        return load_state_dict(self, state_dict, *args, **kwargs)

    guarded_load_state_dict.b2t_wrapped = True
    return guarded_load_state_dict


def install():
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
