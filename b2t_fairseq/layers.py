"""B2T, DeepNorm and Admin layers, their initializations, and word dropout.

The layers subclass fairseq's own: every sub-module (and so every parameter name) is fairseq's, so
B2T and DeepNorm checkpoints have exactly the keys of a stock transformer, and Admin's add only its
named shortcut weights (``*_residual_scale``). B2T and Admin override ``forward``; DeepNorm only
fairseq's ``residual_connection`` hook. Post-LN and Pre-LN are not re-implemented here at all: the
plugin uses fairseq's layers for them.
"""

import math
from typing import Dict, List, Optional

import torch
from fairseq.modules.transformer_layer import (
    TransformerDecoderLayerBase,
    TransformerEncoderLayerBase,
)
from torch import Tensor


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


# --- DeepNorm (Wang et al. 2022, "DeepNet: Scaling Transformers to 1,000 Layers") ---------------

DEEPNORM_REFERENCES = ("paper", "torchscale")


def deepnorm_constants(encoder_layers: int, decoder_layers: int, reference: str = "paper") -> Dict[str, float]:
    """alpha (residual weight) and beta (init gain) of DeepNorm for an N-layer encoder, M-layer decoder.

    The DeepNet paper's encoder-decoder setting:
        encoder  alpha = 0.81 (N^4 M)^(1/16)    beta = 0.87 (N^4 M)^(-1/16)
        decoder  alpha = (3M)^(1/4)             beta = (12M)^(-1/4)
    microsoft/torchscale (0.3.0 and its main branch) uses the same alphas and decoder beta, but
    divides the encoder's weights by (N^4 M)^(1/16) / 1.15, i.e. encoder beta = 1.15 (N^4 M)^(-1/16).
    """
    if reference not in DEEPNORM_REFERENCES:
        raise ValueError(f"unknown DeepNorm reference {reference!r}: choose one of {', '.join(DEEPNORM_REFERENCES)}")
    n, m = encoder_layers, decoder_layers
    depth = (n ** 4 * m) ** (1 / 16)
    return {
        "encoder_alpha": 0.81 * depth,
        "encoder_beta": (0.87 if reference == "paper" else 1.15) / depth,
        "decoder_alpha": (3 * m) ** 0.25,
        "decoder_beta": (12 * m) ** -0.25,
    }


class DeepNormEncoderLayer(TransformerEncoderLayerBase):
    """Post-LN encoder layer whose residual branch is up-weighted by alpha (fairseq's forward as is).

        h = LN_sa(alpha * x + SelfAttn(x))
        y = LN_ffn(alpha * h + FFN(h))

    alpha is a constant computed from the depths in the saved args: no new parameter, so the
    state dict has exactly the keys of a stock fairseq transformer.
    """

    def __init__(self, cfg, return_fc=False):
        super().__init__(cfg, return_fc=return_fc)
        c = deepnorm_constants(cfg.encoder.layers, cfg.decoder.layers, getattr(cfg, "deepnorm_reference", "paper"))
        self.deepnorm_alpha = c["encoder_alpha"]

    def residual_connection(self, x, residual):
        return self.deepnorm_alpha * residual + x


class DeepNormDecoderLayer(TransformerDecoderLayerBase):
    """Post-LN decoder layer, each of its three residuals up-weighted by alpha = (3M)^(1/4)."""

    def __init__(self, cfg, no_encoder_attn=False):
        super().__init__(cfg, no_encoder_attn)
        c = deepnorm_constants(cfg.encoder.layers, cfg.decoder.layers, getattr(cfg, "deepnorm_reference", "paper"))
        self.deepnorm_alpha = c["decoder_alpha"]

    def residual_connection(self, x, residual):
        return self.deepnorm_alpha * residual + x


def deepnorm_lm_constants(layers: int) -> Dict[str, float]:
    """alpha and beta of DeepNorm for a decoder-only N-layer model (the DeepNet paper's decoder-only
    column; microsoft/torchscale's decoder without an encoder): alpha = (2N)^(1/4), beta = (8N)^(-1/4)."""
    return {"alpha": (2 * layers) ** 0.25, "beta": (8 * layers) ** -0.25}


