"""The normalizer axis (b2t_fairseq/norms.py): RMSNorm and DyT equal their equations, and
apply_normalizer swaps every LayerNorm of a fairseq layer or model under the same names."""

import math

import pytest
import torch
import torch.nn.functional as F
from fairseq import checkpoint_utils
from fairseq.modules import LayerNorm
from fairseq.modules.transformer_layer import TransformerDecoderLayerBase, TransformerEncoderLayerBase
from helpers import SIZES, TINY, build, build_lm, parse, reference_attention, toy_batch, transformer_config

from b2t_fairseq import layer_types
from b2t_fairseq.errors import B2TConfigError
from b2t_fairseq.norms import DyT, RMSNorm, apply_normalizer, is_layer_norm, normalizer_of

D = 32


def cfg_for(normalizer="layernorm", **extra):
    cfg = transformer_config()
    for side in (cfg.encoder, cfg.decoder):
        side.embed_dim, side.ffn_embed_dim, side.attention_heads, side.layers = D, 64, 4, 2
    cfg.dropout = cfg.attention_dropout = 0.0
    cfg.normalizer = normalizer
    for k, v in extra.items():
        setattr(cfg, k, v)
    return cfg


def randomize_(module, seed=0):
    """Non-trivial norm parameters (gains, biases, alphas), so the equations are checked with them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "layer_norm" in name or isinstance(module, (RMSNorm, DyT)):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)


# --- the modules against their equations ------------------------------------------------------------

def test_rmsnorm_follows_its_equation():
    norm = RMSNorm(D, eps=1e-5)
    randomize_(norm)
    x = torch.randn(5, 3, D) * 3 + 1  # a non-zero mean: RMSNorm must not subtract it
    expected = x / torch.sqrt((x ** 2).sum(-1, keepdim=True) / D + 1e-5) * norm.weight
    torch.testing.assert_close(norm(x), expected, rtol=1e-6, atol=1e-6)
    assert [n for n, _ in norm.named_parameters()] == ["weight"]
    assert not torch.allclose(norm(x), F.layer_norm(x, (D,), norm.weight, None, 1e-5), atol=1e-3)


def test_rmsnorm_takes_its_statistic_in_float32_for_half_inputs():
    norm = RMSNorm(D).to(torch.bfloat16)
    x = (torch.randn(4, D) * 100).to(torch.bfloat16)
    xf = x.float()
    expected = (xf / torch.sqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(torch.bfloat16) * norm.weight
    y = norm(x)
    assert y.dtype == torch.bfloat16 and torch.equal(y, expected)


def test_dyt_follows_its_equation_and_alpha_learns():
    norm = DyT(D, alpha_init=0.7)
    assert norm.alpha.shape == (1,) and norm.alpha.item() == pytest.approx(0.7)
    assert torch.equal(norm.weight, torch.ones(D)) and torch.equal(norm.bias, torch.zeros(D))
    randomize_(norm)
    x = torch.randn(5, 3, D) * 2
    y = norm(x)
    expected = torch.tanh(norm.alpha * x) * norm.weight + norm.bias
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    y.sum().backward()
    assert norm.alpha.grad is not None and norm.alpha.grad.abs().item() > 0
    assert [n for n, _ in norm.named_parameters()] == ["alpha", "weight", "bias"]
    assert DyT(D).alpha.item() == 0.5  # the source's default alpha_init_value


# --- apply_normalizer on fairseq's own layers ----------------------------------------------------------

def _names(module):
    return [n for n, _ in module.named_parameters()]


@pytest.mark.parametrize("normalizer", ["rmsnorm", "dyt"])
@pytest.mark.parametrize("side", ["encoder", "decoder"])
def test_apply_normalizer_keeps_parameter_names_and_maps_them_as_documented(side, normalizer):
    cfg = cfg_for(normalizer)
    layer = TransformerEncoderLayerBase(cfg) if side == "encoder" else TransformerDecoderLayerBase(cfg)
    before = dict(layer.named_parameters())
    norm_names = [n[: -len(".weight")] for n in before if n.endswith("layer_norm.weight")]
    assert apply_normalizer(layer, cfg) == len(norm_names) == (2 if side == "encoder" else 3)

    after = dict(layer.named_parameters())
    # RMSNorm: weight kept, the LayerNorm's bias gone; DyT: alpha added before weight and bias
    per_norm = {"rmsnorm": ["weight"], "dyt": ["alpha", "weight", "bias"]}[normalizer]
    expected = [n for n in before if not any(n.startswith(m + ".") for m in norm_names)]
    expected += [f"{m}.{w}" for m in norm_names for w in per_norm]
    assert sorted(after) == sorted(expected)
    for n, p in after.items():  # every other tensor is the very same parameter
        if not any(n.startswith(m + ".") for m in norm_names):
            assert p is before[n], n
    assert not any(is_layer_norm(m) for m in layer.modules())
    assert normalizer_of(layer) == normalizer


def test_a_post_ln_layer_with_rmsnorm_follows_the_post_ln_equations_with_rmsnorm():
    cfg = cfg_for("rmsnorm")
    layer = TransformerEncoderLayerBase(cfg)
    apply_normalizer(layer, cfg)
    randomize_(layer)
    x, pad = torch.randn(6, 2, D), torch.zeros(2, 6, dtype=torch.bool)
    pad[0, :2] = True
    p = layer.state_dict()
    rms = lambda z, m: z / torch.sqrt((z ** 2).mean(-1, keepdim=True) + 1e-5) * p[f"{m}.weight"]  # noqa: E731
    h = rms(x + reference_attention(p, "self_attn", x, x, 4, key_pad=pad), "self_attn_layer_norm")
    f = F.linear(torch.relu(F.linear(h, p["fc1.weight"], p["fc1.bias"])), p["fc2.weight"], p["fc2.bias"])
    torch.testing.assert_close(layer(x, pad), rms(h + f, "final_layer_norm"), rtol=1e-5, atol=1e-5)


def test_layernorm_touches_nothing(toy_dicts):
    model, task, args = build(toy_dicts, "transformer", *TINY, "--encoder-normalize-before")
    modules = dict(model.named_modules())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    args.normalizer = "layernorm"
    assert apply_normalizer(model, args) == 0
    assert all(modules[n] is m for n, m in model.named_modules())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("normalizer", ["rmsnorm", "dyt"])
def test_a_whole_model_has_no_layernorm_left_and_still_runs(toy_dicts, normalizer):
    model, task, args = build(toy_dicts, "transformer", *TINY, "--encoder-normalize-before",
                              "--decoder-normalize-before", "--layernorm-embedding")
    count = sum(is_layer_norm(m) for m in model.modules())
    # per layer 2 (encoder) / 3 (decoder), plus each stack's final and embedding norm
    assert count == 3 * 2 + 2 * 3 + 2 + 2
    args.normalizer = normalizer
    if normalizer == "dyt":
        args.dyt_alpha_init = 0.8
    assert apply_normalizer(model, args) == count
    assert normalizer_of(model) == normalizer
    assert "encoder.layernorm_embedding.weight" in model.state_dict()
    assert "encoder.layer_norm.weight" in model.state_dict()
    if normalizer == "dyt":
        assert model.encoder.layer_norm.alpha.item() == pytest.approx(0.8)
    src, lengths, prev = toy_batch(task)
    logits, _ = model(src, lengths, prev)
    assert torch.isfinite(logits).all()


def test_the_replacement_keeps_dtype_eps_affine_and_sharing():
    holder = torch.nn.Module()
    holder.a = LayerNorm(D, eps=1e-6).to(torch.float64)
    holder.b = torch.nn.LayerNorm(D, elementwise_affine=False)
    holder.inner = torch.nn.Module()
    holder.inner.shared = holder.a
    assert apply_normalizer(holder, cfg_for("rmsnorm")) == 2
    assert isinstance(holder.a, RMSNorm) and holder.a.weight.dtype == torch.float64 and holder.a.eps == 1e-6
    assert holder.inner.shared is holder.a
    assert holder.b.weight is None and _names(holder.b) == []


def test_fused_layer_norm_counts_as_a_layer_norm():
    # apex's FusedLayerNorm (what fairseq.modules.LayerNorm builds on CUDA with apex) is no nn.LayerNorm
    fused_cls = type("FusedLayerNorm", (torch.nn.Module,), {})
    fused = fused_cls()
    fused.normalized_shape, fused.eps, fused.elementwise_affine = (D,), 1e-5, True
    fused.weight = torch.nn.Parameter(torch.ones(D))
    holder = torch.nn.Module()
    holder.norm = fused
    assert apply_normalizer(holder, cfg_for("dyt")) == 1 and isinstance(holder.norm, DyT)


# --- refusals ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra,fragment", [
    ({"normalizer": "batchnorm"}, "unknown --normalizer 'batchnorm'; choose one of layernorm, rmsnorm, dyt"),
    ({"normalizer": "dyt", "dyt_alpha_init": 0.0}, "--dyt-alpha-init must be a positive number"),
    ({"normalizer": "dyt", "dyt_alpha_init": math.nan}, "--dyt-alpha-init must be a positive number"),
    ({"normalizer": "dyt", "dyt_alpha_init": "x"}, "--dyt-alpha-init must be a positive number"),
])
def test_bad_normalizer_options_are_refused_in_one_line(extra, fragment):
    cfg = cfg_for(**extra)
    layer = TransformerEncoderLayerBase(cfg)
    with pytest.raises(B2TConfigError) as e:
        apply_normalizer(layer, cfg)
    assert fragment in str(e.value) and ";" in str(e.value) and "\n" not in str(e.value)
    assert sum(is_layer_norm(m) for m in layer.modules()) == 2  # nothing was replaced


def test_unset_options_are_the_defaults():
    cfg = cfg_for(normalizer=None, dyt_alpha_init=None)  # the flags not given (the dataclass defaults)
    layer = TransformerEncoderLayerBase(cfg)
    assert apply_normalizer(layer, cfg) == 0 and normalizer_of(layer) == "layernorm"
    cfg.normalizer = "dyt"
    apply_normalizer(layer, cfg)
    assert layer.final_layer_norm.alpha.item() == 0.5


# --- the axis in the models (--normalizer) -----------------------------------------------------------

@pytest.mark.parametrize("normalizer", ["rmsnorm", "dyt"])
def test_translation_model_swaps_every_norm_and_its_args_record_it(toy_dicts, normalizer):
    plain, _, _ = build(toy_dicts, "transformer_peri_ln_tiny")
    model, task, args = build(toy_dicts, "transformer_peri_ln_tiny", "--normalizer", normalizer)
    assert args.normalizer == normalizer and layer_types.which(model).key == "peri"
    assert normalizer_of(model.encoder) == normalizer_of(model.decoder) == normalizer
    rename = {"rmsnorm": lambda n: [] if n.endswith("norm.bias") else [n],
              "dyt": lambda n: [n[: -len("weight")] + "alpha", n] if n.endswith("norm.weight") else [n]}[normalizer]
    assert list(model.state_dict()) == [m for n in plain.state_dict() for m in rename(n)]
    src, lengths, prev = toy_batch(task)
    assert torch.isfinite(model(src, lengths, prev)[0]).all()


def test_lm_model_swaps_every_norm(lm_dict_dir):
    model, _, cfg = build_lm(lm_dict_dir, "transformer_lm_lns_tiny", *SIZES, "--normalizer", "dyt",
                             "--dyt-alpha-init", "0.3")
    assert str(cfg.normalizer) == "dyt" and cfg.dyt_alpha_init == 0.3
    assert normalizer_of(model.decoder) == "dyt"
    assert model.decoder.layer_norm.alpha.item() == pytest.approx(0.3)  # the stack's final norm too


@pytest.mark.parametrize("extra,fragment", [
    (["--normalizer", "rmsnorm", "--dyt-alpha-init", "0.8"], "--dyt-alpha-init is an option of --normalizer dyt"),
    (["--dyt-alpha-init", "0.8"], "not of layernorm"),
    (["--normalizer", "dyt", "--dyt-alpha-init", "-1"], "--dyt-alpha-init must be a positive number"),
])
def test_normalizer_flags_without_meaning_are_refused_when_parsed(toy_dicts, extra, fragment):
    with pytest.raises(B2TConfigError, match=fragment):
        parse(toy_dicts, "transformer_pre_ln_tiny", *extra)


def test_a_checkpoint_names_its_normalizer_and_loads_as_it(toy_dicts, tmp_path):
    model, task, args = build(toy_dicts, "transformer_mix_ln_tiny", "--normalizer", "dyt",
                                    "--dyt-alpha-init", "0.9")
    with torch.no_grad():  # trained-looking norms, so loading them is seen
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.add_(torch.rand_like(p))
    path = tmp_path / "checkpoint.pt"
    torch.save({"args": args, "model": model.state_dict(), "extra_state": {}, "optimizer_history": [
        {"criterion_name": "CrossEntropyCriterion", "optimizer_name": "Adam", "lr_scheduler_state": {"best": None},
         "num_updates": 0}]}, path)
    assert torch.load(path, weights_only=False)["args"].normalizer == "dyt"
    [loaded], _, _ = checkpoint_utils.load_model_ensemble_and_task([str(path)], arg_overrides={"data": str(toy_dicts)})
    assert normalizer_of(loaded.encoder) == normalizer_of(loaded.decoder) == "dyt"
    model.eval(), loaded.eval()
    batch = toy_batch(task)
    with torch.no_grad():
        assert torch.equal(model(*batch)[0], loaded(*batch)[0])


@pytest.mark.parametrize("t", layer_types.LAYER_TYPES, ids=[t.key for t in layer_types.LAYER_TYPES])
def test_every_layer_type_takes_every_normalizer_it_is_defined_with(toy_dicts, lm_dict_dir, t):
    src_batch = None
    for normalizer in (n for n in t.norms if n != "layernorm"):
        model, task, _ = build(toy_dicts, t.family + "_tiny", "--normalizer", normalizer)
        lm, lm_task, _ = build_lm(lm_dict_dir, t.lm_family + "_tiny", *SIZES, "--normalizer", normalizer)
        for stack in (model.encoder, model.decoder, lm.decoder):
            assert normalizer_of(stack) == normalizer, (t.key, normalizer)
        src_batch = src_batch or toy_batch(task)
        assert torch.isfinite(model(*src_batch)[0]).all()
        assert torch.isfinite(lm(torch.arange(4, 12).view(1, 8))[0]).all()
