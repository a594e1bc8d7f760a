"""B2T encoder and decoder layers, the authors' initialization, and word dropout.

The layers subclass fairseq's own and override only ``forward``: every sub-module (and so every
parameter name) is fairseq's, so a B2T checkpoint has exactly the keys of a stock transformer.
Post-LN and Pre-LN are not re-implemented here at all: the plugin uses fairseq's layers for them.
"""

from typing import Dict, List, Optional

import torch
from torch import Tensor

from fairseq.modules.transformer_layer import (
    TransformerDecoderLayerBase,
    TransformerEncoderLayerBase,
)


class B2TEncoderLayer(TransformerEncoderLayerBase):
    """Post-LN encoder layer plus the bottom-to-top connection.

        h = LN_sa(x + SelfAttn(x))
        y = LN_ffn(x + h + FFN(h))        <- x: the raw layer input, weight 1, no dropout
    """

    def forward(self, x, encoder_padding_mask: Optional[Tensor], attn_mask: Optional[Tensor] = None):
        if attn_mask is not None:  # same masking convention as fairseq's layer
            attn_mask = attn_mask.masked_fill(attn_mask.to(torch.bool), -1e8 if x.dtype == torch.float32 else -1e4)
        bottom = x

        a, _ = self.self_attn(query=x, key=x, value=x, key_padding_mask=encoder_padding_mask,
                              need_weights=False, attn_mask=attn_mask)
        h = self.self_attn_layer_norm(self.residual_connection(self.dropout_module(a), x))

        f = self.fc2(self.activation_dropout_module(self.activation_fn(self.fc1(h))))
        y = self.final_layer_norm(bottom + self.residual_connection(self.dropout_module(f), h))

        if self.return_fc and not torch.jit.is_scripting():
            return y, f
        return y


class B2TDecoderLayer(TransformerDecoderLayerBase):
    """Post-LN decoder layer plus the bottom-to-top connection.

        h1 = LN_sa(x + SelfAttn(x))
        h2 = LN_ca(h1 + CrossAttn(h1, E))
        y  = LN_ffn(x + h2 + FFN(h2))     <- x skips both inner LayerNorms
    """

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
        if prev_self_attn_state is not None or prev_attn_state is not None:
            raise NotImplementedError("B2T decoder layers do not take prev_*_attn_state; use incremental_state")
        need_attn = need_attn or need_head_weights
        bottom = x

        # self-attention (incremental_state caches keys and values during beam search)
        a, _ = self.self_attn(query=x, key=x, value=x, key_padding_mask=self_attn_padding_mask,
                              incremental_state=incremental_state, need_weights=False, attn_mask=self_attn_mask)
        h = self.self_attn_layer_norm(self.residual_connection(self.dropout_module(a), x))

        # cross-attention over the encoder output
        attn = None
        if self.encoder_attn is not None and encoder_out is not None:
            a, attn = self.encoder_attn(query=h, key=encoder_out, value=encoder_out,
                                        key_padding_mask=encoder_padding_mask, incremental_state=incremental_state,
                                        static_kv=True, need_weights=need_attn or (not self.training and self.need_attn),
                                        need_head_weights=need_head_weights)
            h = self.encoder_attn_layer_norm(self.residual_connection(self.dropout_module(a), h))

        # feed-forward, with the layer input added inside the last LayerNorm
        f = self.fc2(self.activation_dropout_module(self.activation_fn(self.fc1(h))))
        y = self.final_layer_norm(bottom + self.residual_connection(self.dropout_module(f), h))
        return y, attn, None


def rescale_init_(layers, num_layers: int) -> float:
    """The authors' 2023 initialization for B2T: shrink every projection by N ** -0.5.

    Every parameter of a layer whose name contains "weight" but not "layer_norm" (q/k/v/out
    projections of self- and cross-attention, fc1, fc2) is multiplied by N ** -0.5, N being the
    depth of *this* stack. Biases and LayerNorm parameters keep fairseq's initialization. With
    N = 6 the factor is 0.408, with 18 it is 0.236. Returns the factor.
    """
    factor = num_layers ** -0.5
    with torch.no_grad():
        for layer in layers:
            for name, p in layer.named_parameters():
                if "weight" in name and "layer_norm" not in name:
                    p.mul_(factor)
    return factor


def word_dropout(emb: Tensor, p: float, keep_first: bool = False) -> Tensor:
    """Zero whole token embeddings with probability p (training only; the caller checks).

    ``emb`` is (batch, time, dim), taken before the embedding scale and the positions. No
    1/(1-p) rescaling, as in the authors' code. ``keep_first`` spares position 0 (the decoder's
    start token).
    """
    if p <= 0:
        return emb
    keep = torch.empty(emb.shape[:2] + (1,), dtype=emb.dtype, device=emb.device).bernoulli_(1 - p)
    if keep_first:
        keep[:, :1] = 1
    return emb * keep
