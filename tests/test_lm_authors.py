"""The authors' fork's language models (their transformer_lm with --residual-bottom-to-top): imported as
transformer_lm_b2t (b2t-import-checkpoint, and on every load), computing the B2T equations from the raw
tensors; their LM-only options are one-line refusals.

The checkpoints are built here in the fork's format: args as their fairseq 0.9 transformer_lm saves them
(fairseq/models/transformer_lm.py there: base_lm_architecture adds the fork's arguments), weights under
their key names (decoder.embed_positions_original, decoder.embed_out, _float_tensor buffers).
"""

import argparse
import math

import pytest
import torch
import torch.nn.functional as F
from fairseq import checkpoint_utils
from fairseq.modules.transformer_layer import TransformerDecoderLayerBase
from helpers import SIZES, build_lm, reference_attention

from b2t_fairseq.errors import B2TError
from b2t_fairseq.layers import B2TDecoderLayer
from b2t_tools.commands import import_checkpoint as imp

D, LAYERS, HEADS = 32, 3, 4


def fork_lm_args(data, **over):
    a = dict(
        arch="transformer_lm", task="language_modeling", data=str(data), tokens_per_sample=16, max_target_positions=16,
        sample_break_mode="none", output_dictionary_size=-1, self_target=False, future_target=False, past_target=False,
        add_bos_token=False, dropout=0.1, attention_dropout=0.0, activation_dropout=0.0, relu_dropout=0.0,
        activation_fn="relu", decoder_embed_dim=D, decoder_output_dim=D, decoder_input_dim=D, decoder_ffn_embed_dim=64,
        decoder_layers=LAYERS, decoder_attention_heads=HEADS, decoder_normalize_before=False,
        no_decoder_final_norm=False, adaptive_softmax_cutoff=None, adaptive_softmax_dropout=0,
        adaptive_softmax_factor=4, no_token_positional_embeddings=False, share_decoder_input_output_embed=False,
        character_embeddings=False, character_filters="[(1, 64)]", character_embedding_dim=4,
        char_embedder_highway_layers=2, adaptive_input=False, adaptive_input_factor=4, adaptive_input_cutoff=None,
        tie_adaptive_weights=False, tie_adaptive_proj=False, decoder_learned_pos=False, decoder_layerdrop=0,
        decoder_layers_to_keep=None, layernorm_embedding=False, no_scale_embedding=False,
        optimizer="adam", lr=[0.0005], lr_scheduler="inverse_sqrt", warmup_updates=4000, criterion="cross_entropy",
        max_tokens=2048, max_update=50000, seed=1,
        # the fork's own arguments, as its base_lm_architecture sets them
        residual_bottom_to_top=True, residual_max_updates=-1, no_layer_norm=False, no_inner_layer_norm=False,
        decay_inner_residual=False, sampling_method=None, dec_replace_rate=0, decay_val=0, ordinary_sinpos=True,
        represent_length_by_lrpe=False, represent_length_by_ldpe=False, stop_relu_dropout_update=0,
    )
    a.update(over)
    return argparse.Namespace(**a)


def fork_lm_weights(data, seed=0):
    stock, _, _ = build_lm(data, "transformer_lm", *SIZES)
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in stock.state_dict().items():
        if torch.is_floating_point(v) and not k.endswith("version"):
            v = torch.randn(v.shape, generator=g) * 0.3 + (1.0 if "layer_norm.weight" in k else 0.0)
        k = k.replace("decoder.embed_positions.", "decoder.embed_positions_original.")
        sd["decoder.embed_out" if k == "decoder.output_projection.weight" else k] = v
    sd["decoder.embed_positions_original._float_tensor"] = torch.FloatTensor(1)
    return sd


def write_fork_lm(path, data, **over):
    state = {"args": fork_lm_args(data, **over), "model": fork_lm_weights(data),
             "optimizer_history": [{"criterion_name": "CrossEntropyCriterion", "optimizer_name": "FairseqAdam",
                                    "lr_scheduler_state": {"best": 4.2}, "num_updates": 50000}],
             "extra_state": {"epoch": 9, "val_loss": 4.2, "train_iterator": {"epoch": 9, "iterations_in_epoch": 0}},
             "last_optimizer_state": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0]}]}}
    torch.save(state, path, _use_new_zipfile_serialization=False)  # torch 1.4's format
    return state


