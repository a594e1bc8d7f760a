"""The ``--dest`` folder of a prepare command: built beside it, renamed onto it, and replaced only when the
command's own marker file inside says the command made it (never another corpus, never someone's files).

``b2t-wmt-prepare`` and ``b2t-lm-prepare`` share it: each names its marker and how it binarizes.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from .errors import ToolError


class OwnedDest:
    """prog: the command; marker: the file it writes in every --dest; legacy(folder, work) -> bool: whether a
    folder written before markers existed is known to be the command's (its stage record names it)."""

    def __init__(self, prog, marker, legacy=None):
        self.prog, self.marker, self.legacy = prog, marker, legacy

    def ours(self, folder, work=None):
        folder = Path(folder)
        if (folder / self.marker).is_file():
            return True
        return bool(self.legacy and work is not None and self.legacy(folder, work))

    def check_replaceable(self, folder, flag, work=None):
        """work: a folder whose stage record may name folder as its --dest (True: already found to be ours)."""
        folder = Path(folder)
        if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
            raise ToolError(f"{flag} {folder} is {'a link' if folder.is_symlink() else 'a file'}, not a folder; "
                            "choose a new folder for the binarized data")
        if folder.is_dir() and any(folder.iterdir()) and work is not True and not self.ours(folder, work):
            raise ToolError(f"{flag} {folder} holds files that {self.prog} did not write (no {self.marker}); it is "
                            "not replaced: choose a new or empty --dest, or move that folder away")

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


def preprocess(flags, tmp, workers, log):
    """fairseq-preprocess FLAGS into tmp (the folder begin() made); its last error line becomes ours."""
    cmd = [os.path.join(os.path.dirname(sys.executable), "fairseq-preprocess"), *flags, "--destdir", str(tmp),
           "--workers", str(max(1, workers))]
    log("binarize: " + " ".join(cmd))
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        tail = (p.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise ToolError(f"fairseq-preprocess failed ({tail}); fix it and re-run (finished stages are kept)")
