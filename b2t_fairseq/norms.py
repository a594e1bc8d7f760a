"""The normalizer axis: LayerNorm (fairseq's), RMSNorm or DyT in every place a layer type puts a norm.

``apply_normalizer(module, cfg)`` runs after a model (or one stack) is built: it replaces every
LayerNorm inside ``module`` -- in the layers and the stacks' final and embedding norms -- by the
normalizer ``cfg.normalizer`` names, under the SAME attribute name, so a parameter keeps its name
(``...self_attn_layer_norm.weight``). ``layernorm`` touches nothing: Post-LN and Pre-LN stay
bit-identical to stock fairseq.

    RMSNorm  (Zhang & Sennrich 2019)   y = x / sqrt(mean(x^2) + eps) * weight
    DyT      (Zhu et al. 2025)         y = tanh(alpha * x) * weight + bias,   alpha a learnable scalar

Parameter names map one to one onto the sources: RMSNorm ``weight`` is the paper's gain g
(bzhangGo/rmsnorm calls it ``scale``, LLaMA's RMSNorm ``weight``); DyT's ``alpha``, ``weight``,
``bias`` are jiachenzhu/DyT's ``DynamicTanh`` names.
"""

import math

import torch
from torch import nn

from .errors import B2TConfigError

NORMALIZERS = ("layernorm", "rmsnorm", "dyt")
DYT_ALPHA_INIT = 0.5  # jiachenzhu/DyT: DynamicTanh(alpha_init_value=0.5), the default of its main code


def normalizer_name(cfg) -> str:
    """cfg.normalizer, or 'layernorm' when unset (absent or None)."""
    return getattr(cfg, "normalizer", None) or "layernorm"


def dyt_alpha_init(cfg):
    """cfg.dyt_alpha_init, or the source's 0.5 when unset (absent or None)."""
    value = getattr(cfg, "dyt_alpha_init", None)
    return DYT_ALPHA_INIT if value is None else value


class RMSNorm(nn.Module):
    """Root-mean-square normalization: no mean subtraction, no bias.

        y = x / sqrt(mean(x^2) + eps) * weight        (mean over the last dimension)

    eps sits inside the square root, as in the LLaMA RMSNorm that the Mix-LN and LayerNorm-Scaling
    reference code use (and torch.nn.RMSNorm); the statistic is taken in float32 for half inputs.
    """

    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True):
        super().__init__()
        self.normalized_shape = tuple(normalized_shape) if isinstance(normalized_shape, (tuple, list)) \
            else (int(normalized_shape),)
        self.eps = eps
        if elementwise_affine:
            self.weight = nn.Parameter(torch.ones(self.normalized_shape))
        else:
            self.register_parameter("weight", None)

    def forward(self, x):
        xf = x.float()
        dims = tuple(range(-len(self.normalized_shape), 0))
        y = (xf * torch.rsqrt(xf.pow(2).mean(dims, keepdim=True) + self.eps)).type_as(x)
        return y * self.weight if self.weight is not None else y

    def extra_repr(self):
        return f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.weight is not None}"


class DyT(nn.Module):
    """Dynamic Tanh: an element-wise stand-in for a norm, no statistics.

        y = tanh(alpha * x) * weight + bias           (alpha: one learnable scalar per module)

    alpha starts at ``alpha_init`` (the source's 0.5), weight at 1, bias at 0.
    """

    def __init__(self, normalized_shape, alpha_init=DYT_ALPHA_INIT, elementwise_affine=True):
        super().__init__()
        self.normalized_shape = tuple(normalized_shape) if isinstance(normalized_shape, (tuple, list)) \
            else (int(normalized_shape),)
        self.alpha_init = alpha_init
        self.alpha = nn.Parameter(torch.full((1,), float(alpha_init)))
        if elementwise_affine:
            self.weight = nn.Parameter(torch.ones(self.normalized_shape))
            self.bias = nn.Parameter(torch.zeros(self.normalized_shape))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def forward(self, x):
        y = torch.tanh(self.alpha * x)
        return y * self.weight + self.bias if self.weight is not None else y

    def extra_repr(self):
        return f"{self.normalized_shape}, alpha_init={self.alpha_init}, elementwise_affine={self.weight is not None}"


