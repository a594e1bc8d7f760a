"""Our Moses steps against the real perl scripts, byte for byte.

tokenizer.perl and detokenizer.perl come from the ``mosestokenizer`` package (PyPI, test-only; an older
copy of mosesdecoder's scripts, without the two rules of 2016): the tokenizer is compared with
``rules_2016=False`` and the package's own prefix files; the 2016 rules, the absent 2018 rule and
input-from-sgm.perl / clean-corpus-n.perl (not in that package) are tested against their behaviour as read
in moses-smt/mosesdecoder's sources (scripts/ems/support/input-from-sgm.perl,
scripts/training/clean-corpus-n.perl), stated in each test.
"""

import random
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

from b2t_tools.wmt.text import (
    clean_corpus,
    compound_split,
    moses_detokenize,
    moses_tokenize,
    sgm_segments,
)

mosestokenizer = pytest.importorskip("mosestokenizer")
SCRIPTS = Path(mosestokenizer.__file__).parent
HARD = [
    'He said "hello" - and left.', "It's the 1990's, isn't it? 'Quoted.'", "Visit https://example.com/a?b=1&c=2 now.",
    "1,000,000.50 and 3.14, 1900 ,5", "A & B <tag> [x] | y &amp;", "Ein „Zitat“ – und — noch ‚eins‘…",
    "z.B. Nr. 5 und U.S. vs. Mr. Smith.", "tab\there\x0bvt\x1cfs\x7f del\u200b zw\xa0nbsp\u3000ideo",
    "   ", "", "Er sagte: 'Ja.'", "Mr.", "No. 5 No. x", "e-mail well-known -5 --", "wait... what?... ..",
    "a.b.c. d", "5,- Euro", "$100 £5 €3 ¥", "isn't can't O'Neil rock'n'roll", "(U.S.) U.S.A. i.e. x",
    "  leading and trailing  ", "Ünïcödé ÄÖÜß ﬁ ½ ² ٣", "x.' y", "don't''", "a\rb",
]


def _perl(script, lang, lines, *extra):
    if shutil.which("perl") is None:
        pytest.skip("perl is not installed")
    p = subprocess.run(["perl", str(SCRIPTS / script), "-q", "-l", lang, *extra],
                       input="".join(x + "\n" for x in lines).encode("utf-8"), capture_output=True, check=True)
    return p.stdout.decode("utf-8").split("\n")[:-1]


@pytest.fixture(scope="module")
def tatoeba(tatoeba_zip):
    lines = zipfile.ZipFile(tatoeba_zip).read("deu.txt").decode("utf-8").split("\n")[:-1]
    random.Random(13).shuffle(lines)
    return [line.split("\t")[:2] for line in lines[:600]]


@pytest.mark.parametrize("lang,col", [("en", 0), ("de", 1)])
def test_tokenizer_matches_tokenizer_perl(tatoeba, lang, col):
    texts = [pair[col] for pair in tatoeba] + HARD
    prefixes = SCRIPTS / "nonbreaking_prefixes" / f"nonbreaking_prefix.{lang}"
    perl = _perl("tokenizer-v1.1.perl", lang, texts)
    ours = [moses_tokenize(t, lang, rules_2016=False, prefix_file=str(prefixes)) for t in texts]
    assert len(perl) == len(texts)
    diff = [(t, p, o) for t, p, o in zip(texts, perl, ours) if p != o]
    assert not diff, diff[:5]
    assert "&apos;" in "".join(ours) and "&quot;" in "".join(ours) and " @-@ " not in "".join(ours)  # no -a


def test_rules_of_2016_and_not_of_2018():
    # PR #163 (2016-07): a comma after a number at the end of the line is split off
    assert moses_tokenize("born in 1800,", "en") == "born in 1800 ,"
    assert moses_tokenize("born in 1800,", "en", rules_2016=False) == "born in 1800,"
    # PR #144 (2016-03): a final .' is split, with the trailing space the perl substitution leaves
    assert moses_tokenize("He said 'yes.'", "en") == "He said &apos; yes . &apos; "
    assert moses_tokenize("He said 'yes.'", "en", rules_2016=False) == "He said &apos; yes.&apos;"
    # PR #204 (2018-11, after Google's archive) split every final period; Google's tokenizer did not:
    assert moses_tokenize("He lives in the U.S.", "en").endswith("the U.S.")
    assert moses_tokenize("Siehe z.B.", "de") == "Siehe z.B."


@pytest.mark.parametrize("lang", ["en", "de"])
def test_detokenizer_matches_detokenizer_perl(tatoeba, lang):
    col = 0 if lang == "en" else 1
    tok = [moses_tokenize(t, lang) for t in [pair[col] for pair in tatoeba] + HARD if t.strip()]
    perl = _perl("detokenizer.perl", lang, tok)
    ours = [moses_detokenize(t, lang) for t in tok]
    diff = [(t, p, o) for t, p, o in zip(tok, perl, ours) if p != o]
    assert not diff, diff[:5]
    assert not any(e in "".join(ours) for e in ("&apos;", "&quot;", "&amp;", "&lt;", "&#91;"))


def test_sgm_extraction_like_input_from_sgm_perl():
    # input-from-sgm.perl: bytes; <seg ATTRS> (case-insensitive, attributes required); a segment continues on the
    # next lines until </seg>, lines joined with nothing between (chop); ASCII whitespace runs -> one space,
    # stripped; NBSP kept; text runs to the LAST </seg> on the line; lines without a segment are ignored.
    sgm = ('<refset setid="x">\n<doc docid="d">\n<seg id="1"> Hello   world </seg>\n'
           '<SEG id=2>multi\nline  </SEG>\n<seg id="3">\n  starts on the next line</seg>\n'
           '<seg>no attributes</seg>\n<seg id="4">a\xa0b\tc</seg><seg id="5">d</seg>\n'
           '<p>\n<seg id="6"></seg>\n</doc>\n').encode("utf-8")
    assert sgm_segments(sgm) == [b"Hello world", b"multiline", b"starts on the next line",
                                 "a\xa0b c</seg><seg id=\"5\">d".encode("utf-8"), b""]
    # the last line without a newline loses its last byte to chop(), as in perl
    assert sgm_segments(b'<seg id="1">abc</seg>x') == [b"abc"]
    assert sgm_segments(b'<seg id="1">abc</seg>') == []


