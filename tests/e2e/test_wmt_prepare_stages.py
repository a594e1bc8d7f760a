"""b2t-wmt-prepare's stage markers are keyed on options and inputs, the dictionary is capped as
fairseq's scaling_nmt does it, and --google-archive binarizes Google's files the same way."""

import tarfile

import pytest

from b2t_tools.wmt import YEARS, fake, prepare


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("stages")
    files = fake.write_archives(root / "mirror", train=(120, 40, 40), test_size=8)
    sums = root / "sums.md5"
    sums.write_text(f"{prepare.md5sum(files['test.tgz'])}  test.tgz\n")
    base = ["--mirror", f"file://{root / 'mirror'}", "--sums", str(sums), "--work", str(root / "work"),
            "--dest", str(root / "bin"), "--workers", "1", "--bpe-merges", "30", "--nwords", "24"]
    assert prepare.main(base) == 0
    return root, base


def _rerun(base, capsys, *extra):
    capsys.readouterr()
    assert prepare.main(base + list(extra)) == 0
    err = capsys.readouterr().err
    return {s for s in prepare.STAGES if f"{s}: complete, skipped" in err}, {s for s in prepare.STAGES
                                                                             if f"{s}: running" in err}


def _dict_size(path):
    return len(path.read_text(encoding="utf-8").splitlines())


def test_google_archive_route_binarizes_the_same_way(built, tmp_path, capsys):
    root, base = built
    # pack the fixture's Google-named files as Google's archive holds them (one folder)
    g = root / "work/google"
    archive = tmp_path / "wmt16_en_de.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name in prepare.google_archive_files(30) + ["vocab.bpe.30", "train.tok.clean.en"]:
            tar.add(g / name, arcname=f"wmt16_de_en/{name}")
    dest = tmp_path / "bin"
    assert prepare.main(["--google-archive", str(archive), "--work", str(tmp_path / "work"), "--dest", str(dest),
                         "--bpe-merges", "30", "--workers", "1", "--nwords", "24"]) == 0
    ours = root / "bin"
    for name in ["dict.en.txt", "dict.de.txt", "train.en-de.en.bin", "train.en-de.de.idx", "test.en-de.de.bin"]:
        assert (dest / name).read_bytes() == (ours / name).read_bytes(), name
    assert _dict_size(dest / "dict.en.txt") == 24 - 4  # capped: 20 words + 4 special symbols
    assert len((g / "vocab.bpe.30").read_text().split()) > 20  # more words than that: the cap did cut
    for y in YEARS:
        assert (dest / "refs" / f"newstest{y}.tok.de").read_bytes() == (g / f"newstest{y}.tok.de").read_bytes()
    capsys.readouterr()
    assert prepare.main(["--google-archive", str(tmp_path / "nope.tgz"), "--work", str(tmp_path / "w2"),
                         "--dest", str(tmp_path / "b2")]) == 2
    assert "--google-archive" in capsys.readouterr().err


def test_changed_options_rerun_their_stage_and_the_later_ones(built, capsys, monkeypatch):
    root, base = built
    g, dest = root / "work/google", root / "bin"
    calls = []

    def fake_binarize(google, dest, workers, merges, nwords, *_):  # fairseq-preprocess is tested above; here: when
        calls.append((merges, nwords))
        tmp = prepare.DEST.begin(dest, {})  # as the real one: built beside, recorded, renamed onto --dest
        for name in ("dict.en.txt", "dict.de.txt", "train.en-de.en.bin", "subsets.json"):
            (tmp / name).write_text(f"{merges} {nwords}\n")
        (tmp / f"bpe.{merges}").write_text("")
        prepare.DEST.commit(tmp, dest)

    monkeypatch.setattr(prepare, "binarize", fake_binarize)
    train_lines = len((g / "train.tok.clean.en").read_text().splitlines())
    skipped, ran = _rerun(base, capsys)
    assert skipped == set(prepare.STAGES) and not ran

    skipped, ran = _rerun(base, capsys, "--max-len", "5")
    assert skipped == {"extract", "tokenize"} and ran == {"clean", "bpe", "binarize"}
    assert max(len(line.split()) for line in (g / "train.tok.clean.en").read_text().splitlines()) <= 5
    assert len((g / "train.tok.clean.en").read_text().splitlines()) < train_lines
    assert calls == [(30, 24)]

    skipped, ran = _rerun(base, capsys, "--max-len", "5", "--bpe-merges", "20")
    assert skipped == {"extract", "tokenize", "clean"} and ran == {"bpe", "binarize"}
    assert (dest / "bpe.20").exists() and (g / "train.tok.clean.bpe.20.en").exists()

    skipped, ran = _rerun(base, capsys, "--max-len", "5", "--bpe-merges", "20", "--nwords", "16")
    assert ran == {"binarize"}
    assert calls[-1] == (20, 16)

    # an input changed by hand (same options) is noticed too
    text = (g / "newstest2014.tok.en").read_text()
    (g / "newstest2014.tok.en").write_text(text)  # same bytes, new time: its stage's key changes
    skipped, ran = _rerun(base, capsys, "--max-len", "5", "--bpe-merges", "20", "--nwords", "16")
    assert ran == {"bpe", "binarize"}

    # archives deleted after extraction (to save disk): the extracted files are kept, nothing is downloaded
    for archive in (root / "work/downloads").glob("*.tgz"):
        archive.unlink()
    skipped, ran = _rerun(base, capsys, "--max-len", "5", "--bpe-merges", "20", "--nwords", "16")
    assert skipped == set(prepare.STAGES) and not list((root / "work/downloads").glob("*.tgz"))


def test_bad_option_values_are_one_line_errors(built, capsys):
    _, base = built
    for flag, value in (("--nwords", "0"), ("--bpe-merges", "-1"), ("--max-len", "0"), ("--ratio", "0")):
        capsys.readouterr()
        assert prepare.main(base + [flag, value]) == 2
        err = [x for x in capsys.readouterr().err.splitlines() if not x.startswith("[prepare]")]
        assert len(err) == 1 and err[0].startswith(f"b2t-wmt-prepare: error: {flag} ")


