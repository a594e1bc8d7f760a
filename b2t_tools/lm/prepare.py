"""``b2t-lm-prepare``: WikiText-103 for fairseq language modelling, as fairseq's examples/language_model does it.

Stages, each resumable and skipped when done (markers in WORK/.stages keyed on what built them):
  download  the official archive wikitext-103-v1.zip (an interrupted download resumes with an HTTP
            Range request), checked against its md5 and read through as a zip
  extract   wikitext-103/wiki.{train,valid,test}.tokens (already tokenized: the archive's own text)
  binarize  fairseq-preprocess --only-source --trainpref/--validpref/--testpref those files
            (fairseq examples/language_model/README.md), into DEST

Then train with ``b2t-lm-train`` and evaluate with ``b2t-lm-evaluate``. This module imports no torch.
"""

import argparse
import json
import os
import re
import shutil
import sys
import zipfile
from pathlib import Path

from ..commands import run_command
from ..dest import OwnedDest, check_workers, preprocess
from ..download import fetch
from ..errors import ToolError
from ..stages import Stages
from ..util import atomic_open, file_digest
from ..util import log as util_log

PROG = "b2t-lm-prepare"
URL = "https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-103-v1.zip"  # fairseq's prepare-wikitext-103.sh
ARCHIVE = "wikitext-103-v1.zip"
MD5 = "9ddaacaf6af0710eda8c456decff7832"  # the archive's md5, as torchtext's WikiText103 dataset checks it
SPLITS = ("train", "valid", "test")
MEMBERS = {s: f"wikitext-103/wiki.{s}.tokens" for s in SPLITS}
RECIPE = "wikitext-103/1"
STAGES = ("download", "extract", "binarize")


def log(msg):
    util_log(f"[lm-prepare] {msg}")


def _stamps(paths):
    """Size and modification time: a file replaced since (by hand, or another download) is not the one recorded."""
    return {str(p): [Path(p).stat().st_size, Path(p).stat().st_mtime_ns] for p in paths}


def verify(path, md5):
    got = file_digest(path, "md5")
    if md5 and got != md5:
        raise ToolError(f"checksum mismatch for {path.name}: md5 {got}, expected {md5}; the download is corrupt "
                       "or not the official archive: delete it and re-run (or pass --md5 for another copy)")
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
            names = set(z.namelist())
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise ToolError(f"{path.name} is not a complete zip archive ({e}); delete it and re-run to fetch it "
                       "again") from None
    if bad is not None:
        raise ToolError(f"{path.name}: member {bad} is corrupt; delete the archive and re-run to fetch it again")
    missing = [m for m in MEMBERS.values() if m not in names]
    if missing:
        raise ToolError(f"{path.name} lacks {', '.join(missing)}; it is not the WikiText-103 archive: pass the "
                       f"official {ARCHIVE} (--url)")
    return got


def _source(path):
    """The URL a download (or its partial file) came from, as recorded beside it; None if unrecorded."""
    try:
        return json.loads(Path(str(path) + ".source").read_text()).get("url")
    except (OSError, ValueError, AttributeError):
        return None


def _record_source(path, url):
    with atomic_open(Path(str(path) + ".source")) as f:
        json.dump({"url": url}, f)


def download(work, url, md5):
    """WORK/downloads/ARCHIVE fetched from url. A file already there is kept only if it came from this url, or
    if it matches the --md5 given (the same bytes, wherever from); else it is ours to fetch again."""
    ddir = Path(work) / "downloads"
    ddir.mkdir(parents=True, exist_ok=True)
    dest = ddir / ARCHIVE
    partial = ddir / (ARCHIVE + ".partial")
    if dest.exists():
        if _source(dest) == url or (md5 and file_digest(dest, "md5") == md5):
            _record_source(dest, url)
            return dest, verify(dest, md5)
        log(f"download: {ARCHIVE} came from {_source(dest) or 'another --url'}, not {url}; fetching it again")
        dest.unlink()
    if partial.exists() and _source(partial) != url:  # never resume a file from one URL with another's bytes
        partial.unlink()
    _record_source(partial, url)
    log(f"download: {url}")
    fetch(url, partial, alternative="--url", log=log)  # a short read keeps the partial file: the next run resumes
    try:
        got = verify(partial, md5)
    except ToolError:
        partial.unlink(missing_ok=True)
        raise
    _record_source(dest, url)
    os.replace(partial, dest)
    Path(str(partial) + ".source").unlink(missing_ok=True)
    return dest, got


