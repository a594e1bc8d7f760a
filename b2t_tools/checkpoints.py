"""Checkpoint files as the tools see them: which ones a folder holds, how far a run got, their fingerprints.

Nothing here imports torch at module import, so the text-only commands (the results table) can check
provenance; every tool that loads a checkpoint does it through :func:`read_checkpoint` (which imports
torch and the plugin when called) and reads how far its run got with :func:`position`.
"""

import errno
import hashlib
import os
import re
import zipfile

from .errors import ToolError
from .util import json_digest

EPOCH_RE = re.compile(r"^checkpoint(\d+)\.pt$")
UPDATE_RE = re.compile(r"^checkpoint_\d+_(\d+)\.pt$")


def last_checkpoints(folder, n, by_update=False, upper_bound=None, at_most=False):
    """Paths of the newest n epoch (or update) checkpoints in folder, newest first (fewer than n only with
    at_most, else an error)."""
    if not os.path.isdir(folder):
        what = "is a file, not a folder" if os.path.exists(folder) else "does not exist"
        raise ToolError(f"checkpoint folder {folder} {what}; pass the --save-dir of a training run")
    pattern = UPDATE_RE if by_update else EPOCH_RE
    found = []
    for name in os.listdir(folder):
        m = pattern.match(name)
        if m and (upper_bound is None or int(m.group(1)) <= upper_bound) and \
                os.path.isfile(os.path.join(folder, name)):
            found.append((int(m.group(1)), os.path.join(folder, name)))
    found.sort(reverse=True)
    kind = "update" if by_update else "epoch"
    if len(found) < n and not at_most:
        raise ToolError(f"{folder} has {len(found)} {kind} checkpoint(s), {n} needed; lower "
                       f"--num-{kind}-checkpoints or train longer (or save more: --keep-last-epochs, "
                       "--save-interval-updates)")
    return [path for _, path in found[:n]]


def check_checkpoint_file(path, flag="--inputs"):
    """Refuse a path that is not a regular, non-empty file (one line naming the fix)."""
    if os.path.isdir(path):
        raise ToolError(f"{flag} {path} is a folder, not a checkpoint file; pass a .pt file (or, for "
                       "b2t-average-checkpoints, the folder with --num-epoch-checkpoints N)")
    if not os.path.isfile(path):
        raise ToolError(f"checkpoint {path} does not exist; check the path")
    if os.path.getsize(path) == 0:
        raise ToolError(f"checkpoint {path} is empty (0 bytes); it was not written completely: delete it "
                       "and use another checkpoint")


def read_checkpoint(path, fix, flag="--inputs", mmap=False, verify=True):
    """The dict of a fairseq checkpoint file, or a ToolError ``cannot read checkpoint PATH (why); FIX``.

    Read with torch's safe (weights-only) loader; the plugin's import allows the few globals fairseq
    checkpoints pickle. ``verify`` first checks the zip archive and its CRCs (b2t_fairseq's
    find_damage: torch.load checks neither, so flipped bytes would load silently; ~1 s a GB);
    ``mmap`` maps the tensors instead of reading them (cheap for a look at the training state).
    """
    check_checkpoint_file(path, flag)
    from b2t_fairseq.checkpoint_io import find_damage

    damage = find_damage(path) if verify else None
    if damage:
        raise ToolError(f"cannot read checkpoint {path} ({damage}: it is truncated or corrupt); {fix}")
    mmap = mmap and zipfile.is_zipfile(path)  # old non-zip checkpoints cannot be memory-mapped
    return _load(path, path, fix, mmap)


def read_checkpoint_once(path, fix, flag="--inputs", gone=None):
    """(state, fingerprint) of one open file: both come from the same handle, so a file replaced by a
    training run in between (checkpoint_last.pt, rotated epoch files) cannot pair the weights of one
    update with the fingerprint of another. ``gone``: the message for a file removed before it could be
    opened (default: the "does not exist" one)."""
    if gone and not os.path.exists(path):
        raise ToolError(gone)
    check_checkpoint_file(path, flag)
    from b2t_fairseq.checkpoint_io import find_damage

    for _ in range(3):  # the damage check reads by path: retry when the path was replaced meanwhile
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            raise ToolError(gone or f"checkpoint {path} does not exist; check the path") from None
        with f:
            st = os.fstat(f.fileno())
            fp = _fingerprint_handle(f, st.st_size)
            try:
                damage = find_damage(path)
                now = os.stat(path)
            except FileNotFoundError:
                now = None
            if now is None or (now.st_ino, now.st_dev, now.st_size, now.st_mtime_ns) != \
                    (st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns):
                continue  # replaced between open and the check: read the new one
            if damage:
                raise ToolError(f"cannot read checkpoint {path} ({damage}: it is truncated or corrupt); {fix}")
            f.seek(0)
            return _load(f, path, fix, mmap=False), fp
    raise ToolError(f"checkpoint {path} kept changing while it was read (a training run is saving it); "
                    "re-run when the run has saved it")


