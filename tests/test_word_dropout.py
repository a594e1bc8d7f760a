"""Word dropout: whole embeddings zeroed at rate p, training only, never the decoder's first position."""

import torch
from helpers import TINY, build

from b2t_fairseq.layers import word_dropout

P = 0.3
NOPOS = TINY + ["--dropout", "0", "--no-token-positional-embeddings",
                "--word-dropout-src", str(P), "--word-dropout-tgt", str(P)]


def _tokens(task, bsz=64, length=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = task.source_dictionary
    return torch.randint(d.nspecial, len(d), (bsz, length), generator=g)


def _rate_ok(zeros, n, p=P):
    # binomial: 5 standard deviations
    sd = (n * p * (1 - p)) ** 0.5
    return abs(zeros - n * p) < 5 * sd


def test_word_dropout_function_zeroes_whole_rows_without_rescaling():
    torch.manual_seed(0)
    emb = torch.randn(32, 40, 16)
    out = word_dropout(emb, P, keep_first=True)
    zero_rows = (out == 0).all(-1)
    kept = ~zero_rows
    assert torch.equal(out[kept], emb[kept])  # no 1/(1-p) rescaling, untouched rows as they were
    assert ((out == 0) == zero_rows.unsqueeze(-1)).all()  # a row is zeroed entirely or not at all
    assert not zero_rows[:, 0].any()
    assert _rate_ok(zero_rows[:, 1:].sum().item(), zero_rows[:, 1:].numel())


def test_encoder_word_dropout_in_training_only(toy_dicts):
    model, task, _ = build(toy_dicts, "transformer_b2t", *NOPOS)
    src = _tokens(task)
    model.train()
    x, embed = model.encoder.forward_embedding(src)
    zero = (x == 0).all(-1)
    assert _rate_ok(zero.sum().item(), zero.numel())
    reference = model.encoder.embed_scale * model.encoder.embed_tokens(src)
    assert torch.equal(x[~zero], reference[~zero])  # dropped before the scale, nothing else changed
    model.eval()
    x_eval, _ = model.encoder.forward_embedding(src)
    assert not (x_eval == 0).all(-1).any()
    assert torch.equal(x_eval, reference)


def test_decoder_word_dropout_spares_first_position_and_eval(toy_dicts):
    model, task, _ = build(toy_dicts, "transformer_b2t", *NOPOS)
    prev = _tokens(task, seed=1)
    seen = {}
    hook = model.decoder.layers[0].register_forward_pre_hook(lambda m, args: seen.__setitem__("x", args[0]))
    enc = model.encoder(prev, src_lengths=torch.full((prev.size(0),), prev.size(1)))

    model.train()
    model.decoder(prev, encoder_out=enc)
    zero = (seen["x"] == 0).all(-1)  # (time, batch)
    assert not zero[0].any()
    assert _rate_ok(zero[1:].sum().item(), zero[1:].numel())
    # the hook is gone after the call: the shared embedding is not dropped for the encoder's next use
    assert not model.encoder.embed_tokens._forward_hooks

    model.eval()
    model.decoder(prev, encoder_out=enc)
    assert not (seen["x"] == 0).all(-1).any()
    hook.remove()


def test_paper_18_layer_architectures_default_to_word_dropout(toy_dicts):
    _, _, deep = build(toy_dicts, "transformer_b2t_18l", "--encoder-layers", "1", "--decoder-layers", "1")
    _, _, shallow = build(toy_dicts, "transformer_b2t", "--encoder-layers", "1", "--decoder-layers", "1")
    assert (deep.word_dropout_src, deep.word_dropout_tgt, deep.dropout) == (0.1, 0.1, 0.5)
    assert (shallow.word_dropout_src, shallow.word_dropout_tgt, shallow.dropout) == (0.0, 0.0, 0.3)
