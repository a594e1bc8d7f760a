"""b2t-grad-norms: the JSON/CSV/PNG it writes, and the paper's vanishing-gradient evidence at 18 layers."""

import csv
import json

import pytest
from helpers import TATOEBA_ZIP, run

from b2t_tools.analysis import grad_norms
from b2t_tools.demo import data as tatoeba


@pytest.fixture(scope="module")
def real_or_toy_bin(tmp_path_factory, toy_data_bin):
    """Tatoeba batches when the corpus is here (the --quick slice b2t-demo uses), else the toy corpus."""
    if not TATOEBA_ZIP.exists():
        return toy_data_bin
    cache = tmp_path_factory.getbasetemp() / "tatoeba-cache"  # shared with test_demo.py in one session
    root = tatoeba.prepare(TATOEBA_ZIP, cache, vocab_size=2000, n_valid=200, n_test=100, max_train=20000, log=print)
    return root / "bin"


def test_cli_writes_json_csv_png(toy_data_bin, tmp_path):
    out = tmp_path / "gn"
    p = run(["b2t-grad-norms", toy_data_bin, "--layers", "3", "--batches", "2", "--max-tokens", "256",
             "--json", out / "gn.json", "--csv", out / "gn.csv", "--png", out / "gn.png"])
    res = json.loads((out / "gn.json").read_text())
    assert set(res) == {"post_ln", "pre_ln", "b2t"}
    for name, r in res.items():
        for side in ("encoder", "decoder"):
            assert len(r[side]) == 3 and all(v > 0 for v in r[side]), (name, side, r[side])
            assert len(r[f"{side}_sublayers"]) == 3
        # the paper's points in every decoder layer: gradient at each LayerNorm's input and output
        assert set(r["decoder_ln_points"][0]) == {f"{s}.{w}" for s in ("self_attn_ln", "cross_attn_ln", "ffn_ln")
                                                  for w in ("in", "out")}
        assert set(r["decoder_sublayers"][0]) == {"self_attn", "self_attn_ln", "cross_attn", "cross_attn_ln",
                                                  "ffn", "ffn_ln"}
    rows = list(csv.DictReader(open(out / "gn.csv")))
    assert {r["model"] for r in rows} == {"post_ln", "pre_ln", "b2t"}
    assert (out / "gn.png").stat().st_size > 10000
    assert "decoder lowest/top-3" in p.stdout


def test_layer_norm_is_the_sum_of_its_sublayers(toy_data_bin):
    """Per-layer norm^2 = sum of per-sub-layer norm^2 (each parameter counted once)."""
    res = grad_norms.run_models(toy_data_bin, [("b2t", "transformer_b2t_tiny", None)], k=1, max_tokens=256)["b2t"]
    for side in ("encoder", "decoder"):
        for total, subs in zip(res[side], res[f"{side}_sublayers"]):
            assert total == pytest.approx(sum(v * v for v in subs.values()) ** 0.5, rel=1e-6)


@pytest.mark.e2e
def test_bad_data_folder_is_one_line(tmp_path):
    p = run(["b2t-grad-norms", tmp_path, "--json", tmp_path / "x.json"], check=False)
    assert p.returncode == 2
    assert "not a fairseq data-bin folder" in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_post_ln_lower_decoder_layers_vanish_at_18_layers(real_or_toy_bin):
    """Evidence (paper, section 3): at 18+18 layers and fresh init, Post-LN's lowest decoder layers get
    far smaller gradients than its top layers; Pre-LN's and B2T's do not.

    Measured (seed 1, 2 batches of 1024 tokens of the --quick Tatoeba slice, 2026-11-28), ratio =
    mean norm of the lowest 3 decoder layers / mean of the top 3:
    Post-LN 0.065, Pre-LN 1.78, B2T 0.84 (with 4 batches of 2048 tokens: 0.064, 1.60, 0.85).
    Thresholds leave a wide margin: Post-LN < 0.2, the others > 0.5.
    """
    specs = [(a, f"transformer_{a}_tiny", None) for a in ("post_ln", "pre_ln", "b2t")]
    res = grad_norms.run_models(real_or_toy_bin, specs, layers=18, k=2, max_tokens=1024, seed=1)
    ratio = {n: grad_norms.bottom_top_ratio(r["decoder"]) for n, r in res.items()}
    print("decoder lowest/top-3 ratios:", ratio)
    assert ratio["post_ln"] < 0.2, ratio
    assert ratio["pre_ln"] > 0.5, ratio
    assert ratio["b2t"] > 0.5, ratio
    # and inside the top Post-LN decoder layer the LayerNorm shrinks the gradient on its way down
    top = res["post_ln"]["decoder_ln_points"][-1]
    assert top["self_attn_ln.in"] < top["self_attn_ln.out"], top


