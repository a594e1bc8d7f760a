"""The ``--dest`` folder of a prepare command: built beside it, renamed onto it, and replaced only when the
command's own marker file inside says the command made it and lists every file in it (never another
corpus, never a file someone put there since).

``b2t-wmt-prepare`` and ``b2t-lm-prepare`` share it: each names its marker and how it binarizes.
"""

import json
import os
import shutil
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

from .errors import ToolError

BIN = os.path.dirname(sys.executable)  # where fairseq-preprocess lives (the venv's bin)


def _entries(folder):
    """{relative path: size (None for a folder; a link counts as a changed file)} of everything under folder."""
    out = {}
    for root, dirs, files in os.walk(folder):  # links to folders are listed, not followed
        for name in dirs + files:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, folder)
            out[rel] = -1 if os.path.islink(path) else (None if name in dirs else os.path.getsize(path))
    return out


class OwnedDest:
    """prog: the command; marker: the file it writes in every --dest, listing what it wrote; legacy(folder,
    work) -> bool: whether a folder written before markers existed is known to be the command's (its stage
    record names it); names: a regex of the relative paths the command writes, for a folder whose marker lists
    no files (an older marker, a partial build)."""

    def __init__(self, prog, marker, legacy=None, names=None):
        self.prog, self.marker, self.legacy, self.names = prog, marker, legacy, names

    def ours(self, folder, work=None):
        folder = Path(folder)
        if (folder / self.marker).is_file():
            return True
        return bool(self.legacy and work is not None and self.legacy(folder, work))

    def foreign(self, folder):
        """What in our folder we did not write: files not in the marker's list, or changed since (other size,
        now a link); with no list, paths that are not ours by name."""
        try:
            listed = json.loads((Path(folder) / self.marker).read_text()).get("files")
        except (OSError, ValueError, AttributeError):
            listed = None
        out = []
        for rel, size in sorted(_entries(folder).items()):
            if rel == self.marker:
                continue
            if isinstance(listed, dict):
                if rel not in listed:
                    out.append(rel)
                elif listed[rel] != size:
                    out.append(f"{rel} (changed)")
            elif self.names is None or size == -1 or not self.names.fullmatch(rel.replace(os.sep, "/")):
                out.append(rel)
        return out

    def check_replaceable(self, folder, flag, work=None):
        """work: a folder whose stage record may name folder as its --dest (True: already found to be ours)."""
        folder = Path(folder)
        if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
            raise ToolError(f"{flag} {folder} is {'a link' if folder.is_symlink() else 'a file'}, not a folder; "
                            "choose a new folder for the binarized data")
        if folder.is_dir() and any(folder.iterdir()) and work is not True and not self.ours(folder, work):
            raise ToolError(f"{flag} {folder} holds files that {self.prog} did not write (no {self.marker}); it is "
                            "not replaced: choose a new or empty --dest, or move that folder away")
        other = self.foreign(folder) if folder.is_dir() else []
        if other:  # ours, but someone's files were put in it since (or ours edited): never deleted
            shown = ", ".join(other[:3]) + (f" and {len(other) - 3} more" if len(other) > 3 else "")
            raise ToolError(f"{flag} {folder} holds files that {self.prog} did not write ({shown}); it is not "
                            f"replaced: move them out of {folder}, or choose another --dest")

    def check_places(self, work, dest):
        """--work and --dest: folders (or to be made), apart from each other, checked before anything is written.
        Returns whether dest is already known to be ours (the stages may drop the record that says so)."""
        for flag, path in (("--work", work), ("--dest", dest)):
            for p in [path, *path.parents]:
                if p.exists() and not p.is_dir():
                    where = "is a file" if p == path else f"is under the file {p}"
                    raise ToolError(f"{flag} {path} {where}; pass a folder (it is made if missing)")
        w, d = work.resolve(), dest.resolve()
        if w == d or w in d.parents or d in w.parents:
            how = "is" if w == d else ("is inside" if w in d.parents else "contains")
            raise ToolError(f"--dest {dest} {how} --work {work}; the binarized data replaces --dest as a whole, so "
                            "it must lie apart from the downloads and the text files: choose another --dest")
        self.check_replaceable(dest, "--dest", work)
        try:  # the binarized data is built beside --dest and renamed onto it: its folder must be writable
            dest.parent.mkdir(parents=True, exist_ok=True)
            probe = dest.parent / f".{dest.name}.b2t-probe"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise ToolError(f"cannot write in {dest.parent} ({e.strerror or e}); pass a --dest you can write "
                            "to") from None
        return self.ours(dest, work)

    def begin(self, dest, record, work=None):
        """A fresh DEST.partial with the marker in it, where the binarized data is built."""
        dest = Path(dest)
        tmp = dest.with_name(dest.name + ".partial")
        self.check_replaceable(dest, "--dest", work)
        self.check_replaceable(tmp, "--dest's work folder")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        (tmp / self.marker).write_text(json.dumps(dict(record, made_by=self.prog), indent=1) + "\n")
        return tmp

    def commit(self, tmp, dest, work=None):
        """Record in the marker every file built in tmp (what a later run may replace), then rename tmp onto dest."""
        marker = Path(tmp) / self.marker
        record = json.loads(marker.read_text())
        record["files"] = {rel: size for rel, size in _entries(tmp).items() if rel != self.marker}
        marker.write_text(json.dumps(record, indent=1) + "\n")
        self.check_replaceable(dest, "--dest", work)  # again: another program may have filled it meanwhile
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)


def check_workers(workers):
    """--workers: each stage starts this many processes (a million would exhaust the machine)."""
    if workers < 1:
        raise ToolError(f"--workers {workers}: must be at least 1; pass the number of processes (default: the "
                        "number of CPUs)")
    most = 4 * (os.cpu_count() or 1) if (os.cpu_count() or 1) > 2 else 8
    if workers > most:
        raise ToolError(f"--workers {workers} is more processes than this machine's {os.cpu_count()} CPUs can "
                        f"use; pass at most {most} (default: the number of CPUs)")


@contextmanager
def _children_stopped_on_signals():
    """SIGTERM and SIGHUP end the children like Ctrl-C does (then KeyboardInterrupt: exit 130, one line); the
    handlers in place before are restored after, and the stop cleared once the children are ended."""
    from .demo import children

    main = threading.current_thread() is threading.main_thread()  # where signal handlers can be set
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)} if main else {}
    children.install_stop_handlers()
    try:
        yield children
    finally:
        for s, h in saved.items():
            signal.signal(s, h)
        children.STOPPING.clear()


def preprocess(flags, tmp, workers, log):
    """fairseq-preprocess FLAGS into tmp (the folder begin() made); its last error line becomes ours. The child
    (and its workers, one process group) dies with this process: killed, stopped or interrupted."""
    cmd = [os.path.join(BIN, "fairseq-preprocess"), *flags, "--destdir", str(tmp), "--workers", str(max(1, workers))]
    log("binarize: " + " ".join(cmd))
    with _children_stopped_on_signals() as children:
        try:
            p = children.run(cmd)
        except children.Stopped:
            raise KeyboardInterrupt from None
    if p.returncode != 0:
        tail = (p.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise ToolError(f"fairseq-preprocess failed ({tail}); fix it and re-run (finished stages are kept)")
