"""Decoder-only models (transformer_lm_b2t): Post-LN / Pre-LN equal fairseq's transformer_lm bit for bit;
B2T, DeepNorm and Admin follow their equations (Admin through admin-torch's own module); incremental
decoding equals the full forward. Models are built in-process from a dictionary only (no data)."""

import math

import admin_torch
import pytest
import torch
import torch.nn.functional as F
from fairseq import options
from fairseq.modules.transformer_layer import TransformerDecoderLayerBase
from helpers import DROPOUT, NO_DROPOUT, SIZES, build_lm

from b2t_fairseq import layer_types
from b2t_fairseq.errors import B2TConfigError
from b2t_fairseq.layers import (
    AdminDecoderLayer,
    B2TDecoderLayer,
    DeepNormLMLayer,
    deepnorm_lm_constants,
)


def tokens(task, bsz=3, length=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = task.dictionary
    return torch.randint(d.nspecial, len(d), (bsz, length), generator=g)


def _fwd_bwd(model, toks, seed=123):
    model.train()
    model.zero_grad()
    torch.manual_seed(seed)
    logits, _ = model(toks)
    logits.float().log_softmax(-1).mean().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("plugin_arch,stock_arch,stock_flags", [
    ("transformer_lm_post_ln", "transformer_lm", []),
    ("transformer_lm_pre_ln", "transformer_lm", ["--decoder-normalize-before"]),
    ("transformer_lm_pre_ln_gpt", "transformer_lm_gpt", []),  # fairseq's named LM archs force Pre-LN
])
def test_post_and_pre_ln_lm_are_bit_identical_to_stock_transformer_lm(lm_dict_dir, plugin_arch, stock_arch,
                                                                      stock_flags):
    stock, task, _ = build_lm(lm_dict_dir, stock_arch, *SIZES, *DROPOUT, *stock_flags)
    plugin, _, _ = build_lm(lm_dict_dir, plugin_arch, *SIZES, *DROPOUT)
    assert stock.decoder.layers[0].normalize_before == plugin.decoder.layers[0].normalize_before
    assert type(plugin.decoder.layers[0]) is type(stock.decoder.layers[0])
    s, p = stock.state_dict(), plugin.state_dict()
    assert list(s) == list(p)
    for name in s:
        assert torch.equal(s[name], p[name]), name
    toks = tokens(task)
    out_s, g_s = _fwd_bwd(stock, toks)
    out_p, g_p = _fwd_bwd(plugin, toks)
    assert torch.equal(out_s, out_p)
    assert g_s.keys() == g_p.keys() and all(torch.equal(g_s[n], g_p[n]) for n in g_s)


def test_named_lm_archs_keep_their_layer_type(lm_dict_dir):
    # fairseq's own named LM archs (transformer_lm_gpt, ...) force Pre-LN; ours keep the type they name
    for t in layer_types.LAYER_TYPES:
        for suffix in ("", "_gpt", "_16l", "_tiny"):
            arch = t.lm_family + suffix
            args = options.parse_args_and_arch(options.get_training_parser(),
                                               [str(lm_dict_dir), "--task", "language_modeling", "--arch", arch])
            if arch == "transformer_lm_b2t":  # the model's own name: fairseq's arch sets nothing, the record table does
                assert getattr(args, "ln_position", None) is None and layer_types.which(args).key == "b2t"
                continue
            assert args.ln_position == t.key, arch
            assert bool(args.decoder_normalize_before) == t.normalize_before, arch
            assert args.decoder_layers == {"_16l": 16, "_gpt": 12, "_tiny": 2}.get(suffix, 6), arch


@pytest.mark.parametrize("arch,cls", [("transformer_lm_b2t", B2TDecoderLayer),
                                      ("transformer_lm_deepnorm", DeepNormLMLayer),
                                      ("transformer_lm_admin", AdminDecoderLayer)])
def test_own_layer_types_keep_stock_keys_and_are_recognised(lm_dict_dir, arch, cls):
    stock, _, _ = build_lm(lm_dict_dir, "transformer_lm", *SIZES)
    model, _, args = build_lm(lm_dict_dir, arch, *SIZES)
    assert all(type(layer) is cls for layer in model.decoder.layers)
    assert layer_types.of_model(model) == args.ln_position
    extra = set(model.state_dict()) - set(stock.state_dict())
    assert set(stock.state_dict()) <= set(model.state_dict())
    if arch.endswith("admin"):
        assert len(extra) == 2 * 3 and all(k.endswith("_residual_scale") for k in extra)
    else:
        assert not extra
    assert model.decoder.layer_norm is None  # Post-LN family: no final LayerNorm


def _inputs(dim=32, length=6, bsz=3):
    torch.manual_seed(0)
    x = torch.randn(length, bsz, dim)
    causal = torch.triu(torch.full((length, length), float("-inf")), 1)
    return x, causal


def _sa(layer, x, causal):
    a, _ = layer.self_attn(query=x, key=x, value=x, attn_mask=causal, need_weights=False)
    return a


def _ffn(layer, h):
    return layer.fc2(F.relu(layer.fc1(h)))


def test_b2t_lm_layer_follows_the_equations(lm_dict_dir):
    model, _, _ = build_lm(lm_dict_dir, "transformer_lm_b2t", *SIZES, *NO_DROPOUT)
    model.train()
    layer = model.decoder.layers[1]
    x, causal = _inputs()
    y, _, _ = layer(x, self_attn_mask=causal)
    h = layer.self_attn_layer_norm(x + _sa(layer, x, causal))          # h = LN_sa(x + SelfAttn(x))
    expected = layer.final_layer_norm(x + h + _ffn(layer, h))           # y = LN_ffn(x + h + FFN(h))
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)
    post, _, _ = TransformerDecoderLayerBase.forward(layer, x, self_attn_mask=causal)
    assert (y - post).abs().max() > 1e-2  # the bottom-to-top term is really there


