"""DeepNorm and Admin layers: their constants, equations, initialization, decoding and checkpoints.

The references are written here from the papers (DeepNet: Wang et al. 2022; Admin: Liu et al. 2020)
and, for Admin, from microsoft/admin-torch itself (a test-only dependency: it needs nothing but torch).
microsoft/torchscale cannot be installed without pinned fairscale/timm (timm pulls torchvision and
so another torch), so its two DeepNorm expressions are re-typed below from its source, read, not run.
"""

import math

import admin_torch
import pytest
import torch
import torch.nn.functional as F
from fairseq import checkpoint_utils
from helpers import (
    TINY,
    assert_incremental_equals_full,
    build,
    parse,
    run,
    toy_batch,
    toy_train_argv,
)

from b2t_fairseq.layers import (
    AdminDecoderLayer,
    AdminEncoderLayer,
    DeepNormDecoderLayer,
    DeepNormEncoderLayer,
    admin_omega,
    deepnorm_constants,
)
from b2t_fairseq.transformer_b2t import B2TConfigError

NO_DROPOUT = ["--dropout", "0", "--attention-dropout", "0"]


def _ffn(layer, h):
    return layer.fc2(F.relu(layer.fc1(h)))


# --- the constants --------------------------------------------------------------------------------

@pytest.mark.parametrize("n,m", [(6, 6), (18, 18), (12, 3)])
def test_deepnorm_constants_equal_the_paper_and_torchscale_formulas(n, m):
    paper = deepnorm_constants(n, m, "paper")
    # the DeepNet paper, encoder-decoder column of its table of constants (written via exp/log here)
    assert paper["encoder_alpha"] == pytest.approx(0.81 * math.exp((4 * math.log(n) + math.log(m)) / 16), rel=1e-12)
    assert paper["encoder_beta"] == pytest.approx(0.87 * math.exp(-(4 * math.log(n) + math.log(m)) / 16), rel=1e-12)
    assert paper["decoder_alpha"] == pytest.approx(math.sqrt(math.sqrt(3 * m)), rel=1e-12)
    assert paper["decoder_beta"] == pytest.approx(1 / math.sqrt(math.sqrt(12 * m)), rel=1e-12)
    # torchscale: same alphas and decoder beta, encoder weights divided by pow(pow(N, 4) * M, 0.0625) / 1.15
    ts = deepnorm_constants(n, m, "torchscale")
    assert ts["encoder_alpha"] == paper["encoder_alpha"] and ts["decoder_alpha"] == paper["decoder_alpha"]
    assert ts["decoder_beta"] == paper["decoder_beta"]
    assert 1 / ts["encoder_beta"] == pytest.approx(math.pow(math.pow(n, 4) * m, 0.0625) / 1.15, rel=1e-12)
    assert ts["encoder_beta"] / paper["encoder_beta"] == pytest.approx(1.15 / 0.87, rel=1e-12)


def test_deepnorm_constants_at_paper_depths():
    six, eighteen = deepnorm_constants(6, 6), deepnorm_constants(18, 18)
    # rounded values, recomputed by hand: 6^(5/16) = 1.7500, 18^(5/16) = 2.4676
    assert round(six["encoder_alpha"], 3) == 1.418 and round(six["encoder_beta"], 3) == 0.497
    assert round(six["decoder_alpha"], 3) == 2.060 and round(six["decoder_beta"], 3) == 0.343
    assert round(eighteen["encoder_alpha"], 3) == 1.999 and round(eighteen["encoder_beta"], 3) == 0.353
    assert round(eighteen["decoder_alpha"], 3) == 2.711 and round(eighteen["decoder_beta"], 3) == 0.261


@pytest.mark.parametrize("n", [1, 12, 18, 36, 54, 300])
@pytest.mark.parametrize("scale", ["O(logn)", "O(1)", "O(n)"])
def test_admin_omega_equals_admin_torch(n, scale):
    assert admin_omega(n, scale) == pytest.approx(admin_torch.calculate_init(n, scale), rel=1e-12)


def test_admin_omega_is_counted_per_stack_from_its_residual_connections(toy_dicts):
    # TINY: 3 encoder layers (2 residuals each), 2 decoder layers (3 residuals each)
    model, _, args = build(toy_dicts, "transformer_admin", *TINY)
    assert args.admin_omega == "trainable" and args.admin_output_change_scale == "O(logn)"
    enc, dec = model.encoder.layers[0], model.decoder.layers[1]
    ref_enc = admin_torch.as_module(2 * 3, as_parameter=True, embed_dim=32).omega
    ref_dec = admin_torch.as_module(3 * 2, as_parameter=True, embed_dim=32).omega
    for name in ("self_attn_residual_scale", "ffn_residual_scale"):
        torch.testing.assert_close(getattr(enc, name).detach(), ref_enc.detach())
        torch.testing.assert_close(getattr(dec, name).detach(), ref_dec.detach())
    torch.testing.assert_close(dec.encoder_attn_residual_scale.detach(), ref_dec.detach())


