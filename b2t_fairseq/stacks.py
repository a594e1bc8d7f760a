"""The standard stacks: fairseq's encoder and decoders, building each layer through the run's layer
type record (layer_types.py), and holding word dropout. A type that changes the stack itself
(a second stream, as ResiDual's) subclasses these and names its classes in its record.
"""

from fairseq.distributed import fsdp_wrap
from fairseq.models.transformer import (
    TransformerConfig,
    TransformerDecoder,
    TransformerDecoderBase,
    TransformerEncoderBase,
)
from fairseq.modules.checkpoint_activations import checkpoint_wrapper

from .layers import word_dropout


def record_of(cfg):
    from . import layer_types  # here, not at the top: the records import the stack classes of their types

    return layer_types.BY_KEY[str(getattr(cfg, "ln_position", None) or "post")]


def _next_index(stack):
    """The 0-based index of the layer being built: fairseq builds a stack's layers in order, in one
    list comprehension of its __init__, before the module can hold attributes of its own."""
    i = stack.__dict__.get("_b2t_layers_built", 0)
    stack.__dict__["_b2t_layers_built"] = i + 1
    return i


def _wrap(layer, cfg):
    """What fairseq does around every layer it builds: activation checkpointing, FSDP wrapping."""
    if cfg.checkpoint_activations:
        layer = checkpoint_wrapper(layer, offload_to_cpu=cfg.offload_activations)
    return fsdp_wrap(layer, min_num_params=cfg.min_params_to_wrap if not cfg.checkpoint_activations else 0)


def build_layer(cls, cfg, index, *args, **kwargs):
    """A layer of class cls with fairseq's constructor arguments, and its index where it asks for one."""
    if getattr(cls, "uses_layer_index", False):
        kwargs["layer_index"] = index
    return _wrap(cls(cfg, *args, **kwargs), cfg)


class Encoder(TransformerEncoderBase):
    def build_encoder_layer(self, cfg):
        index = _next_index(self)
        cls = record_of(cfg).encoder_layer
        if cls is None:
            return super().build_encoder_layer(cfg)
        return build_layer(cls, cfg, index, return_fc=self.return_fc)

    def forward_embedding(self, src_tokens, token_embedding=None):
        p = getattr(self.cfg, "word_dropout_src", 0.0)
        if self.training and p > 0:
            if token_embedding is None:
                token_embedding = self.embed_tokens(src_tokens)
            token_embedding = word_dropout(token_embedding, p)
        return super().forward_embedding(src_tokens, token_embedding)


class Decoder(TransformerDecoderBase):
    side = "decoder"  # which layer class of the record: the translation decoder's, or the LM's

    def build_decoder_layer(self, cfg, no_encoder_attn=False):
        index = _next_index(self)
        cls = getattr(record_of(cfg), f"{self.side}_layer")
        if cls is None:
            return super().build_decoder_layer(cfg, no_encoder_attn)
        if not isinstance(cfg, TransformerConfig):  # the LM's decoder hands its layers the flat args
            cfg = TransformerConfig.from_namespace(cfg)
        return build_layer(cls, cfg, index, no_encoder_attn)

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


class LMDecoder(Decoder, TransformerDecoder):
    """The decoder transformer_lm builds (fairseq's args-taking TransformerDecoder), with the record's
    LM layers."""

    side = "lm"