def extract(archive, text_dir):
    text_dir.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(archive) as z:
        for split, member in MEMBERS.items():
            with z.open(member) as src, atomic_open(text_dir / f"wiki.{split}.tokens", "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)


MARKER = ".b2t-lm-prepare.json"  # in every --dest we write: what made it; only such folders are ever replaced
# what fairseq-preprocess --only-source writes (.ptN: its workers' parts, left by a stop): the files of a --dest
# whose marker lists none (older, or partial)
DEST = OwnedDest(PROG, MARKER, names=re.compile(r"dict\.txt|(train|valid|test)(\.pt\d+)?\.(bin|idx)|preprocess\.log"))


def binarize(text_dir, dest, workers, record, known_ours=False):
    dest = Path(dest)
    tmp = DEST.begin(dest, dict(record, recipe=RECIPE), known_ours or None)
    preprocess(["--only-source", *[x for s in SPLITS for x in (f"--{s}pref", str(text_dir / f"wiki.{s}.tokens"))]],
               tmp, workers, log)
    DEST.commit(tmp, dest, known_ours or None)


def parse_args(argv):
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--work", default="work/wikitext-103", help="the download and the extracted text")
    p.add_argument("--dest", default="data-bin/wikitext-103", help="binarized output (b2t-lm-train's DATA)")
    p.add_argument("--url", default=URL, help="where to fetch the archive (a mirror, or file:///...)")
    p.add_argument("--md5", default=MD5, help="the archive's expected md5 (default: the official archive's)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--force", action="store_true", help="run every stage again")
    return p.parse_args(argv)


def prepare(args):
    check_workers(args.workers)
    if args.md5 and not re.fullmatch(r"[0-9a-f]{32}", args.md5):
        raise ToolError(f"--md5 {args.md5!r} is not an md5 (32 hex digits); pass the archive's md5sum, or --md5 '' "
                        "to skip the check")
    work, dest = Path(args.work), Path(args.dest)
    dest_ours = DEST.check_places(work, dest)  # before anything is downloaded or written
    text_dir = work / "wikitext-103"
    texts = [text_dir / f"wiki.{s}.tokens" for s in SPLITS]
    stages = Stages(work, STAGES, RECIPE, log=log)
    archive = work / "downloads" / ARCHIVE
    found = {}

    def get():
        found["archive"], found["md5"] = download(work, args.url, args.md5)

    # every stage is keyed on the one before (its digest): another --url or --md5 redoes all three
    prev = stages.run("download", [archive], get, force=args.force, key={"url": args.url, "md5": args.md5})
    if "archive" not in found:
        found["archive"] = archive
    prev = stages.run("extract", texts, lambda: extract(found["archive"], text_dir), force=args.force,
                      key={"after": prev, "archive": _stamps([archive]) if archive.exists() else None})
    stages.run("binarize", [dest / "dict.txt", dest / "train.bin", dest / "valid.bin", dest / "test.bin"],
               lambda: binarize(text_dir, dest, args.workers, {"work": str(work.resolve()), "url": args.url},
                                dest_ours), force=args.force,
               key={"after": prev, "inputs": _stamps(texts), "dest": str(dest.resolve())})
    log(f"ready: {dest} (train with b2t-lm-train {dest} ...)")


def main(argv=None):
    return run_command(PROG, lambda: prepare(parse_args(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    sys.exit(main())
