"""``b2t-wmt-prepare``: rebuild Google's WMT'16 En-De data (google/seq2seq bin/data/wmt16_en_de.sh, used by
Ott et al. 2018 and the B2T paper) from the WMT sources, with Google's file names in WORK/google.
(Over 400 lines on purpose: it is Google's script, stage by stage, and reads best in that one order;
the text ports it calls live in text.py, the download and stage machinery in b2t_tools/.)

Stages (each marker in WORK/.stages records the options and inputs it was built from; a stage whose
options or inputs changed runs again, and so do all later ones):

download   the five archives into WORK/downloads; an interrupted download resumes (HTTP Range) where the server
           allows it; every archive is verified whole (md5, tar listing)
extract    train.{en,de}: Europarl v7 + CommonCrawl + News Commentary v11 concatenated; newstest2010-2013.{en,de}:
           the plain-text files of dev.tgz; newstest2014-2016.{en,de}: newstestYYYY-deen-src.de.sgm and
           -deen-ref.en.sgm through input-from-sgm.perl's logic (the files Google's script converts)
tokenize   tokenizer.perl -q -l LANG as of 2017 (no -a, no normalize-punctuation, no remove-non-printing-char;
           Moses escapes such as &apos; &quot; &amp; stay): train.tok.*, newstestYYYY.tok.*
clean      clean-corpus-n.perl train.tok de en train.tok.clean 1 80 (length ratio 9): train.tok.clean.*
bpe        subword-nmt learn_bpe -s 32000 on `cat train.tok.clean.de train.tok.clean.en` -> bpe.32000, applied to
           train.tok.clean.* and newstestYYYY.tok.* (-> *.bpe.32000.*); vocab.bpe.32000 as get_vocab.py writes it
binarize   fairseq-preprocess --joined-dictionary --nwordssrc 32768 --nwordstgt 32768 (fairseq examples/scaling_nmt):
           newstest2013 = valid, newstest2014 = test, the other years test1..test5 (DEST/subsets.json); the raw and
           tokenized references go to DEST/refs

With ``--google-archive wmt16_en_de.tar.gz`` (Google's own archive) the files are taken from it as they are and
only the binarize stage runs.
"""

import argparse
import json
import os
import re
import shutil
import sys
import tarfile
from multiprocessing import Pool
from pathlib import Path

from ..commands import run_command
from ..dest import OwnedDest, check_workers, preprocess
from ..download import fetch as _fetch
from ..errors import ToolError
from ..stages import Stages
from ..util import atomic_open, file_digest
from ..util import log as util_log
from . import BPE_MERGES, TEST_YEAR, VALID_YEAR, YEARS
from .text import BYTES, PrefixFileError, encode

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
NWORDS = 32768  # fairseq examples/scaling_nmt: --nwordssrc 32768 --nwordstgt 32768
# part of every stage's key: change it when the code would write different files from the same inputs
RECIPE = "google-wmt16-en-de/3"
SGM_YEARS = (2014, 2015, 2016)  # converted from SGM by Google's script; older years are plain text in dev.tgz


def log(msg):
    util_log(f"prepare: {msg}", sys.stderr)


# --- small file helpers -----------------------------------------------------------------------

def read_lines(path):
    """Lines split at \\n only (a \\r stays, as perl reads it); bytes that are not UTF-8 kept (text.BYTES)."""
    with open(path, encoding="utf-8", errors=BYTES, newline="\n") as f:
        return [line[:-1] if line.endswith("\n") else line for line in f]


def write_lines(path, lines):
    with atomic_open(path, "wb") as f:
        for line in lines:
            f.write(encode(line) + b"\n")


def split_lines(data):
    """bytes -> lines as perl's <FH> reads them (split at \\n; a last line without \\n still counts)."""
    lines = data.split(b"\n")
    return lines[:-1] if lines[-1] == b"" else lines


def md5sum(path):
    return file_digest(path, "md5")