# --- the equations --------------------------------------------------------------------------------

def _encoder_inputs():
    torch.manual_seed(0)
    x = torch.randn(7, 3, 32)
    pad = torch.zeros(3, 7, dtype=torch.bool)
    pad[0, :2] = True
    return x, pad


def _decoder_inputs():
    torch.manual_seed(0)
    x, enc = torch.randn(5, 3, 32), torch.randn(7, 3, 32)
    enc_pad = torch.zeros(3, 7, dtype=torch.bool)
    enc_pad[1, :3] = True
    causal = torch.triu(torch.full((5, 5), float("-inf")), 1)
    return x, enc, enc_pad, causal


def test_deepnorm_encoder_layer_follows_the_equations(toy_dicts):
    model, _, _ = build(toy_dicts, "transformer_deepnorm", *TINY, *NO_DROPOUT)
    model.train()
    layer = model.encoder.layers[1]
    assert isinstance(layer, DeepNormEncoderLayer)
    alpha = 0.81 * (3 ** 4 * 2) ** (1 / 16)  # N = 3, M = 2
    x, pad = _encoder_inputs()
    y = layer(x, pad)

    a, _ = layer.self_attn(query=x, key=x, value=x, key_padding_mask=pad, need_weights=False)
    h = layer.self_attn_layer_norm(alpha * x + a)                      # h = LN(alpha x + SelfAttn(x))
    expected = layer.final_layer_norm(alpha * h + _ffn(layer, h))      # y = LN(alpha h + FFN(h))
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)
    plain = layer.final_layer_norm(h + _ffn(layer, h))
    assert (y - plain).abs().max() > 1e-2  # alpha really weighs the shortcut
    assert model.encoder.layer_norm is None


def test_deepnorm_decoder_layer_follows_the_equations(toy_dicts):
    model, _, _ = build(toy_dicts, "transformer_deepnorm", *TINY, *NO_DROPOUT)
    model.train()
    layer = model.decoder.layers[1]
    assert isinstance(layer, DeepNormDecoderLayer)
    alpha = (3 * 2) ** 0.25  # M = 2
    x, enc, enc_pad, causal = _decoder_inputs()
    y, _, _ = layer(x, enc, enc_pad, self_attn_mask=causal)

    a, _ = layer.self_attn(query=x, key=x, value=x, attn_mask=causal, need_weights=False)
    h1 = layer.self_attn_layer_norm(alpha * x + a)
    c, _ = layer.encoder_attn(query=h1, key=enc, value=enc, key_padding_mask=enc_pad, static_kv=True)
    h2 = layer.encoder_attn_layer_norm(alpha * h1 + c)
    expected = layer.final_layer_norm(alpha * h2 + _ffn(layer, h2))
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)
    assert model.decoder.layer_norm is None


def _random_omegas_(layer):
    """Move every omega away from its initial value, as training would, so the test sees them used."""
    with torch.no_grad():
        for name, t in list(layer.named_parameters()) + list(layer.named_buffers()):
            if name.endswith("residual_scale"):
                t.copy_(torch.rand_like(t) * 3)


def _omega_residual(omega):
    """admin-torch's own residual module, carrying the given omega vector."""
    r = admin_torch.as_module(4, as_parameter=True, embed_dim=omega.numel())
    with torch.no_grad():
        r.omega.copy_(omega)
    return r


