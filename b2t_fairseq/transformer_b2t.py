"""``transformer_b2t``: fairseq's transformer with one switch for the layer type.

``--layer-type`` (``--ln-position``) picks a record of ``layer_types.py``: ``post`` and ``pre`` are
fairseq's own Post-LN and Pre-LN transformers, built from fairseq's own layers; ``b2t`` is Post-LN
plus the bottom-to-top connection (layers.py) and, by default, the authors' initialization; the
other records are the field's other placements. One value of the switch sets the residual and the
initialization together; the record settles which options go with it.
"""

import argparse

from fairseq.models import (
    ARCH_MODEL_REGISTRY,
    MODEL_REGISTRY,
    register_model,
    register_model_architecture,
)
from fairseq.models.transformer import TransformerConfig, TransformerModel
from fairseq.models.transformer.transformer_legacy import transformer_wmt_en_de
from omegaconf import OmegaConf

from . import fast, layer_types, norms, options, recipe, stacks
from .errors import B2TConfigError  # noqa: F401  (tests import it from here)

LN_POSITIONS = layer_types.KEYS


def resolve_layer_type(args, default="post"):
    """Settle --layer-type and its options (layer_types.resolve); returns the key."""
    return layer_types.resolve(args, default).key


class TransformerB2TModel(TransformerModel):
    """fairseq's TransformerModel with ``--layer-type`` (a record of layer_types.py)."""

    @classmethod
    def add_args(cls, parser):
        super().add_args(parser)
        options.add_args(parser)

    @classmethod
    def build_model(cls, args, task):
        if OmegaConf.is_config(args):
            # fairseq-hydra-train (and hydra-era checkpoints) hand legacy models a DictConfig, whose
            # extra keys TransformerConfig.from_namespace cannot see: without this, ln_position and
            # word dropout would be dropped silently and Post-LN layers built
            args = argparse.Namespace(**OmegaConf.to_container(args, resolve=True))
        t = layer_types.resolve(args)
        fast.check_bf16_args(args)
        model = super().build_model(args, task)
        model.b2t_layer_type = t.key
        layer_types.init_stack(t, model.encoder.layers, args, "encoder")
        layer_types.init_stack(t, model.decoder.layers, args, "decoder")
        if norms.normalizer_name(args) != "layernorm":  # --normalizer: every LayerNorm of both stacks, same names
            norms.apply_normalizer(model.encoder, args)
            norms.apply_normalizer(model.decoder, args)
        if getattr(args, "b2t_fast", False):
            fast.use_fast_attention(model)
        model.b2t_bf16 = bool(getattr(args, "b2t_bf16", False))
        if getattr(args, "log_layer_norms", False):
            from .patches import layer_monitor

            layer_monitor.attach(model, args)
        return model

    def forward(self, *args, **kwargs):
        if not getattr(self, "b2t_bf16", False):
            return super().forward(*args, **kwargs)
        with fast.bf16_autocast(self.encoder.embed_tokens.weight.device.type):
            return super().forward(*args, **kwargs)

    def upgrade_state_dict_named(self, state_dict, name):
        # the authors' fairseq-0.9 fork keeps the decoder's positions under another name
        old = (f"{name}." if name else "") + "decoder.embed_positions_original."
        for key in [k for k in state_dict if k.startswith(old)]:
            state_dict[key.replace("embed_positions_original.", "embed_positions.", 1)] = state_dict.pop(key)
        super().upgrade_state_dict_named(state_dict, name)

    @classmethod
    def build_encoder(cls, cfg, src_dict, embed_tokens):
        stack = layer_types.which(cfg).encoder_stack or stacks.Encoder
        return stack(TransformerConfig.from_namespace(cfg), src_dict, embed_tokens)

    @classmethod
    def build_decoder(cls, cfg, tgt_dict, embed_tokens):
        stack = layer_types.which(cfg).decoder_stack or stacks.Decoder
        cfg = TransformerConfig.from_namespace(cfg)
        return stack(cfg, tgt_dict, embed_tokens, no_encoder_attn=cfg.no_cross_attention)


# --- registration (guarded, so importing the plugin under a second path does not fail) ---------

def _register_model(name, cls):
    if name not in MODEL_REGISTRY:
        register_model(name)(cls)


def _register_arch(name, fn):
    if name not in ARCH_MODEL_REGISTRY:
        register_model_architecture("transformer_b2t", name)(fn)


_register_model("transformer_b2t", TransformerB2TModel)


def _paper(args, ln_position, layers):
    """transformer_wmt_en_de sizes (512/2048/8 heads) with the paper's regularization per depth."""
    args.encoder_layers = getattr(args, "encoder_layers", layers)
    args.decoder_layers = getattr(args, "decoder_layers", layers)
    for key, value in recipe.regularization(layers).items():
        setattr(args, key, getattr(args, key, value))
    resolve_layer_type(args, ln_position)  # at parse time, so a bad combination fails before any work starts
    transformer_wmt_en_de(args)


def _tiny(args, ln_position):
    """For CPU work and tests: 2+2 layers of width 64 (recipe.TINY)."""
    t = recipe.TINY
    for side in ("encoder", "decoder"):
        for key in ("embed_dim", "ffn_embed_dim", "attention_heads", "layers"):
            setattr(args, f"{side}_{key}", getattr(args, f"{side}_{key}", t[key]))
    args.dropout = getattr(args, "dropout", t["dropout"])
    resolve_layer_type(args, ln_position)
    transformer_wmt_en_de(args)


ARCHITECTURES = {}
for _t in layer_types.LAYER_TYPES:
    ARCHITECTURES[_t.family] = lambda args, ln=_t.key: _paper(args, ln, 6)
    ARCHITECTURES[_t.family + "_18l"] = lambda args, ln=_t.key: _paper(args, ln, 18)
    ARCHITECTURES[_t.family + "_tiny"] = lambda args, ln=_t.key: _tiny(args, ln)
    for _suffix in ("", "_18l", "_tiny"):
        layer_types.ARCH_TYPES[_t.family + _suffix] = _t.key
for _name, _fn in ARCHITECTURES.items():
    _register_arch(_name, _fn)
