"""b2t-wmt-prepare replaces --dest as a whole, so it replaces only a folder it made (its marker file, or the
--dest its own stage record names) and refuses a --dest that overlaps --work; bad places are one line."""

import json

import pytest
from helpers import assert_one_line_error

from b2t_tools.wmt import fake, prepare


@pytest.fixture(scope="module")
def mirror(tmp_path_factory):
    root = tmp_path_factory.mktemp("dest")
    files = fake.write_archives(root / "mirror", train=(30, 10, 10), test_size=4)
    sums = root / "sums.md5"
    sums.write_text(f"{prepare.md5sum(files['test.tgz'])}  test.tgz\n")
    return root


def _prepare(root, work, dest, capsys, *extra):
    rc = prepare.main(["--mirror", f"file://{root / 'mirror'}", "--sums", str(root / "sums.md5"), "--work", str(work),
                       "--dest", str(dest), "--workers", "1", "--bpe-merges", "30", "--nwords", "40", *extra])
    return rc, capsys.readouterr().err


def _tree(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_a_folder_we_did_not_make_is_never_replaced(mirror, tmp_path, capsys):
    other = tmp_path / "other-corpus"
    (other / "sub").mkdir(parents=True)
    (other / "train.en").write_text("someone's data\n")
    (other / "sub" / "x").write_text("x\n")
    before = _tree(other)
    rc, err = _prepare(mirror, tmp_path / "work", other, capsys)
    assert rc == 2 and "did not write" in assert_one_line_error(err, "b2t-wmt-prepare")
    assert _tree(other) == before and (other / "train.en").read_text() == "someone's data\n"
    assert not (tmp_path / "work").exists()  # refused before anything was written


@pytest.mark.slow  # a child process or a whole pipeline: e2e
def test_our_output_is_replaced_and_marked(mirror, tmp_path, capsys):
    work, dest = tmp_path / "work", tmp_path / "bin"
    rc, err = _prepare(mirror, work, dest, capsys)
    assert rc == 0, err
    marker = json.loads((dest / prepare.MARKER).read_text())
    assert marker["made_by"] == "b2t-wmt-prepare" and marker["work"] == str(work.resolve())
    rc, err = _prepare(mirror, work, dest, capsys, "--nwords", "32")  # changed option: rebuilt in place
    assert rc == 0 and "binarize: running" in err, err
    assert len((dest / "dict.en.txt").read_text().splitlines()) <= 32 - 4
    # a --dest written before the marker existed: this work folder's stage record names it, so it is ours
    (dest / prepare.MARKER).unlink()
    rc, err = _prepare(mirror, work, dest, capsys, "--nwords", "40")
    assert rc == 0 and (dest / prepare.MARKER).is_file(), err
    # the same folder is not ours to a run with another work folder
    (dest / prepare.MARKER).unlink()
    rc, err = _prepare(mirror, tmp_path / "work2", dest, capsys)
    assert rc == 2 and "did not write" in assert_one_line_error(err, "b2t-wmt-prepare")
    assert (dest / "dict.en.txt").is_file()


@pytest.mark.parametrize("where", ["work", "work/google", "work/x", "."])
def test_dest_overlapping_work_is_refused(mirror, tmp_path, capsys, where):
    work = tmp_path / "work"
    (work / "google").mkdir(parents=True)
    (work / "google" / "train.en").write_text("kept\n")
    dest = tmp_path / where if where != "." else tmp_path
    rc, err = _prepare(mirror, work, dest, capsys)
    line = assert_one_line_error(err, "b2t-wmt-prepare", "--work")
    assert rc == 2 and ("is --work" in line or "inside" in line or "contains" in line), line
    assert (work / "google" / "train.en").read_text() == "kept\n"


def test_work_or_dest_that_is_a_file(mirror, tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x\n")
    for work, dest, what in ((f, tmp_path / "bin", "--work"), (f / "sub", tmp_path / "bin", "is under the file"),
                             (tmp_path / "work", f, "--dest")):
        rc, err = _prepare(mirror, work, dest, capsys)
        assert rc == 2 and what in assert_one_line_error(err, "b2t-wmt-prepare"), err
    assert f.read_text() == "x\n"


def test_unusable_places_and_numbers_are_one_line(mirror, tmp_path, capsys):
    ro = "/sys/b2t-test-readonly/out"  # root ignores chmod: /sys refuses new files even to root
    for work, dest, extra, expect in (
            (tmp_path / "work", ro, [], "cannot write in /sys/b2t-test-readonly"),
            (ro, tmp_path / "bin", [], "pass a --work folder you can write to"),
            (tmp_path / "work", tmp_path / "bin", ["--workers", "1000000"], "pass at most"),  # was a million processes
            (tmp_path / "work", tmp_path / "bin", ["--google-archive", str(tmp_path)], "is a folder")):
        rc, err = _prepare(mirror, work, dest, capsys, *extra)
        assert rc == 2 and expect in assert_one_line_error(err, "b2t-wmt-prepare"), err
    assert not (tmp_path / "bin").exists()
