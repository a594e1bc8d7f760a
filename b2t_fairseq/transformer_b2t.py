"""``transformer_b2t``: fairseq's transformer with one switch for the layer type.

``--ln-position post`` is fairseq's Post-LN transformer, ``pre`` is fairseq's Pre-LN transformer
(``--encoder/decoder-normalize-before``), both built from fairseq's own layers; ``b2t`` is Post-LN
plus the bottom-to-top connection (layers.py) and, by default, the authors' initialization.
"""

import argparse

from omegaconf import OmegaConf

from fairseq.distributed import fsdp_wrap
from fairseq.models import ARCH_MODEL_REGISTRY, MODEL_REGISTRY, register_model, register_model_architecture
from fairseq.models.transformer import TransformerConfig, TransformerDecoderBase, TransformerEncoderBase, TransformerModel
from fairseq.models.transformer.transformer_legacy import transformer_wmt_en_de
from fairseq.modules.checkpoint_activations import checkpoint_wrapper

from .layers import B2TDecoderLayer, B2TEncoderLayer, rescale_init_, word_dropout

LN_POSITIONS = ("post", "pre", "b2t")


class B2TConfigError(ValueError):
    """A flag combination the plugin refuses; the message names the problem and the fix."""


def resolve_layer_type(args):
    """Settle --ln-position from the flags, refuse contradictions, and set fairseq's own switches.

    Idempotent, so a checkpoint's saved args go through it again unchanged.
    """
    ln = getattr(args, "ln_position", None) or "post"
    if ln not in LN_POSITIONS:
        raise B2TConfigError(f"unknown --ln-position '{ln}': choose one of {', '.join(LN_POSITIONS)}")
    if getattr(args, "residual_bottom_to_top", False):
        if ln == "pre":
            raise B2TConfigError("--residual-bottom-to-top cannot be combined with Pre-LN (--ln-position pre): "
                                 "B2T is defined for Post-LN only; drop one of them")
        ln = "b2t"
    enc_nb = getattr(args, "encoder_normalize_before", None)
    dec_nb = getattr(args, "decoder_normalize_before", None)
    if ln == "b2t" and (enc_nb or dec_nb):
        raise B2TConfigError("B2T cannot be combined with --encoder-normalize-before/--decoder-normalize-before: "
                             "B2T is a Post-LN connection; drop those flags or use --ln-position pre")
    if ln == "post" and (enc_nb or dec_nb):
        raise B2TConfigError("--encoder/decoder-normalize-before contradict --ln-position post: "
                             "use --ln-position pre (or --arch transformer_pre_ln) for Pre-LN")
    args.ln_position = ln
    args.residual_bottom_to_top = ln == "b2t"
    args.encoder_normalize_before = args.decoder_normalize_before = ln == "pre"
    if getattr(args, "b2t_rescale_init", None) is None:
        args.b2t_rescale_init = ln == "b2t"  # the 2023 code's default; --no-b2t-rescale-init for 2022
    for side in ("src", "tgt"):
        p = getattr(args, f"word_dropout_{side}", 0.0) or 0.0
        if not 0.0 <= p < 1.0:
            raise B2TConfigError(f"--word-dropout-{side} must be in [0, 1), got {p}")
        setattr(args, f"word_dropout_{side}", float(p))
    if ln == "b2t":
        for flag in ("cross_self_attention", "scale_attn", "scale_heads", "scale_fc", "scale_resids"):
            if getattr(args, flag, False):
                raise B2TConfigError(f"--{flag.replace('_', '-')} is not supported with B2T layers; drop it "
                                     "or use --ln-position post")
    return ln


def _wrap(layer, cfg):
    """What fairseq does around every layer it builds: activation checkpointing, FSDP wrapping."""
    if cfg.checkpoint_activations:
        layer = checkpoint_wrapper(layer, offload_to_cpu=cfg.offload_activations)
    return fsdp_wrap(layer, min_num_params=cfg.min_params_to_wrap if not cfg.checkpoint_activations else 0)


class B2TTransformerEncoder(TransformerEncoderBase):
    def build_encoder_layer(self, cfg):
        if getattr(cfg, "ln_position", "post") != "b2t":
            return super().build_encoder_layer(cfg)
        return _wrap(B2TEncoderLayer(cfg, return_fc=self.return_fc), cfg)

    def forward_embedding(self, src_tokens, token_embedding=None):
        p = getattr(self.cfg, "word_dropout_src", 0.0)
        if self.training and p > 0:
            if token_embedding is None:
                token_embedding = self.embed_tokens(src_tokens)
            token_embedding = word_dropout(token_embedding, p)
        return super().forward_embedding(src_tokens, token_embedding)


class B2TTransformerDecoder(TransformerDecoderBase):
    def build_decoder_layer(self, cfg, no_encoder_attn=False):
        if getattr(cfg, "ln_position", "post") != "b2t":
            return super().build_decoder_layer(cfg, no_encoder_attn)
        return _wrap(B2TDecoderLayer(cfg, no_encoder_attn), cfg)

    def extract_features(self, prev_output_tokens, *args, **kwargs):
        p = getattr(self.cfg, "word_dropout_tgt", 0.0)
        if not (self.training and p > 0):
            return super().extract_features(prev_output_tokens, *args, **kwargs)
        # fairseq embeds the target tokens inline; a hook on the embedding for this one call
        # drops words there without renaming any parameter (the module may be shared with the
        # encoder, so the hook must not outlive the call)
        handle = self.embed_tokens.register_forward_hook(lambda mod, inp, out: word_dropout(out, p, keep_first=True))
        try:
            return super().extract_features(prev_output_tokens, *args, **kwargs)
        finally:
            handle.remove()