def test_deepnorm_and_admin_by_short_name(toy_data_bin, tmp_path):
    """--arch deepnorm / admin build their layer types (tiny width); Admin's omegas count in its layers' norms."""
    specs = grad_norms.parse_specs(grad_norms.get_parser().parse_args(
        [str(toy_data_bin), "--arch", "deepnorm", "--arch", "admin", "--json", "x"]))
    assert specs == [("deepnorm", "transformer_deepnorm_tiny", None), ("admin", "transformer_admin_tiny", None)]
    res = grad_norms.run_models(toy_data_bin, specs, layers=3, k=1, max_tokens=256)
    assert res["deepnorm"]["ln_position"] == "deepnorm" and res["admin"]["ln_position"] == "admin"
    for name, r in res.items():
        for side in ("encoder", "decoder"):
            assert len(r[side]) == 3 and all(v > 0 for v in r[side]), (name, side)
            for total, subs in zip(r[side], r[f"{side}_sublayers"]):
                assert total == pytest.approx(sum(v * v for v in subs.values()) ** 0.5, rel=1e-6)
    assert "other" not in res["deepnorm"]["decoder_sublayers"][0]  # no parameter outside fairseq's sub-layers
    assert res["admin"]["decoder_sublayers"][0]["other"] > 0  # the omega vectors get gradients


def test_committed_five_layer_type_measurement():
    """results/grad-norms-five-18l.json: all five layer types at 18+18 layers, fresh init (see the README)."""
    from helpers import REPO

    res = json.loads((REPO / "results" / "grad-norms-five-18l.json").read_text())
    assert list(res) == ["post_ln", "pre_ln", "b2t", "deepnorm", "admin"]
    for name, r in res.items():
        assert r["source"] == "fresh init" and r["layers"] == {"encoder": 18, "decoder": 18}
        assert r["ln_position"] == {"post_ln": "post", "pre_ln": "pre"}.get(name, name)
        assert len(r["decoder"]) == 18 and all(v > 0 for v in r["decoder"] + r["encoder"])
    assert (REPO / "results" / "grad-norms-five-18l.png").stat().st_size > 10000


def test_labels_follow_the_layer_type_built_not_the_arch_word(toy_data_bin):
    """--arch b2t --model-args '--ln-position post' builds Post-LN layers: reported and plotted as Post-LN."""
    res = grad_norms.run_models(toy_data_bin, [("b2t", "transformer_b2t_tiny", None)], layers=2, k=1,
                                max_tokens=256, model_args=["--ln-position", "post"])
    assert list(res) == ["post_ln"]
    r = res["post_ln"]
    assert r["layer_type"] == "post" and r["label"] == "Post-LN" and r["arch"] == "transformer_b2t_tiny"
    assert grad_norms.label("post_ln", r) == "Post-LN"
    with pytest.raises(grad_norms.ToolError, match="both be reported as 'post_ln'"):
        grad_norms.run_models(toy_data_bin, [("post_ln", "transformer_post_ln_tiny", None),
                                             ("b2t", "transformer_b2t_tiny", None)], layers=2, k=1,
                              max_tokens=256, model_args=["--ln-position", "post"])


