"""ResiDual (Xie et al. 2023, "ResiDual: Transformer with Dual Residual Connections"; reference code
microsoft/ResiDual, a fairseq user-dir): a Post-LN stream plus an un-normalized dual stream that
accumulates every sub-layer's output, joined at the top of each stack.

    x_0 = embedding (after fairseq's embedding dropout),  d_0 = s * x_0
    for every sub-layer f_k (self-attention, cross-attention, FFN), with a_k = Drop(f_k(x_k)):
        x_{k+1} = LN_k(x_k + a_k)            the Post-LN stream (fairseq's layer norms)
        d_{k+1} = d_k + s * a_k              the dual stream, never normalized inside the stack
    out = alpha * x_K + LN_dual(d_K)         the stack's output (no other final norm)

With alpha = s = 1 these are the paper's equations. The same dropped-out a_k feeds both streams.
alpha (``enc_alpha``/``dec_alpha``) and s (``enc_res_input_norm_scale``/``dec_res_input_norm_scale``)
are the reference code's options under its names, 1 by default as there (not in the paper's equations; as
LN is scale-invariant, s changes only the weight of LN_dual's eps: the source's OPUS config sets 0.05).
LN_dual keeps the reference's name ``layer_norm`` (so ``encoder.layer_norm.weight`` maps key for
key) and its eps 1e-7; every other parameter is fairseq's. Initialization: fairseq's, as the source.

The layers take and return the dual stream next to x; the stacks (subclasses of stacks.py's, which
build the layers through the record and hold word dropout) override only fairseq's
``forward_scriptable`` / ``extract_features_scriptable`` and keep fairseq's return structures, so
beam search, incremental decoding and fairseq-generate work unchanged. The decoder-only LM (not
in the paper or the source) is the translation decoder without cross-attention.
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

from . import stacks
from .errors import B2TConfigError

DUAL_NORM_EPS = 1e-7  # the reference's eps for LN_dual (the layers' norms keep fairseq's 1e-5)
# the reference code's option names (its hydra configs set them under model.*)
OPTIONS = {"enc_alpha": 1.0, "dec_alpha": 1.0, "enc_res_input_norm_scale": 1.0, "dec_res_input_norm_scale": 1.0}


def option(cfg, name):
    value = getattr(cfg, name, None)
    return float(OPTIONS[name] if value is None else value)


def check(args):
    """ResiDual's own rules, one line each (B2TConfigError), beyond the common ones of
    layer_types.resolve (which refuses fairseq's --cross-self-attention and --scale-* for every type
    with its own layers: the source computes some of them, its configs use none)."""
    for name in ("enc_res_input_norm_scale", "dec_res_input_norm_scale"):
        s = option(args, name)
        if not (s > 0 and math.isfinite(s)):
            raise B2TConfigError(f"--{name.replace('_', '-')} must be a positive number (it scales the dual "
                                 f"stream), got {s}; drop it for the default 1")
    for name in ("enc_alpha", "dec_alpha"):
        if not math.isfinite(option(args, name)):
            raise B2TConfigError(f"--{name.replace('_', '-')} must be a finite number, got {option(args, name)}; "
                                 "drop it for the default 1")
    if getattr(args, "base_layers", 0):
        raise B2TConfigError("--base-layers is not supported with ResiDual (its BASE layers carry no dual "
                             "stream); drop it")
    if getattr(args, "no_decoder_final_norm", False):
        raise B2TConfigError("--no-decoder-final-norm contradicts ResiDual, whose final norm joins the two "
                             "streams; drop it")


# --- layers ------------------------------------------------------------------------------------

class ResiDualEncoderLayer(TransformerEncoderLayerBase):
    """Post-LN encoder layer that also adds each sub-layer's (dropped-out) output to the dual stream d.

        a = Drop(SelfAttn(x));    d = d + s a;    h = LN_sa(x + a)
        f = Drop(FFN(h));         d = d + s f;    y = LN_ffn(h + f)

    Returns (y, d, FFN output before dropout if return_fc else None).
    """

    def __init__(self, cfg, return_fc=False):
        super().__init__(cfg, return_fc=return_fc)
        self.dual_scale = option(cfg, "enc_res_input_norm_scale")

    def forward(self, x, dual, encoder_padding_mask: Optional[Tensor], attn_mask: Optional[Tensor] = None):
        if attn_mask is not None:  # same masking convention as fairseq's layer
            attn_mask = attn_mask.masked_fill(attn_mask.to(torch.bool), -1e8 if x.dtype == torch.float32 else -1e4)
        a, _ = self.self_attn(query=x, key=x, value=x, key_padding_mask=encoder_padding_mask,
                              need_weights=False, attn_mask=attn_mask)
        a = self.dropout_module(a)
        dual = dual + a * self.dual_scale
        h = self.self_attn_layer_norm(x + a)

        fc = self.fc2(self.activation_dropout_module(self.activation_fn(self.fc1(h))))
        f = self.dropout_module(fc)
        dual = dual + f * self.dual_scale
        y = self.final_layer_norm(h + f)
        return y, dual, (fc if self.return_fc else None)


class ResiDualDecoderLayer(TransformerDecoderLayerBase):
    """Post-LN decoder layer feeding all its sub-layers' outputs to the dual stream d.

        a = Drop(SelfAttn(x));       d = d + s a;    h1 = LN_sa(x + a)
        c = Drop(CrossAttn(h1, E));  d = d + s c;    h2 = LN_ca(h1 + c)      (absent in the LM)
        f = Drop(FFN(h2));           d = d + s f;    y  = LN_ffn(h2 + f)

    Returns (y, d, cross-attention weights or None).
    """

    def __init__(self, cfg, no_encoder_attn=False):
        super().__init__(cfg, no_encoder_attn)
        self.dual_scale = option(cfg, "dec_res_input_norm_scale")

    def forward(
        self,
        x,
        dual,
        encoder_out: Optional[Tensor] = None,
        encoder_padding_mask: Optional[Tensor] = None,
        incremental_state: Optional[Dict[str, Dict[str, Optional[Tensor]]]] = None,
        self_attn_mask: Optional[Tensor] = None,
        self_attn_padding_mask: Optional[Tensor] = None,
        need_attn: bool = False,
        need_head_weights: bool = False,
    ):
        need_attn = need_attn or need_head_weights
        # self-attention (incremental_state caches keys and values during beam search)
        a, _ = self.self_attn(query=x, key=x, value=x, key_padding_mask=self_attn_padding_mask,
                              incremental_state=incremental_state, need_weights=False, attn_mask=self_attn_mask)
        a = self.dropout_module(a)
        dual = dual + a * self.dual_scale
        h = self.self_attn_layer_norm(x + a)

        attn = None
        if self.encoder_attn is not None and encoder_out is not None:
            c, attn = self.encoder_attn(query=h, key=encoder_out, value=encoder_out,
                                        key_padding_mask=encoder_padding_mask, incremental_state=incremental_state,
                                        static_kv=True, need_head_weights=need_head_weights,
                                        need_weights=need_attn or (not self.training and self.need_attn))
            c = self.dropout_module(c)
            dual = dual + c * self.dual_scale
            h = self.encoder_attn_layer_norm(h + c)

        f = self.dropout_module(self.fc2(self.activation_dropout_module(self.activation_fn(self.fc1(h)))))
        dual = dual + f * self.dual_scale
        y = self.final_layer_norm(h + f)
        return y, dual, attn


# --- stacks ------------------------------------------------------------------------------------

class ResiDualEncoder(stacks.Encoder):
    """The standard encoder (its layers, ResiDualEncoderLayer, come from the record) with the dual stream."""

    def __init__(self, cfg, dictionary, embed_tokens, return_fc=False):
        super().__init__(cfg, dictionary, embed_tokens, return_fc=return_fc)
        # LN_dual; replaces fairseq's Pre-LN final norm where --encoder-normalize-before made one
        self.layer_norm = LayerNorm(embed_tokens.embedding_dim, eps=DUAL_NORM_EPS, export=cfg.export)
        self.post_weight = option(cfg, "enc_alpha")
        self.dual_scale = option(cfg, "enc_res_input_norm_scale")

    def forward_scriptable(self, src_tokens, src_lengths: Optional[Tensor] = None, return_all_hiddens: bool = False,
                           token_embeddings: Optional[Tensor] = None):
        """The ResiDual encoder; returns fairseq's encoder_out dict (encoder_states: the Post-LN stream).

            x_0 = Drop(Embed(src)), padded positions zeroed;   d_0 = s x_0
            x_{i+1}, d_{i+1} = layer_i(x_i, d_i)          (ResiDualEncoderLayer: 2 sub-layers into d)
            encoder_out = alpha x_N + LN_dual(d_N)
        """
        pad = src_tokens.eq(self.padding_idx)
        has_pads = src_tokens.device.type == "xla" or bool(pad.any())
        x, embedding = self.forward_embedding(src_tokens, token_embeddings)
        x = (x * (1 - pad.unsqueeze(-1).type_as(x))).transpose(0, 1)  # B x T x C -> T x B x C
        dual = x * self.dual_scale
        states, fc_results = ([x] if return_all_hiddens else []), []
        for layer in self.layers:
            x, dual, fc = layer(x, dual, pad if has_pads else None)
            if return_all_hiddens:
                states.append(x)
                fc_results.append(fc)
        x = x * self.post_weight + self.layer_norm(dual)
        lengths = src_tokens.ne(self.padding_idx).sum(dim=1, dtype=torch.int32).reshape(-1, 1).contiguous()
        return {"encoder_out": [x], "encoder_padding_mask": [pad], "encoder_embedding": [embedding],
                "encoder_states": states, "fc_results": fc_results, "src_tokens": [], "src_lengths": [lengths]}


class ResiDualDecoding:
    """The ResiDual decoder stack, mixed into fairseq's translation decoder and its legacy LM decoder."""

    def _init_dual(self):
        # LN_dual over the decoder's width (the source sizes it by the input embedding, the same in its configs)
        self.layer_norm = LayerNorm(self.embed_dim, eps=DUAL_NORM_EPS, export=self.cfg.export)
        self.post_weight = option(self.cfg, "dec_alpha")
        self.dual_scale = option(self.cfg, "dec_res_input_norm_scale")

    def extract_features_scriptable(
        self,
        prev_output_tokens,
        encoder_out: Optional[Dict[str, List[Tensor]]],
        incremental_state: Optional[Dict[str, Dict[str, Optional[Tensor]]]] = None,
        full_context_alignment: bool = False,
        alignment_layer: Optional[int] = None,
        alignment_heads: Optional[int] = None,
    ):
        """The ResiDual decoder; returns fairseq's (features, {"attn", "inner_states"}).

            x_0 = Drop(Embed(prev) + positions);   d_0 = s x_0   (incremental: the newest position only)
            x_{i+1}, d_{i+1} = layer_i(x_i, d_i, E)    (ResiDualDecoderLayer: 3 sub-layers into d, LM: 2)
            features = alpha x_M + LN_dual(d_M)        (then fairseq's project_out_dim, if any)
        """
        if alignment_layer is None:
            alignment_layer = self.num_layers - 1
        enc: Optional[Tensor] = None
        enc_pad: Optional[Tensor] = None
        if encoder_out is not None and len(encoder_out["encoder_out"]) > 0:
            enc = encoder_out["encoder_out"][0]
        if encoder_out is not None and len(encoder_out["encoder_padding_mask"]) > 0:
            enc_pad = encoder_out["encoder_padding_mask"][0]
        x, self_pad = self._embed_target(prev_output_tokens, incremental_state)
        dual = x * self.dual_scale
        attn: Optional[Tensor] = None
        inner_states: List[Optional[Tensor]] = [x]
        for idx, layer in enumerate(self.layers):
            causal = self.buffered_future_mask(x) if incremental_state is None and not full_context_alignment else None
            x, dual, layer_attn = layer(x, dual, enc, enc_pad, incremental_state, self_attn_mask=causal,
                                        self_attn_padding_mask=self_pad, need_attn=idx == alignment_layer,
                                        need_head_weights=idx == alignment_layer)
            inner_states.append(x)
            if layer_attn is not None and idx == alignment_layer:
                attn = layer_attn.float().to(x)
        if attn is not None:  # average over heads, as fairseq
            attn = (attn[:alignment_heads] if alignment_heads is not None else attn).mean(dim=0)
        x = (x * self.post_weight + self.layer_norm(dual)).transpose(0, 1)
        if self.project_out_dim is not None:
            x = self.project_out_dim(x)
        return x, {"attn": [attn], "inner_states": inner_states}

    def _embed_target(self, prev_output_tokens, incremental_state):
        """fairseq's decoder input, unchanged: (T x B x C after dropout, self-attention padding mask)."""
        positions = None
        if self.embed_positions is not None:
            positions = self.embed_positions(prev_output_tokens, incremental_state=incremental_state)
        if incremental_state is not None:
            prev_output_tokens = prev_output_tokens[:, -1:]
            if positions is not None:
                positions = positions[:, -1:]
        prev_output_tokens = prev_output_tokens.contiguous()
        x = self.embed_scale * self.embed_tokens(prev_output_tokens)
        if self.quant_noise is not None:
            x = self.quant_noise(x)
        if self.project_in_dim is not None:
            x = self.project_in_dim(x)
        if positions is not None:
            x += positions
        if self.layernorm_embedding is not None:
            x = self.layernorm_embedding(x)
        x = self.dropout_module(x).transpose(0, 1)
        self_pad = None
        if self.cross_self_attention or prev_output_tokens.eq(self.padding_idx).any():
            self_pad = prev_output_tokens.eq(self.padding_idx)
        return x, self_pad


class ResiDualDecoder(ResiDualDecoding, stacks.Decoder):
    """The translation decoder (cfg: fairseq's TransformerConfig; layers: the record's ResiDualDecoderLayer)."""

    def __init__(self, cfg, dictionary, embed_tokens, no_encoder_attn=False, output_projection=None):
        super().__init__(cfg, dictionary, embed_tokens, no_encoder_attn, output_projection)
        self._init_dual()


class ResiDualLMDecoder(ResiDualDecoding, stacks.LMDecoder):
    """The decoder-only LM's stack: fairseq's legacy args-taking TransformerDecoder (what transformer_lm
    builds, with no_encoder_attn=True), so only self-attention and FFN feed the dual stream."""

    def __init__(self, args, dictionary, embed_tokens, no_encoder_attn=True, output_projection=None):
        super().__init__(args, dictionary, embed_tokens, no_encoder_attn, output_projection)
        self._init_dual()
