"""b2t-bench: the quick run's records, the synthetic batches, and that the variants it compares
are the computations they claim to be (no timing assertions)."""

import json

import pytest
import torch
from helpers import run

from b2t_fairseq import layer_types
from b2t_tools.analysis import bench, measure

pytestmark = pytest.mark.usefixtures("compose_once")  # many trainers of the same args (conftest.py)

QUICK_LAYERS = bench.DEFAULTS["quick"]["layers"]
FIELDS = {"variant": str, "layers": int, "tokens_per_s": float, "peak_mem_bytes": int,
          "ratio_to_stock_post_ln": float, "mem_ratio_to_stock_post_ln": float,
          "saved_activation_bytes": int, "max_tokens": int, "ms_per_update": float,
          "cpu_time_tokens_per_s": float, "cpu_time_ratio_to_stock_post_ln": float}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    p = run(["b2t-bench", "--quick", "--json", out / "bench.json", "--profile", out / "profile.json"])
    return p.stdout, json.loads((out / "bench.json").read_text()), json.loads((out / "profile.json").read_text())


@pytest.mark.e2e
def test_quick_run_writes_a_record_per_variant_and_depth(quick_run):
    stdout, recs, _ = quick_run
    assert {(r["variant"], r["layers"]) for r in recs} == {(v, n) for v in bench.VARIANTS for n in QUICK_LAYERS}
    assert len(recs) == len(bench.VARIANTS) * len(QUICK_LAYERS)
    for r in recs:
        for field, kind in FIELDS.items():
            assert isinstance(r[field], kind), (field, r)
        assert r["tokens_per_s"] > 0 and r["peak_mem_bytes"] > 0 and r["saved_activation_bytes"] > 0
        assert len(r["tokens_per_s_rounds"]) == bench.DEFAULTS["quick"]["rounds"]
        assert r["device"] == "cpu" and r["mem_measure"] == "cpu_live_tensor_bytes_peak"
        assert r["skipped_updates"] == 0
    for n in QUICK_LAYERS:
        assert f"target {n}L max-tokens" in stdout


@pytest.mark.slow  # a child process or a whole pipeline: e2e
def test_quick_run_ratios_are_computed_from_the_records(quick_run):
    _, recs, _ = quick_run
    for n in QUICK_LAYERS:
        depth = {r["variant"]: r for r in recs if r["layers"] == n}
        base = depth["stock_post_ln"]
        assert base["ratio_to_stock_post_ln"] == 1.0 and base["mem_ratio_to_stock_post_ln"] == 1.0
        for r in depth.values():
            assert r["ratio_to_stock_post_ln"] == pytest.approx(r["tokens_per_s"] / base["tokens_per_s"], rel=1e-12)
            assert r["mem_ratio_to_stock_post_ln"] == pytest.approx(r["peak_mem_bytes"] / base["peak_mem_bytes"],
                                                                    rel=1e-12)
            assert r["cpu_time_ratio_to_stock_post_ln"] == pytest.approx(
                r["cpu_time_tokens_per_s"] / base["cpu_time_tokens_per_s"], rel=1e-12)
            rounds = sorted(r["tokens_per_s_rounds"])
            assert rounds[0] <= r["tokens_per_s"] <= rounds[-1]
        # the same architecture built two ways holds the same parameters; pre-LN adds two final LayerNorms
        assert depth["plugin_post_ln"]["parameters"] == base["parameters"] == depth["plugin_b2t"]["parameters"]
        assert depth["stock_pre_ln"]["parameters"] == base["parameters"] + 2 * 2 * bench.SIZES["quick"]["dim"]
        # DeepNorm changes the init only; Admin adds one omega vector per residual (2 a encoder layer, 3 a decoder layer)
        assert depth["plugin_deepnorm"]["parameters"] == base["parameters"]
        assert depth["plugin_admin"]["parameters"] == base["parameters"] + n * (2 + 3) * bench.SIZES["quick"]["dim"]


