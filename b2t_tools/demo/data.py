"""Tatoeba English-German for the demo: find or download the zip, split, sentencepiece, binarize.

Every step writes under a temporary name and renames when complete, so an interrupted run
redoes at most the step it was in, and a finished step is reused by the next run. Nothing made
here belongs in the repository (the corpus is CC BY 2.0 FR third-party data, see its NOTICE).

Split: pairs are grouped by their English sentence (one English sentence may have several German
translations); the groups are shuffled with a fixed seed and dealt to test, valid, then train, so
no English sentence is in two splits. The joint sentencepiece model is learned on train only.
"""

import collections
import json
import os
import random
import re
import shutil
import sys
import zipfile
import zlib
from pathlib import Path

from b2t_fairseq.unigram import of_data_bin

from ..download import fetch
from ..errors import ToolError
from ..stages import Stages
from ..util import file_digest as util_file_digest
from ..util import write_json
from . import children

DEFAULT_URL = "https://www.manythings.org/anki/deu-eng.zip"
SPLITS = ("train", "valid", "test")
LANGS = ("en", "de")
DATA_VERSION = "tatoeba-data/2"  # bump when the preparation changes: every cached stage is rebuilt


def find_corpus(corpus=None, cache_dir=None, log=print):
    """The zip to use: --corpus, else $B2T_TATOEBA_ZIP, else a download into cache_dir."""
    path = corpus or os.environ.get("B2T_TATOEBA_ZIP")
    if path:
        if Path(path).is_dir():
            source = "--corpus" if corpus else "B2T_TATOEBA_ZIP"
            raise ToolError(f"Tatoeba corpus {path} (from {source}) is a folder; pass the zip itself, "
                           "e.g. --corpus PATH/deu-eng.zip")
        if not Path(path).is_file():
            source = "--corpus" if corpus else "B2T_TATOEBA_ZIP"
            raise ToolError(f"Tatoeba corpus {path} (from {source}) does not exist; pass --corpus PATH/deu-eng.zip "
                           "or set B2T_TATOEBA_ZIP to the zip from manythings.org/anki")
        return Path(path)
    return download(Path(cache_dir or "."), log=log)


def download(cache_dir, log=print, timeout=15):
    """Fetch the current deu-eng.zip (URL overridable with $B2T_TATOEBA_URL for tests and mirrors); an
    interrupted download resumes (download.fetch)."""
    url = os.environ.get("B2T_TATOEBA_URL", DEFAULT_URL)
    dest = cache_dir / "download" / "deu-eng.zip"
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    log(f"downloading {url} (no --corpus and no B2T_TATOEBA_ZIP given)")
    part = dest.with_name(dest.name + ".partial")
    try:
        fetch(url, part, log=log, timeout=timeout)
        zipfile.ZipFile(part).testzip()
    except Exception as e:  # network down, HTTP error, not a zip: all the same fix
        if not isinstance(e, ToolError):  # a short read keeps the partial file to resume; a bad zip does not
            part.unlink(missing_ok=True)
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ToolError(f"could not download the Tatoeba corpus from {url} ({reason}); pass --corpus PATH/deu-eng.zip "
                        "or set B2T_TATOEBA_ZIP to a local copy") from None
    os.replace(part, dest)
    return dest


def _decode_line(raw, lineno, name, zip_path):
    """One line of deu.txt as text; a line that is not UTF-8 (or holds NULs: UTF-16) is a one-line error."""
    fix = (f"re-save {name} as UTF-8 (e.g. iconv -f LATIN1 -t UTF-8, or -f UTF-16) and zip it again, or pass "
           "the deu-eng.zip from manythings.org/anki unchanged")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        guess = "UTF-16" if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else "Latin-1 or another 8-bit encoding"
        raise ToolError(f"line {lineno} of {name} in {zip_path} is not UTF-8 (byte 0x{raw[e.start]:02x} at "
                       f"column {e.start + 1}; {guess}?); {fix}") from None
    if "\x00" in text:
        raise ToolError(f"line {lineno} of {name} in {zip_path} holds NUL bytes (UTF-16 text?); {fix}")
    return text[1:] if lineno == 1 and text.startswith("\ufeff") else text


