"""``b2t-wmt-prepare``: rebuild Google's WMT'16 En-De data (Ott et al. 2018) from the WMT sources.

Stages (each skipped when its outputs are complete; a stage that runs invalidates the later ones):

download   the five archives into WORK/downloads, through NAME.partial, verified (md5, tar listing)
extract    training pairs (Europarl v7 + CommonCrawl + News Commentary v11) and newstest2010-2016 (SGM)
           into WORK/raw; parallel line counts, empty corpora and non-UTF-8 text are refused
tokenize   Moses normalize + remove-non-printing + tokenizer -a (sacremoses, parity settings) -> WORK/tok
clean      training pairs of 1..80 tokens with a length ratio <= 9 (clean-corpus-n.perl)
bpe        one joint subword-nmt BPE of 32,000 merges learned on the cleaned training text -> WORK/bpe
binarize   fairseq-preprocess --joined-dictionary: newstest2013 = valid, newstest2014 = test, the other
           years test1..test5 (DEST/subsets.json); the raw and tokenized references go to DEST/refs

With ``--google-archive wmt16_en_de.tar.gz`` (Google's preprocessed archive) the first five stages are
replaced by taking its BPE files and references as they are.
"""

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import urllib.error
import urllib.request
from multiprocessing import Pool
from pathlib import Path

from ..commands import run_command
from ..errors import B2TError
from ..util import atomic_open, log as util_log
from . import BPE_MERGES, TEST_YEAR, VALID_YEAR, YEARS

PROG = "b2t-wmt-prepare"
OFFICIAL = {
    "europarl": "https://www.statmt.org/europarl/v7/de-en.tgz",
    "commoncrawl": "https://www.statmt.org/wmt13/training-parallel-commoncrawl.tgz",
    "nc-v11": "https://data.statmt.org/wmt16/translation-task/training-parallel-nc-v11.tgz",
    "dev": "https://data.statmt.org/wmt16/translation-task/dev.tgz",
    "test": "https://data.statmt.org/wmt16/translation-task/test.tgz",
}
# md5 sums known in advance (sacreBLEU's dataset table lists wmt16/test.tgz); the others are recorded
# in WORK/downloads/MD5SUMS on first download and checked from then on.
KNOWN_MD5 = {"test.tgz": "3d809cd0c2c86adb2c67034d15c4e446"}
TRAIN_CORPORA = (("europarl", "europarl-v7.de-en"), ("commoncrawl", "commoncrawl.de-en"),
                 ("nc-v11", "news-commentary-v11.de-en"))
LANGS = ("en", "de")
STAGES = ("extract", "tokenize", "clean", "bpe", "binarize")


def log(msg):
    util_log(f"prepare: {msg}", sys.stderr)


# --- small file helpers -----------------------------------------------------------------------

def read_lines(path):
    with open(path, encoding="utf-8", newline="\n") as f:
        return [line[:-1] if line.endswith("\n") else line for line in f]


def write_lines(path, lines):
    with atomic_open(path) as f:
        for line in lines:
            f.write(line + "\n")


def md5sum(path):
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class Stages:
    """Markers in WORK/.stages: a stage is done when its marker exists and its outputs have the recorded sizes."""

    def __init__(self, work):
        self.dir = Path(work) / ".stages"

    def done(self, name):
        marker = self.dir / f"{name}.json"
        if not marker.exists():
            return False
        outputs = json.loads(marker.read_text())["outputs"]
        return all(Path(p).exists() and (Path(p).is_dir() or Path(p).stat().st_size == n) for p, n in outputs.items())

    def run(self, name, outputs, fn, force=False):
        if not force and self.done(name):
            log(f"{name}: complete, skipped")
            return False
        for later in STAGES[STAGES.index(name):]:
            (self.dir / f"{later}.json").unlink(missing_ok=True)
        log(f"{name}: running")
        fn()
        sizes = {str(p): (0 if Path(p).is_dir() else Path(p).stat().st_size) for p in outputs}
        self.dir.mkdir(parents=True, exist_ok=True)
        with atomic_open(self.dir / f"{name}.json") as f:
            json.dump({"outputs": sizes}, f, indent=1)
        log(f"{name}: done")
        return True


# --- download ---------------------------------------------------------------------------------