def reference_lm_logits(p, tokens, pad, b2t=True):
    """Decoder-only Post-LN layers from the raw tensors: y = LN_ffn([x +] h + FFN(h)), h = LN_sa(x + SelfAttn(x))."""
    from fairseq.modules.sinusoidal_positional_embedding import (
        SinusoidalPositionalEmbedding,
    )

    p = {k: v.float() for k, v in p.items()}
    table = SinusoidalPositionalEmbedding.get_embedding(64, D, pad)
    ln = lambda x, n: F.layer_norm(x, (D,), p[f"{n}.weight"], p[f"{n}.bias"])  # noqa: E731
    ffn = lambda x, n: F.linear(F.relu(F.linear(x, p[f"{n}.fc1.weight"], p[f"{n}.fc1.bias"])),  # noqa: E731
                                p[f"{n}.fc2.weight"], p[f"{n}.fc2.bias"])
    positions = torch.arange(tokens.size(1)) + pad + 1  # no padding in the batch
    x = (math.sqrt(D) * p["decoder.embed_tokens.weight"][tokens] + table[positions]).transpose(0, 1)
    for i in range(LAYERS):
        n = f"decoder.layers.{i}"
        h = ln(x + reference_attention(p, f"{n}.self_attn", x, x, HEADS, causal=True), f"{n}.self_attn_layer_norm")
        x = ln((x if b2t else 0) + h + ffn(h, n), f"{n}.final_layer_norm")
    return F.linear(x.transpose(0, 1), p["decoder.embed_out"])


def _load(path, data):
    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([str(path)], arg_overrides={"data": str(data)})
    return models[0].eval(), cfg, task


def _tokens(task):
    g = torch.Generator().manual_seed(0)
    return torch.randint(task.dictionary.nspecial, len(task.dictionary), (3, 9), generator=g)


@pytest.mark.parametrize("b2t", [True, False])
def test_fork_lm_imports_and_computes_its_equations(tmp_path, lm_dict_dir, capsys, b2t):
    src = tmp_path / "fork_lm.pt"
    original = write_fork_lm(src, lm_dict_dir, residual_bottom_to_top=b2t)
    out = tmp_path / "imported.pt"
    assert imp.main([str(src), str(out)]) == 0
    assert f"{LAYERS} decoder-only layers" in capsys.readouterr().out
    a = torch.load(out, weights_only=False)["args"]
    assert a.arch == ("transformer_lm_b2t" if b2t else "transformer_lm_post_ln")
    assert a.ln_position == ("b2t" if b2t else "post") and a.b2t_rescale_init is b2t
    assert not any(hasattr(a, k) for k in ("residual_max_updates", "no_inner_layer_norm", "decay_inner_residual"))
    for path in (out, src):  # imported once, or converted on the fly by every fairseq load
        model, cfg, task = _load(path, lm_dict_dir)
        want = B2TDecoderLayer if b2t else TransformerDecoderLayerBase
        assert all(type(layer) is want for layer in model.decoder.layers), path
        assert model.decoder.layer_norm is None and not model.decoder.layers[0].normalize_before
        toks = _tokens(task)
        with torch.no_grad():
            logits = model(toks)[0]
        pad = task.dictionary.pad()
        torch.testing.assert_close(logits, reference_lm_logits(original["model"], toks, pad, b2t=b2t),
                                   rtol=1e-4, atol=1e-4)
        other = reference_lm_logits(original["model"], toks, pad, b2t=not b2t)
        assert (logits - other).abs().max() > 0.1  # the other layer type with these weights is another function


@pytest.mark.parametrize("over,flag", [
    ({"residual_max_updates": 1000}, "--residual-max-updates 1000"),
    ({"no_inner_layer_norm": True}, "--no-inner-layer-norm True"),
    ({"decay_inner_residual": True}, "--decay-inner-residual True"),
    ({"no_layer_norm": True}, "--no-layer-norm"),
    ({"decoder_normalize_before": True}, "B2T on Pre-LN"),
])
def test_fork_lm_options_we_do_not_implement_are_refused_in_one_line(tmp_path, lm_dict_dir, capsys, over, flag):
    path = tmp_path / "odd_lm.pt"
    write_fork_lm(path, lm_dict_dir, **over)
    assert imp.main([str(path), str(tmp_path / "o.pt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("b2t-import-checkpoint: error:") and err.strip().count("\n") == 0 and flag in err
    assert ";" in err and not (tmp_path / "o.pt").exists()
    with pytest.raises(B2TError, match="cannot convert"):
        checkpoint_utils.load_checkpoint_to_cpu(str(path))


def test_fork_pre_ln_lm_imports_as_pre_ln(tmp_path, lm_dict_dir, capsys):
    """A language model's saved args have no encoder switch: Pre-LN is decoder_normalize_before alone
    (it was refused as "Pre-LN on one side only")."""
    src = tmp_path / "fork_pre_lm.pt"
    state = write_fork_lm(src, lm_dict_dir, residual_bottom_to_top=False, decoder_normalize_before=True)
    state["model"]["decoder.layer_norm.weight"], state["model"]["decoder.layer_norm.bias"] = torch.ones(D), torch.zeros(D)
    torch.save(state, src, _use_new_zipfile_serialization=False)  # a Pre-LN stack ends in a norm
    out = tmp_path / "imported.pt"
    assert imp.main([str(src), str(out)]) == 0, capsys.readouterr().err
    a = torch.load(out, weights_only=False)["args"]
    assert a.arch == "transformer_lm_pre_ln" and a.ln_position == "pre" and a.decoder_normalize_before
    model, _, _ = _load(src, lm_dict_dir)
    assert model.decoder.layers[0].normalize_before and model.decoder.layer_norm is not None