class DeepNormLMLayer(DeepNormDecoderLayer):
    """A decoder-only layer (no cross-attention): two residuals, each up-weighted by alpha = (2N)^(1/4)."""

    def __init__(self, cfg, no_encoder_attn=True):
        super().__init__(cfg, no_encoder_attn)
        self.deepnorm_alpha = deepnorm_lm_constants(cfg.decoder.layers)["alpha"]


# the sub-modules whose weights DeepNorm initializes with gain beta (both attentions of a decoder layer)
DEEPNORM_BETA_MODULES = ("fc1", "fc2", "v_proj", "out_proj")
DEEPNORM_UNIT_GAIN_MODULES = ("q_proj", "k_proj")


def deepnorm_init_(layers, beta: float, reference: str = "paper") -> int:
    """DeepNorm's initialization of one stack; returns the number of tensors it set.

    paper:      the DeepNet paper's pseudocode: Xavier-normal with gain beta for the weights of
                fc1, fc2, v_proj and out_proj, Xavier-normal with gain 1 for q_proj and k_proj;
                biases and LayerNorms keep fairseq's initialization.
    torchscale: microsoft/torchscale's code: keep the framework's initialization (fairseq's equals
                torchscale's base init: Xavier-uniform, gain 1/sqrt(2) for q/k/v, 1 for out_proj,
                PyTorch's default for fc1/fc2) and divide every parameter, weight AND bias, of
                fc1, fc2, v_proj, out_proj by 1/beta.
    """
    if reference not in DEEPNORM_REFERENCES:
        raise ValueError(f"unknown DeepNorm reference {reference!r}")
    count = 0
    with torch.no_grad():
        for layer in layers:
            for name, p in layer.named_parameters():
                module = name.split(".")[-2] if "." in name else ""
                if reference == "torchscale":
                    if module in DEEPNORM_BETA_MODULES:
                        p.div_(1 / beta)
                        count += 1
                elif name.endswith(".weight") and module in DEEPNORM_BETA_MODULES:
                    torch.nn.init.xavier_normal_(p, gain=beta)
                    count += 1
                elif name.endswith(".weight") and module in DEEPNORM_UNIT_GAIN_MODULES:
                    torch.nn.init.xavier_normal_(p, gain=1.0)
                    count += 1
    return count


# --- Admin (Liu et al. 2020, "Understanding the Difficulty of Training Transformers") -----------

ADMIN_OUTPUT_CHANGE_SCALES = ("O(logn)", "O(1)", "O(n)")


def admin_omega(num_res_layers: int, output_change_scale: str = "O(logn)") -> float:
    """Admin's shortcut weight omega without profiling, as microsoft/admin-torch 0.1.0 computes it.

    With n residual connections in the stack (2 per encoder layer, 3 per decoder layer):
        O(logn) (admin-torch's default):  omega = sqrt((n + 1) / ln(n + 1) - 1)
        O(1):                              omega = sqrt(n)
        O(n):                              omega = 1 (plain Post-LN)
    """
    if num_res_layers < 1:
        raise ValueError(f"Admin needs at least one residual connection, got {num_res_layers}")
    if output_change_scale == "O(logn)":
        value = (num_res_layers + 1) / math.log(num_res_layers + 1) - 1
    elif output_change_scale == "O(1)":
        value = num_res_layers
    elif output_change_scale == "O(n)":
        value = 1.0
    else:
        raise ValueError(f"unknown Admin output change scale {output_change_scale!r}: "
                         f"choose one of {', '.join(ADMIN_OUTPUT_CHANGE_SCALES)}")
    return value ** 0.5


def _admin_scale(module, name, dim, omega, trainable):
    """omega as a vector of size dim: a parameter (admin-torch's as_parameter) or a buffer (fixed)."""
    value = torch.full((dim,), float(omega))
    if trainable:
        module.register_parameter(name, torch.nn.Parameter(value))
    else:
        module.register_buffer(name, value)


