"""Checkpoint files as the tools see them: which ones a folder holds, how far a run got, their fingerprints.

Nothing here imports torch, so the text-only commands (the results table) can check provenance; the
tools that load checkpoints do it through :func:`read_checkpoint`, which does.
"""

import os
import re
import zipfile

from .errors import ToolError
from .util import file_digest, json_digest

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


def fingerprint(path):
    """A content fingerprint of a checkpoint file that costs a few KB of reading whatever its size.

    torch.save writes a zip archive whose directory holds every record's name, size and CRC-32: their
    SHA-256 (with the file size) changes whenever any byte of any tensor or of the pickled state
    changes, survives copying and renaming (unlike size + mtime), and costs milliseconds where a
    SHA-256 of the whole file costs seconds per GB (10 inputs of an 18-layer run at every check).
    CRC-32 guards against accidents, not forgery. Old (non-zip) files get a SHA-256 of their bytes.
    """
    size = os.path.getsize(path)
    try:
        with zipfile.ZipFile(path) as z:
            entries = [(i.filename, i.file_size, i.CRC) for i in z.infolist()]
        return "zipcrc:" + json_digest([size, entries], 32)
    except (zipfile.BadZipFile, EOFError, ValueError):
        return "sha256:" + file_digest(path, n=32)


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