def fingerprint(paths):
    """{path: [size, mtime_ns]} of files: cheap identity of a stage's inputs."""
    out = {}
    for p in paths:
        st = Path(p).stat()
        out[str(p)] = [st.st_size, st.st_mtime_ns]
    return out


# --- download ---------------------------------------------------------------------------------

def archive_urls(mirror=None, overrides=()):
    urls = dict(OFFICIAL)
    if mirror:
        urls = {k: mirror.rstrip("/") + "/" + u.rsplit("/", 1)[1] for k, u in urls.items()}
    for item in overrides:
        key, _, url = item.partition("=")
        if key not in urls or not url:
            raise ToolError(f"--url {item}: expected NAME=URL with NAME one of {', '.join(OFFICIAL)}; e.g. --url dev=file:///data/dev.tgz")
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


def read_sums_option(path):
    """The --sums file, strictly: it must exist and hold only ``MD5  NAME`` lines (md5sum's format)."""
    f = Path(path)
    if f.is_dir():
        raise ToolError(f"--sums {f} is a folder; pass a file in md5sum format (lines 'MD5 NAME')")
    if not f.is_file():
        raise ToolError(f"--sums {f} does not exist; fix the path, or leave --sums out to use the built-in sums "
                       "and record the others on first download")
    try:
        lines = f.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ToolError(f"--sums {f} is not a text file; pass a file in md5sum format (lines 'MD5 NAME')") from None
    for i, line in enumerate(lines, 1):
        parts = line.split()
        if parts and (len(parts) != 2 or not re.fullmatch(r"[0-9a-fA-F]{32}", parts[0])):
            raise ToolError(f"--sums {f} line {i} is not 'MD5 NAME' (32 hex digits, then the file name): "
                           f"{line.strip()[:80]!r}; fix the line (md5sum FILE writes this format)")
    return read_sums(f)


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
        raise ToolError(f"{name} is not a complete tar archive ({type(e).__name__}: {e}); the download is "
                       "truncated or corrupt: re-run to fetch it again") from None
    if not members:
        raise ToolError(f"{name} is an empty archive; check the URL (--mirror / --url)")


def verify(path, name, expected):
    got = md5sum(path)
    if expected and got != expected:
        raise ToolError(f"checksum mismatch for {name}: md5 {got}, expected {expected}; the download is corrupt "
                       "or the server's file changed: re-run to fetch it again, or delete its line from "
                       "MD5SUMS if the new file is the right one")
    check_tar(path, name)
    return got


def fetch(url, dest):
    """download.fetch with prepare's alternatives in its messages."""
    return _fetch(url, dest, alternative="use --mirror/--url", log=log)


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
            except ToolError as e:
                log(f"{name}: the existing file is broken ({e}); fetching it again")
                dest.unlink()
        partial = ddir / (name + ".partial")
        log(f"{name}: downloading {url}")
        resumed = fetch(url, partial)  # a short read raises and keeps the partial file for the next run
        try:
            got = verify(partial, name, want)
        except ToolError as e:
            partial.unlink(missing_ok=True)
            if not resumed:
                raise
            log(f"{name}: the resumed file fails verification ({e}); downloading it whole")
            fetch(url, partial)
            try:
                got = verify(partial, name, want)
            except ToolError:
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

def _member_bytes(tar, member):
    return tar.extractfile(member).read()


def _find(tar, suffix, archive):
    hits = [m for m in tar.getmembers() if m.isfile() and m.name.endswith(suffix)]
    if not hits:
        raise ToolError(f"{archive} has no file ending in {suffix}; is it the right archive? (check --mirror/--url)")
    return hits[0]


def read_parallel(archive, stem):
    """{lang: the file's bytes as they are} of one training corpus (Google's script cats them)."""
    with tarfile.open(archive, "r:*") as tar:
        sides = {lang: _member_bytes(tar, _find(tar, f"{stem}.{lang}", archive.name)) for lang in LANGS}
    n_en, n_de = len(split_lines(sides["en"])), len(split_lines(sides["de"]))
    if n_en != n_de:
        raise ToolError(f"{archive.name}: {stem}.en has {n_en} lines but {stem}.de has {n_de}; the corpus is "
                       "damaged: delete the archive and re-run")
    if n_en == 0:
        raise ToolError(f"{archive.name}: {stem} is empty; delete the archive and re-run (check --mirror/--url)")
    return sides["en"], sides["de"]