@pytest.mark.parametrize("perturb", [False, True])
def test_admin_encoder_layer_equals_admin_torch_residuals(toy_dicts, perturb):
    model, _, _ = build(toy_dicts, "transformer_admin", *TINY, *NO_DROPOUT)
    model.train()
    layer = model.encoder.layers[1]
    assert isinstance(layer, AdminEncoderLayer)
    if perturb:
        _random_omegas_(layer)
        res_sa, res_ffn = _omega_residual(layer.self_attn_residual_scale), _omega_residual(layer.ffn_residual_scale)
    else:  # at initialization: admin-torch's module for a 3-layer encoder (6 residual connections)
        res_sa = res_ffn = admin_torch.as_module(6, as_parameter=True, embed_dim=32)
    x, pad = _encoder_inputs()
    y = layer(x, pad)

    a, _ = layer.self_attn(query=x, key=x, value=x, key_padding_mask=pad, need_weights=False)
    h = layer.self_attn_layer_norm(res_sa(x, a))                        # LN(omega * x + f(x))
    expected = layer.final_layer_norm(res_ffn(h, _ffn(layer, h)))
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("perturb", [False, True])
def test_admin_decoder_layer_equals_admin_torch_residuals(toy_dicts, perturb):
    model, _, _ = build(toy_dicts, "transformer_admin", *TINY, *NO_DROPOUT)
    model.train()
    layer = model.decoder.layers[1]
    assert isinstance(layer, AdminDecoderLayer)
    if perturb:
        _random_omegas_(layer)
        res = [_omega_residual(getattr(layer, f"{n}_residual_scale")) for n in ("self_attn", "encoder_attn", "ffn")]
    else:  # a 2-layer decoder has 6 residual connections
        res = [admin_torch.as_module(6, as_parameter=True, embed_dim=32)] * 3
    x, enc, enc_pad, causal = _decoder_inputs()
    y, _, _ = layer(x, enc, enc_pad, self_attn_mask=causal)

    a, _ = layer.self_attn(query=x, key=x, value=x, attn_mask=causal, need_weights=False)
    h1 = layer.self_attn_layer_norm(res[0](x, a))
    c, _ = layer.encoder_attn(query=h1, key=enc, value=enc, key_padding_mask=enc_pad, static_kv=True)
    h2 = layer.encoder_attn_layer_norm(res[1](h1, c))
    expected = layer.final_layer_norm(res[2](h2, _ffn(layer, h2)))
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)


def test_admin_with_unit_omega_is_exactly_post_ln(toy_dicts):
    # O(n) gives omega = 1; Admin layers consume the random stream as fairseq's do: same weights
    post, task, _ = build(toy_dicts, "transformer_post_ln", *TINY, seed=5)
    admin, _, _ = build(toy_dicts, "transformer_admin", *TINY, "--admin-output-change-scale", "O(n)",
                        "--admin-omega", "fixed", seed=5)
    post.load_state_dict({k: v for k, v in admin.state_dict().items() if "residual_scale" not in k}, strict=True)
    post.eval(), admin.eval()
    batch = toy_batch(task)
    with torch.no_grad():
        torch.testing.assert_close(admin(*batch)[0], post(*batch)[0], rtol=1e-5, atol=1e-5)


# --- the initialization ---------------------------------------------------------------------------

def _module_of(name):
    return name.split(".")[-2]


def test_deepnorm_torchscale_init_divides_exactly_the_intended_tensors(toy_dicts):
    post, _, _ = build(toy_dicts, "transformer_post_ln", *TINY, seed=7)
    deep, _, args = build(toy_dicts, "transformer_deepnorm", *TINY, "--deepnorm-reference", "torchscale", seed=7)
    assert args.b2t_rescale_init is False
    divisor = {"encoder": math.pow(math.pow(3, 4) * 2, 0.0625) / 1.15, "decoder": math.pow(12.0 * 2, 0.25)}
    p0, p1 = post.state_dict(), deep.state_dict()
    assert p0.keys() == p1.keys()  # DeepNorm adds no parameter
    touched = []
    for name, before in p0.items():
        if ".layers." in name and _module_of(name) in ("fc1", "fc2", "v_proj", "out_proj"):
            torch.testing.assert_close(p1[name], before / divisor[name.split(".")[0]], rtol=1e-6, atol=0)
            touched.append(name)
        else:
            assert torch.equal(p1[name], before), name
    # weight and bias of 4 modules per encoder layer, 6 per decoder layer (cross-attention's v/out too)
    assert len(touched) == 3 * 4 * 2 + 2 * 6 * 2
    assert "decoder.layers.0.encoder_attn.v_proj.bias" in touched