@pytest.mark.e2e  # reads the quick run's profile: a child process
def test_quick_profile_splits_the_update(quick_run):
    _, _, prof = quick_run
    assert prof["variant"] == "stock_post_ln" and prof["layers"] == QUICK_LAYERS[0]
    assert 0 < prof["busy_ms"] <= prof["window_ms"] + 1e-6
    assert prof["gap_ms"] == pytest.approx(prof["window_ms"] - prof["busy_ms"])
    assert prof["top"] and all(t["ms"] > 0 and t["calls"] > 0 for t in prof["top"])
    assert prof["flops_per_update"] > 0 and 0 < prof["achieved_fraction_of_matmul_peak"]


# --- in-process checks, at the quick sizes -----------------------------------------------------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return str(bench.write_dictionary(tmp_path_factory.mktemp("dict"), bench.SIZES["quick"]["vocab"]))


def trainer_for(variant, workdir, layers=2):
    return bench.build_trainer(bench.fairseq_argv(variant, workdir, "quick", layers, 64, "cpu", "fp32"))


def first_batch(trainer):
    return bench.make_batches(trainer.task.target_dictionary, 64, 1, seed=3)[0]


def seeded_loss(trainer, sample):
    torch.manual_seed(7)  # same dropout masks if the computation is the same
    trainer.model.train()
    loss, _, _ = trainer.criterion(trainer.model, sample)
    return loss


@pytest.mark.parametrize("stock,plugin", [("stock_post_ln", "plugin_post_ln"), ("stock_pre_ln", "plugin_pre_ln")])
def test_stock_and_plugin_variants_are_the_same_computation(workdir, stock, plugin):
    a, b = trainer_for(stock, workdir), trainer_for(plugin, workdir)
    b.model.load_state_dict(a.model.state_dict(), strict=True)  # same keys, same weights
    sample = first_batch(a)
    assert torch.equal(seeded_loss(a, sample), seeded_loss(b, sample))
    # and one full update (backward, clipping, Adam) leaves the same weights
    a.train_step([sample])
    b.train_step([sample])
    sb = b.model.state_dict()
    for name, value in a.model.state_dict().items():
        assert torch.equal(value, sb[name]), name


def test_b2t_variant_is_a_different_computation_with_the_same_weights(workdir):
    post, b2t = trainer_for("stock_post_ln", workdir), trainer_for("plugin_b2t", workdir)
    b2t.model.load_state_dict(post.model.state_dict(), strict=True)
    sample = first_batch(post)
    assert not torch.allclose(seeded_loss(post, sample), seeded_loss(b2t, sample))
    # the bottom-to-top term is an addition: autograd saves no more bytes for it than for Post-LN
    assert bench.saved_activation_bytes(b2t, sample) == bench.saved_activation_bytes(post, sample)


@pytest.mark.parametrize("variant,layer,extra", [("plugin_deepnorm", "DeepNorm", set()),
                                                 ("plugin_admin", "Admin", {"self_attn_residual_scale",
                                                                            "encoder_attn_residual_scale",
                                                                            "ffn_residual_scale"})])
def test_deepnorm_and_admin_variants_build_their_layers(workdir, variant, layer, extra):
    """The two new variants are the layer types they name: their classes, fairseq's parameter names (plus Admin's
    omega), and a different loss from Post-LN with the shared weights; one update runs."""
    post, other = trainer_for("plugin_post_ln", workdir), trainer_for(variant, workdir)
    assert type(other.model.encoder.layers[0]).__name__ == f"{layer}EncoderLayer"
    assert type(other.model.decoder.layers[-1]).__name__ == f"{layer}DecoderLayer"
    names = set(other.model.state_dict())
    assert {n.rsplit(".", 1)[-1] for n in names - set(post.model.state_dict())} == extra
    missing, unexpected = other.model.load_state_dict(post.model.state_dict(), strict=False)
    assert not unexpected and {m.rsplit(".", 1)[-1] for m in missing} == extra
    sample = first_batch(post)
    assert not torch.allclose(seeded_loss(post, sample), seeded_loss(other, sample))
    before = {k: v.clone() for k, v in other.model.state_dict().items()}
    other.train_step([sample])
    assert any(not torch.equal(before[k], v) for k, v in other.model.state_dict().items())