def read_pairs(zip_path):
    """(english, german) pairs from the zip's deu.txt (later releases add a third attribution column)."""
    try:
        with zipfile.ZipFile(zip_path) as z:
            name = next((n for n in z.namelist() if n.endswith("deu.txt")), None)
            if name is None:
                found = ", ".join(z.namelist()[:5]) or "nothing"
                raise ToolError(f"{zip_path} has no deu.txt (it holds {found}); pass the deu-eng.zip from "
                               "manythings.org/anki")
            pairs = []
            with z.open(name) as f:
                for lineno, raw in enumerate(f, 1):
                    cols = _decode_line(raw, lineno, name, zip_path).rstrip("\r\n").split("\t")
                    if len(cols) >= 2 and cols[0].strip() and cols[1].strip():
                        pairs.append((" ".join(cols[0].split()), " ".join(cols[1].split())))
    except (zipfile.BadZipFile, EOFError, zlib.error) as e:
        raise ToolError(f"{zip_path} is not a readable zip file ({type(e).__name__}); pass the deu-eng.zip from "
                       "manythings.org/anki") from None
    return pairs


def split_pairs(pairs, n_valid, n_test, max_train=None, seed=1):
    """Deal whole English-sentence groups to test, valid and train; deterministic for a given file."""
    groups = collections.defaultdict(list)
    for en, de in pairs:
        groups[en].append((en, de))
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)
    out = {s: [] for s in SPLITS}
    for key in keys:
        split = "test" if len(out["test"]) < n_test else "valid" if len(out["valid"]) < n_valid else "train"
        if split == "train" and max_train is not None and len(out["train"]) >= max_train:
            break
        out[split].extend(groups[key])
    return out


MIN_TRAIN = 1000  # fewer training pairs than this teach a model nothing worth comparing


def check_splits(zip_path, pairs, splits, n_valid, n_test):
    n = {k: len(v) for k, v in splits.items()}
    if n["test"] < n_test or n["valid"] < n_valid or n["train"] < MIN_TRAIN:
        raise ToolError(f"{zip_path} has only {len(pairs):,} usable sentence pairs: too few for {n_test} test + "
                       f"{n_valid} valid + at least {MIN_TRAIN} training pairs; pass the full deu-eng.zip from "
                       "manythings.org/anki (about 150,000 pairs or more)")


def file_digest(path, n=16):
    return util_file_digest(path, n=n)


def _write_lines(path, lines):
    with open(path, "w", encoding="utf-8") as f:
        for line in lines:
            f.write(line + "\n")


def _step(final, make):
    """make(tmp) into a temporary sibling of final, then rename it into place: final is whole or absent."""
    final = Path(final)
    tmp = final.with_name(final.name + ".tmp")
    for old in (tmp, final):
        if old.exists():
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    make(tmp)
    os.replace(tmp, final)
    return final


def _make_raw(pairs_by_split):
    def make(tmp):
        tmp.mkdir(parents=True)
        for split, pairs in pairs_by_split.items():
            _write_lines(tmp / f"{split}.en", (en for en, _ in pairs))
            _write_lines(tmp / f"{split}.de", (de for _, de in pairs))
    return make


def _make_spm(raw, vocab_size, seed):
    def make(tmp):
        import sentencepiece as spm

        tmp.mkdir(parents=True)
        try:
            _train_spm(spm, raw, tmp, vocab_size, seed)
        except RuntimeError as e:
            m = re.search(r"value <= (\d+)", str(e))
            if m is None:
                raise
            raise ToolError(f"sentencepiece cannot learn {vocab_size} pieces from this corpus's training split (at "
                           f"most {m.group(1)} here); pass --vocab {m.group(1)} or less, or a larger corpus") from None
        proc = spm.SentencePieceProcessor(model_file=str(tmp / "spm.model"))
        for split in SPLITS:
            for lang in LANGS:
                with open(raw / f"{split}.{lang}", encoding="utf-8") as f:
                    lines = [l.rstrip("\n") for l in f]
                pieces = proc.encode(lines, out_type=str)
                _write_lines(tmp / f"{split}.{lang}", (" ".join(p) for p in pieces))
    return make


