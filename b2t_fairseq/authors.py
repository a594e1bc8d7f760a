"""The authors' fairseq-0.9 fork (github.com/takase/b2t_connection): their checkpoints as transformer_b2t ones
(translation) and transformer_lm_b2t ones (their transformer_lm, whose layers are their decoder layers
without cross-attention).

Used by the checkpoint repair in patches/checkpoint_load.py (every fairseq load converts such a file on the fly) and by
``b2t-import-checkpoint`` (commands/import_checkpoint.py, which writes a converted copy); the module
docstring there describes the conversion.
"""

import argparse
import logging

from . import layer_types
from .errors import B2TError

logger = logging.getLogger(__name__)
PROG = "b2t-import-checkpoint"  # named in the messages: the command that converts a checkpoint once

# arguments that only the authors' fork (or its parent project) defines, with their fork defaults
FORK_ONLY_ARGS = {
    "sampling_method": "none", "enc_replace_rate": 0.0, "dec_replace_rate": 0.0, "decay_val": 1000,
    "no_layer_norm": False, "one_emb": None, "one_emb_dropout": 0.5, "one_emb_std": 1.0, "codenum": 64,
    "codebooknum": 8, "one_emb_inter_dim": 0, "one_emb_layernum": 2, "one_emb_relu_dropout": 0.1,
    "stop_relu_dropout_update": 0, "represent_length_by_lrpe": False, "represent_length_by_ldpe": False,
    "ordinary_sinpos": False,
}
# the fork's transformer_lm options (fairseq/models/transformer_lm.py there) and their defaults; the fork
# defines them but its layers never read them. A checkpoint that sets one is refused rather than guessed at
FORK_LM_ARGS = {"residual_max_updates": (-1, None), "no_inner_layer_norm": (False, None),
                "decay_inner_residual": (False, -1, None)}
# fork options that change the computed function and have no transformer_b2t equivalent
UNCONVERTIBLE = {
    "no_layer_norm": "--no-layer-norm (the scaled-residual variant without LayerNorm)",
    "one_emb": "--one-emb (one-embedding)",
    "represent_length_by_lrpe": "--represent-length-by-lrpe (length-ratio positions)",
    "represent_length_by_ldpe": "--represent-length-by-ldpe (length-difference positions)",
    "layer_wise_attention": "--layer-wise-attention",
}
SAMPLING_METHODS = ("none", "worddrop", "similarity", "uniform", "condprob", "worddrop_with_sim",
                    "worddrop_with_sim_enc_drop", "worddrop_with_uni", "worddrop_with_uni_enc_drop")
# stock fairseq architectures of the translation transformer, whose sizes the saved args carry
STOCK_TRANSFORMER_MODELS = ("transformer",)
STOCK_LM_MODELS = ("transformer_lm",)  # fairseq's decoder-only model: converted to transformer_lm_b2t
OUR_MODELS = ("transformer_b2t", "transformer_lm_b2t")
FORK_DECODER_POSITIONS = "decoder.embed_positions_original."


def _arch_model(arch):
    from fairseq.models import ARCH_MODEL_NAME_REGISTRY

    return ARCH_MODEL_NAME_REGISTRY.get(arch)


def is_fork_checkpoint(state):
    """True for a checkpoint that needs this conversion: saved by the authors' fork, or a stock-arch one
    whose args switch B2T on (which stock fairseq would build as Post-LN)."""
    args = state.get("args") if isinstance(state, dict) else None
    if not isinstance(args, argparse.Namespace):
        return False
    if _arch_model(getattr(args, "arch", None)) in OUR_MODELS:
        return False
    model = state.get("model") or {}
    return (any(hasattr(args, k) for k in list(FORK_ONLY_ARGS) + list(FORK_LM_ARGS))
            or bool(getattr(args, "residual_bottom_to_top", False))
            or any(str(k).startswith(FORK_DECODER_POSITIONS) for k in model))


def _layer_type(args, where, lm=False):
    dec_nb = bool(getattr(args, "decoder_normalize_before", False))
    # a language model has no encoder: its saved args carry no encoder switch to agree with
    enc_nb = dec_nb if lm else bool(getattr(args, "encoder_normalize_before", False))
    if getattr(args, "residual_bottom_to_top", False):
        if enc_nb or dec_nb:
            raise B2TError(f"{where} combines --residual-bottom-to-top with --*-normalize-before (B2T on Pre-LN), "
                           f"which the paper does not define and {PROG} cannot convert; decode it with the "
                           "authors' fairseq-0.9 fork")
        return "b2t"
    if enc_nb != dec_nb:
        raise B2TError(f"{where} has Pre-LN on one side only (encoder_normalize_before={enc_nb}, "
                       f"decoder_normalize_before={dec_nb}); {PROG} converts Post-LN, Pre-LN and B2T models only")
    return "pre" if enc_nb else "post"


