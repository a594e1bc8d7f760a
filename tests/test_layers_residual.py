"""ResiDual (b2t_fairseq/residual.py, --layer-type residual): the translation model and the decoder-only
LM against an implementation written here from the equations (plain torch ops on the model's own tensors), the
Post-LN stream against stock fairseq bit for bit, incremental decoding and beam search against the
full forward, and the type's option rules."""

import argparse
import math

import pytest
import torch
import torch.nn.functional as F
from fairseq.modules.sinusoidal_positional_embedding import SinusoidalPositionalEmbedding
from fairseq.sequence_generator import SequenceGenerator
from helpers import SIZES, TINY, assert_incremental_equals_full, build, build_lm, reference_attention, toy_batch

from b2t_fairseq import layer_types, residual
from b2t_fairseq.errors import B2TConfigError

NO_DROPOUT = ["--dropout", "0", "--attention-dropout", "0", "--activation-dropout", "0"]
AUTHORS_OPTIONS = {"enc_alpha": 0.5, "dec_alpha": 1.5, "enc_res_input_norm_scale": 0.05,
                   "dec_res_input_norm_scale": 0.05}  # the scale is the source's OPUS config's


def _flags(options):
    return [str(x) for k, v in (options or {}).items() for x in (f"--{k.replace('_', '-')}", v)]


def residual_model(data, *extra, options=None, seed=1):
    """The translation model from its named architecture, ResiDual's options as command-line flags."""
    return build(data, "transformer_residual", *TINY, *extra, *_flags(options), seed=seed)


@pytest.fixture
def residual_lm(lm_dict_dir):
    """The decoder-only model from its named architecture, as fairseq-train builds it (Hydra config)."""
    def make(*extra, options=None, seed=1):
        return build_lm(lm_dict_dir, "transformer_lm_residual", *SIZES, *extra, *_flags(options), seed=seed)
    return make