def _member(archives, basename):
    """(archive, member) of the first file named basename (any folder) in the archives, or None."""
    for arch in archives:
        with tarfile.open(arch, "r:*") as tar:
            for m in tar.getmembers():
                if m.isfile() and m.name.rsplit("/", 1)[-1] == basename:
                    return arch, m.name
    return None


def _read_member(arch, member):
    with tarfile.open(arch, "r:*") as tar:
        return tar.extractfile(tar.getmember(member)).read()


def read_newstest(archives, year):
    """Google's newstestYYYY.en/.de: the plain-text files of dev.tgz up to 2013; from 2014 on the German source
    and English reference of the de-en direction (newstestYYYY-deen-src.de.sgm, -deen-ref.en.sgm) through
    input-from-sgm.perl's logic."""
    from .text import sgm_segments

    out = {}
    for lang in LANGS:
        if year in SGM_YEARS:
            basename = f"newstest{year}-deen-{'src' if lang == 'de' else 'ref'}.{lang}.sgm"
        else:
            basename = f"newstest{year}.{lang}"
        hit = _member(archives, basename)
        if hit is None:
            raise ToolError(f"{basename} is in none of {', '.join(a.name for a in archives)}; check the dev/test "
                           "archives (--mirror/--url)")
        arch, member = hit
        data = _read_member(arch, member)
        if year in SGM_YEARS:
            out[lang] = b"".join(x + b"\n" for x in sgm_segments(data))
        else:  # copied as they are (cp), bytes and all
            out[lang] = data
    n_en, n_de = len(split_lines(out["en"])), len(split_lines(out["de"]))
    if n_en != n_de or not n_en:
        raise ToolError(f"newstest{year}: {n_en} English and {n_de} German segments; the files "
                       "do not match: delete the dev/test archives and re-run")
    return out["en"], out["de"]


def _write_bytes(path, data):
    with atomic_open(path, "wb") as f:
        f.write(data)


def extract(paths, google):
    """Byte for byte what Google's script writes: cat of the three corpora (a file without a final newline
    runs into the next one's first line, as with cat), cp of the plain-text test sets, input-from-sgm.perl's
    lines of the SGM ones. Bytes that are not UTF-8 stay as they are."""
    en, de = [], []
    for key, stem in TRAIN_CORPORA:
        e, d = read_parallel(paths[key], stem)
        log(f"extract: {stem}: {len(split_lines(e))} pairs")
        en.append(e)
        de.append(d)
    en, de = b"".join(en), b"".join(de)
    n_en, n_de = len(split_lines(en)), len(split_lines(de))
    if n_en != n_de:  # only a corpus without a final newline on one side can do this
        raise ToolError(f"train.en has {n_en} lines but train.de {n_de} after concatenating the corpora (a corpus "
                        "file lacks its final newline on one side); delete the damaged archive and re-run")
    _write_bytes(google / "train.en", en)
    _write_bytes(google / "train.de", de)
    for year in YEARS:
        e, d = read_newstest([paths["dev"], paths["test"]], year)
        _write_bytes(google / f"newstest{year}.en", e)
        _write_bytes(google / f"newstest{year}.de", d)


# --- tokenize, clean, bpe -----------------------------------------------------------------------

TEXTS = ["train"] + [f"newstest{y}" for y in YEARS]


def _tok_worker(args):
    from .text import moses_tokenize

    lines, lang = args
    return [moses_tokenize(line, lang) for line in lines]


def _chunks(lines, lang, size=2000):
    return [(lines[i:i + size], lang) for i in range(0, len(lines), size)]


