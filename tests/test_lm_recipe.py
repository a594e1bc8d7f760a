"""The WikiText-103 recipe: b2t-lm-prepare on small local archives built here (the real download cannot
run in CI), b2t-lm-train's commands, b2t-lm-evaluate's perplexity table."""

import hashlib
import json
import subprocess
import sys
import zipfile

import pytest
from helpers import REPO, assert_one_line_error, run

from b2t_fairseq import recipe
from b2t_tools.lm import prepare as lm_prepare
from b2t_tools.lm import train as lm_train

_WORDS = "the a cat dog house tree red blue big small runs sees eats and with on".split()


def make_archive(path, seed=0, drop=None):
    """A zip laid out as wikitext-103-v1.zip: wikitext-103/wiki.{train,valid,test}.tokens."""
    import random

    rng = random.Random(seed)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for split, n in (("train", 300), ("valid", 30), ("test", 30)):
            if split == drop:
                continue
            lines = [" = Title = \n"] + [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 15))) + " \n"
                                         for _ in range(n)]
            z.writestr(f"wikitext-103/wiki.{split}.tokens", "".join(lines))
    return hashlib.md5(path.read_bytes()).hexdigest()


def prep(tmp_path, archive, md5, *extra):
    return run([sys.executable, "-m", "b2t_tools.lm.prepare", "--work", tmp_path / "work", "--dest",
                tmp_path / "bin", "--url", archive.as_uri(), "--md5", md5, "--workers", "1", *extra],
               check=False, cwd=REPO)


@pytest.mark.slow
def test_prepare_downloads_checks_extracts_and_binarizes_and_resumes(tmp_path):
    archive = tmp_path / "wikitext-103-v1.zip"
    md5 = make_archive(archive)
    p = prep(tmp_path, archive, md5)
    assert p.returncode == 0, p.stderr
    for name in ("dict.txt", "train.bin", "valid.bin", "test.bin", "test.idx"):
        assert (tmp_path / "bin" / name).is_file(), name
    assert "the" in (tmp_path / "bin" / "dict.txt").read_text()
    # done: every stage skipped
    p = prep(tmp_path, archive, md5)
    out = p.stdout + p.stderr
    assert p.returncode == 0 and out.count("complete, skipped") == 3, out
    # nothing stale: an extracted text changed by hand is extracted again, and binarized again
    valid = tmp_path / "work" / "wikitext-103" / "wiki.valid.tokens"
    original = valid.read_text()
    valid.write_text(" a cat \n")
    p = prep(tmp_path, archive, md5)
    out = p.stdout + p.stderr
    assert p.returncode == 0 and "extract: running" in out and "binarize: running" in out, out
    assert valid.read_text() == original


@pytest.mark.slow
def test_prepare_refuses_a_wrong_checksum_and_a_wrong_archive_in_one_line(tmp_path):
    archive = tmp_path / "wikitext-103-v1.zip"
    make_archive(archive)
    p = prep(tmp_path, archive, "0" * 32)
    assert p.returncode == 2
    assert_one_line_error(p.stderr, "b2t-lm-prepare", "checksum mismatch")
    assert not (tmp_path / "work" / "downloads" / "wikitext-103-v1.zip").exists()  # not kept as if good
    other = tmp_path / "other" / "wikitext-103-v1.zip"
    other.parent.mkdir()
    md5 = make_archive(other, drop="test")
    p = prep(tmp_path, other, md5)
    assert p.returncode == 2
    assert_one_line_error(p.stderr, "b2t-lm-prepare", "wiki.test.tokens")


