"""Peri-LN, Mix-LN and LayerNorm Scaling: encoder and decoder layers (the decoder layers serve the LM too).

Like layers.py, each class subclasses fairseq's layer, so every sub-module and parameter keeps fairseq's
name (self_attn, encoder_attn, fc1, fc2, self_attn_layer_norm, encoder_attn_layer_norm,
final_layer_norm). Only Peri-LN adds modules: its output norms ``*_output_layer_norm``. All three are
Pre-LN-like at the top of the stack: a final norm follows each stack (fairseq's normalize_before stack
norm), as the LLaMA-style reference code of Mix-LN and LayerNorm Scaling and the Peri-LN paper have.
Each norm here is a LayerNorm at build; ``norms.apply_normalizer`` swaps in RMSNorm or DyT afterwards.

Notation: LN_sa, LN_ca, LN_ffn are self_attn_layer_norm, encoder_attn_layer_norm, final_layer_norm;
FFN(z) = fc2(act_dropout(act(fc1(z)))); Drop is the residual dropout (cfg.dropout).
"""

import math
from typing import Dict, List, Optional

import torch
from fairseq.modules import LayerNorm
from fairseq.modules.transformer_layer import (
    TransformerDecoderLayerBase,
    TransformerEncoderLayerBase,
)
from torch import Tensor

from .errors import B2TConfigError

MIXLN_POST_FRACTION = 0.25  # the Mix-LN paper's alpha; its scripts: 3 Post-LN of 12 layers, 6 of 24


def mixln_fraction(cfg) -> float:
    """cfg.mixln_post_fraction, or the paper's 0.25 when unset (absent or None)."""
    value = getattr(cfg, "mixln_post_fraction", None)
    return MIXLN_POST_FRACTION if value is None else float(value)


def mixln_post_layers(num_layers: int, fraction: float) -> int:
    """How many of a stack's lowest layers Mix-LN makes Post-LN: floor(fraction * num_layers).

    The reference code (pixeli99/MixLN) takes this count directly (POST_NUM); the paper states it as
    floor(alpha * L). A tiny tolerance keeps e.g. 0.3 * 10 from flooring to 2.
    """
    return int(math.floor(fraction * num_layers + 1e-9))


def check_placement_options(args):
    """Refuse a Mix-LN fraction outside [0, 1] (B2TConfigError, one line)."""
    fraction = getattr(args, "mixln_post_fraction", None)
    if fraction is None:
        return
    try:
        ok = 0.0 <= float(fraction) <= 1.0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise B2TConfigError(f"--mixln-post-fraction must be a number in [0, 1], got {fraction!r}; "
                             f"use e.g. the paper's {MIXLN_POST_FRACTION}")


def _check_index(layer_index, num_layers):
    if not 0 <= layer_index < num_layers:
        raise ValueError(f"layer_index {layer_index} is outside a stack of {num_layers} layers")


_FAIRSEQ_EXTRAS = (("attn_ln", "--scale-attn"), ("c_attn", "--scale-heads"), ("ffn_layernorm", "--scale-fc"),
                   ("w_resid", "--scale-resids"))


def _refuse_fairseq_extras(layer, cfg, label):
    """The explicit forwards below do not implement fairseq's cross_self_attention or NormFormer's
    extra scalings; refuse them rather than silently ignore them."""
    flags = [flag for attr, flag in _FAIRSEQ_EXTRAS if getattr(layer, attr, None) is not None]
    if getattr(cfg, "cross_self_attention", False):
        flags.append("--cross-self-attention")
    if flags:
        raise B2TConfigError(f"{label} layers do not implement fairseq's {' '.join(flags)}; "
                             f"drop {'it' if len(flags) == 1 else 'them'} or choose another layer type")


def _encoder_attn_mask(attn_mask, x):
    # fairseq's encoder layer convention: masked entries become a large negative number, not -inf
    if attn_mask is None:
        return None
    return attn_mask.masked_fill(attn_mask.to(torch.bool), -1e8 if x.dtype == torch.float32 else -1e4)