def test_clean_like_clean_corpus_n_perl():
    # clean-corpus-n.perl CORPUS de en OUT 1 80 (ratio 9): whitespace normalized and written so; empty side,
    # > 80 or < 1 words, ratio > 9 either way, a word over 1000 characters: dropped; "|" deleted unless the
    # first pair has one (factored corpus)
    pairs = [("a  b ", " x y"), ("", "x"), ("w " * 81, "x"), ("w " * 80, "x " * 9), ("w " * 10, "x"),
             ("w " * 9, "x"), ("q" * 1001, "x"), ("q" * 1000, "x"), ("a|b", "c"), ("a\u3000b", "c")]
    kept = list(clean_corpus(pairs))
    assert kept == [("a b", "x y"), (("w " * 80).strip(), ("x " * 9).strip()), (("w " * 9).strip(), "x"),
                    ("q" * 1000, "x"), ("ab", "c"), ("a b", "c")]
    assert list(clean_corpus([("a|b", "c")])) == [("a|b", "c")]  # factored: kept as is
    assert list(clean_corpus([("a b c", "x")], max_len=2)) == []


def test_compound_split_like_compound_split_bleu_sh():
    # fairseq scripts/compound_split_bleu.sh: s{(\S)-(\S)}{$1 ##AT##-##AT## $2}g, non-overlapping
    assert compound_split("Ost-West a-b-c - x-") == "Ost ##AT##-##AT## West a ##AT##-##AT## b-c - x-"


def test_google_files_from_real_text_equal_the_scripts_output(tatoeba_zip, tmp_path, monkeypatch):
    """WMT-shaped archives of real (Tatoeba) text through extract, tokenize, clean and bpe; then Google's script's
    steps with the real tools on our extracted text: tokenizer.perl -q -l L -threads 8 (the package's copy; a line
    may differ only where a 2016 rule fires), subword-nmt learn-bpe/apply-bpe/get-vocab (the CLI)."""
    import sys

    from b2t_tools.wmt import YEARS, fake, prepare

    lines = zipfile.ZipFile(tatoeba_zip).read("deu.txt").decode("utf-8").split("\n")[:-1]
    random.Random(5).shuffle(lines)
    pairs = iter(tuple(line.split("\t")[:2]) for line in lines)
    monkeypatch.setattr(fake, "sentence_pairs", lambda n, rng: [next(pairs) for _ in range(n)])
    files = fake.write_archives(tmp_path / "mirror", train=(150, 50, 50), test_size=12)
    paths = {k: files[v] for k, v in (("europarl", "de-en.tgz"), ("commoncrawl", "training-parallel-commoncrawl.tgz"),
                                      ("nc-v11", "training-parallel-nc-v11.tgz"), ("dev", "dev.tgz"),
                                      ("test", "test.tgz"))}
    g = tmp_path / "google"
    prepare.extract(paths, g)
    prepare.tokenize(g, 1)
    prepare.clean(g, 80, 9.0)
    prepare.learn_and_apply_bpe(g, 200, 1)
    for name in ["train"] + [f"newstest{y}" for y in YEARS]:
        for lang in ("en", "de"):
            raw = (g / f"{name}.{lang}").read_text(encoding="utf-8").split("\n")[:-1]
            perl = _perl("tokenizer-v1.1.perl", lang, raw, "-threads", "8")
            ours = (g / f"{name}.tok.{lang}").read_text(encoding="utf-8").split("\n")[:-1]
            prefixes = str(SCRIPTS / "nonbreaking_prefixes" / f"nonbreaking_prefix.{lang}")
            for r, p, o in zip(raw, perl, ours):
                assert o == p or moses_tokenize(r, lang, rules_2016=False, prefix_file=prefixes) == p, (r, p, o)
            assert len(perl) == len(ours) == len(raw)
    cli = [str(Path(sys.executable).parent / "subword-nmt")]
    joint = (g / "train.tok.clean.de").read_bytes() + (g / "train.tok.clean.en").read_bytes()
    codes = subprocess.run(cli + ["learn-bpe", "-s", "200"], input=joint, capture_output=True, check=True).stdout
    assert codes == (g / "bpe.200").read_bytes()
    for name in ("train.tok.clean", "newstest2014.tok", "newstest2016.tok"):
        for lang in ("en", "de"):
            out = subprocess.run(cli + ["apply-bpe", "-c", str(g / "bpe.200")], input=(g / f"{name}.{lang}").read_bytes(),
                                 capture_output=True, check=True).stdout
            # apply_bpe.py of March 2017 (what Google's script ran) strips the spaces today's keeps at the ends
            out = b"".join(line.strip(b" ") + b"\n" for line in out.split(b"\n")[:-1])
            assert out == (g / f"{name}.bpe.200.{lang}").read_bytes(), name
    both = (g / "train.tok.clean.bpe.200.en").read_bytes() + (g / "train.tok.clean.bpe.200.de").read_bytes()
    vocab = subprocess.run(cli + ["get-vocab"], input=both, capture_output=True, check=True).stdout
    assert b"".join(line.split(b" ")[0] + b"\n" for line in vocab.splitlines()) == (g / "vocab.bpe.200").read_bytes()