def _load(source, path, fix, mmap):
    import pickle

    import torch

    try:
        state = torch.load(source, map_location="cpu", weights_only=True, **({"mmap": True} if mmap else {}))
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):
            raise ToolError(f"cannot read checkpoint {path} (UnpicklingError: {_first_line(e)}: it is truncated or "
                            f"corrupt); {fix}") from None
        raise ToolError(f"cannot read checkpoint {path} (torch's weights-only loader refuses an object in it: not a "
                        f"fairseq checkpoint, or one from an untrusted source); {fix}") from None
    except Exception as e:  # noqa: BLE001 - truncated zip, wrong magic ...: one line
        raise ToolError(f"cannot read checkpoint {path} ({type(e).__name__}: {_first_line(e)}: it is truncated or "
                        f"corrupt); {fix}") from None
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise ToolError(f"{path} is not a fairseq checkpoint (no 'model' state dict); pass checkpoints written "
                        "by b2t-train / fairseq-train")
    return state


def write_checkpoint(state, path, flag):
    """checkpoint_io.save (atomic: path keeps its old content on any failure), with a full disk, a
    file-size limit or torch's zip writer failing on either ("unexpected pos") as one line."""
    from b2t_fairseq import checkpoint_io

    try:
        checkpoint_io.save(state, path)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            raise ToolError(f"cannot write {flag} {path} ({e.strerror or e}: the disk is full or a file-size limit "
                            f"was hit; {path} is unchanged); free some space, raise the limit (ulimit -f) or "
                            f"choose another {flag}") from None
        raise ToolError(f"cannot write {flag} {path} ({e.strerror or e}; it is unchanged); choose another {flag}"
                        ) from None
    except RuntimeError as e:
        if "unexpected pos" not in str(e) and "failed writing" not in str(e):
            raise
        raise ToolError(f"cannot write {flag} {path} (torch's writer stopped: {_first_line(e)}; the disk is likely "
                        f"full or a file-size limit was hit; {path} is unchanged); free some space, raise the limit "
                        f"(ulimit -f) or choose another {flag}") from None


def run_id(state):
    """The training run a loaded checkpoint belongs to (extra_state['b2t_run'], written by the plugin's
    run_identity patch), or None for checkpoints saved without it."""
    extra = state.get("extra_state")
    rid = extra.get("b2t_run") if isinstance(extra, dict) else None
    return rid if isinstance(rid, str) and rid else None


def _fingerprint_handle(f, size):
    try:
        f.seek(0)
        with zipfile.ZipFile(f) as z:
            entries = [(i.filename, i.file_size, i.CRC) for i in z.infolist()]
        return "zipcrc:" + json_digest([size, entries], 32)
    except (zipfile.BadZipFile, EOFError, ValueError):
        f.seek(0)
        h = hashlib.sha256()
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
        return "sha256:" + h.hexdigest()[:32]


def _first_line(e):
    return ((str(e).strip().splitlines() or [type(e).__name__])[0])[:200]


def fingerprint(path):
    """A content fingerprint of a checkpoint file that costs a few KB of reading whatever its size.

    torch.save writes a zip archive whose directory holds every record's name, size and CRC-32: their
    SHA-256 (with the file size) changes whenever any byte of any tensor or of the pickled state
    changes, survives copying and renaming (unlike size + mtime), and costs milliseconds where a
    SHA-256 of the whole file costs seconds per GB (10 inputs of an 18-layer run at every check).
    CRC-32 guards against accidents, not forgery. Old (non-zip) files get a SHA-256 of their bytes.
    """
    with open(path, "rb") as f:
        return _fingerprint_handle(f, os.fstat(f.fileno()).st_size)


def position(state, path=None):
    """(epoch, update number) a loaded checkpoint was saved at; None where it does not say."""
    updates = None
    history = state.get("optimizer_history")
    if isinstance(history, list) and history and isinstance(history[-1], dict):
        updates = history[-1].get("num_updates")
    extra = state.get("extra_state") if isinstance(state.get("extra_state"), dict) else {}
    itr = extra.get("train_iterator") if isinstance(extra.get("train_iterator"), dict) else {}
    epoch = itr.get("epoch", extra.get("epoch"))
    if updates is None and path is not None:
        m = UPDATE_RE.match(os.path.basename(path))
        updates = int(m.group(1)) if m else None
    return epoch, updates


def identity(sources):
    """What decides whether an average is current: its inputs' names and fingerprints, in order."""
    return [[s.get("name"), s.get("fingerprint")] for s in sources]