class _DecoderLayerMixin:
    """What the explicit decoder forwards share: the FFN and fairseq's self/cross-attention calls."""

    def _ffn(self, z):
        return self.fc2(self.activation_dropout_module(self.activation_fn(self.fc1(z))))

    def _self_attn(self, z, incremental_state, self_attn_mask, self_attn_padding_mask):
        a, _ = self.self_attn(query=z, key=z, value=z, key_padding_mask=self_attn_padding_mask,
                              incremental_state=incremental_state, need_weights=False, attn_mask=self_attn_mask)
        return a

    def _cross_attn(self, z, encoder_out, encoder_padding_mask, incremental_state, need_attn, need_head_weights):
        return self.encoder_attn(query=z, key=encoder_out, value=encoder_out, key_padding_mask=encoder_padding_mask,
                                 incremental_state=incremental_state, static_kv=True,
                                 need_weights=need_attn or (not self.training and self.need_attn),
                                 need_head_weights=need_head_weights)


def _no_prev_state(label, prev_self_attn_state, prev_attn_state):
    if prev_self_attn_state is not None or prev_attn_state is not None:
        raise NotImplementedError(f"{label} decoder layers do not take prev_*_attn_state; use incremental_state")


# --- Peri-LN (Kim et al., ICML 2025) -------------------------------------------------------------

class PeriLNEncoderLayer(TransformerEncoderLayerBase):
    """Peri-LN encoder layer: a norm on the input AND on the output of every sub-layer.

        h = x + Drop(LN_sa_out(SelfAttn(LN_sa(x))))
        y = h + Drop(LN_ffn_out(FFN(LN_ffn(h))))

    LN_sa_out, LN_ffn_out: ``self_attn_output_layer_norm``, ``ffn_output_layer_norm``.
    """

    uses_layer_index = False

    def __init__(self, cfg, return_fc=False):
        super().__init__(cfg, return_fc=return_fc)
        _refuse_fairseq_extras(self, cfg, "Peri-LN")
        self.self_attn_output_layer_norm = LayerNorm(self.embed_dim, export=cfg.export)
        self.ffn_output_layer_norm = LayerNorm(self.embed_dim, export=cfg.export)

    def forward(self, x, encoder_padding_mask: Optional[Tensor], attn_mask: Optional[Tensor] = None):
        attn_mask = _encoder_attn_mask(attn_mask, x)
        z = self.self_attn_layer_norm(x)
        a, _ = self.self_attn(query=z, key=z, value=z, key_padding_mask=encoder_padding_mask,
                              need_weights=False, attn_mask=attn_mask)
        h = x + self.dropout_module(self.self_attn_output_layer_norm(a))

        f = self.fc2(self.activation_dropout_module(self.activation_fn(self.fc1(self.final_layer_norm(h)))))
        y = h + self.dropout_module(self.ffn_output_layer_norm(f))

        if self.return_fc and not torch.jit.is_scripting():
            return y, f
        return y