def _perturb_(model, seed=0):
    """Random LayerNorm weights and biases (fairseq starts them at 1 and 0, where a wrong norm can hide)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if name.endswith("weight") else 0.0))


# --- the equations, from the model's tensors alone ---------------------------------------------------

def _ops(p, d):
    ln = lambda x, n, eps=1e-5: F.layer_norm(x, (d,), p[f"{n}.weight"], p[f"{n}.bias"], eps)  # noqa: E731
    ffn = lambda x, n: F.linear(F.relu(F.linear(x, p[f"{n}.fc1.weight"], p[f"{n}.fc1.bias"])),  # noqa: E731
                                p[f"{n}.fc2.weight"], p[f"{n}.fc2.bias"])
    return ln, ffn


def _embed(p, key, tokens, pad, d):
    """scale * E[tokens] + sinusoidal positions (pads at fairseq's padding position, a zero row)."""
    table = SinusoidalPositionalEmbedding.get_embedding(64, d, pad)
    mask = tokens.ne(pad).long()
    positions = torch.cumsum(mask, 1) * mask + pad  # fairseq's make_positions
    return (math.sqrt(d) * p[key][tokens] + table[positions]).transpose(0, 1)


def _drop(x, p):
    return F.dropout(x, p, training=p > 0)


def reference_stack(p, stack, x, layers, d, options, sublayers, drop=0.0):
    """x_0 = d_0/s = x; per sub-layer a = Drop(f(x)): d += s a, x = LN(x + a); out = alpha x + LN_dual(d).
    sublayers: the attentions, [(norm name, f(layer name, x))]; the FFN comes last in every layer."""
    ln, ffn = _ops(p, d)
    o = dict(residual.OPTIONS, **options)
    s, alpha = o[f"{stack[:3]}_res_input_norm_scale"], o[f"{stack[:3]}_alpha"]
    dual = x * s
    for i in range(layers):
        n = f"{stack}.layers.{i}"
        for norm, f in [*sublayers, ("final", lambda n, x: ffn(x, n))]:
            a = _drop(f(n, x), drop)
            dual = dual + a * s
            x = ln(x + a, f"{n}.{norm}_layer_norm")
    return alpha * x + ln(dual, f"{stack}.layer_norm", eps=1e-7)


def reference_translation(model, src, prev, options, drop=0.0):
    p, cfg = dict(model.state_dict()), model.encoder.cfg
    pad, d, heads = model.encoder.padding_idx, cfg.encoder.embed_dim, cfg.encoder.attention_heads
    src_pad = src.eq(pad)
    tgt_pad = prev.eq(pad) if prev.eq(pad).any() else None
    x = _drop(_embed(p, "encoder.embed_tokens.weight", src, pad, d), drop) * (~src_pad).T.unsqueeze(-1)
    enc = reference_stack(p, "encoder", x, cfg.encoder.layers, d, options, [
        ("self_attn", lambda n, x: reference_attention(p, f"{n}.self_attn", x, x, heads, key_pad=src_pad)),
    ], drop)
    y = _drop(_embed(p, "decoder.embed_tokens.weight", prev, pad, d), drop)
    out = reference_stack(p, "decoder", y, cfg.decoder.layers, d, options, [
        ("self_attn", lambda n, x: reference_attention(p, f"{n}.self_attn", x, x, heads, key_pad=tgt_pad, causal=True)),
        ("encoder_attn", lambda n, x: reference_attention(p, f"{n}.encoder_attn", x, enc, heads, key_pad=src_pad)),
    ], drop)
    return F.linear(out.transpose(0, 1), p["decoder.output_projection.weight"])


def reference_lm(model, toks, options):
    p, cfg = dict(model.state_dict()), model.decoder.cfg
    pad, d, heads = model.decoder.padding_idx, cfg.decoder.embed_dim, cfg.decoder.attention_heads
    key_pad = toks.eq(pad) if toks.eq(pad).any() else None
    x = _embed(p, "decoder.embed_tokens.weight", toks, pad, d)
    out = reference_stack(p, "decoder", x, cfg.decoder.layers, d, options, [
        ("self_attn", lambda n, x: reference_attention(p, f"{n}.self_attn", x, x, heads, key_pad=key_pad, causal=True)),
    ])
    return F.linear(out.transpose(0, 1), p["decoder.output_projection.weight"])


def _padded_batch(task):
    src, lengths, prev = toy_batch(task)
    prev[2, -2:] = task.target_dictionary.pad()  # a right-padded target row: the decoder's own padding mask
    return src, lengths, prev


# --- exactness -------------------------------------------------------------------------------------

@pytest.mark.parametrize("options", [{}, AUTHORS_OPTIONS], ids=["defaults", "alpha-and-scale"])
def test_translation_model_equals_the_equations(toy_dicts, options):
    model, task, _ = residual_model(toy_dicts, *NO_DROPOUT, options=options)
    _perturb_(model)
    model.train()  # dropout is 0: training mode follows the equations exactly
    src, lengths, prev = _padded_batch(task)
    assert src.eq(task.source_dictionary.pad()).any()
    logits, _ = model(src, lengths, prev)
    expected = reference_translation(model, src, prev, options)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # the join really is there: without LN_dual the output differs
        model.decoder.layer_norm.weight.zero_()
        model.decoder.layer_norm.bias.zero_()
    assert (model(src, lengths, prev)[0] - logits).abs().max() > 1e-2


def test_dropout_is_applied_once_per_sublayer_and_feeds_both_streams(toy_dicts):
    drop = 0.3
    model, task, _ = residual_model(toy_dicts, "--dropout", str(drop), "--attention-dropout", "0",
                                    "--activation-dropout", "0")
    _perturb_(model)
    model.train()
    src, lengths, prev = _padded_batch(task)
    torch.manual_seed(5)
    logits, _ = model(src, lengths, prev)
    # the same dropout calls in the same order (embedding, then each sub-layer's output) draw the same masks
    torch.manual_seed(5)
    expected = reference_translation(model, src, prev, {}, drop=drop)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    model.eval()
    assert (model(src, lengths, prev)[0] - logits).abs().max() > 1e-2  # dropout was on


@pytest.mark.parametrize("options", [{}, {"dec_alpha": 0.5, "dec_res_input_norm_scale": 0.05}],
                         ids=["defaults", "alpha-and-scale"])
def test_lm_equals_the_equations(residual_lm, options):
    model, task, _ = residual_lm(*NO_DROPOUT, options=options)
    assert all(type(layer) is residual.ResiDualDecoderLayer and layer.encoder_attn is None
               for layer in model.decoder.layers)
    _perturb_(model)
    model.train()
    g = torch.Generator().manual_seed(0)
    toks = torch.randint(task.dictionary.nspecial, len(task.dictionary), (3, 9), generator=g)
    toks[1, -3:] = task.dictionary.pad()
    logits, _ = model(toks)
    torch.testing.assert_close(logits, reference_lm(model, toks, options), rtol=1e-5, atol=1e-5)


def test_post_ln_stream_is_stock_post_ln_bit_for_bit(toy_dicts):
    """With LN_dual zeroed (weight and bias 0) and alpha 1, the output is the Post-LN stream alone: stock
    fairseq's Post-LN transformer with the same weights, to the bit, forward and backward."""
    model, task, _ = residual_model(toy_dicts, *NO_DROPOUT)
    stock, _, _ = build(toy_dicts, "transformer", *TINY, *NO_DROPOUT)
    with torch.no_grad():
        for stack in (model.encoder, model.decoder):
            stack.layer_norm.weight.zero_()
            stack.layer_norm.bias.zero_()
    ours = model.state_dict()
    missing, unexpected = stock.load_state_dict(ours, strict=False)
    assert not missing and sorted(unexpected) == [f"{s}.layer_norm.{w}" for s in ("decoder", "encoder")
                                                  for w in ("bias", "weight")]
    batch = _padded_batch(task)
    outs = []
    for m in (stock, model):
        m.train()
        m.zero_grad()
        out, _ = m(*batch)
        out.float().log_softmax(-1).mean().backward()
        outs.append((out.detach(), {n: q.grad for n, q in m.named_parameters() if q.grad is not None}))
    assert torch.equal(outs[0][0], outs[1][0])
    for name, grad in outs[0][1].items():
        assert torch.equal(grad, outs[1][1][name]), name


def test_parameter_names_are_fairseqs_plus_the_sources_join_norm(toy_dicts):
    model, _, _ = residual_model(toy_dicts)
    pre, _, _ = build(toy_dicts, "transformer", *TINY, "--encoder-normalize-before", "--decoder-normalize-before")
    # fairseq's Pre-LN has exactly these names: the layers' norms plus one norm after each stack
    assert sorted(model.state_dict()) == sorted(pre.state_dict())
    for stack in (model.encoder, model.decoder):
        assert stack.layer_norm.eps == 1e-7 and stack.layers[0].self_attn_layer_norm.eps == 1e-5
    assert all(type(layer) is residual.ResiDualEncoderLayer for layer in model.encoder.layers)
    assert all(type(layer) is residual.ResiDualDecoderLayer for layer in model.decoder.layers)


def test_activation_checkpointing_keeps_the_forward_and_the_gradients(toy_dicts):
    """fairseq's checkpoint_wrapper around the layers (their extra stream in and out) recomputes the
    same dropout masks: the same output, the same gradients up to summation order."""
    runs = []
    for extra in ([], ["--checkpoint-activations"]):
        model, task, _ = residual_model(toy_dicts, "--dropout", "0.2", *extra, seed=2)
        model.train()
        torch.manual_seed(4)
        out, _ = model(*_padded_batch(task))
        out.float().log_softmax(-1).mean().backward()
        runs.append((out.detach(), {n: p.grad for n, p in model.named_parameters()}))
    assert torch.equal(runs[0][0], runs[1][0])
    for name, grad in runs[0][1].items():
        torch.testing.assert_close(runs[1][1][name], grad, rtol=1e-5, atol=1e-7, msg=name)


# --- decoding ----------------------------------------------------------------------------------------

def test_incremental_decoding_equals_full_forward(toy_dicts):
    model, task, _ = residual_model(toy_dicts)
    _perturb_(model)
    assert_incremental_equals_full(model, task)


def test_lm_incremental_decoding_equals_full_forward(residual_lm):
    model, task, _ = residual_lm()
    _perturb_(model)
    model.eval()
    g = torch.Generator().manual_seed(1)
    toks = torch.randint(task.dictionary.nspecial, len(task.dictionary), (3, 9), generator=g)
    with torch.no_grad():
        full, _ = model(toks)
        state = {}
        steps = [model.decoder(toks[:, : t + 1], incremental_state=state)[0] for t in range(toks.size(1))]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_beam_search_scores_equal_the_full_forward(toy_dicts):
    """fairseq's SequenceGenerator (incremental states reordered across beams) scores each hypothesis
    as the teacher-forced full forward does."""
    model, task, _ = residual_model(toy_dicts)
    _perturb_(model)
    model.eval()
    src, lengths, _ = toy_batch(task)
    gen = SequenceGenerator([model], task.target_dictionary, beam_size=3, max_len_b=6, normalize_scores=False)
    with torch.no_grad():
        hypos = gen.forward({"net_input": {"src_tokens": src, "src_lengths": lengths}})
    eos = task.target_dictionary.eos()
    for i, beams in enumerate(hypos):
        for h in beams[:2]:
            tokens = h["tokens"]
            prev = torch.cat([torch.tensor([eos]), tokens[:-1]]).unsqueeze(0)
            with torch.no_grad():
                logits, _ = model(src[i:i + 1], lengths[i:i + 1], prev)
            lprobs = model.get_normalized_probs((logits, None), log_probs=True)[0]
            expected = lprobs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
            torch.testing.assert_close(h["positional_scores"], expected, rtol=1e-4, atol=1e-4)


# --- options -----------------------------------------------------------------------------------------

def test_options_reach_the_stacks_and_layers(toy_dicts):
    model, _, _ = residual_model(toy_dicts, options=AUTHORS_OPTIONS)
    assert (model.encoder.post_weight, model.decoder.post_weight) == (0.5, 1.5)
    assert model.encoder.dual_scale == model.encoder.layers[0].dual_scale == 0.05
    assert model.decoder.dual_scale == model.decoder.layers[1].dual_scale == 0.05


@pytest.mark.parametrize("flags,needle", [
    ({"enc_res_input_norm_scale": 0.0}, "--enc-res-input-norm-scale must be a positive number"),
    ({"dec_res_input_norm_scale": -1.0}, "--dec-res-input-norm-scale must be a positive number"),
    ({"dec_alpha": float("inf")}, "--dec-alpha must be a finite number"),
    ({"cross_self_attention": True}, "--cross-self-attention is not supported with residual"),
    ({"scale_resids": True}, "--scale-resids is not supported with residual"),
    ({"base_layers": 1}, "--base-layers is not supported with ResiDual"),
    ({"no_decoder_final_norm": True}, "--no-decoder-final-norm contradicts ResiDual"),
    ({"encoder_normalize_before": True}, "ResiDual cannot be combined with --encoder-normalize-before"),
])
def test_bad_options_are_refused_in_one_line(flags, needle):
    with pytest.raises(B2TConfigError, match=needle) as e:
        layer_types.resolve(argparse.Namespace(ln_position="residual", **flags))
    assert "\n" not in str(e.value) and ";" in str(e.value)


def test_residual_options_belong_to_residual(toy_dicts):
    """Another type refuses them unless they hold their unused value; ResiDual settles them as numbers."""
    with pytest.raises(B2TConfigError, match="--enc-alpha is an option of ResiDual layers, not of B2T"):
        build(toy_dicts, "transformer_b2t_tiny", "--enc-alpha", "0.5")
    _, _, args = build(toy_dicts, "transformer_b2t_tiny", "--enc-alpha", "1")
    assert args.enc_alpha == 1.0
    _, _, args = residual_model(toy_dicts, options={"dec_res_input_norm_scale": 0.05})
    assert (args.enc_alpha, args.dec_res_input_norm_scale) == (1.0, 0.05)
    assert isinstance(args.dec_res_input_norm_scale, float)