def _train_spm(spm, raw, tmp, vocab_size, seed):
    spm.SentencePieceTrainer.train(
        input=[str(raw / "train.en"), str(raw / "train.de")], model_prefix=str(tmp / "spm"),
        vocab_size=vocab_size, model_type="unigram", character_coverage=1.0,
        input_sentence_size=200000, shuffle_input_sentence=True, seed_sentencepiece_size=200000,
        num_threads=min(2, os.cpu_count() or 1), minloglevel=2,
        # ids for fairseq's own symbols are not needed: fairseq builds its dictionary from pieces
        bos_id=-1, eos_id=-1, unk_id=0, pad_id=-1)


def _make_bin(sp):
    def make(tmp):
        cmd = [sys.executable, "-m", "fairseq_cli.preprocess", "--source-lang", "en", "--target-lang", "de",
               "--trainpref", str(sp / "train"), "--validpref", str(sp / "valid"), "--testpref", str(sp / "test"),
               "--destdir", str(tmp), "--joined-dictionary", "--workers", "1"]  # no pool: one process to stop
        p = children.run(cmd)
        if p.returncode != 0:
            raise ToolError(f"fairseq-preprocess failed ({p.stderr.strip().splitlines()[-1:]}); "
                           f"delete {tmp.parent} and run again")
    return make


def longest_sentence(sp):
    """The most tokens (pieces + end of sentence) in one side of one sentence pair, over all splits."""
    most = 0
    for split in SPLITS:
        for lang in LANGS:
            with open(sp / f"{split}.{lang}", encoding="utf-8") as f:
                most = max([most, *(len(line.split()) + 1 for line in f)])
    return most


def unigram_level(data_root):
    """The demo's unigram level: b2t_fairseq/unigram.py's one definition, on the valid targets of its data-bin."""
    return of_data_bin(data_root / "bin")


def data_tag(digest, vocab_size, n_valid, n_test, max_train, seed):
    """The cache folder's name: every input of the preparation (the corpus by its content's hash)."""
    return f"tatoeba-{digest}-v{vocab_size}-va{n_valid}-te{n_test}-tr{max_train or 'all'}-s{seed}"


def prepare(zip_path, cache_dir, *, vocab_size=4000, n_valid=1000, n_test=1000, max_train=None, seed=1,
            log=print):
    """Prepare (or reuse) the binarized corpus; returns the folder holding raw/, spm/, bin/, meta.json."""
    digest = file_digest(zip_path)
    root = Path(cache_dir) / data_tag(digest, vocab_size, n_valid, n_test, max_train, seed)
    meta_path = root / "meta.json"
    if meta_path.is_file():
        try:
            json.loads(meta_path.read_text())
        except ValueError:
            raise ToolError(f"{meta_path} is damaged; delete {root} and run again to prepare the data anew") from None
        log(f"data: reusing {root}")
        return root
    root.mkdir(parents=True, exist_ok=True)
    stages = Stages(root, ("raw", "spm", "bin"), DATA_VERSION, log=lambda m: None)

    def raw():
        log(f"data: splitting {zip_path} (grouped by English sentence)")
        pairs = read_pairs(zip_path)
        splits = split_pairs(pairs, n_valid, n_test, max_train, seed)
        check_splits(zip_path, pairs, splits, n_valid, n_test)
        _step(root / "raw", _make_raw(splits))

    def spm():
        log(f"data: learning a joint sentencepiece vocabulary ({vocab_size}) on train")
        _step(root / "spm", _make_spm(root / "raw", vocab_size, seed))

    def binarize():
        log("data: binarizing with fairseq-preprocess --joined-dictionary")
        _step(root / "bin", _make_bin(root / "spm"))

    # the folder's name already holds every option; the keys chain the stages, so a rebuilt one reruns the rest
    prev = stages.run("raw", [root / "raw"], raw, key={"corpus": digest, "n_valid": n_valid, "n_test": n_test,
                                                        "max_train": max_train, "seed": seed})
    prev = stages.run("spm", [root / "spm"], spm, key={"after": prev, "vocab_size": vocab_size})
    stages.run("bin", [root / "bin"], binarize, key={"after": prev})
    counts = {s: sum(1 for _ in open(root / "raw" / f"{s}.en", encoding="utf-8")) for s in SPLITS}
    meta = {"zip": str(zip_path), "zip_sha256_16": digest, "pairs": counts, "vocab_size": vocab_size,
            "seed": seed}
    write_json(meta_path, meta)
    return root
