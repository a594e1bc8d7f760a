"""``transformer_b2t``: fairseq's transformer with one switch for the layer type.

``--ln-position post`` is fairseq's Post-LN transformer, ``pre`` is fairseq's Pre-LN transformer
(``--encoder/decoder-normalize-before``), both built from fairseq's own layers; ``b2t`` is Post-LN
plus the bottom-to-top connection (layers.py) and, by default, the authors' initialization.
``deepnorm`` (DeepNet, Wang et al. 2022) and ``admin`` (Liu et al. 2020) are the two other fixes
for deep Post-LN: one value of the switch sets both the residual and the initialization.
"""

import argparse

from fairseq.distributed import fsdp_wrap
from fairseq.models import (
    ARCH_MODEL_REGISTRY,
    MODEL_REGISTRY,
    register_model,
    register_model_architecture,
)
from fairseq.models.transformer import (
    TransformerConfig,
    TransformerDecoderBase,
    TransformerEncoderBase,
    TransformerModel,
)
from fairseq.models.transformer.transformer_legacy import transformer_wmt_en_de
from fairseq.modules.checkpoint_activations import checkpoint_wrapper
from omegaconf import OmegaConf

from . import fast, layer_types, recipe
from .errors import B2TConfigError
from .layers import (
    ADMIN_OUTPUT_CHANGE_SCALES,
    DEEPNORM_REFERENCES,
    deepnorm_constants,
    deepnorm_init_,
    rescale_init_,
    word_dropout,
)

LN_POSITIONS = layer_types.KEYS
ADMIN_OMEGA_MODES = ("trainable", "fixed")


def resolve_layer_type(args, default="post"):
    """Settle --ln-position from the flags, refuse contradictions, and set fairseq's own switches.

    ``default`` is the named architecture's layer type, which --residual-bottom-to-top may override
    (transformer_post_ln with it is B2T); a --ln-position given on the command line may not be.
    Idempotent, so a checkpoint's saved args go through it again unchanged.
    """
    given = getattr(args, "ln_position", None)
    ln = given or default
    if ln not in LN_POSITIONS:
        raise B2TConfigError(f"unknown --ln-position '{ln}': choose one of {', '.join(LN_POSITIONS)}")
    if getattr(args, "residual_bottom_to_top", False):
        if given == "post":
            raise B2TConfigError("--residual-bottom-to-top (B2T) contradicts --ln-position post (Post-LN without "
                                 "the B2T connection); drop one of them")
        if ln == "pre":
            raise B2TConfigError("--residual-bottom-to-top cannot be combined with Pre-LN (--ln-position pre): "
                                 "B2T is defined for Post-LN only; drop one of them")
        if ln in ("deepnorm", "admin"):
            raise B2TConfigError(f"--residual-bottom-to-top cannot be combined with --ln-position {ln}: "
                                 "they are different layer types; drop one of them")
        ln = "b2t"
    enc_nb = getattr(args, "encoder_normalize_before", None)
    dec_nb = getattr(args, "decoder_normalize_before", None)
    if ln == "b2t" and (enc_nb or dec_nb):
        raise B2TConfigError("B2T cannot be combined with --encoder-normalize-before/--decoder-normalize-before: "
                             "B2T is a Post-LN connection; drop those flags or use --ln-position pre")
    if ln in ("deepnorm", "admin") and (enc_nb or dec_nb):
        name = {"deepnorm": "DeepNorm", "admin": "Admin"}[ln]
        raise B2TConfigError(f"{name} cannot be combined with --encoder-normalize-before/--decoder-normalize-before: "
                             f"{name} is a Post-LN method; drop those flags or use --ln-position pre")
    if ln == "post" and (enc_nb or dec_nb):
        raise B2TConfigError("--encoder/decoder-normalize-before contradict --ln-position post: "
                             "use --ln-position pre (or --arch transformer_pre_ln) for Pre-LN")
    args.ln_position = ln
    args.residual_bottom_to_top = ln == "b2t"
    args.encoder_normalize_before = args.decoder_normalize_before = ln == "pre"
    if getattr(args, "b2t_rescale_init", None) is None:
        args.b2t_rescale_init = ln == "b2t"  # the 2023 code's default; --no-b2t-rescale-init for 2022
    if ln == "deepnorm" and args.b2t_rescale_init:
        raise B2TConfigError("--b2t-rescale-init cannot be combined with --ln-position deepnorm: DeepNorm has its "
                             "own initialization (--deepnorm-reference); drop --b2t-rescale-init")
    _resolve_choice(args, "deepnorm_reference", DEEPNORM_REFERENCES, "paper")
    _resolve_choice(args, "admin_omega", ADMIN_OMEGA_MODES, "trainable")
    _resolve_choice(args, "admin_output_change_scale", ADMIN_OUTPUT_CHANGE_SCALES, "O(logn)")
    for side in ("src", "tgt"):
        p = getattr(args, f"word_dropout_{side}", 0.0) or 0.0
        if not 0.0 <= p < 1.0:
            raise B2TConfigError(f"--word-dropout-{side} must be in [0, 1), got {p}")
        setattr(args, f"word_dropout_{side}", float(p))
    if ln in ("b2t", "admin", "deepnorm"):
        # B2T and Admin layers have their own forward; these options of fairseq's forward would be
        # ignored there, and for DeepNorm they would change the equations the layer type stands for
        for flag in ("cross_self_attention", "scale_attn", "scale_heads", "scale_fc", "scale_resids"):
            if getattr(args, flag, False):
                raise B2TConfigError(f"--{flag.replace('_', '-')} is not supported with {ln} layers; drop it "
                                     "or use --ln-position post")
    return ln