def test_b2t_lm_rescaled_init_is_exactly_the_authors_factor(lm_dict_dir):
    plain, _, _ = build_lm(lm_dict_dir, "transformer_lm_b2t", *SIZES, "--no-b2t-rescale-init")
    scaled, _, _ = build_lm(lm_dict_dir, "transformer_lm_b2t", *SIZES)  # the default: rescaled
    stock, _, _ = build_lm(lm_dict_dir, "transformer_lm", *SIZES)
    factor = 3 ** -0.5
    p, s, st = plain.state_dict(), scaled.state_dict(), stock.state_dict()
    scaled_count = 0
    for name in p:
        assert torch.equal(p[name], st[name]), name  # without the rescale: fairseq's own initialization
        if ".layers." in name and "weight" in name and "layer_norm" not in name:
            torch.testing.assert_close(s[name], p[name] * factor, rtol=0, atol=0)
            scaled_count += 1
        else:
            assert torch.equal(s[name], p[name]), name
    assert scaled_count == 3 * 6  # q, k, v, out_proj, fc1, fc2 in 3 layers


@pytest.mark.parametrize("n", [6, 16, 48])
def test_deepnorm_lm_constants_are_the_decoder_only_ones(n):
    c = deepnorm_lm_constants(n)
    assert c["alpha"] == pytest.approx(math.sqrt(math.sqrt(2 * n)), rel=1e-12)
    assert c["beta"] == pytest.approx(1 / math.sqrt(math.sqrt(8 * n)), rel=1e-12)


def test_deepnorm_lm_layer_follows_the_equations(lm_dict_dir):
    model, _, _ = build_lm(lm_dict_dir, "transformer_lm_deepnorm", *SIZES, *NO_DROPOUT)
    model.train()
    layer = model.decoder.layers[2]
    alpha = (2 * 3) ** 0.25  # N = 3 decoder-only layers (an encoder-decoder decoder would use (3N)^(1/4))
    assert layer.deepnorm_alpha == pytest.approx(alpha, rel=1e-12)
    x, causal = _inputs()
    y, _, _ = layer(x, self_attn_mask=causal)
    h = layer.self_attn_layer_norm(alpha * x + _sa(layer, x, causal))
    expected = layer.final_layer_norm(alpha * h + _ffn(layer, h))
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)