def map_lines(worker, lines, lang, workers):
    if workers <= 1 or len(lines) < 4000:
        return worker((lines, lang))
    with Pool(workers) as pool:
        return [x for chunk in pool.imap(worker, _chunks(lines, lang)) for x in chunk]


def tokenize(google, workers):
    from .text import prefix_file_2017

    for lang in LANGS:
        try:
            prefix_file_2017(lang)
        except PrefixFileError as e:
            raise ToolError(str(e)) from None
    for name in TEXTS:
        for lang in LANGS:
            lines = read_lines(google / f"{name}.{lang}")
            write_lines(google / f"{name}.tok.{lang}", map_lines(_tok_worker, lines, lang, workers))


def clean(google, max_len, ratio):
    from .text import clean_corpus

    de, en = read_lines(google / "train.tok.de"), read_lines(google / "train.tok.en")
    if len(de) != len(en):
        raise ToolError(f"train.tok.de has {len(de)} lines but train.tok.en {len(en)}; run with --force")
    keep = list(clean_corpus(zip(de, en), 1, max_len, ratio))  # Google: clean-corpus-n.perl train.tok de en ...
    if not keep:
        raise ToolError("no training pair is left after cleaning; the corpus is empty or --max-len/--ratio too strict")
    log(f"clean: kept {len(keep)} of {len(en)} pairs (1..{max_len} tokens, ratio <= {ratio})")
    write_lines(google / "train.tok.clean.de", (d for d, _ in keep))
    write_lines(google / "train.tok.clean.en", (e for _, e in keep))


_bpe = None


def _bpe_worker(args):
    global _bpe
    lines, codes = args
    if _bpe is None or _bpe[0] != codes:
        from subword_nmt.apply_bpe import BPE

        with open(codes, encoding="utf-8", errors=BYTES) as f:
            _bpe = (codes, BPE(f))
    return [apply_bpe_2017(_bpe[1], line) for line in lines]


def apply_bpe_2017(bpe, line):
    """One line as subword-nmt's apply_bpe.py of March 2017 (b481fdc, 2017-03-09) writes it, which Google's
    script cloned: Python's codecs reader splits lines at every Unicode line boundary, each piece is split at
    any whitespace and written as ``' '.join(segments).strip()`` -- no leading or trailing space, where today's
    process_line keeps them (tokenizer.perl leaves one after a final ``.'``)."""
    return "\n".join(" ".join(bpe.segment_tokens(piece.split())) for piece in (line + "\n").splitlines())


def bpe_outputs(google, merges):
    files = [google / f"bpe.{merges}", google / f"vocab.bpe.{merges}"]
    files += [google / f"train.tok.clean.bpe.{merges}.{lang}" for lang in LANGS]
    return files + [google / f"newstest{y}.tok.bpe.{merges}.{lang}" for y in YEARS for lang in LANGS]


def write_vocab(paths, dest):
    """subword-nmt get_vocab.py | cut -f1 -d ' ': the words by count, most frequent first (ties: first seen)."""
    from collections import Counter

    counts = Counter()
    for path in paths:
        for line in read_lines(path):
            counts.update(w for w in line.strip("\r\n ").split(" ") if w)
    write_lines(dest, (w for w, _ in sorted(counts.items(), key=lambda x: x[1], reverse=True)))


def learn_and_apply_bpe(google, merges, workers):
    import io

    from subword_nmt.learn_bpe import learn_bpe

    joint = google / "bpe.joint.tmp"
    both = b"".join((google / f"train.tok.clean.{lang}").read_bytes() for lang in ("de", "en"))  # cat de en
    joint.write_bytes(both)
    try:
        both.decode("utf-8")
        workers_bpe = max(1, workers)
    except UnicodeDecodeError:
        workers_bpe = 1  # learn_bpe's worker processes reopen the file as strict UTF-8
    codes = google / f"bpe.{merges}"
    text = io.StringIO()
    with open(joint, encoding="utf-8", errors=BYTES, newline="\n") as inp:
        learn_bpe(inp, text, merges, num_workers=workers_bpe)
    with atomic_open(codes, "wb") as out:
        out.write(encode(text.getvalue()))
    joint.unlink()
    for name in ["train.tok.clean"] + [f"newstest{y}.tok" for y in YEARS]:
        for lang in LANGS:
            lines = read_lines(google / f"{name}.{lang}")
            write_lines(google / f"{name}.bpe.{merges}.{lang}", _apply_bpe(lines, str(codes), workers))
    write_vocab([google / f"train.tok.clean.bpe.{merges}.{lang}" for lang in ("en", "de")], google / f"vocab.bpe.{merges}")