def _resolve_choice(args, name, choices, default):
    value = getattr(args, name, None)
    if value is None:
        value = default
    if value not in choices:
        raise B2TConfigError(f"--{name.replace('_', '-')} must be one of {', '.join(choices)}, got '{value}'")
    setattr(args, name, value)


def _wrap(layer, cfg):
    """What fairseq does around every layer it builds: activation checkpointing, FSDP wrapping."""
    if cfg.checkpoint_activations:
        layer = checkpoint_wrapper(layer, offload_to_cpu=cfg.offload_activations)
    return fsdp_wrap(layer, min_num_params=cfg.min_params_to_wrap if not cfg.checkpoint_activations else 0)


class B2TTransformerEncoder(TransformerEncoderBase):
    def build_encoder_layer(self, cfg):
        layer_class = layer_types.BY_KEY[getattr(cfg, "ln_position", None) or "post"].encoder_layer
        if layer_class is None:
            return super().build_encoder_layer(cfg)
        return _wrap(layer_class(cfg, return_fc=self.return_fc), cfg)

    def forward_embedding(self, src_tokens, token_embedding=None):
        p = getattr(self.cfg, "word_dropout_src", 0.0)
        if self.training and p > 0:
            if token_embedding is None:
                token_embedding = self.embed_tokens(src_tokens)
            token_embedding = word_dropout(token_embedding, p)
        return super().forward_embedding(src_tokens, token_embedding)


