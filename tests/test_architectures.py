"""Every named architecture builds at its real size, trains one step and decodes with beam search."""

import pytest
import torch
from fairseq.models import ARCH_MODEL_REGISTRY
from fairseq.sequence_generator import SequenceGenerator
from helpers import TINY, build, toy_batch

from b2t_fairseq.layers import B2TEncoderLayer
from b2t_fairseq.transformer_b2t import ARCHITECTURES, B2TConfigError

EXPECTED = {  # arch: (ln_position, encoder layers, decoder layers, embed dim)
    "transformer_b2t": ("b2t", 6, 6, 512), "transformer_post_ln": ("post", 6, 6, 512),
    "transformer_pre_ln": ("pre", 6, 6, 512), "transformer_b2t_18l": ("b2t", 18, 18, 512),
    "transformer_post_ln_18l": ("post", 18, 18, 512), "transformer_pre_ln_18l": ("pre", 18, 18, 512),
    "transformer_b2t_tiny": ("b2t", 2, 2, 64), "transformer_post_ln_tiny": ("post", 2, 2, 64),
    "transformer_pre_ln_tiny": ("pre", 2, 2, 64),
    "transformer_deepnorm": ("deepnorm", 6, 6, 512), "transformer_deepnorm_18l": ("deepnorm", 18, 18, 512),
    "transformer_deepnorm_tiny": ("deepnorm", 2, 2, 64),
    "transformer_admin": ("admin", 6, 6, 512), "transformer_admin_18l": ("admin", 18, 18, 512),
    "transformer_admin_tiny": ("admin", 2, 2, 64),
    "transformer_residual": ("residual", 6, 6, 512), "transformer_residual_18l": ("residual", 18, 18, 512),
    "transformer_residual_tiny": ("residual", 2, 2, 64),
    "transformer_peri_ln": ("peri", 6, 6, 512), "transformer_peri_ln_18l": ("peri", 18, 18, 512),
    "transformer_peri_ln_tiny": ("peri", 2, 2, 64),
    "transformer_mix_ln": ("mixln", 6, 6, 512), "transformer_mix_ln_18l": ("mixln", 18, 18, 512),
    "transformer_mix_ln_tiny": ("mixln", 2, 2, 64),
    "transformer_lns": ("lns", 6, 6, 512), "transformer_lns_18l": ("lns", 18, 18, 512),
    "transformer_lns_tiny": ("lns", 2, 2, 64),
}
LAYER_CLASS = {"b2t": "B2TEncoderLayer", "deepnorm": "DeepNormEncoderLayer", "admin": "AdminEncoderLayer",
               "residual": "ResiDualEncoderLayer",
               "peri": "PeriLNEncoderLayer", "mixln": "MixLNEncoderLayer", "lns": "LNSEncoderLayer"}
# Pre-LN's final LayerNorm; ResiDual's norm of the dual stream where it joins; the placements' stack norm
FINAL_NORM = ("pre", "residual", "peri", "mixln", "lns")


def test_all_architectures_are_registered():
    assert set(ARCHITECTURES) == set(EXPECTED)
    assert all(ARCH_MODEL_REGISTRY[a].__name__ == "TransformerB2TModel" for a in EXPECTED)


# the paper-sized 18-layer models take seconds each to build and train a step: e2e
@pytest.mark.parametrize("arch", [pytest.param(a, marks=pytest.mark.slow) if a.endswith("_18l") else a
                                  for a in sorted(EXPECTED)])
def test_architecture_builds_trains_and_decodes(toy_dicts, arch):
    ln, enc_layers, dec_layers, dim = EXPECTED[arch]
    model, task, args = build(toy_dicts, arch, "--dropout", "0.1")
    assert (args.ln_position, len(model.encoder.layers), len(model.decoder.layers)) == (ln, enc_layers, dec_layers)
    assert model.encoder.embed_tokens.embedding_dim == dim
    assert isinstance(model.encoder.layers[0], B2TEncoderLayer) == (ln == "b2t")
    assert type(model.encoder.layers[0]).__name__ == LAYER_CLASS.get(ln, "TransformerEncoderLayerBase")
    deep = enc_layers >= 18  # the paper's per-depth word dropout, the same for every layer type
    assert args.word_dropout_src == args.word_dropout_tgt == (0.1 if deep else 0.0)
    assert (model.encoder.layer_norm is not None) == (ln in FINAL_NORM)

    src, lengths, prev = toy_batch(task, bsz=2)
    target = torch.cat([prev[:, 1:], torch.full((2, 1), task.target_dictionary.eos())], dim=1)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    logits, _ = model(src, lengths, prev)
    loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target)
    loss.backward()
    before = model.encoder.layers[0].fc1.weight.detach().clone()
    opt.step()
    assert torch.isfinite(loss) and not torch.equal(before, model.encoder.layers[0].fc1.weight)

    model.eval()
    gen = SequenceGenerator([model], task.target_dictionary, beam_size=2, max_len_b=4)
    hyps = gen.generate([model], {"net_input": {"src_tokens": src, "src_lengths": lengths}})
    assert len(hyps) == 2 and all(len(h) == 2 and h[0]["tokens"][-1] == task.target_dictionary.eos() for h in hyps)


def test_depth_flags_override_named_architectures(toy_dicts):
    model, _, _ = build(toy_dicts, "transformer_b2t_18l", "--encoder-layers", "3", "--decoder-layers", "1",
                        "--encoder-embed-dim", "32", "--decoder-embed-dim", "32", "--encoder-ffn-embed-dim", "64",
                        "--decoder-ffn-embed-dim", "64", "--encoder-attention-heads", "2", "--decoder-attention-heads", "2")
    assert (len(model.encoder.layers), len(model.decoder.layers)) == (3, 1)


@pytest.mark.parametrize("arch,flags,ln", [
    ("transformer_post_ln", ["--ln-position", "b2t"], "b2t"),
    ("transformer_post_ln", ["--residual-bottom-to-top"], "b2t"),   # the authors' spelling
    ("transformer_b2t", ["--ln-position", "pre"], "pre"),
    ("transformer_b2t", ["--ln-position", "post"], "post"),
])
def test_one_flag_switches_the_layer_type(toy_dicts, arch, flags, ln):
    model, _, args = build(toy_dicts, arch, *TINY, *flags)
    assert args.ln_position == ln
    assert (type(model.decoder.layers[0]).__name__ == "B2TDecoderLayer") == (ln == "b2t")
    assert args.encoder_normalize_before == args.decoder_normalize_before == (ln == "pre")


@pytest.mark.parametrize("arch,flags,needle", [
    ("transformer_b2t", ["--encoder-normalize-before"], "normalize-before"),
    ("transformer_b2t", ["--decoder-normalize-before"], "normalize-before"),
    ("transformer_pre_ln", ["--residual-bottom-to-top"], "Pre-LN"),
    ("transformer_b2t", ["--word-dropout-src", "1.5"], "--word-dropout-src"),
    ("transformer_b2t", ["--cross-self-attention"], "--cross-self-attention"),
])
def test_contradictory_flags_are_refused(toy_dicts, arch, flags, needle):
    with pytest.raises(B2TConfigError, match=needle):
        build(toy_dicts, arch, *TINY, *flags)


def test_unknown_ln_position_lists_the_choices(toy_dicts, capsys):
    with pytest.raises(SystemExit):
        build(toy_dicts, "transformer_b2t", "--ln-position", "sandwich")
    err = capsys.readouterr().err
    assert "invalid choice: 'sandwich'" in err and "'post', 'pre', 'b2t'" in err