def test_batches_look_like_fairseq_batches(workdir):
    from fairseq.data import Dictionary

    d = Dictionary.load(f"{workdir}/dict.src.txt")
    batches = bench.make_batches(d, 200, 4, seed=5)
    assert len(batches) == 4
    for b in batches:
        src, prev, tgt = b["net_input"]["src_tokens"], b["net_input"]["prev_output_tokens"], b["target"]
        assert src.numel() <= 200 and tgt.numel() <= 200  # fairseq's --max-tokens counts padding
        assert (src[:, -1] == d.eos()).all()  # left-padded sources end in eos
        for p_row, t_row in zip(prev, tgt):  # decoder input: eos, then the target shifted right
            n = int(t_row.ne(d.pad()).sum())
            assert t_row[n - 1] == d.eos() and p_row[0] == d.eos() and torch.equal(p_row[1:n], t_row[:n - 1])
        assert b["ntokens"] == int(tgt.ne(d.pad()).sum())
        assert (src.ne(d.pad()).sum(1) == b["net_input"]["src_lengths"]).all()
    again = bench.make_batches(d, 200, 4, seed=5)
    assert all(torch.equal(x["target"], y["target"]) for x, y in zip(batches, again))


def test_union_length_merges_overlaps():
    assert measure.union_length([(0, 2), (1, 3), (5, 6)], 0, 10) == 4
    assert measure.union_length([(0, 2), (1, 3), (5, 6)], 1, 5.5) == 2.5
    assert measure.union_length([(0, 10), (2, 3)], 0, 10) == 10


@pytest.mark.parametrize("argv,message", [
    (["--device", "cpu", "--dtype", "fp16"], "--dtype fp16 needs CUDA"),
    (["--quick", "--rounds", "0"], "--rounds must be at least 1"),
    (["--quick", "--variants", "plugin_b2t", "plugin_b2t"], "name each once"),
])
def test_bad_input_is_one_line(argv, message, capsys):
    assert bench.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("b2t-bench: error:") and message in err and "\n" not in err


# --- --task lm: decoder-only language models beside stock transformer_lm (in-process, quick sizes) ----------

LM_LAYERS = [1, 2]


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-lm") / "bench.json"
    assert bench.main(["--quick", "--task", "lm", "--layers", *map(str, LM_LAYERS), "--json", str(out)]) == 0
    return json.loads(out.read_text())


@pytest.mark.slow  # a whole quick bench run over seven variants and two depths: e2e
def test_lm_quick_run_measures_every_variant_and_computes_ratios_from_the_records(lm_run):
    assert {(r["variant"], r["layers"]) for r in lm_run} == {(v, n) for v in bench.LM_VARIANTS for n in LM_LAYERS}
    assert set(bench.LM_VARIANTS) == {"stock_post_ln", "stock_pre_ln"} | {f"plugin_{t.short}" for t in
                                                                          layer_types.LAYER_TYPES}
    for n in LM_LAYERS:
        depth = {r["variant"]: r for r in lm_run if r["layers"] == n}
        base = depth["stock_post_ln"]
        for r in depth.values():
            assert r["task"] == "lm" and r["tokens_per_s"] > 0 and r["peak_mem_bytes"] > 0
            assert r["skipped_updates"] == 0 and len(r["tokens_per_s_rounds"]) == bench.DEFAULTS["quick"]["rounds"]
            # every update is full blocks of --tokens-per-sample: the same target tokens for every variant
            assert r["target_tokens_per_round"] == base["target_tokens_per_round"] > 0
            assert r["target_tokens_per_round"] % bench.LM_DEFAULTS["quick"]["tokens_per_sample"] == 0
            assert r["ratio_to_stock_post_ln"] == pytest.approx(r["tokens_per_s"] / base["tokens_per_s"], rel=1e-12)
            assert r["mem_ratio_to_stock_post_ln"] == pytest.approx(r["peak_mem_bytes"] / base["peak_mem_bytes"],
                                                                    rel=1e-12)
        dim = bench.SIZES["quick"]["dim"]
        # stock Post-LN transformer_lm and the plugin's post_ln LM are the same network: the same parameters
        assert depth["plugin_post_ln"]["parameters"] == base["parameters"] == depth["plugin_b2t"]["parameters"]
        assert depth["plugin_deepnorm"]["parameters"] == base["parameters"]
        # Pre-LN adds the decoder's final LayerNorm; Admin one omega vector per residual (2 a layer)
        assert depth["stock_pre_ln"]["parameters"] == depth["plugin_pre_ln"]["parameters"] == base["parameters"] + 2 * dim
        assert depth["plugin_admin"]["parameters"] == base["parameters"] + n * 2 * dim


