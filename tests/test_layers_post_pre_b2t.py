"""Exactness: Post-LN / Pre-LN equal stock fairseq bit for bit; B2T equals the paper's equations."""

import pytest
import torch
import torch.nn.functional as F
from helpers import TINY, assert_incremental_equals_full, build, toy_batch

from b2t_fairseq.layers import rescale_init_

STOCK_PRE = ["--encoder-normalize-before", "--decoder-normalize-before"]


def _forward_backward(model, batch, seed=123):
    """One training forward/backward with a fixed dropout seed; returns logits and named grads."""
    model.train()
    model.zero_grad()
    torch.manual_seed(seed)
    logits, _ = model(*batch)
    (logits.float().log_softmax(-1).mean()).backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("plugin_arch,stock_flags", [
    ("transformer_post_ln", []),
    ("transformer_pre_ln", STOCK_PRE),
])
def test_post_and_pre_ln_are_bit_identical_to_stock(toy_dicts, plugin_arch, stock_flags):
    common = TINY + ["--dropout", "0.1", "--attention-dropout", "0.1", "--activation-dropout", "0.1"]
    stock, task, _ = build(toy_dicts, "transformer", *common, *stock_flags)
    plugin, _, _ = build(toy_dicts, plugin_arch, *common)
    # same seed, same construction order: fairseq's own layers, so the very same initial weights
    for (ns, ps), (np_, pp) in zip(stock.state_dict().items(), plugin.state_dict().items()):
        assert ns == np_ and torch.equal(ps, pp), ns
    batch = toy_batch(task)
    out_s, grads_s = _forward_backward(stock, batch)
    out_p, grads_p = _forward_backward(plugin, batch)
    assert torch.equal(out_s, out_p)
    assert grads_s.keys() == grads_p.keys()
    for n in grads_s:
        assert torch.equal(grads_s[n], grads_p[n]), n


def test_b2t_checkpoint_has_exactly_stock_keys(toy_dicts):
    stock, _, _ = build(toy_dicts, "transformer", *TINY)
    b2t, _, _ = build(toy_dicts, "transformer_b2t", *TINY)
    assert list(stock.state_dict().keys()) == list(b2t.state_dict().keys())
    assert all(stock.state_dict()[k].shape == v.shape for k, v in b2t.state_dict().items())
    # and a stock checkpoint loads into a B2T model strictly (and vice versa)
    b2t.load_state_dict(stock.state_dict(), strict=True)
    stock.load_state_dict(b2t.state_dict(), strict=True)


def _ffn(layer, h):
    return layer.fc2(F.relu(layer.fc1(h)))


def test_b2t_encoder_layer_follows_the_equations(toy_dicts):
    model, _, _ = build(toy_dicts, "transformer_b2t", *TINY, "--dropout", "0", "--attention-dropout", "0")
    model.train()  # dropout is 0: training mode must still follow the equations exactly
    layer = model.encoder.layers[1]
    torch.manual_seed(0)
    x = torch.randn(7, 3, 32)
    pad = torch.zeros(3, 7, dtype=torch.bool)
    pad[0, :2] = True
    y = layer(x, pad)

    a, _ = layer.self_attn(query=x, key=x, value=x, key_padding_mask=pad, need_weights=False)
    h = layer.self_attn_layer_norm(x + a)                      # h = LN_sa(x + SelfAttn(x))
    expected = layer.final_layer_norm(x + h + _ffn(layer, h))  # y = LN_ffn(x + h + FFN(h))
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)
    post_ln = layer.final_layer_norm(h + _ffn(layer, h))
    assert (y - post_ln).abs().max() > 1e-2  # the bottom-to-top term really is there
    assert model.encoder.layer_norm is None  # no LayerNorm after the stack


