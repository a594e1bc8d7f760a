"""b2t-wmt-prepare keeps what Google's scripts keep, byte for byte: bytes that are not UTF-8, CRLF, files
without a final newline (cat runs them into the next file); and it pins what changed since March 2017 (the
English nonbreaking prefixes, apply_bpe.py's trailing space)."""

import io
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from b2t_tools.wmt import fake, prepare, text

BAD_EN = b"Caf\xe9 au lait.\r\nThe \xed\xa0\x80 sign and \xff.\nNo final newline here"  # Latin-1, a surrogate, CRLF
BAD_DE = b"Caf\xc3\xa9 mit Milch.\r\nDas \xed\xa0\x80 Zeichen und \xff.\nKein Zeilenende"


def _rewrite(path, members):
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.mark.slow  # a child process or a whole pipeline: e2e
def test_bytes_crlf_and_missing_newlines_pass_through_as_the_scripts_do(tmp_path, capsys):
    files = fake.write_archives(tmp_path / "mirror", train=(30, 10, 10), test_size=4)
    _rewrite(files["de-en.tgz"], {"europarl-v7.de-en.en": BAD_EN, "europarl-v7.de-en.de": BAD_DE})
    sums = tmp_path / "sums.md5"
    sums.write_text(f"{prepare.md5sum(files['test.tgz'])}  test.tgz\n")
    work, dest = tmp_path / "work", tmp_path / "bin"
    rc = prepare.main(["--mirror", f"file://{tmp_path / 'mirror'}", "--sums", str(sums), "--work", str(work),
                       "--dest", str(dest), "--workers", "1", "--bpe-merges", "30", "--nwords", "40"])
    err = capsys.readouterr().err
    assert rc == 0, err
    g = work / "google"
    with tarfile.open(files["training-parallel-commoncrawl.tgz"]) as tar:
        cc_en = tar.extractfile("commoncrawl.de-en.en").read()
    # cat: the bytes as they are; the last line without a newline runs into the next corpus's first line
    assert (g / "train.en").read_bytes().startswith(BAD_EN + cc_en[:20])
    tok = (g / "train.tok.en").read_bytes().split(b"\n")
    assert tok[0] == b"Caf \xe9 au lait ."  # \r is a space to tokenizer.perl; the Latin-1 byte kept, a symbol
    assert tok[1] == b"The \xed\xa0\x80 sign and \xff ."  # the surrogate is one symbol, as perl reads it
    assert tok[2].startswith(b"No final newline here" + cc_en[:5])
    assert b"\xed\xa0\x80" in (g / "train.tok.clean.bpe.30.en").read_bytes()
    assert (dest / "train.en-de.en.bin").exists() and "not UTF-8" in err  # fairseq reads U+FFFD there


def _perl_tokenizer(lang, data):
    mosestokenizer = pytest.importorskip("mosestokenizer")
    if shutil.which("perl") is None:
        pytest.skip("perl is not installed")
    script = Path(mosestokenizer.__file__).parent / "tokenizer-v1.1.perl"
    return subprocess.run(["perl", str(script), "-q", "-l", lang], input=data, capture_output=True,
                          check=True).stdout


def test_tokenizer_keeps_surrogates_and_crlf_as_tokenizer_perl():
    """perl's :utf8 layer reads an encoded surrogate as one non-letter character; modern perl dies on other
    malformed bytes (so only surrogates can be compared with the real script)."""
    mosestokenizer = pytest.importorskip("mosestokenizer")
    data = b"Hallo\xed\xa0\x80Welt und a\xed\xb2\x80b.\r\nok caf\xc3\xa9 z\xed\xa0\xbd\xed\xb8\x80z\n\xed\xa0\x80\n"
    perl = _perl_tokenizer("de", data)
    prefixes = Path(mosestokenizer.__file__).parent / "nonbreaking_prefixes" / "nonbreaking_prefix.de"
    ours = b"".join(text.encode(text.moses_tokenize(line, "de", rules_2016=False, prefix_file=str(prefixes))) + b"\n"
                    for line in text.decode(data).split("\n")[:-1])
    assert ours == perl


def test_bytes_round_trip_exactly():
    raw = bytes(range(256)) + b"\xed\xa0\x80\xed\xb2\x80\xed\xbf\xbf\xf4\x90\x80\x80\xc0\xaf"
    assert text.encode(text.decode(raw)) == raw


def test_english_prefixes_are_those_of_march_2017():
    """Moses added "Rs" (rupees) in November 2019; Google's tokenizer (March 2017) splits "Rs." like a word."""
    assert "Rs" not in text.nonbreaking_prefixes("en")
    assert "Mr" in text.nonbreaking_prefixes("en") and "z.B" in text.nonbreaking_prefixes("de")
    assert text.moses_tokenize("It costs 5 Rs.", "en") == "It costs 5 Rs ."
    import hashlib

    assert hashlib.sha256(text.prefix_file_2017("en")).hexdigest() == text.PREFIXES_2017["en"][0]


def test_apply_bpe_strips_as_apply_bpe_py_of_2017(tmp_path):
    """apply_bpe.py of March 2017 writes ' '.join(segments).strip(): the space tokenizer.perl leaves after a
    final .' goes; today's process_line keeps it."""
    from subword_nmt.apply_bpe import BPE

    codes = tmp_path / "codes"
    codes.write_text("#version: 0.2\ny e\n")
    bpe = BPE(open(codes, encoding="utf-8"))
    line = text.moses_tokenize("He said 'yes.'", "en")
    assert line.endswith(" ")
    assert bpe.process_line(line).endswith(" ")  # today's subword-nmt
    ours = prepare.apply_bpe_2017(bpe, line)
    assert ours == bpe.process_line(line)[:-1] and ours.endswith("ye@@ s . &@@ a@@ p@@ o@@ s@@ ;")
    assert prepare.apply_bpe_2017(bpe, "  y  e ") == "y e"
    assert prepare.apply_bpe_2017(bpe, "\x0c") == "\n"  # the codecs reader's line boundaries: two lines