class PeriLNDecoderLayer(_DecoderLayerMixin, TransformerDecoderLayerBase):
    """Peri-LN decoder layer (no_encoder_attn=True: the LM layer, without the middle line).

        h1 = x  + Drop(LN_sa_out(SelfAttn(LN_sa(x))))
        h2 = h1 + Drop(LN_ca_out(CrossAttn(LN_ca(h1), E)))
        y  = h2 + Drop(LN_ffn_out(FFN(LN_ffn(h2))))
    """

    uses_layer_index = False

    def __init__(self, cfg, no_encoder_attn=False, add_bias_kv=False, add_zero_attn=False):
        super().__init__(cfg, no_encoder_attn, add_bias_kv=add_bias_kv, add_zero_attn=add_zero_attn)
        _refuse_fairseq_extras(self, cfg, "Peri-LN")
        self.self_attn_output_layer_norm = LayerNorm(self.embed_dim, export=cfg.export)
        self.encoder_attn_output_layer_norm = (
            None if no_encoder_attn else LayerNorm(self.embed_dim, export=cfg.export))
        self.ffn_output_layer_norm = LayerNorm(self.embed_dim, export=cfg.export)

    def forward(
        self,
        x,
        encoder_out: Optional[Tensor] = None,
        encoder_padding_mask: Optional[Tensor] = None,
        incremental_state: Optional[Dict[str, Dict[str, Optional[Tensor]]]] = None,
        prev_self_attn_state: Optional[List[Tensor]] = None,
        prev_attn_state: Optional[List[Tensor]] = None,
        self_attn_mask: Optional[Tensor] = None,
        self_attn_padding_mask: Optional[Tensor] = None,
        need_attn: bool = False,
        need_head_weights: bool = False,
    ):
        _no_prev_state("Peri-LN", prev_self_attn_state, prev_attn_state)
        need_attn = need_attn or need_head_weights
        a = self._self_attn(self.self_attn_layer_norm(x), incremental_state, self_attn_mask, self_attn_padding_mask)
        h = x + self.dropout_module(self.self_attn_output_layer_norm(a))

        attn = None
        if self.encoder_attn is not None and encoder_out is not None:
            c, attn = self._cross_attn(self.encoder_attn_layer_norm(h), encoder_out, encoder_padding_mask,
                                       incremental_state, need_attn, need_head_weights)
            h = h + self.dropout_module(self.encoder_attn_output_layer_norm(c))

        y = h + self.dropout_module(self.ffn_output_layer_norm(self._ffn(self.final_layer_norm(h))))
        return y, attn, None


# --- Mix-LN (Li, Yin, Liu 2024; pixeli99/MixLN) --------------------------------------------------

class MixLNEncoderLayer(TransformerEncoderLayerBase):
    """Mix-LN encoder layer: Post-LN in the lowest floor(fraction * N) layers of the stack, Pre-LN above.

        layer_index <  n_post:   h = LN_sa(x + Drop(SelfAttn(x)))        y = LN_ffn(h + Drop(FFN(h)))
        layer_index >= n_post:   h = x + Drop(SelfAttn(LN_sa(x)))        y = h + Drop(FFN(LN_ffn(h)))

    The forward is fairseq's own; only its ``normalize_before`` switch is set per layer, so each layer
    is exactly fairseq's Post-LN or Pre-LN layer. fraction: ``mixln_post_fraction`` (default 0.25).
    """

    uses_layer_index = True

    def __init__(self, cfg, return_fc=False, *, layer_index):
        super().__init__(cfg, return_fc=return_fc)
        _check_index(layer_index, cfg.encoder.layers)
        check_placement_options(cfg)
        self.layer_index = layer_index
        n_post = mixln_post_layers(cfg.encoder.layers, mixln_fraction(cfg))
        self.normalize_before = layer_index >= n_post


class MixLNDecoderLayer(TransformerDecoderLayerBase):
    """Mix-LN decoder (and LM) layer: fairseq's Post-LN layer in the lowest floor(fraction * M) layers,
    its Pre-LN layer above (the cross-attention sub-layer follows the same placement).

        layer_index <  n_post:   h1 = LN_sa(x + Drop(SelfAttn(x)))
                                 h2 = LN_ca(h1 + Drop(CrossAttn(h1, E)))
                                 y  = LN_ffn(h2 + Drop(FFN(h2)))
        layer_index >= n_post:   h1 = x + Drop(SelfAttn(LN_sa(x)))
                                 h2 = h1 + Drop(CrossAttn(LN_ca(h1), E))
                                 y  = h2 + Drop(FFN(LN_ffn(h2)))
    """

    uses_layer_index = True

    def __init__(self, cfg, no_encoder_attn=False, add_bias_kv=False, add_zero_attn=False, *, layer_index):
        super().__init__(cfg, no_encoder_attn, add_bias_kv=add_bias_kv, add_zero_attn=add_zero_attn)
        _check_index(layer_index, cfg.decoder.layers)
        check_placement_options(cfg)
        self.layer_index = layer_index
        n_post = mixln_post_layers(cfg.decoder.layers, mixln_fraction(cfg))
        self.normalize_before = layer_index >= n_post


