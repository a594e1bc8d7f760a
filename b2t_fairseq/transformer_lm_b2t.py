"""``transformer_lm_b2t``: fairseq's decoder-only ``transformer_lm`` with the one layer-type switch.

``--ln-position post`` and ``pre`` keep fairseq's own LM layers (and so its weights, bit for bit);
``b2t`` (``y = LN_ffn(x + h + FFN(h))``, ``h = LN_sa(x + SelfAttn(x))``), ``deepnorm`` (decoder-only
alpha = (2N)^(1/4), beta = (8N)^(-1/4)) and ``admin`` (omega from 2N residual connections) use the
``lm_layer`` classes of ``layer_types.LAYER_TYPES``. Parameter names are fairseq's.

Named architectures, for every layer type SHORT (post_ln, pre_ln, b2t, deepnorm, admin):
``transformer_lm_SHORT`` (fairseq's transformer_lm sizes: 6 x 512, ffn 2048, 8 heads),
``transformer_lm_SHORT_16l`` (the same with 16 layers: the WikiText-103 recipe's deep setting),
``transformer_lm_SHORT_gpt`` (transformer_lm_gpt: 12 x 768, gelu) and ``transformer_lm_SHORT_tiny``
(recipe.LM_TINY: CPU tests and the demo).
Unlike fairseq's named LM architectures, which force Pre-LN (``base_lm_architecture``), these keep
the layer type they name.
"""

import argparse
from dataclasses import dataclass, field
from typing import Optional

from fairseq.dataclass import ChoiceEnum
from fairseq.models import (
    ARCH_MODEL_REGISTRY,
    MODEL_REGISTRY,
    register_model,
    register_model_architecture,
)
from fairseq.models.transformer import TransformerConfig
from fairseq.models.transformer_lm import (
    TransformerLanguageModel,
    TransformerLanguageModelConfig,
    base_lm_architecture,
    transformer_lm_gpt,
)
from omegaconf import OmegaConf
from torch import nn

from . import layer_types, recipe
from .layers import (
    ADMIN_OUTPUT_CHANGE_SCALES,
    DEEPNORM_REFERENCES,
    deepnorm_init_,
    deepnorm_lm_constants,
    rescale_init_,
)
from .transformer_b2t import ADMIN_OMEGA_MODES, _wrap, resolve_layer_type

MODEL = "transformer_lm_b2t"
CHOICES = ("ln_position", "deepnorm_reference", "admin_omega", "admin_output_change_scale", "on_divergence")


@dataclass
class TransformerLMB2TConfig(TransformerLanguageModelConfig):
    # the default is B2T: `--arch transformer_lm_b2t` (the model's own name) is B2T at transformer_lm sizes
    ln_position: ChoiceEnum(layer_types.KEYS) = field(
        default="b2t", metadata={"help": "layer type: post, pre, b2t, deepnorm, admin"})
    residual_bottom_to_top: bool = field(default=False, metadata={"help": "the authors' spelling of --ln-position b2t"})
    b2t_rescale_init: Optional[bool] = field(
        default=None, metadata={"help": "multiply layer projection weights by N**-0.5 (default: on for b2t only)"})
    deepnorm_reference: Optional[ChoiceEnum(DEEPNORM_REFERENCES)] = field(
        default=None, metadata={"help": "DeepNorm's init: paper (Xavier-normal, gain beta) or torchscale"})
    admin_omega: Optional[ChoiceEnum(ADMIN_OMEGA_MODES)] = field(
        default=None, metadata={"help": "Admin's shortcut weights: trainable (default) or fixed"})
    admin_output_change_scale: Optional[ChoiceEnum(ADMIN_OUTPUT_CHANGE_SCALES)] = field(
        default=None, metadata={"help": "Admin's omega without profiling: O(logn) (default), O(1), O(n)"})
    b2t_imported_from: Optional[str] = field(default=None, metadata={"help": "set by b2t-import-checkpoint"})
    # the training monitor, as for translation (patches/layer_monitor.py)
    log_layer_norms: bool = field(default=False, metadata={
        "help": "every --log-interval updates, log each layer's gradient norm, input gradient norm and largest "
                "activation, and stop a diverging run naming the layer"})
    on_divergence: Optional[ChoiceEnum(["stop", "warn"])] = field(
        default=None, metadata={"help": "with --log-layer-norms: stop (default) or warn when training diverges"})
    divergence_patience: Optional[int] = field(default=None, metadata={
        "help": "with --log-layer-norms: updates after warm-up the loss may stay above the unigram level (default 100)"})


