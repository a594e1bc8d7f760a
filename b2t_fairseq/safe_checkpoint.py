"""Checkpoints that survive a kill, and a clear error for one that did not.

fairseq writes the first checkpoint of a save atomically (``torch.save`` to ``NAME.tmp``, then a
rename), but then *copies* it to the other names of that save (``checkpoint_best.pt``,
``checkpoint_last.pt``) with a plain ``shutil.copyfile``: a process killed during that copy leaves
a truncated ``checkpoint_last.pt``, and the next run, which resumes from it, cannot start.
``install()`` makes those copies atomic too (copy to ``NAME.tmp``, then rename over the old file),
and checks every checkpoint before ``torch.load`` reads it (zip directory and CRCs): a truncated or
damaged file becomes a :class:`CheckpointError` that names it, instead of a traceback or, worse,
a model with silently broken weights. Nothing in fairseq's files is changed: ``install`` swaps two names inside
``fairseq.checkpoint_utils`` once per process.
"""

import os
import pickle
import shutil
import zipfile
import zlib

from .errors import B2TError


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


def _readable(load):
    def load_checkpoint_to_cpu(path, *args, **kwargs):
        local = os.path.expanduser(path)
        damage = find_damage(local) if os.path.isfile(local) else None
        if damage:
            raise CheckpointError(path, damage)
        try:
            return load(path, *args, **kwargs)
        except pickle.UnpicklingError as e:
            if "Weights only load failed" not in str(e):
                raise
            raise CheckpointError(path, "torch.load(weights_only=True) refuses an object in it: not a fairseq "
                                        "checkpoint, or one from an untrusted source", kind="unsafe") from e

    load_checkpoint_to_cpu.b2t_wrapped = True
    return load_checkpoint_to_cpu


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
