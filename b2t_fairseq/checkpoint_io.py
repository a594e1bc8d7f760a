"""Checkpoint files that survive a kill or a Ctrl-C: atomic saves and copies, and a damage check.

Used by the plugin's checkpoint patches (patches/atomic_checkpoints.py, patches/checkpoint_load.py)
and by the tools that read or write checkpoints (b2t_tools/checkpoints.py).
"""

import contextlib
import os
import shutil
import signal
import threading
import zipfile
import zlib

TMP_SUFFIX = ".tmp"  # fairseq's own name for a checkpoint being written


@contextlib.contextmanager
def honest_interrupts():
    """Let Ctrl-C during the block end as a KeyboardInterrupt, whatever the block turns it into.

    torch's zip writer calls the file's write() from C++ and reports a KeyboardInterrupt raised there
    as a RuntimeError; fairseq's torch_persistent_save then retries on the same half-written handle.
    Here a SIGINT is noted as it arrives, and the block's exception (or its normal end) is replaced
    by the KeyboardInterrupt the user asked for.
    """
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or not callable(previous):
        yield  # SIG_IGN/SIG_DFL, or not the main thread: nothing to note
        return
    hit = []

    def note(signum, frame):
        hit.append(signum)
        previous(signum, frame)  # Python's default raises KeyboardInterrupt here

    signal.signal(signal.SIGINT, note)
    try:
        yield
    except KeyboardInterrupt:
        raise
    except BaseException:
        if hit:  # the writer's error was the interrupt: say only that (as Python's traceback would)
            raise KeyboardInterrupt from None
        raise
    finally:
        signal.signal(signal.SIGINT, previous)
    if hit:  # swallowed entirely by the block
        raise KeyboardInterrupt


def _fsync_dir(path):
    with contextlib.suppress(OSError):
        fd = os.open(os.path.dirname(os.path.abspath(path)) or ".", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_output(path, tmp=None):
    """Write a file at ``tmp`` (default ``path.tmp``), fsync it and rename it over ``path``.

    ``path`` is at every moment the old file or the complete new one, under any signal; an error or
    Ctrl-C removes the partial file and leaves ``path`` untouched. The folder is created if missing.
    """
    path = os.fspath(path)
    tmp = tmp or path + TMP_SUFFIX
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with honest_interrupts():
        try:
            with open(tmp, "wb") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise
        os.replace(tmp, path)
    _fsync_dir(path)


def save(obj, path):
    """torch.save(obj) to path atomically (see :func:`atomic_output`), Ctrl-C honoured."""
    import torch

    with atomic_output(path) as f:
        torch.save(obj, f)


def atomic_copy(src, dst):
    """Copy src to dst so that dst is, at every moment, either the old file or the complete new one."""
    with open(src, "rb") as fsrc, atomic_output(dst, tmp=f"{dst}.tmp{os.getpid()}") as fdst:
        shutil.copyfileobj(fsrc, fdst, 1 << 20)
    return True


# what torch.save writes first in its pre-1.6 (non-zip) format: a pickled magic number
_LEGACY_MAGIC = bytes.fromhex("80028a0a6cfc9c46f9206aa85019")
_ZIP_LOCAL_HEADER = b"PK\x03\x04"


def find_damage(path):
    """Why the file at path is not an intact torch checkpoint, or None if it looks intact.

    torch.save writes one zip archive, from byte 0, with a CRC per record; torch.load checks neither
    the CRCs nor, for some truncations, the length, and Python's zipfile accepts bytes before an
    archive (a retried save that appended a second archive to a half-written one). Reading the
    archive once more costs about as long as the CRC of its size (~1 s a GB).
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
            first = min((i.header_offset for i in z.infolist()), default=0)
            if first != 0 or not head.startswith(_ZIP_LOCAL_HEADER):
                return (f"damaged: {first or 'some'} bytes before its zip archive (a save interrupted and "
                        "written again on top of the partial file)")
            bad = z.testzip()
    except (zipfile.BadZipFile, EOFError, OSError, zlib.error, ValueError) as e:
        return f"damaged zip archive, {size} bytes: {e}"
    return f"corrupt: CRC mismatch in {bad}" if bad else None