def _lm_layer_class(cfg):
    return layer_types.BY_KEY[str(getattr(cfg, "ln_position", None) or "post")].lm_layer


class TransformerLMB2TModel(TransformerLanguageModel):
    """fairseq's TransformerLanguageModel with ``--ln-position {post,pre,b2t,deepnorm,admin}``."""

    @classmethod
    def add_args(cls, parser):
        super().add_args(parser)
        # fairseq drops the dataclass defaults from argparse; None means "decide from the layer type"
        parser.set_defaults(b2t_rescale_init=None)
        parser.add_argument("--no-b2t-rescale-init", dest="b2t_rescale_init", action="store_false",
                            help="keep fairseq's initialization for B2T (the 2022 code)")

    @classmethod
    def build_model(cls, args, task):
        if OmegaConf.is_config(args):
            # as in transformer_b2t: TransformerConfig.from_namespace cannot see a DictConfig's extra keys
            args = argparse.Namespace(**OmegaConf.to_container(args, resolve=True))
        for key in CHOICES:
            if getattr(args, key, None) is not None:  # fairseq's ChoiceEnum values as plain strings
                setattr(args, key, str(getattr(args, key)))
        # settled on a copy (fairseq merges the config into a new one before this call): a checkpoint's
        # config keeps the flags as given, and settles to the same layer type when loaded
        ln = resolve_layer_type(args)
        model = super().build_model(args, task)
        layer_class = _lm_layer_class(args)
        if layer_class is not None:
            # fairseq's build_model names its decoder class inline: swap its stock layers for ours, built
            # from the same config and starting from the stock layers' weights (so, before the layer
            # type's own init, exactly fairseq's initialization); every parameter name stays fairseq's
            cfg = TransformerConfig.from_namespace(args)
            ours = []
            for stock in model.decoder.layers:
                layer = layer_class(cfg, no_encoder_attn=True)
                missing, unexpected = layer.load_state_dict(stock.state_dict(), strict=False)
                assert not unexpected and all(k.endswith("_residual_scale") for k in missing), (missing, unexpected)
                ours.append(_wrap(layer, cfg))
            model.decoder.layers = nn.ModuleList(ours)
        layers = model.decoder.layers
        if args.b2t_rescale_init:
            rescale_init_(layers, len(layers))
        if ln == "deepnorm":
            deepnorm_init_(layers, deepnorm_lm_constants(len(layers))["beta"], args.deepnorm_reference)
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


def _keep_layer_type(args, ln_position, sizes):
    """fairseq's LM architecture function, with the layer type it would overwrite (Pre-LN) kept."""
    user_pre = getattr(args, "decoder_normalize_before", None)
    sizes(args)
    args.decoder_normalize_before = bool(user_pre)
    # at parse time, so a bad combination fails before any work starts; ln_position is the architecture's
    # default, which --residual-bottom-to-top may override and an explicit --ln-position may not
    resolve_layer_type(args, ln_position)


def _sized(**defaults):
    def apply(args):
        for key, value in defaults.items():
            setattr(args, key, getattr(args, key, value))
        base_lm_architecture(args)
    return apply


ARCHITECTURES = {}
for _t in layer_types.LAYER_TYPES:
    _f = "transformer_lm_" + _t.short
    if _f != MODEL:  # the model's own name is registered by fairseq as its defaults (ln_position b2t)
        ARCHITECTURES[_f] = lambda args, ln=_t.key: _keep_layer_type(args, ln, base_lm_architecture)
    ARCHITECTURES[_f + "_gpt"] = lambda args, ln=_t.key: _keep_layer_type(args, ln, transformer_lm_gpt)
    ARCHITECTURES[_f + "_16l"] = lambda args, ln=_t.key: _keep_layer_type(
        args, ln, _sized(decoder_layers=recipe.LM_DEEP))
    ARCHITECTURES[_f + "_tiny"] = lambda args, ln=_t.key: _keep_layer_type(args, ln, _sized(**recipe.LM_TINY))
for _name, _fn in ARCHITECTURES.items():
    _register_arch(_name, _fn)