def test_b2t_decoder_layer_follows_the_equations(toy_dicts):
    model, _, _ = build(toy_dicts, "transformer_b2t", *TINY, "--dropout", "0", "--attention-dropout", "0")
    model.train()
    layer = model.decoder.layers[1]
    torch.manual_seed(0)
    x, enc = torch.randn(5, 3, 32), torch.randn(7, 3, 32)
    enc_pad = torch.zeros(3, 7, dtype=torch.bool)
    enc_pad[1, :3] = True
    causal = torch.triu(torch.full((5, 5), float("-inf")), 1)
    y, _, _ = layer(x, enc, enc_pad, self_attn_mask=causal)

    a, _ = layer.self_attn(query=x, key=x, value=x, attn_mask=causal, need_weights=False)
    h1 = layer.self_attn_layer_norm(x + a)                            # h1 = LN_sa(x + SelfAttn(x))
    c, _ = layer.encoder_attn(query=h1, key=enc, value=enc, key_padding_mask=enc_pad, static_kv=True)
    h2 = layer.encoder_attn_layer_norm(h1 + c)                        # h2 = LN_ca(h1 + CrossAttn(h1, E))
    expected = layer.final_layer_norm(x + h2 + _ffn(layer, h2))       # y = LN_ffn(x + h2 + FFN(h2))
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)
    assert model.decoder.layer_norm is None


@pytest.mark.parametrize("arch", ["transformer_post_ln", "transformer_pre_ln", "transformer_b2t"])
def test_incremental_decoding_equals_full_forward(toy_dicts, arch):
    model, task, _ = build(toy_dicts, arch, *TINY)
    assert_incremental_equals_full(model, task)


def test_rescaled_init_scales_exactly_the_projection_weights(toy_dicts):
    # 3 encoder and 2 decoder layers: each stack is scaled by its own depth
    plain, _, _ = build(toy_dicts, "transformer_b2t", *TINY, "--no-b2t-rescale-init", seed=7)
    scaled, _, args = build(toy_dicts, "transformer_b2t", *TINY, seed=7)
    assert args.b2t_rescale_init is True  # the documented default for B2T
    p0, p1 = plain.state_dict(), scaled.state_dict()
    touched = []
    for name, before in p0.items():
        after = p1[name]
        stack = name.split(".")[0]
        in_layer = ".layers." in name
        if in_layer and "weight" in name and "layer_norm" not in name:
            factor = {"encoder": 3, "decoder": 2}[stack] ** -0.5
            assert torch.equal(after, before * factor), name
            touched.append(name)
        else:
            assert torch.equal(after, before), name
    # q/k/v/out + fc1/fc2 in each encoder layer; plus the cross-attention's four in each decoder layer
    assert len(touched) == 3 * 6 + 2 * 10
    assert any("encoder_attn.k_proj.weight" in n for n in touched)


@pytest.mark.parametrize("depth,factor", [(6, 0.408), (18, 0.236), (100, 0.100)])
def test_rescaled_init_factors_for_paper_depths(depth, factor):
    """rescale_init_ applies the reference's factor (6: 0.408, 18: 0.236, 100: 0.100) to a weight."""
    layer = torch.nn.Module()
    layer.fc1 = torch.nn.Linear(4, 4)
    before = layer.fc1.weight.detach().clone()
    got = rescale_init_([layer], depth)
    assert round(got, 3) == factor
    assert torch.allclose(layer.fc1.weight, before * got)


def test_b2t_without_rescale_starts_from_the_stock_initialization(toy_dicts):
    stock, _, _ = build(toy_dicts, "transformer", *TINY, seed=3)
    b2t, _, _ = build(toy_dicts, "transformer_b2t", *TINY, "--no-b2t-rescale-init", seed=3)
    for k, v in stock.state_dict().items():
        assert torch.equal(v, b2t.state_dict()[k]), k


def test_rescale_init_can_be_asked_for_post_ln_as_an_ablation(toy_dicts):
    _, _, default = build(toy_dicts, "transformer_post_ln", *TINY)
    _, _, forced = build(toy_dicts, "transformer_post_ln", *TINY, "--b2t-rescale-init")
    assert default.b2t_rescale_init is False and forced.b2t_rescale_init is True
