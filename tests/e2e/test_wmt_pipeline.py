"""The whole WMT recipe on tiny WMT-shaped archives served through file:// URLs:
download + verify, tokenize, BPE, binarize, train with two gloo processes, average, generate, score, table."""

import json

import pytest
from helpers import REPO, run

from b2t_tools.wmt import YEARS, fake, prepare, results_table

pytestmark = pytest.mark.e2e  # prepares data and trains: minutes

SCRIPTS = REPO / "scripts"


@pytest.fixture(scope="module")
def mirror(tmp_path_factory):
    root = tmp_path_factory.mktemp("wmt")
    files = fake.write_archives(root / "mirror")
    # the built-in table knows the real test.tgz's md5; a mirror of other files needs its own sums file
    sums = root / "sums.md5"
    sums.write_text(f"{prepare.md5sum(files['test.tgz'])}  test.tgz\n")
    return root, sums


@pytest.fixture(scope="module")
def prepared(mirror):
    root, sums = mirror
    work, dest = root / "work", root / "bin"
    p = run(["bash", SCRIPTS / "prepare-wmt16-en-de.sh", "--mirror", f"file://{root / 'mirror'}", "--sums", sums,
             "--work", work, "--dest", dest, "--bpe-merges", "40", "--workers", "1"])
    return work, dest, p.stderr


def test_prepare_outputs(prepared):
    work, dest, log = prepared
    g = work / "google"
    for name in ("de-en.tgz", "training-parallel-commoncrawl.tgz", "training-parallel-nc-v11.tgz", "dev.tgz"):
        assert name in (work / "downloads" / "MD5SUMS").read_text()  # recorded on first download
    assert not list((work / "downloads").glob("*.partial"))
    assert len((g / "train.en").read_text().splitlines()) == 500
    tok = (g / "train.tok.clean.en").read_text()
    assert "&quot;" in tok and " @-@ " not in tok and "well-known" in tok  # Moses escapes, no -a
    assert "@@ " in (g / "train.tok.clean.bpe.40.de").read_text()  # 40 merges: words stay split
    assert len((dest / "bpe.40").read_text().splitlines()) == 41  # version line + 40 merges
    assert (g / "bpe.40").read_bytes() == (dest / "bpe.40").read_bytes()
    vocab = (g / "vocab.bpe.40").read_text().split("\n")[:-1]
    assert len(vocab) == len(set(vocab)) and " " not in "".join(vocab)
    for y in YEARS:
        for kind in ("", ".tok", ".tok.bpe.40"):
            assert len((g / f"newstest{y}{kind}.de").read_text().splitlines()) == 20
    subsets = json.loads((dest / "subsets.json").read_text())
    assert subsets["2013"] == "valid" and subsets["2014"] == "test" and len(subsets) == 7
    for y in YEARS:
        assert (dest / f"{subsets[str(y)]}.en-de.de.bin").exists()
        refs = (dest / "refs" / f"newstest{y}.de").read_text().splitlines()
        assert len(refs) == 20 and not any("@@" in r or "&quot;" in r for r in refs)
        assert refs == (g / f"newstest{y}.de").read_text().splitlines()
    # newstest2015/2016: the de-en direction's files, as Google's script converts them; SGM spacing removed
    assert "(ende file)" not in (g / "newstest2015.en").read_text() + (g / "newstest2016.de").read_text()
    assert not any(line != line.strip() for line in (g / "newstest2016.en").read_text().splitlines())
    assert (dest / "dict.en.txt").read_text() == (dest / "dict.de.txt").read_text()  # --joined-dictionary


def test_rerun_skips_finished_stages(prepared, mirror, capsys):
    work, dest, _ = prepared
    root, sums = mirror
    before = (dest / "train.en-de.en.bin").stat().st_mtime_ns
    assert prepare.main(["--mirror", f"file://{root / 'mirror'}", "--sums", str(sums), "--work", str(work),
                         "--dest", str(dest), "--bpe-merges", "40", "--workers", "1"]) == 0
    err = capsys.readouterr().err
    for stage in prepare.STAGES:
        assert f"{stage}: complete, skipped" in err
    assert "downloading" not in err and (dest / "train.en-de.en.bin").stat().st_mtime_ns == before


@pytest.fixture(scope="module")
def trained(prepared):
    work, dest, _ = prepared
    save = work.parent / "ckpt"
    p = run(["bash", SCRIPTS / "train.sh", "transformer_b2t", "6", "--gpus", "0", "--cpu-procs", "2",
             "--max-tokens", "512", "--tokens-per-update", "1024", "--data", dest, "--save-dir", save, "--",
             "--arch", "transformer_b2t_tiny", "--max-update", "4", "--save-interval-updates", "2",
             "--keep-interval-updates", "5", "--log-interval", "1"])
    return save, p.stdout + p.stderr


def test_two_process_training(trained):
    save, log = trained
    assert "distributed init (rank 1)" in log and "distributed init (rank 0)" in log
    assert (save / "DONE").exists() and (save / "checkpoint_1_2.pt").exists() and (save / "checkpoint_1_4.pt").exists()
    lines = [json.loads(line) for line in (save / "train.log").read_text().splitlines()
             if line.startswith("{") and '"num_updates"' in line]  # --log-format json: one record a line
    assert lines and lines[-1]["num_updates"] == "4"