def is_layer_norm(module) -> bool:
    """fairseq.modules.LayerNorm builds torch.nn.LayerNorm (or a subclass such as Fp32LayerNorm) on CPU
    and apex's FusedLayerNorm on CUDA when apex is installed: both count."""
    return isinstance(module, nn.LayerNorm) or type(module).__name__ == "FusedLayerNorm"


def check_normalizer_options(cfg):
    """Refuse an unknown normalizer, a DyT alpha init that is not a positive number, and one given
    without --normalizer dyt (B2TConfigError, one line). Returns the normalizer's name."""
    name = str(normalizer_name(cfg))
    if name not in NORMALIZERS:
        raise B2TConfigError(f"unknown --normalizer {name!r}; choose one of {', '.join(NORMALIZERS)}")
    alpha = dyt_alpha_init(cfg)
    try:
        ok = math.isfinite(float(alpha)) and float(alpha) > 0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise B2TConfigError(f"--dyt-alpha-init must be a positive number, got {alpha!r}; "
                             f"use e.g. the source's {DYT_ALPHA_INIT}")
    if name != "dyt" and float(alpha) != DYT_ALPHA_INIT:  # the default is never a conflict (saved args hold it)
        raise B2TConfigError(f"--dyt-alpha-init is an option of --normalizer dyt, not of {name}; "
                             "drop it or use --normalizer dyt")
    return name


def make_normalizer(layer_norm, cfg):
    """The replacement for one LayerNorm: same shape, same affine switch, same device and dtype;
    RMSNorm keeps the LayerNorm's eps. Fresh parameters (weight 1, bias 0, alpha = dyt_alpha_init),
    which is what a just-built LayerNorm holds; no random numbers are drawn."""
    name = check_normalizer_options(cfg)
    shape = tuple(layer_norm.normalized_shape)
    affine = getattr(layer_norm, "elementwise_affine", True)
    if name == "rmsnorm":
        new = RMSNorm(shape, eps=layer_norm.eps, elementwise_affine=affine)
    elif name == "dyt":
        new = DyT(shape, alpha_init=float(dyt_alpha_init(cfg)), elementwise_affine=affine)
    else:
        raise AssertionError(name)  # layernorm never reaches here
    ref = next(layer_norm.parameters(), None)
    return new.to(device=ref.device, dtype=ref.dtype) if ref is not None else new


def apply_normalizer(module, cfg) -> int:
    """Replace every LayerNorm strictly inside ``module`` by ``cfg.normalizer`` under the same attribute
    name; returns how many were replaced (0 for ``layernorm``, which touches nothing).

    Every parameter keeps its full name: ``layers.0.self_attn_layer_norm.weight`` stays, a LayerNorm's
    ``bias`` disappears under RMSNorm, and DyT adds ``alpha`` next to ``weight`` and ``bias``.
    """
    name = check_normalizer_options(cfg)
    if name == "layernorm":
        return 0
    targets = [(parent, child_name, child)
               for parent in module.modules()
               for child_name, child in parent.named_children()
               if is_layer_norm(child)]
    new = {}  # one replacement per LayerNorm object, so a norm shared by two parents stays shared
    for parent, child_name, child in targets:
        if id(child) not in new:
            new[id(child)] = make_normalizer(child, cfg)
        setattr(parent, child_name, new[id(child)])
    return len(new)


def normalizer_of(module) -> str:
    """Which normalizer a built module uses: 'layernorm', 'rmsnorm', 'dyt', or 'mixed'/'none'."""
    found = set()
    for m in module.modules():
        if is_layer_norm(m):
            found.add("layernorm")
        elif isinstance(m, RMSNorm):
            found.add("rmsnorm")
        elif isinstance(m, DyT):
            found.add("dyt")
    return found.pop() if len(found) == 1 else ("mixed" if found else "none")
