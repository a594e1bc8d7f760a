"""Repair: checkpoint saves and copies are atomic under every signal, and Ctrl-C during one ends the run.

fairseq saves ``checkpointN.pt`` through ``torch_persistent_save`` and copies it onto
``checkpoint_last.pt``/``checkpoint_best.pt`` in place. A kill mid-copy left a truncated
``checkpoint_last.pt``; a Ctrl-C mid-save reached torch's zip writer, which reports it as a
RuntimeError, and fairseq retried on the same half-written handle: a file of two archives that
torch cannot load, and a run that went on as if nothing had happened. Now both write a new file,
fsync it and rename it into place (checkpoint_io.py); an interrupted save leaves the old file and
ends the run with the KeyboardInterrupt. Remote storage (no rename) keeps fairseq's own way.
Relies on: ``fairseq.checkpoint_utils.torch_persistent_save(obj, filename, async_write=False)`` and
``checkpoint_utils.PathManager.copy``/``supports_rename`` (``fairseq.file_io.PathManager``), both
looked up as module attributes when fairseq saves.
"""

import functools

from .. import checkpoint_io


def install():
    from fairseq import checkpoint_utils
    from fairseq.file_io import PathManager

    if not getattr(checkpoint_utils.PathManager, "b2t_atomic", False):
        class AtomicCopyPathManager(PathManager):
            b2t_atomic = True

            @staticmethod
            def copy(src_path, dst_path, overwrite=False):
                if not PathManager.supports_rename(dst_path):  # remote storage: keep fairseq's way
                    return PathManager.copy(src_path, dst_path, overwrite=overwrite)
                return checkpoint_io.atomic_copy(src_path, dst_path)

        checkpoint_utils.PathManager = AtomicCopyPathManager

    save = checkpoint_utils.torch_persistent_save
    if not getattr(save, "b2t_wrapped", False):
        @functools.wraps(save)
        def torch_persistent_save(obj, filename, async_write=False):
            if async_write or not isinstance(filename, str) or not PathManager.supports_rename(filename):
                return save(obj, filename, async_write=async_write)
            checkpoint_io.save(obj, filename)

        torch_persistent_save.b2t_wrapped = True
        checkpoint_utils.torch_persistent_save = torch_persistent_save