def archive_urls(mirror=None, overrides=()):
    urls = dict(OFFICIAL)
    if mirror:
        urls = {k: mirror.rstrip("/") + "/" + u.rsplit("/", 1)[1] for k, u in urls.items()}
    for item in overrides:
        key, _, url = item.partition("=")
        if key not in urls or not url:
            raise B2TError(f"--url {item}: expected NAME=URL with NAME one of {', '.join(OFFICIAL)}; e.g. --url dev=file:///data/dev.tgz")
        urls[key] = url
    return urls


def read_sums(path):
    sums = {}
    if path and Path(path).exists():
        for line in Path(path).read_text().splitlines():
            parts = line.split()
            if len(parts) == 2:
                sums[parts[1].lstrip("*")] = parts[0]
    return sums


def check_tar(path, name):
    """Read the whole archive listing: a truncated or corrupt gzip/tar stream raises here."""
    try:
        with tarfile.open(path, "r:*") as tar:
            members = tar.getmembers()
            for m in members:  # read through to the end, so a cut-off last member is noticed too
                if m.isfile():
                    f = tar.extractfile(m)
                    while f.read(1 << 20):
                        pass
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        raise B2TError(f"{name} is not a complete tar archive ({type(e).__name__}: {e}); the download is "
                       "truncated or corrupt: re-run to fetch it again") from None
    if not members:
        raise B2TError(f"{name} is an empty archive; check the URL (--mirror / --url)")


def verify(path, name, expected):
    got = md5sum(path)
    if expected and got != expected:
        raise B2TError(f"checksum mismatch for {name}: md5 {got}, expected {expected}; the download is corrupt "
                       "or the server's file changed: re-run to fetch it again, or delete its line from "
                       "MD5SUMS if the new file is the right one")
    check_tar(path, name)
    return got


def fetch(url, dest):
    """Stream url into dest (a .partial file); a short read (fewer bytes than Content-Length) is an error."""
    name = Path(dest).name
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(dest, "wb") as out:
            expected = r.headers.get("Content-Length")
            shutil.copyfileobj(r, out, 1 << 20)
            got = out.tell()
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise B2TError(f"download of {url} failed ({e}); check the network, or use --mirror/--url, or put the "
                       f"file at {Path(dest).with_suffix('')} yourself") from None
    if expected is not None and int(expected) != got:
        raise B2TError(f"download of {name} is short ({got} of {expected} bytes); re-run to fetch it again")


def download_all(work, urls, sums_file=None):
    ddir = Path(work) / "downloads"
    ddir.mkdir(parents=True, exist_ok=True)
    record = ddir / "MD5SUMS"
    expected = dict(KNOWN_MD5)
    expected.update(read_sums(sums_file))
    recorded = read_sums(record)
    paths = {}
    for key, url in urls.items():
        name = url.rsplit("/", 1)[1]
        dest = ddir / name
        want = expected.get(name) or recorded.get(name)
        if dest.exists():
            try:
                verify(dest, name, want)
                paths[key] = dest
                continue
            except B2TError as e:
                log(f"{name}: the existing file is broken ({e}); fetching it again")
                dest.unlink()
        partial = ddir / (name + ".partial")
        log(f"{name}: downloading {url}")
        try:
            fetch(url, partial)
            got = verify(partial, name, want)
        except B2TError:
            partial.unlink(missing_ok=True)
            raise
        os.replace(partial, dest)
        if name not in expected and name not in recorded:
            with open(record, "a") as f:
                f.write(f"{got}  {name}\n")
            recorded[name] = got
        paths[key] = dest
    return paths


# --- extract ----------------------------------------------------------------------------------

def _decode(raw, where):
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise B2TError(f"{where} is not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); convert the "
                       "file to UTF-8 (iconv) or remove that line") from None


def _member_lines(tar, member, where):
    f = tar.extractfile(member)
    lines = []
    for i, raw in enumerate(f, 1):
        raw = raw[:-1] if raw.endswith(b"\n") else raw
        lines.append(_decode(raw, f"{where} line {i}"))
    return lines


def _find(tar, suffix, archive):
    hits = [m for m in tar.getmembers() if m.isfile() and m.name.endswith(suffix)]
    if not hits:
        raise B2TError(f"{archive} has no file ending in {suffix}; is it the right archive? (check --mirror/--url)")
    return hits[0]