class AdminEncoderLayer(TransformerEncoderLayerBase):
    """Post-LN encoder layer with Admin's weighted shortcut.

        h = LN_sa(omega_sa * x + SelfAttn(x))
        y = LN_ffn(omega_ffn * h + FFN(h))

    omega_sa, omega_ffn: ``self_attn_residual_scale``, ``ffn_residual_scale``, vectors of size
    embed_dim initialized to admin_omega(2N); trainable by default, buffers with --admin-omega fixed.
    """

    def __init__(self, cfg, return_fc=False):
        super().__init__(cfg, return_fc=return_fc)
        omega = admin_omega(2 * cfg.encoder.layers, getattr(cfg, "admin_output_change_scale", "O(logn)"))
        trainable = getattr(cfg, "admin_omega", "trainable") == "trainable"
        _admin_scale(self, "self_attn_residual_scale", self.embed_dim, omega, trainable)
        _admin_scale(self, "ffn_residual_scale", self.embed_dim, omega, trainable)

    def forward(self, x, encoder_padding_mask: Optional[Tensor], attn_mask: Optional[Tensor] = None):
        if attn_mask is not None:  # same masking convention as fairseq's layer
            attn_mask = attn_mask.masked_fill(attn_mask.to(torch.bool), -1e8 if x.dtype == torch.float32 else -1e4)
        a, _ = self.self_attn(query=x, key=x, value=x, key_padding_mask=encoder_padding_mask,
                              need_weights=False, attn_mask=attn_mask)
        h = self.self_attn_layer_norm(self.self_attn_residual_scale * x + self.dropout_module(a))

        f = self.fc2(self.activation_dropout_module(self.activation_fn(self.fc1(h))))
        y = self.final_layer_norm(self.ffn_residual_scale * h + self.dropout_module(f))

        if self.return_fc and not torch.jit.is_scripting():
            return y, f
        return y


class AdminDecoderLayer(TransformerDecoderLayerBase):
    """Post-LN decoder layer with Admin's weighted shortcuts (omega = admin_omega(3M) at init).

        h1 = LN_sa(omega_sa * x + SelfAttn(x))
        h2 = LN_ca(omega_ca * h1 + CrossAttn(h1, E))
        y  = LN_ffn(omega_ffn * h2 + FFN(h2))
    """

    def __init__(self, cfg, no_encoder_attn=False):
        super().__init__(cfg, no_encoder_attn)
        per_layer = 2 if no_encoder_attn else 3
        omega = admin_omega(per_layer * cfg.decoder.layers, getattr(cfg, "admin_output_change_scale", "O(logn)"))
        trainable = getattr(cfg, "admin_omega", "trainable") == "trainable"
        _admin_scale(self, "self_attn_residual_scale", self.embed_dim, omega, trainable)
        if not no_encoder_attn:
            _admin_scale(self, "encoder_attn_residual_scale", self.embed_dim, omega, trainable)
        _admin_scale(self, "ffn_residual_scale", self.embed_dim, omega, trainable)

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
            raise NotImplementedError("Admin decoder layers do not take prev_*_attn_state; use incremental_state")
        need_attn = need_attn or need_head_weights

        a, _ = self.self_attn(query=x, key=x, value=x, key_padding_mask=self_attn_padding_mask,
                              incremental_state=incremental_state, need_weights=False, attn_mask=self_attn_mask)
        h = self.self_attn_layer_norm(self.self_attn_residual_scale * x + self.dropout_module(a))

        attn = None
        if self.encoder_attn is not None and encoder_out is not None:
            a, attn = self.encoder_attn(query=h, key=encoder_out, value=encoder_out,
                                        key_padding_mask=encoder_padding_mask, incremental_state=incremental_state,
                                        static_kv=True, need_weights=need_attn or (not self.training and self.need_attn),
                                        need_head_weights=need_head_weights)
            h = self.encoder_attn_layer_norm(self.encoder_attn_residual_scale * h + self.dropout_module(a))

        f = self.fc2(self.activation_dropout_module(self.activation_fn(self.fc1(h))))
        y = self.final_layer_norm(self.ffn_residual_scale * h + self.dropout_module(f))
        return y, attn, None