def test_deepnorm_paper_init_is_xavier_normal_with_gain_beta(toy_dicts):
    # wide enough for the standard deviations to be estimated within a few percent
    wide = ["--encoder-embed-dim", "256", "--decoder-embed-dim", "256", "--encoder-ffn-embed-dim", "1024",
            "--decoder-ffn-embed-dim", "1024", "--encoder-attention-heads", "4", "--decoder-attention-heads", "4",
            "--encoder-layers", "2", "--decoder-layers", "2"]
    post, _, _ = build(toy_dicts, "transformer_post_ln", *wide, seed=11)
    deep, _, args = build(toy_dicts, "transformer_deepnorm", *wide, seed=11)
    assert args.deepnorm_reference == "paper"  # the documented default
    beta = {"encoder": 0.87 * (2 ** 4 * 2) ** (-1 / 16), "decoder": (12 * 2) ** -0.25}
    p0, p1 = post.state_dict(), deep.state_dict()
    reinit = 0
    for name, before in p0.items():
        after = p1[name]
        module = _module_of(name)
        if ".layers." in name and name.endswith(".weight") and module in ("fc1", "fc2", "v_proj", "out_proj",
                                                                          "q_proj", "k_proj"):
            gain = 1.0 if module in ("q_proj", "k_proj") else beta[name.split(".")[0]]
            fan_out, fan_in = after.shape
            expected_std = gain * math.sqrt(2.0 / (fan_in + fan_out))
            assert after.std().item() == pytest.approx(expected_std, rel=0.03), name
            assert abs(after.mean().item()) < 0.05 * expected_std, name
            assert not torch.equal(after, before), name
            # normal, not uniform: the 4th standardized moment of a Gaussian is 3 (a uniform's is 1.8)
            z = (after - after.mean()) / after.std()
            assert (z ** 4).mean().item() == pytest.approx(3.0, abs=0.2), name
            reinit += 1
        else:  # biases, LayerNorms, embeddings: fairseq's initialization, untouched
            assert torch.equal(after, before), name
    assert reinit == 2 * 6 + 2 * 10


# --- decoding and checkpoints ---------------------------------------------------------------------

@pytest.mark.parametrize("arch,flags", [
    ("transformer_deepnorm", []),
    ("transformer_deepnorm", ["--deepnorm-reference", "torchscale"]),
    ("transformer_admin", []),
    ("transformer_admin", ["--admin-omega", "fixed"]),
])
def test_incremental_decoding_equals_full_forward(toy_dicts, arch, flags):
    model, task, _ = build(toy_dicts, arch, *TINY, *flags)
    for layer in model.decoder.layers:
        _random_omegas_(layer)  # no-op for DeepNorm
    assert_incremental_equals_full(model, task)


def test_admin_keys_are_stock_keys_plus_the_named_omegas(toy_dicts):
    stock, _, _ = build(toy_dicts, "transformer", *TINY)
    admin, _, _ = build(toy_dicts, "transformer_admin", *TINY)
    fixed, _, _ = build(toy_dicts, "transformer_admin", *TINY, "--admin-omega", "fixed")
    extra = set(admin.state_dict()) - set(stock.state_dict())
    assert set(stock.state_dict()) <= set(admin.state_dict())
    assert len(extra) == 3 * 2 + 2 * 3 and all(k.endswith("_residual_scale") for k in extra)
    assert "decoder.layers.1.encoder_attn_residual_scale" in extra
    assert set(fixed.state_dict()) == set(admin.state_dict())  # the two modes load each other's checkpoints
    trainable = {n for n, _ in admin.named_parameters()}
    assert extra <= trainable and not extra & {n for n, _ in fixed.named_parameters()}


def test_admin_omegas_learn(toy_dicts):
    model, task, _ = build(toy_dicts, "transformer_admin", *TINY)
    model.train()
    logits, _ = model(*toy_batch(task))
    logits.float().log_softmax(-1).mean().backward()
    for name, p in model.named_parameters():
        if name.endswith("_residual_scale"):
            assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("arch,flags", [
    ("transformer_deepnorm", []),
    ("transformer_deepnorm", ["--deepnorm-reference", "torchscale"]),
    ("transformer_admin", []),
    ("transformer_admin", ["--admin-omega", "fixed", "--admin-output-change-scale", "O(1)"]),
])
def test_checkpoint_round_trips_through_fairseq(toy_dicts, tmp_path, arch, flags):
    model, task, args = build(toy_dicts, arch, *TINY, *flags, seed=2)
    for module in list(model.encoder.layers) + list(model.decoder.layers):
        _random_omegas_(module)  # trained omegas must come back from the file, not from the init
    path = tmp_path / "checkpoint.pt"
    torch.save({"args": args, "model": model.state_dict(), "extra_state": {},
                "optimizer_history": [{"criterion_name": "CrossEntropyCriterion", "optimizer_name": "Adam",
                                       "lr_scheduler_state": {"best": None}, "num_updates": 0}]}, path)
    torch.manual_seed(99)  # a rebuild draws other random weights: only the file can make them equal
    models, cfg, _ = checkpoint_utils.load_model_ensemble_and_task([str(path)])
    loaded = models[0]
    assert type(loaded.encoder.layers[0]) is type(model.encoder.layers[0])
    assert cfg.model.ln_position == args.ln_position
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    model.eval(), loaded.eval()
    batch = toy_batch(task)
    with torch.no_grad():
        assert torch.equal(model(*batch)[0], loaded(*batch)[0])