def test_deepnorm_lm_init_uses_the_decoder_only_beta(lm_dict_dir):
    wide = ["--decoder-embed-dim", "256", "--decoder-ffn-embed-dim", "1024", "--decoder-attention-heads", "4",
            "--decoder-layers", "2"]
    model, _, _ = build_lm(lm_dict_dir, "transformer_lm_deepnorm", *wide)
    beta = (8 * 2) ** -0.25
    for name, p in model.decoder.layers.named_parameters():
        module = name.split(".")[-2]
        if name.endswith(".weight") and module in ("fc1", "fc2", "v_proj", "out_proj", "q_proj", "k_proj"):
            gain = 1.0 if module in ("q_proj", "k_proj") else beta
            fan_out, fan_in = p.shape
            assert p.std().item() == pytest.approx(gain * math.sqrt(2.0 / (fan_in + fan_out)), rel=0.03), name
    # torchscale: fairseq's weights divided by (8N)^(1/4), biases too
    plain, _, _ = build_lm(lm_dict_dir, "transformer_lm_post_ln", *wide, seed=5)
    ts, _, _ = build_lm(lm_dict_dir, "transformer_lm_deepnorm", *wide, "--deepnorm-reference", "torchscale", seed=5)
    p0, p1 = plain.state_dict(), ts.state_dict()
    for name in p0:
        module = name.split(".")[-2] if name.count(".") else ""
        if ".layers." in name and module in ("fc1", "fc2", "v_proj", "out_proj"):
            torch.testing.assert_close(p1[name], p0[name] * beta, rtol=1e-6, atol=0)
        else:
            assert torch.equal(p1[name], p0[name]), name


@pytest.mark.parametrize("perturb", [False, True])
def test_admin_lm_layer_equals_admin_torch_residuals(lm_dict_dir, perturb):
    model, _, _ = build_lm(lm_dict_dir, "transformer_lm_admin", *SIZES, *NO_DROPOUT)
    model.train()
    layer = model.decoder.layers[1]
    assert not hasattr(layer, "encoder_attn_residual_scale")
    if perturb:
        with torch.no_grad():
            layer.self_attn_residual_scale.copy_(torch.rand(32) * 3)
            layer.ffn_residual_scale.copy_(torch.rand(32) * 3)
        res = []
        for omega in (layer.self_attn_residual_scale, layer.ffn_residual_scale):
            r = admin_torch.as_module(4, as_parameter=True, embed_dim=32)
            with torch.no_grad():
                r.omega.copy_(omega)
            res.append(r)
    else:  # a 3-layer decoder-only stack has 2 x 3 = 6 residual connections
        res = [admin_torch.as_module(6, as_parameter=True, embed_dim=32)] * 2
    x, causal = _inputs()
    y, _, _ = layer(x, self_attn_mask=causal)
    h = layer.self_attn_layer_norm(res[0](x, _sa(layer, x, causal)))
    expected = layer.final_layer_norm(res[1](h, _ffn(layer, h)))
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch,flags", [
    ("transformer_lm_post_ln", []), ("transformer_lm_pre_ln", []), ("transformer_lm_b2t", []),
    ("transformer_lm_deepnorm", []), ("transformer_lm_admin", []),
])
def test_lm_incremental_decoding_equals_full_forward(lm_dict_dir, arch, flags):
    model, task, _ = build_lm(lm_dict_dir, arch, *SIZES, *flags)
    model.eval()
    toks = tokens(task)
    with torch.no_grad():
        full, _ = model(toks)
        state = {}
        steps = [model.decoder(toks[:, : t + 1], incremental_state=state)[0] for t in range(toks.size(1))]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch,flags,needle", [
    ("transformer_lm_b2t", ["--decoder-normalize-before"], "B2T cannot be combined"),
    ("transformer_lm_post_ln", ["--decoder-normalize-before"], "--ln-position pre"),
    ("transformer_lm_deepnorm", ["--b2t-rescale-init"], "DeepNorm has its own initialization"),
])
def test_lm_contradictory_flags_are_refused(lm_dict_dir, arch, flags, needle):
    with pytest.raises(B2TConfigError, match=needle):
        build_lm(lm_dict_dir, arch, *SIZES, *flags)


def test_authors_switch_selects_b2t_on_the_lm(lm_dict_dir):
    model, _, args = build_lm(lm_dict_dir, "transformer_lm_post_ln", *SIZES, "--residual-bottom-to-top")
    assert args.ln_position == "b2t" and type(model.decoder.layers[0]) is B2TDecoderLayer