class B2TTransformerDecoder(TransformerDecoderBase):
    def build_decoder_layer(self, cfg, no_encoder_attn=False):
        layer_class = layer_types.BY_KEY[getattr(cfg, "ln_position", None) or "post"].decoder_layer
        if layer_class is None:
            return super().build_decoder_layer(cfg, no_encoder_attn)
        return _wrap(layer_class(cfg, no_encoder_attn), cfg)

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
    """fairseq's TransformerModel with ``--ln-position {post,pre,b2t,deepnorm,admin}``."""

    @classmethod
    def add_args(cls, parser):
        super().add_args(parser)
        parser.add_argument("--ln-position", choices=LN_POSITIONS,
                            help="layer type: post (Post-LN), pre (Pre-LN), b2t (Post-LN + B2T connection), "
                                 "deepnorm (DeepNet's LN(alpha*x + f(x)) and init), admin (LN(omega*x + f(x)))")
        parser.add_argument("--residual-bottom-to-top", action="store_true",
                            help="the authors' spelling of --ln-position b2t")
        parser.add_argument("--b2t-rescale-init", dest="b2t_rescale_init", action="store_true",
                            help="multiply layer projection weights by N**-0.5 (default: on for b2t, off otherwise)")
        parser.add_argument("--no-b2t-rescale-init", dest="b2t_rescale_init", action="store_false",
                            help="keep fairseq's initialization (the 2022 B2T code)")
        parser.add_argument("--deepnorm-reference", choices=DEEPNORM_REFERENCES,
                            help="DeepNorm's init: paper (default: the DeepNet paper, encoder beta = "
                                 "0.87 (N^4 M)^(-1/16), Xavier-normal re-init) or torchscale (microsoft/torchscale: "
                                 "encoder beta = 1.15 (N^4 M)^(-1/16), fairseq's init divided by 1/beta)")
        parser.add_argument("--admin-omega", choices=ADMIN_OMEGA_MODES,
                            help="Admin's shortcut weights: trainable vectors (default, as admin-torch's "
                                 "published runs) or fixed buffers")
        parser.add_argument("--admin-output-change-scale", choices=ADMIN_OUTPUT_CHANGE_SCALES,
                            help="Admin's omega without profiling (admin-torch): O(logn) (default), O(1), "
                                 "or O(n) (omega = 1, plain Post-LN)")
        parser.add_argument("--word-dropout-src", type=float, metavar="P",
                            help="zero each source token embedding with probability P while training")
        parser.add_argument("--word-dropout-tgt", type=float, metavar="P",
                            help="the same for target tokens (the first decoder position is never dropped)")
        parser.add_argument("--b2t-fast", action="store_true",
                            help="fast path (fast.py): attention through scaled_dot_product_attention; "
                                 "b2t-train also selects --optimizer b2t_adam (fairseq's Adam, multi-tensor)")
        parser.add_argument("--b2t-bf16", action="store_true",
                            help="bf16 autocast around the forward, fp32 weights and optimizer "
                                 "(fairseq's --bf16 implies --tpu)")
        parser.add_argument("--log-layer-norms", action="store_true",
                            help="every --log-interval updates, log each layer's gradient norm, input gradient "
                                 "norm and largest activation, and stop a diverging run naming the layer "
                                 "(patches/layer_monitor.py)")
        parser.add_argument("--on-divergence", choices=("stop", "warn"),
                            help="with --log-layer-norms: stop (default) or warn when training diverges")
        parser.add_argument("--divergence-patience", type=int, metavar="N",
                            help="with --log-layer-norms: updates after warm-up the training loss may stay above "
                                 "the unigram level before the run counts as diverged (default 100; 0: never)")

    @classmethod
    def build_model(cls, args, task):
        if OmegaConf.is_config(args):
            # fairseq-hydra-train (and hydra-era checkpoints) hand legacy models a DictConfig, whose
            # extra keys TransformerConfig.from_namespace cannot see: without this, ln_position and
            # word dropout would be dropped silently and Post-LN layers built
            args = argparse.Namespace(**OmegaConf.to_container(args, resolve=True))
        resolve_layer_type(args)
        fast.check_bf16_args(args)
        model = super().build_model(args, task)
        if args.b2t_rescale_init:
            rescale_init_(model.encoder.layers, len(model.encoder.layers))
            rescale_init_(model.decoder.layers, len(model.decoder.layers))
        if args.ln_position == "deepnorm":
            c = deepnorm_constants(len(model.encoder.layers), len(model.decoder.layers), args.deepnorm_reference)
            deepnorm_init_(model.encoder.layers, c["encoder_beta"], args.deepnorm_reference)
            deepnorm_init_(model.decoder.layers, c["decoder_beta"], args.deepnorm_reference)
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
for _name, _fn in ARCHITECTURES.items():
    _register_arch(_name, _fn)