def convert_args(args, where="checkpoint", init=None):
    """A transformer_b2t Namespace for the fork's args (a new object; args is not changed)."""
    arch = getattr(args, "arch", None)
    model = _arch_model(arch)
    b2t = bool(getattr(args, "residual_bottom_to_top", False))
    lm = model in STOCK_LM_MODELS
    if model not in STOCK_TRANSFORMER_MODELS and not lm:
        what = "a B2T " if b2t else ""
        kind = f"model '{model}'" if model else "an architecture fairseq 0.12 does not know"
        raise B2TError(f"{where} is {what}a '{arch}' model of the authors' fork ({kind}); {PROG} converts "
                       "the translation transformer (transformer_wmt_en_de and its relatives) and the language "
                       "model (transformer_lm and its relatives) only: use it with the authors' fairseq-0.9 fork")
    ours = "transformer_lm_b2t" if lm else "transformer_b2t"
    for key, label in UNCONVERTIBLE.items():
        if getattr(args, key, None):
            raise B2TError(f"{where} was trained with the authors' {label}, which {ours} does not "
                           f"implement, so {PROG} cannot convert it; use it with the authors' fairseq-0.9 fork")
    for key, defaults in FORK_LM_ARGS.items():
        value = getattr(args, key, None)
        if not any(value is d or (d is not None and value == d and type(value) is type(d)) for d in defaults):
            raise B2TError(f"{where} was trained with the authors' --{key.replace('_', '-')} {value}, which {ours} "
                           f"does not implement, so {PROG} cannot convert it; use it with the authors' fairseq-0.9 fork")
    ln = _layer_type(args, where, lm)
    new = argparse.Namespace(**vars(args))
    method = getattr(args, "sampling_method", "none") or "none"
    if method not in SAMPLING_METHODS:
        raise B2TError(f"{where} has an unknown --sampling-method '{method}'; {PROG} knows {', '.join(SAMPLING_METHODS)}")
    if lm and method != "none":
        raise B2TError(f"{where} is a language model trained with the authors' --sampling-method {method}, which "
                       f"transformer_lm_b2t does not implement, so {PROG} cannot convert it; use it with the authors' "
                       "fairseq-0.9 fork")
    enc_p = float(getattr(args, "enc_replace_rate", 0.0) or 0.0)
    dec_p = float(getattr(args, "dec_replace_rate", 0.0) or 0.0)
    new.word_dropout_src, new.word_dropout_tgt = (enc_p, dec_p) if method == "worddrop" else (0.0, 0.0)
    deep = min(getattr(args, "encoder_layers", 6), getattr(args, "decoder_layers", 6)) >= 18
    # the LM's sizes are all in its saved args: the architecture name only labels the layer type
    new.arch = layer_types.BY_KEY[ln].lm_family if lm else layer_types.BY_KEY[ln].family + ("_18l" if deep else "")
    new.ln_position = ln
    new.residual_bottom_to_top = ln == "b2t"
    new.encoder_normalize_before = new.decoder_normalize_before = ln == "pre"
    if init is None:
        init = "2023"
    if init not in ("2022", "2023"):
        raise B2TError(f"--init {init}: choose 2022 (no rescaled initialization) or 2023 (rescaled, the fork's "
                       "code since 2023-05-18)")
    new.b2t_rescale_init = ln == "b2t" and init == "2023"
    note = [f"arch {arch}", f"residual_bottom_to_top {b2t}", f"sampling_method {method}"]
    if method != "none":
        note.append(f"enc/dec_replace_rate {enc_p}/{dec_p}")
        if method != "worddrop":
            note.append("(training-only perturbation, not converted: word dropout off)")
    note.append(f"init recorded as {init} code")
    new.b2t_imported_from = "takase/b2t_connection (fairseq 0.9): " + ", ".join(note)
    for key in list(FORK_ONLY_ARGS) + list(FORK_LM_ARGS) + ["layer_wise_attention"]:
        if hasattr(new, key):
            delattr(new, key)
    return new


def convert_model_state(model, args=None):
    """The fork's state dict with fairseq 0.12's key names (a new dict; tensors are the same objects).

    fairseq 0.9's decoder projects with ``embed_tokens.weight`` (shared) or ``embed_out``; 0.12 has an
    ``output_projection`` module: the same tensor is stored under its name, as fairseq's own upgrade does.
    """
    out = type(model)()
    if "decoder.output_projection.weight" not in model:
        if "decoder.embed_out" in model:
            out["decoder.output_projection.weight"] = model["decoder.embed_out"]
        elif "decoder.embed_tokens.weight" in model and getattr(args, "share_decoder_input_output_embed", True):
            out["decoder.output_projection.weight"] = model["decoder.embed_tokens.weight"]
    for key, value in model.items():
        if key.startswith(FORK_DECODER_POSITIONS):
            key = "decoder.embed_positions." + key[len(FORK_DECODER_POSITIONS):]
        if key.endswith("embed_positions._float_tensor"):
            continue  # a dummy buffer of 0.9's sinusoidal positions: fairseq 0.12 has none
        if key == "decoder.embed_out":
            continue  # stored above as decoder.output_projection.weight
        if key.startswith(("decoder.embed_positions_lrpe.", "decoder.embed_positions_ldpe.")):
            raise B2TError(f"the checkpoint has length-encoding positions ({key}); {PROG} cannot convert them")
        out[key] = value
    return out


def convert_state(state, where="checkpoint", init=None):
    """The whole checkpoint converted (args, model); optimizer and training state are kept as they are."""
    new = dict(state)
    new["args"] = convert_args(state["args"], where, init=init)
    new["model"] = convert_model_state(state["model"], state["args"])
    return new


def layer_type_of_state(state):
    """The layer type key of a loaded checkpoint (layer_types.which), or None (no configuration saved)."""
    t = layer_types.which(state)
    return t.key if t is not None else None