def lm_trainer(variant, folder, layers=2):
    return bench.build_trainer(bench.lm_argv(variant, folder, "quick", layers, 64, "cpu", 32))


@pytest.fixture(scope="module")
def lm_workdir(tmp_path_factory):
    return str(bench.write_dictionary(tmp_path_factory.mktemp("lmdict"), bench.SIZES["quick"]["vocab"], "lm"))


def test_lm_batches_are_token_blocks(lm_workdir):
    from fairseq.data import Dictionary

    d = Dictionary.load(f"{lm_workdir}/dict.txt")
    batches = bench.make_lm_batches(d, 100, 32, 3, seed=4)
    assert len(batches) == 3
    for b in batches:
        src, tgt = b["net_input"]["src_tokens"], b["target"]
        assert src.shape == tgt.shape == (100 // 32, 32) and b["ntokens"] == src.numel()
        assert torch.equal(src[:, 1:], tgt[:, :-1])  # the input is the target shifted right by one token
        assert not src.eq(d.pad()).any() and tgt.eq(d.eos()).any()  # no padding; sentences end in eos
    # consecutive blocks continue one token stream, as TokenBlockDataset cuts it
    assert batches[0]["net_input"]["src_tokens"][1, 0] == batches[0]["target"][0, -1]


@pytest.mark.parametrize("stock,plugin", [("stock_post_ln", "plugin_post_ln"), ("stock_pre_ln", "plugin_pre_ln")])
def test_lm_stock_and_plugin_variants_are_the_same_computation(lm_workdir, stock, plugin):
    a, b = lm_trainer(stock, lm_workdir), lm_trainer(plugin, lm_workdir)
    b.model.load_state_dict(a.model.state_dict(), strict=True)
    sample = bench.make_lm_batches(a.task.target_dictionary, 64, 32, 1, seed=2)[0]
    assert torch.equal(seeded_loss(a, sample), seeded_loss(b, sample))
    # and the comparison can fail: with the same weights, the other layer placement computes another loss
    other = lm_trainer("plugin_b2t" if stock == "stock_post_ln" else "stock_post_ln", lm_workdir)
    other.model.load_state_dict(a.model.state_dict(), strict=False)
    assert not torch.allclose(seeded_loss(a, sample), seeded_loss(other, sample))


@pytest.mark.parametrize("argv,message", [
    (["--quick", "--task", "lm", "--variants", "fast_b2t"], "not a variant of --task lm"),
    (["--quick", "--task", "lm", "--tokens-per-sample", "128"], "--max-tokens must hold at least one block"),
    (["--quick", "--tokens-per-sample", "16"], "--tokens-per-sample is for --task lm"),
])
def test_lm_bad_input_is_one_line(argv, message, capsys):
    assert bench.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("b2t-bench: error:") and message in err and "\n" not in err