class TransformerB2TModel(TransformerModel):
    """fairseq's TransformerModel with ``--ln-position {post,pre,b2t}``."""

    @classmethod
    def add_args(cls, parser):
        super().add_args(parser)
        parser.add_argument("--ln-position", choices=LN_POSITIONS,
                            help="layer type: post (Post-LN), pre (Pre-LN) or b2t (Post-LN + B2T connection)")
        parser.add_argument("--residual-bottom-to-top", action="store_true",
                            help="the authors' spelling of --ln-position b2t")
        parser.add_argument("--b2t-rescale-init", dest="b2t_rescale_init", action="store_true",
                            help="multiply layer projection weights by N**-0.5 (default: on for b2t, off otherwise)")
        parser.add_argument("--no-b2t-rescale-init", dest="b2t_rescale_init", action="store_false",
                            help="keep fairseq's initialization (the 2022 B2T code)")
        parser.add_argument("--word-dropout-src", type=float, metavar="P",
                            help="zero each source token embedding with probability P while training")
        parser.add_argument("--word-dropout-tgt", type=float, metavar="P",
                            help="the same for target tokens (the first decoder position is never dropped)")

    @classmethod
    def build_model(cls, args, task):
        if OmegaConf.is_config(args):
            # fairseq-hydra-train (and hydra-era checkpoints) hand legacy models a DictConfig, whose
            # extra keys TransformerConfig.from_namespace cannot see: without this, ln_position and
            # word dropout would be dropped silently and Post-LN layers built
            args = argparse.Namespace(**OmegaConf.to_container(args, resolve=True))
        resolve_layer_type(args)
        model = super().build_model(args, task)
        if args.b2t_rescale_init:
            rescale_init_(model.encoder.layers, len(model.encoder.layers))
            rescale_init_(model.decoder.layers, len(model.decoder.layers))
        return model

    def upgrade_state_dict_named(self, state_dict, name):
        # the authors' fairseq-0.9 fork keeps the decoder's positions under another name
        old = (f"{name}." if name else "") + "decoder.embed_positions_original."
        for key in [k for k in state_dict if k.startswith(old)]:
            state_dict[key.replace("embed_positions_original.", "embed_positions.", 1)] = state_dict.pop(key)
        super().upgrade_state_dict_named(state_dict, name)

    @classmethod
    def build_encoder(cls, cfg, src_dict, embed_tokens):
        return B2TTransformerEncoder(TransformerConfig.from_namespace(cfg), src_dict, embed_tokens)

    @classmethod
    def build_decoder(cls, cfg, tgt_dict, embed_tokens):
        cfg = TransformerConfig.from_namespace(cfg)
        return B2TTransformerDecoder(cfg, tgt_dict, embed_tokens, no_encoder_attn=cfg.no_cross_attention)


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
    args.ln_position = getattr(args, "ln_position", None) or ln_position
    args.encoder_layers = getattr(args, "encoder_layers", layers)
    args.decoder_layers = getattr(args, "decoder_layers", layers)
    deep = layers >= 18
    args.dropout = getattr(args, "dropout", 0.5 if deep else 0.3)
    args.word_dropout_src = getattr(args, "word_dropout_src", 0.1 if deep else 0.0)
    args.word_dropout_tgt = getattr(args, "word_dropout_tgt", 0.1 if deep else 0.0)
    resolve_layer_type(args)  # at parse time, so a bad combination fails before any work starts
    transformer_wmt_en_de(args)


def _tiny(args, ln_position):
    """For CPU work and tests: 2+2 layers of width 64."""
    args.encoder_embed_dim = getattr(args, "encoder_embed_dim", 64)
    args.encoder_ffn_embed_dim = getattr(args, "encoder_ffn_embed_dim", 128)
    args.encoder_attention_heads = getattr(args, "encoder_attention_heads", 4)
    args.decoder_embed_dim = getattr(args, "decoder_embed_dim", 64)
    args.decoder_ffn_embed_dim = getattr(args, "decoder_ffn_embed_dim", 128)
    args.decoder_attention_heads = getattr(args, "decoder_attention_heads", 4)
    args.ln_position = getattr(args, "ln_position", None) or ln_position
    args.encoder_layers = getattr(args, "encoder_layers", 2)
    args.decoder_layers = getattr(args, "decoder_layers", 2)
    args.dropout = getattr(args, "dropout", 0.1)
    resolve_layer_type(args)
    transformer_wmt_en_de(args)


ARCHITECTURES = {}
for _ln, _prefix in (("b2t", "transformer_b2t"), ("post", "transformer_post_ln"), ("pre", "transformer_pre_ln")):
    ARCHITECTURES[_prefix] = lambda args, ln=_ln: _paper(args, ln, 6)
    ARCHITECTURES[_prefix + "_18l"] = lambda args, ln=_ln: _paper(args, ln, 18)
    ARCHITECTURES[_prefix + "_tiny"] = lambda args, ln=_ln: _tiny(args, ln)
for _name, _fn in ARCHITECTURES.items():
    _register_arch(_name, _fn)