def read_parallel(archive, stem):
    with tarfile.open(archive, "r:*") as tar:
        sides = {lang: _member_lines(tar, _find(tar, f"{stem}.{lang}", archive.name), f"{archive.name}:{stem}.{lang}")
                 for lang in LANGS}
    n_en, n_de = len(sides["en"]), len(sides["de"])
    if n_en != n_de:
        raise B2TError(f"{archive.name}: {stem}.en has {n_en} lines but {stem}.de has {n_de}; the corpus is "
                       "damaged: delete the archive and re-run")
    if n_en == 0:
        raise B2TError(f"{archive.name}: {stem} is empty; delete the archive and re-run (check --mirror/--url)")
    return sides["en"], sides["de"]


def _sgm_rank(name, lang, year):
    base = name.rsplit("/", 1)[-1]
    if not (base.startswith(f"newstest{year}") and base.endswith(f".{lang}.sgm")):
        return None
    pair = 0 if "-ende-" in base else 1 if "-deen-" in base else 2
    role = 0 if ("-src." in base) == (lang == "en") else 1  # En source and De reference first
    return pair, role, base


def read_sgm_segments(tar, member, where):
    segs = []
    for line in _member_lines(tar, member, where):
        m = re.search(r"<seg[^>]*>(.*)</seg>", line)
        if m:
            segs.append(m.group(1).strip())
    return segs


def read_newstest(archives, year):
    out = {}
    for lang in LANGS:
        best = None
        for arch in archives:
            with tarfile.open(arch, "r:*") as tar:
                for m in tar.getmembers():
                    rank = _sgm_rank(m.name, lang, year) if m.isfile() else None
                    if rank is not None and (best is None or rank < best[0]):
                        best = (rank, arch, m.name)
        if best is None:
            raise B2TError(f"newstest{year} ({lang}) is in none of {', '.join(a.name for a in archives)}; check "
                           "the dev/test archives (--mirror/--url)")
        _, arch, member = best
        with tarfile.open(arch, "r:*") as tar:
            out[lang] = read_sgm_segments(tar, tar.getmember(member), f"{arch.name}:{member}")
    if len(out["en"]) != len(out["de"]) or not out["en"]:
        raise B2TError(f"newstest{year}: {len(out['en'])} English and {len(out['de'])} German segments; the SGM "
                       "files do not match: delete the dev/test archives and re-run")
    return out["en"], out["de"]


def extract(paths, raw):
    en, de = [], []
    for key, stem in TRAIN_CORPORA:
        e, d = read_parallel(paths[key], stem)
        log(f"extract: {stem}: {len(e)} pairs")
        en += e
        de += d
    write_lines(raw / "train.en", en)
    write_lines(raw / "train.de", de)
    for year in YEARS:
        e, d = read_newstest([paths["dev"], paths["test"]], year)
        write_lines(raw / f"newstest{year}.en", e)
        write_lines(raw / f"newstest{year}.de", d)


# --- tokenize, clean, bpe -----------------------------------------------------------------------

def _tok_worker(args):
    from .text import tokenize_line

    lines, lang = args
    return [tokenize_line(line, lang) for line in lines]


def _chunks(lines, lang, size=2000):
    return [(lines[i:i + size], lang) for i in range(0, len(lines), size)]


def map_lines(worker, lines, lang, workers):
    if workers <= 1 or len(lines) < 4000:
        return worker((lines, lang))
    with Pool(workers) as pool:
        return [x for chunk in pool.imap(worker, _chunks(lines, lang)) for x in chunk]


def tokenize(raw, tok, workers):
    for name in ["train"] + [f"newstest{y}" for y in YEARS]:
        for lang in LANGS:
            lines = read_lines(raw / f"{name}.{lang}")
            write_lines(tok / f"{name}.{lang}", map_lines(_tok_worker, lines, lang, workers))


def clean(tok, max_len, ratio):
    en, de = read_lines(tok / "train.en"), read_lines(tok / "train.de")
    keep = [(e, d) for e, d in zip(en, de) if _keep(e, d, max_len, ratio)]
    if not keep:
        raise B2TError("no training pair is left after cleaning; the corpus is empty or --max-len/--ratio too strict")
    log(f"clean: kept {len(keep)} of {len(en)} pairs (1..{max_len} tokens, ratio <= {ratio})")
    write_lines(tok / "train.clean.en", (e for e, _ in keep))
    write_lines(tok / "train.clean.de", (d for _, d in keep))


def _keep(e, d, max_len, ratio):
    from .text import keep_pair

    return keep_pair(" ".join(e.split()), " ".join(d.split()), 1, max_len, ratio)