def _apply_bpe(lines, codes, workers):
    chunks = [(lines[i:i + 2000], codes) for i in range(0, len(lines), 2000)]
    if workers <= 1 or len(lines) < 4000:
        return [x for c in chunks for x in _bpe_worker(c)]
    with Pool(workers) as pool:
        return [x for chunk in pool.imap(_bpe_worker, chunks) for x in chunk]


# --- Google's archive ---------------------------------------------------------------------------

def google_archive_files(merges):
    """The files of Google's archive the binarize stage and evaluation need (Google's names)."""
    names = [f"train.tok.clean.bpe.{merges}.{lang}" for lang in LANGS] + [f"bpe.{merges}"]
    for y in YEARS:
        for lang in LANGS:
            names += [f"newstest{y}.tok.bpe.{merges}.{lang}", f"newstest{y}.tok.{lang}", f"newstest{y}.{lang}"]
    return names


def import_google(archive, google, merges):
    """Copy the needed files of Google's wmt16_en_de.tar.gz into WORK/google byte for byte."""
    wanted = google_archive_files(merges)
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = {m.name.rsplit("/", 1)[-1]: m for m in tar.getmembers() if m.isfile()}
            missing = [n for n in wanted if n not in members]
            if missing:
                raise ToolError(f"{archive} lacks {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}; "
                               "pass Google's wmt16_en_de.tar.gz (or leave out --google-archive)")
            for name in wanted:
                with atomic_open(google / name, "wb") as out:
                    shutil.copyfileobj(tar.extractfile(members[name]), out)
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ToolError(f"cannot read {archive} ({e}); it is truncated or not a tar archive") from None
    for y in YEARS:
        for kind in ("", ".tok", f".tok.bpe.{merges}"):
            en, de = read_lines(google / f"newstest{y}{kind}.en"), read_lines(google / f"newstest{y}{kind}.de")
            if len(en) != len(de):
                raise ToolError(f"{archive}: newstest{y}{kind} has {len(en)} English and {len(de)} German lines")


# --- binarize -----------------------------------------------------------------------------------

def subsets():
    """Year -> fairseq subset name: valid = 2013, test = 2014, test1.. = the other years in order."""
    others = [y for y in YEARS if y not in (VALID_YEAR, TEST_YEAR)]
    out = {VALID_YEAR: "valid", TEST_YEAR: "test"}
    out.update({y: f"test{i}" for i, y in enumerate(others, 1)})
    return out


MARKER = ".b2t-wmt-prepare.json"  # in every --dest we write: what made it; only such folders are ever replaced


def _recorded_dest(folder, work):
    """Written before the marker existed: WORK/.stages/binarize.json records folder as this work folder's --dest."""
    key = Stages(work, STAGES, RECIPE, log).recorded_key("binarize")
    return isinstance(key, dict) and key.get("dest") == str(Path(folder).resolve())


# what binarize() writes (.ptN: fairseq-preprocess's workers' parts): the files of a --dest whose marker lists
# none (older, partial, or from before markers)
DEST = OwnedDest(PROG, MARKER, legacy=_recorded_dest, names=re.compile(
    r"dict\.(en|de)\.txt|(train|valid|test\d*)\.en-de\.(en|de)(\.pt\d+)?\.(bin|idx)|preprocess\.log|bpe\.\d+"
    r"|subsets\.json|refs(/newstest\d{4}\.(en|de|tok\.de))?|utf8(/.*)?"))


