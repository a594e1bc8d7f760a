"""b2t-demo --task lm: decoder-only Post-LN / Pre-LN / B2T on the English side of Tatoeba, same report layout."""

import json
from pathlib import Path

import pytest
from helpers import assert_one_line_error, run

from b2t_tools.demo import cli as demo
from b2t_tools.demo import runs


# the report's layout and the LM's numbers, at a fraction of the quick budget (the deep-vs-shallow evidence is
# test_demo.py's; the LM's own is in results/demo-lm-cpu/)
SMALL = ["--depths", "2,4", "--max-update", "20"]
DEEP = 4


@pytest.fixture(scope="module")
def quick_lm_demo(tatoeba_zip, tmp_path_factory):
    out = tmp_path_factory.mktemp("lmdemo") / "out"
    cache = tmp_path_factory.getbasetemp() / "tatoeba-cache"  # shared with test_demo.py's data
    p = run(["b2t-demo", "--task", "lm", "--quick", *SMALL, "--corpus", tatoeba_zip, "--out", out, "--cache", cache])
    return out, cache, p, tatoeba_zip


def test_lm_runs_train_decoder_only_models_with_the_lm_task():
    cfg = demo.resolve_config(demo.get_parser().parse_args(["--task", "lm", "--quick"]))
    cmd = runs.train_command("BIN", "RUN", "b2t", 18, cfg)
    flags = dict(zip(cmd, cmd[1:]))
    assert flags["--task"] == "language_modeling" and flags["--arch"] == "transformer_lm_b2t_tiny"
    assert flags["--decoder-layers"] == "18" and "--encoder-layers" not in flags
    assert flags["--criterion"] == "cross_entropy" and "--share-all-embeddings" not in cmd
    assert flags["--lr"] == str(cfg.lr) and flags["--max-update"] == str(cfg.max_update)
    mt = demo.resolve_config(demo.get_parser().parse_args(["--quick"]))
    assert runs.run_key("b2t", 18, Path("d"), cfg) != runs.run_key("b2t", 18, Path("d"), mt)  # never shared


def test_lm_demo_writes_the_report(quick_lm_demo):
    out, _, p, _ = quick_lm_demo
    res = json.loads((out / "results.json").read_text())
    assert res["task"] == "lm"
    got = {(r["arch"], r["layers"]) for r in res["runs"]}
    assert got == {(a, d) for a in ("post_ln", "pre_ln", "b2t") for d in (2, DEEP)}
    for r in res["runs"]:
        assert r["updates"] == res["config"]["max_update"] and r["bleu"] is None
        assert r["ppl"] is None or abs(r["ppl"] - 2 ** r["valid_loss"]) < 1e-6 * r["ppl"]
    deep = {r["arch"]: r for r in res["runs"] if r["layers"] == DEEP}
    assert deep["b2t"]["params"] == deep["post_ln"]["params"]
    for f in ("results.md", "index.md", "loss_curves.png", "grad_norms_init.png", "grad_norms_init.json"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    gn = json.loads((out / "grad_norms_init.json").read_text())
    assert set(gn) == {"post_ln", "pre_ln", "b2t"} and all("encoder" not in r and len(r["decoder"]) == DEEP
                                                            for r in gn.values())
    assert "valid perplexity" in p.stdout and f"| B2T | {DEEP} |" in p.stdout


def test_lm_demo_rerun_reuses_its_runs(quick_lm_demo):
    out, cache, _, zip_path = quick_lm_demo
    p = run(["b2t-demo", "--task", "lm", "--quick", *SMALL, "--corpus", zip_path, "--out", out, "--cache", cache])
    assert p.stdout.count("finished earlier") == 6


def test_unknown_task_is_one_line(tmp_path):
    p = run(["b2t-demo", "--task", "speech", "--out", tmp_path], check=False)
    assert p.returncode == 2
    assert_one_line_error(p.stderr, "b2t-demo", "--task")