_bpe = None


def _bpe_worker(args):
    global _bpe
    lines, codes = args
    if _bpe is None or _bpe[0] != codes:
        from subword_nmt.apply_bpe import BPE

        with open(codes, encoding="utf-8") as f:
            _bpe = (codes, BPE(f))
    return [_bpe[1].process_line(line) for line in lines]


def learn_and_apply_bpe(tok, bpe_dir, merges, workers):
    from subword_nmt.learn_bpe import learn_bpe

    bpe_dir.mkdir(parents=True, exist_ok=True)
    joint = bpe_dir / "joint.tmp"
    with open(joint, "w", encoding="utf-8") as f:  # the German then the English side, as Google's script did
        for lang in ("de", "en"):
            f.writelines(line + "\n" for line in read_lines(tok / f"train.clean.{lang}"))
    codes = bpe_dir / f"bpe.{merges}"
    with open(joint, encoding="utf-8") as inp, atomic_open(codes) as out:
        learn_bpe(inp, out, merges, num_workers=max(1, workers))
    joint.unlink()
    sources = [("train", "train.clean")] + [(f"newstest{y}", f"newstest{y}") for y in YEARS]
    for name, src in sources:
        for lang in LANGS:
            lines = read_lines(tok / f"{src}.{lang}")
            write_lines(bpe_dir / f"{name}.{lang}", _apply_bpe(lines, str(codes), workers))


def _apply_bpe(lines, codes, workers):
    chunks = [(lines[i:i + 2000], codes) for i in range(0, len(lines), 2000)]
    if workers <= 1 or len(lines) < 4000:
        return [x for c in chunks for x in _bpe_worker(c)]
    with Pool(workers) as pool:
        return [x for chunk in pool.imap(_bpe_worker, chunks) for x in chunk]


# --- Google's archive ---------------------------------------------------------------------------

def import_google(archive, raw, tok, bpe_dir, merges):
    """Take train/newstest BPE files and references from Google's wmt16_en_de.tar.gz as they are."""
    wanted = {f"train.tok.clean.bpe.{merges}.{lang}": bpe_dir / f"train.{lang}" for lang in LANGS}
    wanted[f"bpe.{merges}"] = bpe_dir / f"bpe.{merges}"
    for y in YEARS:
        for lang in LANGS:
            wanted[f"newstest{y}.tok.bpe.{merges}.{lang}"] = bpe_dir / f"newstest{y}.{lang}"
            wanted[f"newstest{y}.tok.{lang}"] = tok / f"newstest{y}.{lang}"
            wanted[f"newstest{y}.{lang}"] = raw / f"newstest{y}.{lang}"
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = {m.name.rsplit("/", 1)[-1]: m for m in tar.getmembers() if m.isfile()}
            missing = [n for n in wanted if n not in members]
            if missing:
                raise B2TError(f"{archive} lacks {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}; "
                               "pass Google's wmt16_en_de.tar.gz (or leave out --google-archive)")
            for name, dest in wanted.items():
                write_lines(dest, _member_lines(tar, members[name], f"{archive}:{name}"))
    except (tarfile.TarError, EOFError, OSError) as e:
        raise B2TError(f"cannot read {archive} ({e}); it is truncated or not a tar archive") from None
    for y in YEARS:
        for d in (raw, tok, bpe_dir):
            en, de = read_lines(d / f"newstest{y}.en"), read_lines(d / f"newstest{y}.de")
            if len(en) != len(de):
                raise B2TError(f"{archive}: newstest{y} has {len(en)} English and {len(de)} German lines in {d.name}")


# --- binarize -----------------------------------------------------------------------------------

def subsets():
    """Year -> fairseq subset name: valid = 2013, test = 2014, test1.. = the other years in order."""
    others = [y for y in YEARS if y not in (VALID_YEAR, TEST_YEAR)]
    out = {VALID_YEAR: "valid", TEST_YEAR: "test"}
    out.update({y: f"test{i}" for i, y in enumerate(others, 1)})
    return out