def utf8_inputs(google, prefixes, tmp):
    """The folder fairseq-preprocess reads: WORK/google, or where a file holds bytes that are not UTF-8 (which
    fairseq reads strictly and fails on; Google's files keep them) copies in tmp/utf8 with each such byte
    replaced by U+FFFD."""
    bad = [g for p in prefixes for lang in LANGS for g in [google / f"{p}.{lang}"]
           if not _is_utf8(g.read_bytes())]
    if not bad:
        return google
    out = tmp / "utf8"
    out.mkdir(exist_ok=True)
    n = 0
    for p in prefixes:
        for lang in LANGS:
            data = (google / f"{p}.{lang}").read_bytes()
            fixed = data.decode("utf-8", "replace")
            n += sum(1 for line in split_lines(data) if not _is_utf8(line))
            (out / f"{p}.{lang}").write_text(fixed, encoding="utf-8", newline="\n")
    log(f"binarize: {n} lines of {', '.join(g.name for g in bad[:3])}{' ...' if len(bad) > 3 else ''} hold bytes that "
        "are not UTF-8; fairseq reads them as U+FFFD (Google's files keep the bytes)")
    return out


def _is_utf8(data):
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def binarize(google, dest, workers, merges, nwords, record=None, work=None):
    dest = Path(dest)
    tmp = DEST.begin(dest, dict(record or {}, recipe=RECIPE), work)
    subs = subsets()
    tests = [TEST_YEAR] + [y for y in YEARS if y not in (VALID_YEAR, TEST_YEAR)]
    bpe = f"bpe.{merges}"
    src = utf8_inputs(google, [f"train.tok.clean.{bpe}"] + [f"newstest{y}.tok.{bpe}" for y in YEARS], tmp)
    preprocess(["--source-lang", "en", "--target-lang", "de", "--trainpref", str(src / f"train.tok.clean.{bpe}"),
                "--validpref", str(src / f"newstest{VALID_YEAR}.tok.{bpe}"),
                "--testpref", ",".join(str(src / f"newstest{y}.tok.{bpe}") for y in tests),
                "--joined-dictionary", "--nwordssrc", str(nwords), "--nwordstgt", str(nwords)], tmp, workers, log)
    shutil.rmtree(tmp / "utf8", ignore_errors=True)
    refs = tmp / "refs"
    refs.mkdir()
    for y in YEARS:
        shutil.copy(google / f"newstest{y}.de", refs / f"newstest{y}.de")
        shutil.copy(google / f"newstest{y}.tok.de", refs / f"newstest{y}.tok.de")
        shutil.copy(google / f"newstest{y}.en", refs / f"newstest{y}.en")
    shutil.copy(google / bpe, tmp / bpe)
    (tmp / "subsets.json").write_text(json.dumps({str(y): s for y, s in subs.items()}, indent=1) + "\n")
    DEST.commit(tmp, dest, work)


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
    p.add_argument("--nwords", type=int, default=NWORDS,
                   help="dictionary size, special symbols included (fairseq-preprocess --nwordssrc/--nwordstgt)")
    p.add_argument("--max-len", type=int, default=80, help="clean: longest sentence kept, in tokens")
    p.add_argument("--ratio", type=float, default=9.0, help="clean: largest length ratio kept")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--force", action="store_true", help="run every stage again")
    return p.parse_args(argv)


def check_options(args):
    for flag, value in (("--bpe-merges", args.bpe_merges), ("--nwords", args.nwords), ("--max-len", args.max_len)):
        if value < 1:
            raise ToolError(f"{flag} {value}: must be at least 1")
    check_workers(args.workers)
    if not args.ratio > 0 or args.ratio == float("inf"):  # nan and inf too
        raise ToolError(f"--ratio {args.ratio}: must be positive (Google's recipe: 9)")
    if args.sums is not None:
        read_sums_option(args.sums)  # a missing or malformed --sums used to be ignored silently