def test_two_checkpoints_of_one_folder_keep_both_results(toy_data_bin, tmp_path, monkeypatch):
    built = {}

    def fake_load(path, data):  # a checkpoint per file: one fresh B2T model each, with its own seed
        built[path] = len(built) + 1
        return grad_norms.build_fresh(data, "transformer_b2t_tiny", 2, seed=built[path])

    monkeypatch.setattr(grad_norms, "load_checkpoint", fake_load)
    argv = [str(toy_data_bin), "--checkpoint", "runs/b2t/checkpoint_1.pt", "--checkpoint", "runs/b2t/checkpoint_2.pt",
            "--checkpoint", "other/checkpoint_last.pt", "--json", "x"]
    specs = grad_norms.parse_specs(grad_norms.get_parser().parse_args(argv))
    assert [s[0] for s in specs] == ["b2t/checkpoint_1", "b2t/checkpoint_2", "other"]
    res = grad_norms.run_models(toy_data_bin, specs, k=1, max_tokens=256)
    assert list(res) == ["b2t/checkpoint_1", "b2t/checkpoint_2", "other"]
    assert res["b2t/checkpoint_1"]["decoder"] != res["b2t/checkpoint_2"]["decoder"]
    assert {r["label"] for r in res.values()} == {"B2T"}
    assert grad_norms.label("other", res["other"]) == "other (B2T)"
    with pytest.raises(grad_norms.ToolError, match="given twice"):
        grad_norms.parse_specs(grad_norms.get_parser().parse_args(
            [str(toy_data_bin), "--checkpoint", "a=x/1.pt", "--checkpoint", "a=x/2.pt", "--json", "x"]))


@pytest.mark.parametrize("extra,expect", [
    (["--batches", "0"], "--batches 0 is not a positive number"),  # k=0 measured every batch, recorded 0
    (["--max-tokens", "-5"], "--max-tokens -5 is not a positive number"),
    (["--max-tokens", "100000000000000000000"], "pass at most 2147483647"),  # was an OverflowError
    (["--layers", "0"], "--layers 0 is not a positive number"),  # was the arch's default depth, silently
    (["--layers", "-2"], "--layers -2 is not a positive number"),  # was a ZeroDivisionError
    (["--layers", "100000000"], "pass at most 1000"),  # was tens of GB of memory
    (["--csv", "{T}/g.csv", "--json", "{T}/g.csv"], "--csv and --json are both"),
    (["--json", "{D}/dict.en.txt"], "inside the data folder"),
    (["--checkpoint", "{T}/ckpt.pt", "--json", "{T}/ckpt.pt"], "is a --checkpoint"),
    (["--json", "{T}/afile/g.json"], "is a file, not a folder"),
])
def test_bad_numbers_and_places_are_one_line_before_any_model(toy_data_bin, tmp_path, capsys, extra, expect):
    from helpers import assert_one_line_error

    (tmp_path / "afile").write_text("x\n")
    (tmp_path / "ckpt.pt").write_text("x\n")
    before = (toy_data_bin / "dict.en.txt").read_bytes()
    argv = [str(toy_data_bin), "--layers", "2"] + [a.replace("{T}", str(tmp_path)).replace("{D}", str(toy_data_bin))
                                                  for a in extra]
    if "--json" not in extra and "--csv" not in extra:
        argv += ["--json", str(tmp_path / "g.json")]
    assert grad_norms.main(argv) == 2
    assert_one_line_error(capsys.readouterr().err, "b2t-grad-norms", expect)
    assert (toy_data_bin / "dict.en.txt").read_bytes() == before and (tmp_path / "ckpt.pt").read_text() == "x\n"


def test_a_checkpoint_fairseq_cannot_build_is_one_line(toy_data_bin, tmp_path, capsys):
    import argparse

    import torch
    from helpers import assert_one_line_error

    torch.save({"model": {"w": torch.zeros(2)}, "args": argparse.Namespace(arch="transformer_b2t")}, tmp_path / "c.pt")
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    for name, expect in (("c.pt", "cannot build a model from checkpoint"), ("tensor.pt", "is not a fairseq checkpoint")):
        assert grad_norms.main([str(toy_data_bin), "--checkpoint", str(tmp_path / name), "--json",
                                str(tmp_path / "g.json")]) == 2
        assert_one_line_error(capsys.readouterr().err, "b2t-grad-norms", expect)
