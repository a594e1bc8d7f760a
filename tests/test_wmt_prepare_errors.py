"""b2t-wmt-prepare refuses bad downloads and bad corpora with one line, and recovers from broken files."""

import io
import tarfile

import pytest
from helpers import assert_one_line_error

from b2t_tools.wmt import fake, prepare


@pytest.fixture
def mirror(tmp_path):
    files = fake.write_archives(tmp_path / "mirror", train=(30, 10, 10), test_size=4)
    sums = tmp_path / "sums.md5"
    sums.write_text(f"{prepare.md5sum(files['test.tgz'])}  test.tgz\n")
    return tmp_path, sums


def _prepare(root, sums, capsys, *extra):
    rc = prepare.main(["--mirror", f"file://{root / 'mirror'}", "--sums", str(sums), "--work", str(root / "work"),
                       "--dest", str(root / "bin"), "--workers", "1", *extra])
    return rc, capsys.readouterr().err


def _one_error_line(err):
    lines = [line for line in err.splitlines() if " prepare: " not in line]  # progress lines
    assert len(lines) == 1, err
    return assert_one_line_error(err, "b2t-wmt-prepare")


def _replace_corpus(root, name, en, de):
    stem = {"de-en.tgz": "europarl-v7.de-en"}[name]
    with tarfile.open(root / "mirror" / name, "w:gz") as tar:
        for lang, data in (("en", en), ("de", de)):
            info = tarfile.TarInfo(f"{stem}.{lang}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_checksum_mismatch(mirror, capsys):
    root, sums = mirror
    sums.write_text("0" * 32 + "  test.tgz\n")
    rc, err = _prepare(root, sums, capsys)
    line = _one_error_line(err)
    assert rc == 2 and "checksum mismatch for test.tgz" in line and "expected 00000000" in line
    assert not (root / "work/downloads/test.tgz").exists() and not (root / "work/downloads/test.tgz.partial").exists()


def test_recorded_checksum_catches_a_changed_file(mirror, capsys):
    root, sums = mirror
    downloads = root / "work/downloads"
    prepare.download_all(root / "work", prepare.archive_urls(f"file://{root / 'mirror'}"), sums)
    assert "dev.tgz" in (downloads / "MD5SUMS").read_text()
    fake.write_archives(root / "mirror", train=(30, 10, 10), test_size=5, seed=1)  # the server's files change
    (downloads / "dev.tgz").unlink()
    with pytest.raises(prepare.ToolError, match="checksum mismatch for dev.tgz"):
        prepare.download_all(root / "work", prepare.archive_urls(f"file://{root / 'mirror'}"), sums)


def test_interrupted_and_truncated_downloads_are_fetched_again(mirror, capsys):
    root, sums = mirror
    downloads = root / "work/downloads"
    downloads.mkdir(parents=True)
    good = (root / "mirror/dev.tgz").read_bytes()
    (downloads / "dev.tgz.partial").write_bytes(good[: len(good) // 3])  # an interrupted download
    (downloads / "de-en.tgz").write_bytes((root / "mirror/de-en.tgz").read_bytes()[:100])  # a cut-off file
    paths = prepare.download_all(root / "work", prepare.archive_urls(f"file://{root / 'mirror'}"), sums)
    err = capsys.readouterr().err
    assert "de-en.tgz: the existing file is broken" in err and "not a complete tar archive" in err
    assert paths["dev"].read_bytes() == good and not (downloads / "dev.tgz.partial").exists()
    assert (downloads / "de-en.tgz").read_bytes() == (root / "mirror/de-en.tgz").read_bytes()
    prepare.check_tar(paths["europarl"], "de-en.tgz")


@pytest.mark.parametrize("en,de,message", [
    (b"a\nb\nc\n", b"a\nb\n", "europarl-v7.de-en.en has 3 lines but europarl-v7.de-en.de has 2"),
    (b"", b"", "europarl-v7.de-en is empty"),
])
def test_bad_corpora_are_refused(mirror, capsys, en, de, message):
    root, sums = mirror
    _replace_corpus(root, "de-en.tgz", en, de)
    rc, err = _prepare(root, sums, capsys)
    assert rc == 2 and message in _one_error_line(err)
    assert not (root / "work/google/train.en").exists()  # nothing half-built is left for a later stage
    assert not (root / "work/.stages/extract.json").exists()


def test_wrong_archive_and_bad_url_option(mirror, capsys):
    root, sums = mirror
    (root / "mirror/training-parallel-commoncrawl.tgz").write_bytes((root / "mirror/test.tgz").read_bytes())
    rc, err = _prepare(root, sums, capsys)
    assert rc == 2 and "has no file ending in commoncrawl.de-en.en" in _one_error_line(err)
    rc, err = _prepare(root, sums, capsys, "--url", "nope=file:///x")
    assert rc == 2 and "expected NAME=URL with NAME one of europarl" in _one_error_line(err)
    rc, err = _prepare(root, sums, capsys, "--url", f"dev=file://{root}/missing.tgz")
    assert rc == 2 and "download of file://" in _one_error_line(err)