def test_average_evaluate_and_table(trained, prepared, capsys):
    save, _ = trained
    work, dest, _ = prepared
    out = work.parent / "results" / "tiny_b2t.json"
    p = run(["bash", SCRIPTS / "evaluate.sh", save, "--data", dest, "--name", "tiny_b2t", "--out", out,
             "--last", "2", "--updates", "--", "--cpu", "--generate-args", "--max-len-a 1 --max-len-b 2",
             "--keep-outputs", work.parent / "hyps"])
    assert "averaged 2 checkpoint(s)" in p.stdout and (save / "checkpoint_avg_update_last2.pt").exists()
    result = json.loads(out.read_text())
    assert set(result["years"]) == {str(y) for y in YEARS}
    assert result["years"]["2014"]["lenpen"] == 0.6 and result["years"]["2010"]["lenpen"] == 1.0
    assert all(r["sentences"] == 20 for r in result["years"].values())
    assert "tok:13a" in result["sacrebleu_signature"] and "case:mixed" in result["sacrebleu_signature"]
    avg = sum(result["years"][str(y)]["sacrebleu"] for y in YEARS) / 7
    assert abs(result["average_2010_2016"]["sacrebleu"] - avg) < 0.01
    hyps = (work.parent / "hyps" / "newstest2014.de").read_text().splitlines()
    assert len(hyps) == 20 and not any("@@" in h for h in hyps)
    assert results_table.main([str(out.parent)]) == 0
    table = capsys.readouterr().out
    assert "| tiny_b2t |" in table and "| paper: B2T 18L (2023 code) | 25.27 |" in table
    assert "Tokenized BLEU with compound splitting" in table


def _weights(path):
    import torch

    return {k: v.float() for k, v in torch.load(path, weights_only=True)["model"].items() if v.is_floating_point()}


def test_progress_check_is_rebuilt_by_evaluate_and_reproduce_table(trained, prepared, mirror, tmp_path):
    """End to end: evaluate.sh as a progress check mid-training, training saves a newer
    checkpoint and finishes; then evaluate.sh and reproduce-table.sh must average and score the new checkpoints
    (they used to reuse the early average and skip the existing result: 0.24 BLEU where the final scored 36.55)."""
    import shutil

    save, _ = trained
    work, dest, _ = prepared
    root, sums = mirror
    name = "transformer_b2t_6l"
    run_dir, results = tmp_path / "ckpts" / name, tmp_path / "results"
    shutil.copytree(save, run_dir, ignore=shutil.ignore_patterns("checkpoint_avg_*", "checkpoint_1_4.pt", "DONE"))
    fast = ["--last", "1", "--updates", "--", "--years", "2014", "--generate-args", "--max-len-a 1 --max-len-b 2"]
    out, avg = results / f"{name}.json", run_dir / "checkpoint_avg_update_last1.pt"
    run(["bash", SCRIPTS / "evaluate.sh", run_dir, "--data", dest, "--out", out] + fast)  # mid-training
    early_avg, early_out = avg.read_bytes(), out.read_bytes()
    shutil.copy(save / "checkpoint_1_4.pt", run_dir)  # training goes on ...
    (run_dir / "DONE").write_text("finished\n")  # ... and finishes
    final = _weights(run_dir / "checkpoint_1_4.pt")

    # evaluate.sh again: a new average of the new last checkpoint, and a result that says so
    run(["bash", SCRIPTS / "evaluate.sh", run_dir, "--data", dest, "--out", out] + fast)
    assert all(torch_equal(_weights(avg)[k], v) for k, v in final.items()), "the progress-check average was reused"
    result = json.loads(out.read_text())
    assert [s["name"] for s in result["provenance"]["averaged_from"]] == ["checkpoint_1_4.pt"]
    assert result["provenance"]["averaged_from"][0]["num_updates"] == 4

    # reproduce-table.sh finding the progress check's average and result: both are rebuilt, not skipped
    avg.write_bytes(early_avg)
    out.write_bytes(early_out)
    env = {"SETTINGS": "transformer_b2t:6", "CKPTS": str(run_dir.parent), "RESULTS": str(results), "DATA": str(dest),
           "PREPARE_ARGS": f"--mirror file://{root / 'mirror'} --sums {sums} --work {work} --bpe-merges 40 "
                           "--workers 1",
           "EVAL_ARGS": "--last 1 --updates -- --years 2014 --generate-args '--max-len-a 1 --max-len-b 2'"}
    p = run(["bash", SCRIPTS / "reproduce-table.sh"], env=env)
    assert "out of date" in p.stdout and "evaluating again" in p.stdout
    assert all(torch_equal(_weights(avg)[k], v) for k, v in final.items())
    result = json.loads(out.read_text())
    assert [s["name"] for s in result["provenance"]["averaged_from"]] == ["checkpoint_1_4.pt"]
    assert result["provenance"]["fingerprint"] != json.loads(early_out)["provenance"]["fingerprint"]
    table = (results / "table.md").read_text()
    assert f"| {name} | checkpoint_avg_update_last1.pt | 1: checkpoint_1_4.pt | 4 |" in table and "stale" not in table
    # (a re-run that finds everything current redoes nothing: tests/test_average_and_result_provenance.py, in-process)


def torch_equal(a, b):
    return a.shape == b.shape and bool((a == b).all())