def binarize(raw, tok, bpe_dir, dest, workers, merges):
    dest = Path(dest)
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    subs = subsets()
    tests = [TEST_YEAR] + [y for y in YEARS if y not in (VALID_YEAR, TEST_YEAR)]
    cmd = [os.path.join(os.path.dirname(sys.executable), "fairseq-preprocess"), "--source-lang", "en",
           "--target-lang", "de", "--trainpref", str(bpe_dir / "train"), "--validpref",
           str(bpe_dir / f"newstest{VALID_YEAR}"), "--testpref", ",".join(str(bpe_dir / f"newstest{y}") for y in tests),
           "--destdir", str(tmp), "--joined-dictionary", "--workers", str(max(1, workers))]
    log("binarize: " + " ".join(cmd))
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        tail = (p.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise B2TError(f"fairseq-preprocess failed ({tail}); see the message above, fix it and re-run")
    refs = tmp / "refs"
    refs.mkdir()
    for y in YEARS:
        shutil.copy(raw / f"newstest{y}.de", refs / f"newstest{y}.de")
        shutil.copy(tok / f"newstest{y}.de", refs / f"newstest{y}.tok.de")
        shutil.copy(raw / f"newstest{y}.en", refs / f"newstest{y}.en")
    shutil.copy(bpe_dir / f"bpe.{merges}", tmp / f"bpe.{merges}")
    (tmp / "subsets.json").write_text(json.dumps({str(y): s for y, s in subs.items()}, indent=1) + "\n")
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)


# --- main ---------------------------------------------------------------------------------------

def parse_args(argv):
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--work", default="work/wmt16_en_de", help="downloads and intermediate files")
    p.add_argument("--dest", default="data-bin/wmt16_en_de_bpe32k", help="binarized output (train.sh --data)")
    p.add_argument("--mirror", default=os.environ.get("B2T_WMT_MIRROR"),
                   help="base URL that serves the five archives under their own names (env B2T_WMT_MIRROR)")
    p.add_argument("--url", action="append", default=[], metavar="NAME=URL",
                   help=f"one archive's URL; NAME in {', '.join(OFFICIAL)}")
    p.add_argument("--sums", help="md5sum-format file of expected checksums (wins over the built-in table)")
    p.add_argument("--google-archive", help="Google's preprocessed wmt16_en_de.tar.gz: use its BPE data as is")
    p.add_argument("--bpe-merges", type=int, default=BPE_MERGES)
    p.add_argument("--max-len", type=int, default=80, help="clean: longest sentence kept, in tokens")
    p.add_argument("--ratio", type=float, default=9.0, help="clean: largest length ratio kept")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--force", action="store_true", help="run every stage again")
    return p.parse_args(argv)


def prepare(args):
    work = Path(args.work)
    raw, tok, bpe_dir, dest = work / "raw", work / "tok", work / "bpe", Path(args.dest)
    stages = Stages(work)
    texts = [f"newstest{y}.{lang}" for y in YEARS for lang in LANGS]
    bpe_out = [bpe_dir / f"train.{lang}" for lang in LANGS] + [bpe_dir / t for t in texts] + [bpe_dir / f"bpe.{args.bpe_merges}"]
    if args.google_archive:
        stages.run("bpe", bpe_out + [raw / t for t in texts] + [tok / t for t in texts],
                   lambda: import_google(args.google_archive, raw, tok, bpe_dir, args.bpe_merges), args.force)
    else:
        if not stages.done("extract") or args.force:
            paths = download_all(work, archive_urls(args.mirror, args.url), args.sums)
        else:
            paths = None
        stages.run("extract", [raw / "train.en", raw / "train.de"] + [raw / t for t in texts],
                   lambda: extract(paths, raw), args.force)
        stages.run("tokenize", [tok / f"train.{lang}" for lang in LANGS] + [tok / t for t in texts],
                   lambda: tokenize(raw, tok, args.workers), args.force)
        stages.run("clean", [tok / f"train.clean.{lang}" for lang in LANGS],
                   lambda: clean(tok, args.max_len, args.ratio), args.force)
        stages.run("bpe", bpe_out, lambda: learn_and_apply_bpe(tok, bpe_dir, args.bpe_merges, args.workers), args.force)
    stages.run("binarize", [dest / "dict.en.txt", dest / "dict.de.txt", dest / "train.en-de.en.bin",
                            dest / "subsets.json"],
               lambda: binarize(raw, tok, bpe_dir, dest, args.workers, args.bpe_merges), args.force)
    log(f"ready: {dest} (train with scripts/train.sh ARCH LAYERS --data {dest})")


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    return run_command(PROG, prepare, args)


if __name__ == "__main__":
    sys.exit(main())