# --- LayerNorm Scaling (Sun et al. 2025, "The Curse of Depth"; lmsdss/LayerNorm-Scaling) ----------

class LNSEncoderLayer(TransformerEncoderLayerBase):
    """LayerNorm Scaling encoder layer: Pre-LN, each norm's output scaled by 1/sqrt(l), l = layer_index + 1.

        h = x + Drop(SelfAttn(LN_sa(x) / sqrt(l)))
        y = h + Drop(FFN(LN_ffn(h) / sqrt(l)))

    l counts this stack's layers from 1 at its bottom; the stack's final norm is not scaled.
    """

    uses_layer_index = True

    def __init__(self, cfg, return_fc=False, *, layer_index):
        super().__init__(cfg, return_fc=return_fc)
        _check_index(layer_index, cfg.encoder.layers)
        _refuse_fairseq_extras(self, cfg, "LayerNorm Scaling")
        self.layer_index = layer_index
        self.lns_scale = 1.0 / math.sqrt(layer_index + 1)

    def forward(self, x, encoder_padding_mask: Optional[Tensor], attn_mask: Optional[Tensor] = None):
        attn_mask = _encoder_attn_mask(attn_mask, x)
        z = self.lns_scale * self.self_attn_layer_norm(x)
        a, _ = self.self_attn(query=z, key=z, value=z, key_padding_mask=encoder_padding_mask,
                              need_weights=False, attn_mask=attn_mask)
        h = x + self.dropout_module(a)

        f = self.fc2(self.activation_dropout_module(self.activation_fn(
            self.fc1(self.lns_scale * self.final_layer_norm(h)))))
        y = h + self.dropout_module(f)

        if self.return_fc and not torch.jit.is_scripting():
            return y, f
        return y


class LNSDecoderLayer(_DecoderLayerMixin, TransformerDecoderLayerBase):
    """LayerNorm Scaling decoder (and LM) layer, l = layer_index + 1:

        h1 = x  + Drop(SelfAttn(LN_sa(x) / sqrt(l)))
        h2 = h1 + Drop(CrossAttn(LN_ca(h1) / sqrt(l), E))
        y  = h2 + Drop(FFN(LN_ffn(h2) / sqrt(l)))
    """

    uses_layer_index = True

    def __init__(self, cfg, no_encoder_attn=False, add_bias_kv=False, add_zero_attn=False, *, layer_index):
        super().__init__(cfg, no_encoder_attn, add_bias_kv=add_bias_kv, add_zero_attn=add_zero_attn)
        _check_index(layer_index, cfg.decoder.layers)
        _refuse_fairseq_extras(self, cfg, "LayerNorm Scaling")
        self.layer_index = layer_index
        self.lns_scale = 1.0 / math.sqrt(layer_index + 1)

    def forward(
        self,
        x,
        encoder_out: Optional[Tensor] = None,
        encoder_padding_mask: Optional[Tensor] = None,
        incremental_state: Optional[Dict[str, Dict[str, Optional[Tensor]]]] = None,
        prev_self_attn_state: Optional[List[Tensor]] = None,
        prev_attn_state: Optional[List[Tensor]] = None,
        self_attn_mask: Optional[Tensor] = None,
        self_attn_padding_mask: Optional[Tensor] = None,
        need_attn: bool = False,
        need_head_weights: bool = False,
    ):
        _no_prev_state("LayerNorm Scaling", prev_self_attn_state, prev_attn_state)
        need_attn = need_attn or need_head_weights
        s = self.lns_scale
        a = self._self_attn(s * self.self_attn_layer_norm(x), incremental_state, self_attn_mask, self_attn_padding_mask)
        h = x + self.dropout_module(a)

        attn = None
        if self.encoder_attn is not None and encoder_out is not None:
            c, attn = self._cross_attn(s * self.encoder_attn_layer_norm(h), encoder_out, encoder_padding_mask,
                                       incremental_state, need_attn, need_head_weights)
            h = h + self.dropout_module(c)

        y = h + self.dropout_module(self._ffn(s * self.final_layer_norm(h)))
        return y, attn, None
