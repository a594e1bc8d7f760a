"""Exactness of Peri-LN, Mix-LN and LayerNorm Scaling layers (b2t_fairseq/placements.py).

Each layer is checked against its source's equations written here from the layer's raw weights with
plain torch ops (helpers.reference_attention, a LayerNorm and an FFN spelled out): the layer's own
forward is never called inside a reference. Encoder, decoder and LM-style (no cross-attention)
decoder layers, train and eval mode (dropout 0), with padding; incremental decoding equals the full
forward. Layers are built from a fairseq TransformerConfig, as the stacks build them.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from fairseq.models.transformer import TransformerConfig
from fairseq.modules.transformer_layer import TransformerDecoderLayerBase, TransformerEncoderLayerBase
from helpers import SIZES, build_lm, parse, reference_attention, transformer_config

from b2t_fairseq.errors import B2TConfigError
from b2t_fairseq.placements import (
    LNSDecoderLayer,
    LNSEncoderLayer,
    MixLNDecoderLayer,
    MixLNEncoderLayer,
    PeriLNDecoderLayer,
    PeriLNEncoderLayer,
    check_placement_options,
    mixln_post_layers,
)

D, FFN_DIM, HEADS, LAYERS = 32, 64, 4, 4
ENCODER = {"peri": PeriLNEncoderLayer, "mixln": MixLNEncoderLayer, "lns": LNSEncoderLayer}
DECODER = {"peri": PeriLNDecoderLayer, "mixln": MixLNDecoderLayer, "lns": LNSDecoderLayer}
# (type, layer_index): Mix-LN with 4 layers and the default 0.25 has layer 0 Post-LN, 1-3 Pre-LN
CASES = [("peri", 0), ("mixln", 0), ("mixln", 1), ("mixln", 3), ("lns", 0), ("lns", 1), ("lns", 3)]


def make_cfg(dropout=0.0, **extra):
    cfg = transformer_config()
    for side in (cfg.encoder, cfg.decoder):
        side.embed_dim, side.ffn_embed_dim, side.attention_heads, side.layers = D, FFN_DIM, HEADS, LAYERS
    cfg.dropout = cfg.attention_dropout = cfg.activation_dropout = dropout
    for k, v in extra.items():
        setattr(cfg, k, v)
    return cfg


def build(cls, cfg, index, **kw):
    torch.manual_seed(0)
    layer = cls(cfg, layer_index=index, **kw) if getattr(cls, "uses_layer_index", False) else cls(cfg, **kw)
    with torch.no_grad():  # norms with non-trivial gains and biases, so a swapped norm cannot go unseen
        for name, p in layer.named_parameters():
            if "layer_norm" in name:
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if name.endswith("weight") else 0.0))
    return layer


# --- the sources' equations, written out ----------------------------------------------------------

def ln(p, prefix, x, eps=1e-5):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * p[f"{prefix}.weight"] + p[f"{prefix}.bias"]


def ffn(p, z):
    return F.linear(torch.relu(F.linear(z, p["fc1.weight"], p["fc1.bias"])), p["fc2.weight"], p["fc2.bias"])


def reference(kind, index, p, x, self_attn, cross_attn=None):
    """One layer of `kind` by its source's equations. self_attn(z) and cross_attn(z) are the
    attentions from raw weights (masks bound); cross_attn None: the LM layer (no cross sub-layer)."""
    subs = [("self_attn_layer_norm", "self_attn_output_layer_norm", self_attn)]
    if cross_attn is not None:
        subs.append(("encoder_attn_layer_norm", "encoder_attn_output_layer_norm", cross_attn))
    subs.append(("final_layer_norm", "ffn_output_layer_norm", lambda z: ffn(p, z)))
    h = x
    for norm, out_norm, module in subs:
        if kind == "peri":        # y = x + Norm_out(F(Norm_in(x)))
            h = h + ln(p, out_norm, module(ln(p, norm, h)))
        elif kind == "lns":       # y = x + F(Norm(x) / sqrt(l)),  l = index + 1
            h = h + module(ln(p, norm, h) / math.sqrt(index + 1))
        elif index < math.floor(0.25 * LAYERS):   # Mix-LN, Post-LN part: y = Norm(x + F(x))
            h = ln(p, norm, h + module(h))
        else:                                     # Mix-LN, Pre-LN part:  y = x + F(Norm(x))
            h = h + module(ln(p, norm, h))
    return h


def inputs(seed=0, t=6, s=7, b=3):
    g = torch.Generator().manual_seed(seed)
    x, enc = torch.randn(t, b, D, generator=g), torch.randn(s, b, D, generator=g)
    enc_pad = torch.zeros(b, s, dtype=torch.bool)
    enc_pad[0, :2] = True          # left-padded source, as fairseq's translation task pads
    tgt_pad = torch.zeros(b, t, dtype=torch.bool)
    tgt_pad[1, -2:] = True         # right-padded target
    causal = torch.triu(torch.full((t, t), float("-inf")), 1)
    return x, enc, enc_pad, tgt_pad, causal


# --- each layer equals its equations --------------------------------------------------------------

@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("kind,index", CASES)
def test_encoder_layer_follows_its_equations(kind, index, mode):
    layer = build(ENCODER[kind], make_cfg(), index)
    layer.train(mode == "train")
    _, x, pad, _, _ = inputs()
    y = layer(x, pad)
    p = layer.state_dict()
    expected = reference(kind, index, p, x, lambda z: reference_attention(p, "self_attn", z, z, HEADS, key_pad=pad))
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("kind,index", CASES)
def test_decoder_layer_follows_its_equations(kind, index, mode):
    layer = build(DECODER[kind], make_cfg(), index)
    layer.train(mode == "train")
    x, enc, enc_pad, tgt_pad, causal = inputs()
    y, attn, _ = layer(x, enc, enc_pad, self_attn_mask=causal, self_attn_padding_mask=tgt_pad, need_attn=True)
    p = layer.state_dict()
    expected = reference(kind, index, p, x,
                         lambda z: reference_attention(p, "self_attn", z, z, HEADS, key_pad=tgt_pad, causal=True),
                         lambda z: reference_attention(p, "encoder_attn", z, enc, HEADS, key_pad=enc_pad))
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    assert attn is not None and attn.shape == (3, x.size(0), enc.size(0))  # cross-attention weights, as fairseq's


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("kind,index", CASES)
def test_lm_layer_follows_its_equations(kind, index, mode):
    layer = build(DECODER[kind], make_cfg(), index, no_encoder_attn=True)
    assert layer.encoder_attn is None and not any("encoder_attn" in n for n, _ in layer.named_parameters())
    layer.train(mode == "train")
    x, _, _, pad, causal = inputs()
    y, attn, _ = layer(x, self_attn_mask=causal, self_attn_padding_mask=pad)
    p = layer.state_dict()
    expected = reference(kind, index, p, x,
                         lambda z: reference_attention(p, "self_attn", z, z, HEADS, key_pad=pad, causal=True))
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    assert attn is None


@pytest.mark.parametrize("lm", [False, True], ids=["translation", "lm"])
@pytest.mark.parametrize("kind,index", CASES)
def test_incremental_decoding_equals_the_full_forward(kind, index, lm):
    layer = build(DECODER[kind], make_cfg(), index, no_encoder_attn=lm).eval()
    x, enc, enc_pad, _, causal = inputs(seed=1)
    enc, enc_pad = (None, None) if lm else (enc, enc_pad)
    with torch.no_grad():
        full, _, _ = layer(x, enc, enc_pad, self_attn_mask=causal)
        state = {}
        steps = [layer(x[t:t + 1], enc, enc_pad, incremental_state=state)[0] for t in range(x.size(0))]
    assert state  # the keys and values really were cached
    torch.testing.assert_close(torch.cat(steps, dim=0), full, rtol=1e-5, atol=1e-5)


# --- what each type is made of ------------------------------------------------------------------

def test_peri_ln_adds_only_its_named_output_norms():
    cfg = make_cfg()
    stock_enc = {n for n, _ in TransformerEncoderLayerBase(cfg).named_parameters()}
    stock_dec = {n for n, _ in TransformerDecoderLayerBase(cfg).named_parameters()}
    stock_lm = {n for n, _ in TransformerDecoderLayerBase(cfg, True).named_parameters()}
    out = lambda *subs: {f"{s}_output_layer_norm.{w}" for s in subs for w in ("weight", "bias")}  # noqa: E731
    assert {n for n, _ in PeriLNEncoderLayer(cfg).named_parameters()} == stock_enc | out("self_attn", "ffn")
    assert {n for n, _ in PeriLNDecoderLayer(cfg).named_parameters()} == \
        stock_dec | out("self_attn", "encoder_attn", "ffn")
    assert {n for n, _ in PeriLNDecoderLayer(cfg, True).named_parameters()} == stock_lm | out("self_attn", "ffn")


@pytest.mark.parametrize("side", ["encoder", "decoder"])
def test_mixln_and_lns_keep_exactly_fairseqs_parameter_names(side):
    cfg = make_cfg()
    stock = TransformerEncoderLayerBase(cfg) if side == "encoder" else TransformerDecoderLayerBase(cfg)
    for cls in ((MixLNEncoderLayer, LNSEncoderLayer) if side == "encoder" else (MixLNDecoderLayer, LNSDecoderLayer)):
        assert list(cls(cfg, layer_index=1).state_dict()) == list(stock.state_dict()), cls.__name__


@pytest.mark.parametrize("side", ["encoder", "decoder"])
def test_mixln_layers_are_fairseqs_post_ln_below_the_split_and_pre_ln_above_bit_for_bit(side):
    cfg = make_cfg(mixln_post_fraction=0.5)  # 4 layers: 0-1 Post-LN, 2-3 Pre-LN
    x, enc, enc_pad, tgt_pad, causal = inputs()
    for index in range(LAYERS):
        pre = index >= 2
        cfg.encoder.normalize_before = cfg.decoder.normalize_before = pre
        if side == "encoder":
            ours, stock = build(MixLNEncoderLayer, cfg, index), TransformerEncoderLayerBase(cfg)
            args = (enc, enc_pad)
        else:
            ours, stock = build(MixLNDecoderLayer, cfg, index), TransformerDecoderLayerBase(cfg)
            args = (x, enc, enc_pad, None, None, None, causal, tgt_pad)
        stock.load_state_dict(ours.state_dict())
        cfg.encoder.normalize_before = cfg.decoder.normalize_before = not pre  # the layer ignores the stack's switch
        assert ours.normalize_before is pre
        out, ref = ours(*args), stock(*args)
        out, ref = (out[0], ref[0]) if side == "decoder" else (out, ref)
        assert torch.equal(out, ref), index


@pytest.mark.parametrize("side", ["encoder", "decoder"])
def test_lns_first_layer_is_fairseqs_pre_ln_bit_for_bit_and_deeper_ones_are_not(side):
    cfg = make_cfg()
    cfg.encoder.normalize_before = cfg.decoder.normalize_before = True
    stock = TransformerEncoderLayerBase(cfg) if side == "encoder" else TransformerDecoderLayerBase(cfg)
    x, enc, enc_pad, tgt_pad, causal = inputs()
    args = (enc, enc_pad) if side == "encoder" else (x, enc, enc_pad, None, None, None, causal, tgt_pad)
    cls = LNSEncoderLayer if side == "encoder" else LNSDecoderLayer
    for index, same in ((0, True), (2, False)):
        layer = build(cls, cfg, index)
        stock.load_state_dict(layer.state_dict())
        out, ref = layer(*args), stock(*args)
        out, ref = (out[0], ref[0]) if side == "decoder" else (out, ref)
        assert torch.equal(out, ref) is same, index
    assert layer.lns_scale == 1 / math.sqrt(3)


@pytest.mark.parametrize("layers,fraction,post", [
    (12, 0.25, 3), (24, 0.25, 6),   # the reference scripts: POST_NUM 3 of 12 (71M), 6 of 24 (1B)
    (6, 0.25, 1), (18, 0.25, 4),    # floor(alpha * L)
    (10, 0.3, 3), (4, 0.0, 0), (4, 1.0, 4),
])
def test_mixln_split_is_floor_of_fraction_times_depth(layers, fraction, post):
    assert mixln_post_layers(layers, fraction) == post
    cfg = make_cfg(mixln_post_fraction=fraction)
    cfg.decoder.layers = layers
    kinds = [MixLNDecoderLayer(cfg, True, layer_index=i).normalize_before for i in range(layers)]
    assert kinds == [False] * post + [True] * (layers - post)


# --- refusals -------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [1.5, -0.1, "half", math.nan])
def test_mixln_fraction_outside_0_1_is_refused_in_one_line(bad):
    with pytest.raises(B2TConfigError, match=r"^--mixln-post-fraction must be .*; use") as e:
        check_placement_options(type("Args", (), {"mixln_post_fraction": bad})())
    assert "\n" not in str(e.value)
    with pytest.raises(B2TConfigError, match="--mixln-post-fraction"):  # the layer refuses it too
        MixLNEncoderLayer(make_cfg(mixln_post_fraction=bad), layer_index=0)


def test_an_unset_mixln_fraction_is_the_papers_quarter():
    for value in (None, 0.25):  # None: the flag not given (the dataclass default)
        cfg = make_cfg(mixln_post_fraction=value)
        cfg.encoder.layers = 8
        assert [MixLNEncoderLayer(cfg, layer_index=i).normalize_before for i in range(8)] == [False] * 2 + [True] * 6
    check_placement_options(make_cfg(mixln_post_fraction=None))


@pytest.mark.parametrize("cls", [PeriLNDecoderLayer, LNSDecoderLayer])
@pytest.mark.parametrize("flag", ["scale_attn", "scale_fc", "scale_heads", "scale_resids", "cross_self_attention"])
def test_explicit_forwards_refuse_fairseq_extras_they_do_not_implement(cls, flag):
    with pytest.raises(B2TConfigError, match=f"do not implement fairseq's --{flag.replace('_', '-')}; drop it"):
        build(cls, make_cfg(**{flag: True}), 0)


def test_layer_index_is_required_and_checked():
    cfg = make_cfg()
    with pytest.raises(TypeError, match="layer_index"):
        LNSEncoderLayer(cfg)
    with pytest.raises(ValueError, match="outside a stack of 4 layers"):
        MixLNDecoderLayer(cfg, layer_index=4)
    assert MixLNEncoderLayer.uses_layer_index and LNSDecoderLayer.uses_layer_index
    assert not PeriLNEncoderLayer.uses_layer_index


# --- the types as models (the records) ---------------------------------------------------------------

@pytest.mark.parametrize("arch,post", [("transformer_mix_ln", (1, 1)), ("transformer_mix_ln_18l", (4, 4))])
def test_mixln_model_splits_each_stack_by_its_own_depth(toy_dicts, arch, post):
    args = parse(toy_dicts, arch)
    assert args.encoder_normalize_before and args.decoder_normalize_before  # the norm after each stack
    cfg = TransformerConfig.from_namespace(args)
    for side, cls in (("encoder", MixLNEncoderLayer), ("decoder", MixLNDecoderLayer)):
        n = getattr(args, f"{side}_layers")
        before = [cls(cfg, layer_index=i).normalize_before for i in range(n)]
        assert before.count(False) == post[side == "decoder"] and before == sorted(before), side


@pytest.mark.parametrize("extra,fragment", [
    (["--arch", "transformer_post_ln_tiny", "--mixln-post-fraction", "0.5"],
     "--mixln-post-fraction is an option of Mix-LN layers, not of Post-LN"),
    (["--arch", "transformer_mix_ln_tiny", "--mixln-post-fraction", "2"], "--mixln-post-fraction must be a number"),
    (["--arch", "transformer_lns_tiny", "--cross-self-attention"], "not supported with lns layers"),
])
def test_placement_flags_without_meaning_are_refused_when_parsed(toy_dicts, extra, fragment):
    with pytest.raises(B2TConfigError, match=fragment):
        parse(toy_dicts, extra[1], *extra[2:])


@pytest.mark.parametrize("extra,post", [([], 2), (["--mixln-post-fraction", "0.5"], 4)])
def test_mixln_lm_takes_its_fraction_through_the_hydra_config(lm_dict_dir, extra, post):
    sizes = list(SIZES)
    sizes[sizes.index("--decoder-layers") + 1] = "8"
    model, _, cfg = build_lm(lm_dict_dir, "transformer_lm_mix_ln_tiny", *sizes, *extra)
    assert cfg.mixln_post_fraction == (0.5 if extra else 0.25)
    assert [layer.normalize_before for layer in model.decoder.layers] == [False] * post + [True] * (8 - post)
    assert model.decoder.layer_norm is not None  # the norm after the stack