def prepare(args):
    check_options(args)
    work, dest = Path(args.work), Path(args.dest)
    dest_ours = DEST.check_places(work, dest)  # before the stages run: they drop the binarize record first
    google = work / "google"
    try:
        google.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ToolError(f"cannot create {google} ({e.strerror or e}); pass a --work folder you can write to") from None
    stages = Stages(work, STAGES, RECIPE, log)
    m = args.bpe_merges
    if args.google_archive:
        archive = Path(args.google_archive)
        if archive.is_dir():
            raise ToolError(f"--google-archive {archive} is a folder; pass the path of wmt16_en_de.tar.gz")
        if not archive.is_file():
            raise ToolError(f"--google-archive {archive} does not exist; pass the path of wmt16_en_de.tar.gz")
        prev = stages.run("bpe", [google / n for n in google_archive_files(m)], lambda: import_google(archive, google, m),
                          args.force, key={"google_archive": fingerprint([archive]), "merges": m})
    else:
        downloads = work / "downloads"
        names = [u.rsplit("/", 1)[1] for u in archive_urls(args.mirror, args.url).values()]
        have = [downloads / n for n in names if (downloads / n).exists()]
        key = {"archives": fingerprint(have)} if len(have) == len(names) else None
        if key is None and not args.force and stages.done("extract"):  # archives deleted after extraction
            log("extract: the archives are gone from WORK/downloads; keeping the extracted files")
            key = {k: v for k, v in (stages.recorded_key("extract") or {}).items() if k != "recipe"}
        if key is None or args.force or not stages.done("extract", dict(key, recipe=RECIPE)):
            paths = download_all(work, archive_urls(args.mirror, args.url), args.sums)
            key = {"archives": fingerprint([paths[k] for k in sorted(paths)])}
        else:
            paths = None
        texts = [google / f"{t}.{lang}" for t in TEXTS for lang in LANGS]
        tok = [google / f"{t}.tok.{lang}" for t in TEXTS for lang in LANGS]
        cleaned = [google / f"train.tok.clean.{lang}" for lang in LANGS]
        prev = stages.run("extract", texts, lambda: extract(paths, google), args.force, key=key)
        prev = stages.run("tokenize", tok, lambda: tokenize(google, args.workers), args.force,
                          key={"after": prev, "inputs": fingerprint(texts)})
        prev = stages.run("clean", cleaned, lambda: clean(google, args.max_len, args.ratio), args.force,
                          key={"after": prev, "inputs": fingerprint(tok[:2]), "min_len": 1, "max_len": args.max_len,
                               "ratio": args.ratio})
        bpe_inputs = cleaned + [google / f"newstest{y}.tok.{lang}" for y in YEARS for lang in LANGS]
        prev = stages.run("bpe", bpe_outputs(google, m), lambda: learn_and_apply_bpe(google, m, args.workers),
                          args.force, key={"after": prev, "inputs": fingerprint(bpe_inputs), "merges": m})
    bin_inputs = [google / f"train.tok.clean.bpe.{m}.{lang}" for lang in LANGS]
    bin_inputs += [google / f"newstest{y}{kind}.{lang}" for y in YEARS for lang in LANGS
                   for kind in ("", ".tok", f".tok.bpe.{m}")]
    stages.run("binarize", [dest / "dict.en.txt", dest / "dict.de.txt", dest / "train.en-de.en.bin",
                            dest / "subsets.json"],
               lambda: binarize(google, dest, args.workers, m, args.nwords, {"work": str(work.resolve())},
                                dest_ours or work),
               args.force,
               key={"after": prev, "inputs": fingerprint(bin_inputs), "nwords": args.nwords,
                    "dest": str(dest.resolve())})
    log(f"Google's files: {google}; ready: {dest} (train with scripts/train.sh ARCH LAYERS --data {dest})")


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    return run_command(PROG, prepare, args)


if __name__ == "__main__":
    sys.exit(main())