# --- refused combinations -------------------------------------------------------------------------

@pytest.mark.parametrize("arch,flags,needle", [
    ("transformer_deepnorm", ["--encoder-normalize-before"], "DeepNorm cannot be combined"),
    ("transformer_admin", ["--decoder-normalize-before"], "Admin cannot be combined"),
    ("transformer_deepnorm", ["--b2t-rescale-init"], "own initialization"),
    ("transformer_admin", ["--residual-bottom-to-top"], "--residual-bottom-to-top cannot be combined"),
    ("transformer_deepnorm", ["--cross-self-attention"], "--cross-self-attention"),
])
def test_contradictory_flags_are_refused(toy_dicts, arch, flags, needle):
    with pytest.raises(B2TConfigError, match=needle):
        build(toy_dicts, arch, *TINY, *flags)


@pytest.mark.parametrize("flags,attr,value", [
    (["--ln-position", "deepnorm"], "ln_position", "deepnorm"),
    (["--ln-position", "admin"], "ln_position", "admin"),
])
def test_the_one_switch_selects_the_new_types(toy_dicts, flags, attr, value):
    model, _, args = build(toy_dicts, "transformer_post_ln", *TINY, *flags)
    assert getattr(args, attr) == value
    expected = {"deepnorm": DeepNormEncoderLayer, "admin": AdminEncoderLayer}[value]
    assert all(type(layer) is expected for layer in model.encoder.layers)
    assert args.encoder_normalize_before is False and args.decoder_normalize_before is False


# --- published numbers ----------------------------------------------------------------------------

def test_published_numbers_are_labelled_and_their_flags_select_their_setting(toy_dicts):
    import shlex

    from b2t_tools.wmt.published import FLAGS, PUBLISHED

    assert FLAGS.keys() == PUBLISHED.keys()
    for label, entry in PUBLISHED.items():
        assert all(entry[k] for k in ("source", "setting", "metric")), label
        assert entry["bleu"] and all(isinstance(v, float) and 0 < v < 100 for v in entry["bleu"].values())
        args = parse(toy_dicts, "transformer_post_ln_tiny", *shlex.split(FLAGS[label]))
        scale = "O(1)" if "O(1)" in label else "O(logn)"
        omega = "fixed" if "fixed omega" in label else "trainable"
        assert (args.ln_position, args.admin_output_change_scale, args.admin_omega) == ("admin", scale, omega)


# --- through the command line ---------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["transformer_deepnorm_18l", "transformer_admin_18l"])
def test_18_layer_architectures_train_and_decode_through_the_command_line(toy_data_bin, tmp_path, arch):
    narrow = ["--encoder-embed-dim", "32", "--decoder-embed-dim", "32", "--encoder-ffn-embed-dim", "64",
              "--decoder-ffn-embed-dim", "64", "--encoder-attention-heads", "2", "--decoder-attention-heads", "2"]
    run(["b2t-train", toy_data_bin, *toy_train_argv(*narrow, "--lr-scheduler", "inverse_sqrt", "--warmup-updates", 4,
                                                    "--criterion", "label_smoothed_cross_entropy",
                                                    "--label-smoothing", "0.1", "--max-update", 3,
                                                    "--save-dir", tmp_path, "--no-epoch-checkpoints",
                                                    arch=arch, lr="1e-3", max_tokens=1000, json_log=False)])
    state = torch.load(tmp_path / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    cfg = state["cfg"]["model"]
    assert (cfg.ln_position, cfg.encoder_layers, cfg.decoder_layers) == (arch.split("_")[1], 18, 18)
    assert state["optimizer_history"][-1]["num_updates"] == 3
    if arch.startswith("transformer_admin"):  # the omegas were trained and saved
        omega = state["model"]["encoder.layers.0.self_attn_residual_scale"]
        assert omega.shape == (32,) and not torch.allclose(omega, torch.full_like(omega, admin_omega(36)))
    p = run(["b2t-generate", toy_data_bin, "--path", tmp_path / "checkpoint_last.pt", "--beam", "2",
             "--batch-size", "16", "--max-len-b", "5", "--cpu"])
    assert sum(line.startswith("H-") for line in p.stdout.splitlines()) == 40