def _tree(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_prepare_never_replaces_a_folder_it_did_not_make(tmp_path, capsys):
    """--dest is replaced as a whole: someone's folder (no marker of ours) is refused before any download."""
    other = tmp_path / "bin"
    (other / "sub").mkdir(parents=True)
    (other / "train.txt").write_text("someone's data\n")
    (other / "sub" / "x").write_text("x\n")
    before = _tree(other)
    rc = lm_prepare.main(["--work", str(tmp_path / "work"), "--dest", str(other), "--url", "file:///nowhere.zip",
                          "--workers", "1"])
    assert rc == 2 and "did not write" in assert_one_line_error(capsys.readouterr().err, "b2t-lm-prepare")
    assert _tree(other) == before and (other / "train.txt").read_text() == "someone's data\n"
    assert not (tmp_path / "work").exists()  # refused before anything was written


@pytest.mark.parametrize("argv, fragment", [
    (["--workers", "0"], "--workers 0: must be at least 1"),
    (["--workers", "-1"], "--workers -1: must be at least 1"),
    (["--workers", "99999999"], "more processes than this machine's"),
    (["--md5", "zz"], "is not an md5"),
])
def test_prepare_refuses_bad_numbers_before_anything_is_written(tmp_path, capsys, argv, fragment):
    rc = lm_prepare.main(["--work", str(tmp_path / "work"), "--dest", str(tmp_path / "bin"), "--url",
                          "file:///nowhere.zip", *argv])
    assert rc == 2 and fragment in assert_one_line_error(capsys.readouterr().err, "b2t-lm-prepare")
    assert not (tmp_path / "work").exists() and not (tmp_path / "bin").exists()


@pytest.mark.parametrize("where", ["work", "work/x", "."])
def test_prepare_refuses_a_dest_overlapping_work(tmp_path, capsys, where):
    work = tmp_path / "work"
    work.mkdir()
    rc = lm_prepare.main(["--work", str(work), "--dest", str(tmp_path / where), "--url", "file:///nowhere.zip"])
    assert rc == 2 and "--work" in assert_one_line_error(capsys.readouterr().err, "b2t-lm-prepare")


@pytest.mark.slow
def test_prepare_marks_its_dest_and_replaces_only_that(tmp_path):
    archive = tmp_path / "wikitext-103-v1.zip"
    md5 = make_archive(archive)
    assert prep(tmp_path, archive, md5).returncode == 0
    marker = json.loads((tmp_path / "bin" / lm_prepare.MARKER).read_text())
    assert marker["made_by"] == "b2t-lm-prepare" and marker["work"] == str((tmp_path / "work").resolve())
    p = prep(tmp_path, archive, md5, "--force")  # every stage again: our own --dest is replaced
    assert p.returncode == 0 and "binarize: running" in p.stderr + p.stdout, p.stderr
    (tmp_path / "bin" / lm_prepare.MARKER).unlink()  # no longer ours: kept, and the run refused
    p = prep(tmp_path, archive, md5, "--force")
    assert p.returncode == 2 and "did not write" in assert_one_line_error(p.stderr, "b2t-lm-prepare")
    assert (tmp_path / "bin" / "train.bin").is_file()


def test_prepare_module_imports_no_torch():
    code = "import sys, b2t_tools.lm.prepare; print('torch' in sys.modules, 'fairseq' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO).stdout
    assert out.split() == ["False", "False"]
    assert lm_prepare.MD5 == "9ddaacaf6af0710eda8c456decff7832"


@pytest.mark.parametrize("layers", recipe.LM_DEPTHS)
def test_train_command_is_the_recipe(tmp_path, layers):
    cmd = lm_train.command("data-bin/wikitext-103", "transformer_lm_b2t", layers, "ck", gpus=2)
    flags = dict(zip(cmd, cmd[1:]))
    assert flags["--arch"] == "transformer_lm_b2t" and flags["--decoder-layers"] == str(layers)
    assert flags["--task"] == "language_modeling" and flags["--tokens-per-sample"] == "512"
    assert flags["--lr"] == "0.0005" and flags["--warmup-updates"] == "4000" and flags["--sample-break-mode"] == "none"
    # 2 GPUs x 2048 tokens x 16: the tokens per update of fairseq's README, on any setup
    assert int(flags["--update-freq"]) * 2 * int(flags["--max-tokens"]) == recipe.LM_TOKENS_PER_UPDATE == 65536
    one = lm_train.command("d", "transformer_lm_pre_ln", layers, "c", gpus=1)
    assert one[one.index("--update-freq") + 1] == "32"


def test_train_refuses_bad_setups_in_one_line(tmp_path, capsys):
    (tmp_path / "dict.txt").write_text("a 1\n")
    for argv, needle in ((["--arch", "transformer_lm_b2t", "--max-tokens", "3000"], "use --max-tokens 2048"),
                         (["--arch", "transformer_lm_b2t", "--layers", "0"], "at least 1"),
                         (["--arch", "transformer_lm_b2t", "--gpus", "2", "--nodes", "2", "--node-rank", "2"],
                          "--node-rank 2 does not exist")):
        assert lm_train.main([str(tmp_path), *argv, "--dry-run"]) == 2
        assert_one_line_error(capsys.readouterr().err, "b2t-lm-train", needle)
    assert lm_train.main([str(tmp_path / "nothing"), "--arch", "transformer_lm_b2t"]) == 2
    assert_one_line_error(capsys.readouterr().err, "b2t-lm-train", "b2t-lm-prepare")


def test_train_hint_for_a_gpu_count_that_cannot_keep_the_tokens_per_update(capsys):
    """65,536 tokens an update over 3 GPUs: no --max-tokens can fit, so the fix is the GPU count (or the target)."""
    assert lm_train.main(["data", "--arch", "transformer_lm_b2t", "--gpus", "3", "--dry-run"]) == 2
    line = assert_one_line_error(capsys.readouterr().err, "b2t-lm-train", "no --max-tokens fits 3 processes",
                                 "e.g. 2 or 4 processes", "--tokens-per-update")
    assert "e.g. 2048" not in line  # the old hint: a --max-tokens, when none divides 65,536 over 3 GPUs
    assert lm_train.main(["data", "--arch", "transformer_lm_b2t", "--gpus", "3", "--tokens-per-update", str(3 * 2048 * 10),
                          "--dry-run"]) == 0
    assert "--update-freq 10 " in capsys.readouterr().out


@pytest.mark.parametrize("argv, want", [
    (["--gpus", "8", "--nodes", "4", "--launcher", "slurm"],
     ["srun --nodes 4 --ntasks-per-node 8 --gpus-per-node 8 ", "--distributed-world-size 32", "--update-freq 1 ",
      "--distributed-port 29500", "--fp16"]),
    (["--gpus", "4", "--nodes", "2", "--node-rank", "1", "--master-addr", "h0"],
     ["torch.distributed.run --nnodes 2 --node_rank 1 --master_addr h0", "--nproc_per_node 4",
      "-m b2t_tools.commands.torchrun_train", "--distributed-world-size 8", "--update-freq 4 "]),
    (["--gpus", "1"], ["b2t-train data-not-here --arch", "--update-freq 32 ", "--fp16"]),
    (["--cpu", "--cpu-procs", "2", "--max-tokens", "512"],
     ["--standalone --nproc_per_node 2", "--cpu", "--distributed-backend gloo", "--update-freq 64 "]),
])
def test_train_launches_like_train_sh_and_dry_run_needs_no_data(capsys, argv, want):
    """Nodes, SLURM and CPU processes: the WMT launcher's (b2t_tools/launch.py); --dry-run without the data."""
    assert lm_train.main(["data-not-here", "--arch", "transformer_lm_b2t", *argv, "--dry-run"]) == 0
    out = capsys.readouterr().out
    for w in want:
        assert w in out, (w, out)
    if "--cpu" in argv:
        assert "--fp16" not in out


def test_evaluate_writes_the_table_beside_the_published_number(tmp_path):
    from b2t_tools.lm.evaluate import table

    text = table([{"label": "B2T", "layers": 16, "subset": "test", "ppl": 31.5, "checkpoint": "c.pt"}])
    assert "| B2T | 16 | test | 31.50 | measured (c.pt) |" in text
    assert "30.46 | published: fairseq examples/language_model/README.md" in text
    assert "No published perplexity at 16 layers" in text


@pytest.mark.slow
def test_recipe_train_then_evaluate_on_a_tiny_corpus(tmp_path):
    """prepare -> b2t-lm-train (CPU, a few updates via extra flags) -> b2t-lm-evaluate."""
    archive = tmp_path / "wikitext-103-v1.zip"
    assert prep(tmp_path, archive, make_archive(archive)).returncode == 0
    save = tmp_path / "ck"
    run([sys.executable, "-m", "b2t_tools.lm.train", tmp_path / "bin", "--arch", "transformer_lm_b2t", "--layers", "2",
         "--cpu", "--max-tokens", "256", "--save-dir", save, "--", "--max-update", "4", "--tokens-per-sample", "64",
         "--decoder-embed-dim", "32", "--decoder-ffn-embed-dim", "64", "--decoder-attention-heads", "2",
         "--decoder-input-dim", "32", "--decoder-output-dim", "32", "--no-epoch-checkpoints", "--num-workers", "0"],
        cwd=REPO)
    out = tmp_path / "ppl.json"
    p = run([sys.executable, "-m", "b2t_tools.lm.evaluate", tmp_path / "bin", save / "checkpoint_last.pt", "--cpu",
             "--tokens-per-sample", "64", "--context-window", "32", "--out", out], cwd=REPO)
    rows = list(json.loads(out.read_text()).values())
    assert len(rows) == 1 and rows[0]["label"] == "B2T" and rows[0]["layers"] == 2 and rows[0]["ppl"] > 1
    assert "| B2T | 2 | test |" in p.stdout


def test_another_url_is_fetched_extracted_and_binarized_again(tmp_path, monkeypatch):
    """No checksum, another --url: nothing of the first archive is kept (its download, text or binarized data)."""
    built = []

    def fake_binarize(text_dir, dest, workers, record, known_ours=False):  # fairseq-preprocess costs seconds
        tmp = lm_prepare.DEST.begin(dest, record, known_ours or None)
        for name in ("dict.txt", "train.bin", "valid.bin", "test.bin"):
            (tmp / name).write_bytes((text_dir / "wiki.train.tokens").read_bytes())
        lm_prepare.DEST.commit(tmp, dest, known_ours or None)
        built.append(record.get("url"))

    monkeypatch.setattr(lm_prepare, "binarize", fake_binarize)
    archives = []
    for seed in (0, 1):
        archives.append(tmp_path / f"mirror{seed}" / "wikitext-103-v1.zip")
        archives[-1].parent.mkdir()
        make_archive(archives[-1], seed=seed)
    argv = ["--work", str(tmp_path / "work"), "--dest", str(tmp_path / "bin"), "--md5", "", "--workers", "1"]
    for archive in archives + archives[:1]:
        assert lm_prepare.main([*argv, "--url", archive.as_uri()]) == 0
        with zipfile.ZipFile(archive) as z:
            want = z.read("wikitext-103/wiki.train.tokens")
        assert (tmp_path / "work" / "downloads" / "wikitext-103-v1.zip").read_bytes() == archive.read_bytes()
        assert (tmp_path / "bin" / "train.bin").read_bytes() == want
    assert built == [a.as_uri() for a in archives + archives[:1]]
    assert lm_prepare.main([*argv, "--url", archives[0].as_uri()]) == 0 and len(built) == 3  # the same: all kept
