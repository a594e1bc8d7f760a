"""``transformer_lm_b2t``: fairseq's decoder-only ``transformer_lm`` with the one layer-type switch.

``--layer-type post`` and ``pre`` keep fairseq's own LM layers (and so its weights, bit for bit);
the other records build their ``lm_layer`` (or ``lm_stack``) classes: ``b2t`` (``y = LN_ffn(x + h +
FFN(h))``, ``h = LN_sa(x + SelfAttn(x))``), ``deepnorm`` (decoder-only alpha = (2N)^(1/4), beta =
(8N)^(-1/4)), ``admin`` (omega from 2N residual connections), ... Parameter names are fairseq's.

Named architectures, for every layer type SHORT (post_ln, pre_ln, b2t, ...):
``transformer_lm_SHORT`` (fairseq's transformer_lm sizes: 6 x 512, ffn 2048, 8 heads),
``transformer_lm_SHORT_16l`` (the same with 16 layers: the WikiText-103 recipe's deep setting),
``transformer_lm_SHORT_gpt`` (transformer_lm_gpt: 12 x 768, gelu) and ``transformer_lm_SHORT_tiny``
(recipe.LM_TINY: CPU tests and the demo).
Unlike fairseq's named LM architectures, which force Pre-LN (``base_lm_architecture``), these keep
the layer type they name.
"""

import argparse
import contextlib
from dataclasses import dataclass, field
from typing import Optional

import fairseq.models.transformer_lm as fairseq_lm
from fairseq.models import (
    ARCH_MODEL_REGISTRY,
    MODEL_REGISTRY,
    register_model,
    register_model_architecture,
)
from fairseq.models.transformer_lm import (
    TransformerLanguageModel,
    TransformerLanguageModelConfig,
    base_lm_architecture,
    transformer_lm_gpt,
)
from omegaconf import OmegaConf

from . import layer_types, norms, options, recipe, stacks
from .errors import B2TConfigError

MODEL = "transformer_lm_b2t"
# the model's own name is B2T at transformer_lm sizes (fairseq registers it as an architecture that
# sets nothing, so the layer type comes from here)
MODEL_LAYER_TYPE = "b2t"
TRANSLATION_ONLY = ("word_dropout_src", "word_dropout_tgt", "b2t_fast", "b2t_bf16")


@dataclass
class TransformerLMB2TConfig(TransformerLanguageModelConfig, options.LayerOptions):
    # saved in every checkpoint's config: --arch transformer_lm_b2t records the type it builds
    ln_position: Optional[str] = field(default=MODEL_LAYER_TYPE,
                                       metadata=options.LayerOptions.__dataclass_fields__["ln_position"].metadata)


@contextlib.contextmanager
def _decoder_class(cls):
    """fairseq's TransformerLanguageModel.build_model names its decoder class inline: for this one
    call the name means ours (built from the same args, so before the layer type's own init the
    weights are exactly fairseq's)."""
    stock = fairseq_lm.TransformerDecoder
    fairseq_lm.TransformerDecoder = cls
    try:
        yield
    finally:
        fairseq_lm.TransformerDecoder = stock


class TransformerLMB2TModel(TransformerLanguageModel):
    """fairseq's TransformerLanguageModel with ``--layer-type`` (a record of layer_types.py)."""

    @classmethod
    def add_args(cls, parser):
        super().add_args(parser)
        options.finish_args(parser)

    @classmethod
    def build_model(cls, args, task):
        if OmegaConf.is_config(args):
            # as in transformer_b2t: TransformerConfig.from_namespace cannot see a DictConfig's extra keys
            args = argparse.Namespace(**OmegaConf.to_container(args, resolve=True))
        for key in options.CHOICE_FIELDS:
            if getattr(args, key, None) is not None:  # fairseq's ChoiceEnum values as plain strings
                setattr(args, key, str(getattr(args, key)))
        for key in TRANSLATION_ONLY:
            if getattr(args, key, None):
                raise B2TConfigError(f"--{key.replace('_', '-')} is an option of the translation model "
                                     f"(transformer_b2t), not of {MODEL}; drop it")
        # settled on a copy (fairseq merges the config into a new one before this call): a checkpoint's
        # config keeps the flags as given, and settles to the same layer type when loaded
        t = layer_types.resolve(args, layer_types.which(args).key)
        with _decoder_class(t.lm_stack or stacks.LMDecoder):
            model = super().build_model(args, task)
        model.b2t_layer_type = t.key
        layer_types.init_stack(t, model.decoder.layers, args, "lm")
        if norms.normalizer_name(args) != "layernorm":  # --normalizer: every LayerNorm of the stack, same names
            norms.apply_normalizer(model.decoder, args)
        if getattr(args, "log_layer_norms", False):
            from .patches import layer_monitor

            layer_monitor.attach(model, args)
        return model


def _register_model(name, cls, dc):
    if name not in MODEL_REGISTRY:
        register_model(name, dataclass=dc)(cls)


def _register_arch(name, fn):
    if name not in ARCH_MODEL_REGISTRY:
        register_model_architecture(MODEL, name)(fn)


_register_model(MODEL, TransformerLMB2TModel, TransformerLMB2TConfig)
layer_types.ARCH_TYPES[MODEL] = MODEL_LAYER_TYPE


def _keep_layer_type(args, ln_position, sizes):
    """fairseq's LM architecture function, with the layer type it would overwrite (Pre-LN) kept."""
    user_pre = getattr(args, "decoder_normalize_before", None)
    sizes(args)
    args.decoder_normalize_before = bool(user_pre)
    # at parse time, so a bad combination fails before any work starts; ln_position is the architecture's
    # default, which --residual-bottom-to-top may override and an explicit --layer-type may not
    layer_types.resolve(args, ln_position)


def _sized(**defaults):
    def apply(args):
        for key, value in defaults.items():
            setattr(args, key, getattr(args, key, value))
        base_lm_architecture(args)
    return apply


ARCHITECTURES = {}
for _t in layer_types.LAYER_TYPES:
    _f = _t.lm_family
    if _f != MODEL:  # the model's own name is registered by fairseq as its defaults (MODEL_LAYER_TYPE)
        ARCHITECTURES[_f] = lambda args, ln=_t.key: _keep_layer_type(args, ln, base_lm_architecture)
    ARCHITECTURES[_f + "_gpt"] = lambda args, ln=_t.key: _keep_layer_type(args, ln, transformer_lm_gpt)
    ARCHITECTURES[_f + "_16l"] = lambda args, ln=_t.key: _keep_layer_type(
        args, ln, _sized(decoder_layers=recipe.LM_DEEP))
    ARCHITECTURES[_f + "_tiny"] = lambda args, ln=_t.key: _keep_layer_type(args, ln, _sized(**recipe.LM_TINY))
    for _suffix in ("", "_gpt", "_16l", "_tiny"):
        layer_types.ARCH_TYPES[_f + _suffix] = _t.key
for _name, _fn in ARCHITECTURES.items():
    _register_arch(_name, _fn)
