"""The fast path (``--b2t-fast``): the same training math with fewer, larger kernels.

Three parts, each registered through fairseq's own extension points (no fairseq file is changed):

``b2t_adam`` (optimizer)
    fairseq's Adam (``fairseq.optim.adam.Adam``: decoupled weight decay, fairseq's placement of
    eps, amsgrad, the same state-dict layout) computed with multi-tensor ``torch._foreach_*``
    kernels (all tensors at once on a GPU, cache-sized chunks on CPU) instead of fairseq's
    Python loop over parameters (what fairseq runs without apex in fp32 and with --amp; with
    --fp16 fairseq already flattens the parameters into one tensor), and ``--clip-norm`` with
    ``torch._foreach_norm``. The operations are fairseq's, in fairseq's order, so on CPU the
    result is bitwise fairseq's. torch's ``fused=True`` Adam is deliberately not used: it adds
    eps after the bias correction (its eps is fairseq's eps times sqrt(1 - beta2^t)), which
    would change the recipe's optimizer; foreach costs a handful of launches per update.
    It reports fairseq's class name ``FairseqAdam`` to the checkpoint check, so a checkpoint
    resumes across the flag without ``--reset-optimizer`` (the state is the same).

``FastMultiheadAttention`` (attention)
    fairseq's ``MultiheadAttention`` (same sub-modules, so the same parameter names
    q_proj/k_proj/v_proj/out_proj) whose non-incremental forward calls
    ``torch.nn.functional.scaled_dot_product_attention`` for encoder self-attention, decoder
    self-attention (fairseq's future mask becomes ``is_causal``, which a GPU can run with its
    flash kernels) and cross-attention (which stock fairseq computes with bmm + softmax + bmm;
    its self-attention already reaches SDPA through torch's multi_head_attention_forward, with
    an explicit mask). Incremental decoding, requests for attention weights (fairseq asks the
    last decoder layer's cross-attention for them even in training: that one module stays on
    fairseq's code) and the exotic options (bias_kv, zero_attn, xformers, ONNX, XLA) use
    fairseq's code. With --attention-dropout > 0 SDPA draws its own dropout masks: equal in
    distribution, not update by update (the recipe's attention dropout is 0).

``--b2t-bf16`` (precision)
    bf16 autocast around the model's forward with fp32 weights and optimizer (no loss scaling
    is needed in bf16). fairseq's own ``--bf16`` sets ``--tpu`` (fairseq/options.py), so on a
    GPU machine the trainer asks torch_xla for a TPU device and fails.

``--b2t-fast`` (a model flag) switches the attention on; ``b2t-train`` (also under torchrun and
``scripts/train.sh ... -- --b2t-fast``) turns
``--optimizer adam`` into ``--optimizer b2t_adam`` when it is given (with plain fairseq-train,
pass ``--optimizer b2t_adam`` yourself).
"""

import math
from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from fairseq.modules.multihead_attention import MultiheadAttention
from fairseq.optim import OPTIMIZER_REGISTRY, FairseqOptimizer, register_optimizer
from fairseq.optim.adam import FairseqAdam, FairseqAdamConfig
from torch import Tensor

from .errors import B2TError

FAST_FLAG = "--b2t-fast"
OPTIMIZER_NAME = "b2t_adam"


# --- optimizer ---------------------------------------------------------------------------------


class ForeachAdam(torch.optim.Optimizer):
    """fairseq's ``Adam`` step with multi-tensor kernels; same hyperparameters and state layout
    (per parameter: ``step`` as a Python int, ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``
    with amsgrad; fp32 state for fp16/bf16 parameters)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, amsgrad=False):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad))

    @property
    def supports_memory_efficient_fp16(self):
        return True

    @property
    def supports_flat_params(self):
        return True

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            amsgrad = group.get("amsgrad", False)
            # one multi-tensor pass per (device, dtype, step): fairseq keeps a step per parameter
            buckets = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Adam does not support sparse gradients, please consider SparseAdam instead")
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                    if amsgrad:
                        state["max_exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                else:  # as fairseq: state may come back from a checkpoint in another dtype/device
                    for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if amsgrad else ("exp_avg", "exp_avg_sq"):
                        if state[k].dtype != torch.float32 or state[k].device != p.device:
                            state[k] = state[k].to(device=p.device, dtype=torch.float32)
                state["step"] += 1
                buckets.setdefault((p.device, p.dtype, state["step"]), []).append(p)
            for (_, dtype, step), params in buckets.items():
                self._update(group, params, dtype, step, amsgrad)
        return loss

    def _update(self, group, params, dtype, step, amsgrad):
        beta1, beta2 = group["betas"]
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        bias_correction1 = 1 - beta1 ** step
        bias_correction2 = 1 - beta2 ** step
        step_size = lr * math.sqrt(bias_correction2) / bias_correction1
        low = dtype in (torch.float16, torch.bfloat16)
        grads = [p.grad.float() if p.grad.dtype != torch.float32 else p.grad for p in params]
        p32 = [p.float() for p in params] if low else list(params)
        m = [self.state[p]["exp_avg"] for p in params]
        v = [self.state[p]["exp_avg_sq"] for p in params]
        vmax = [self.state[p]["max_exp_avg_sq"] for p in params] if amsgrad else None
        for a, b in _chunks(params):
            _adam_math(p32[a:b], grads[a:b], m[a:b], v[a:b], vmax and vmax[a:b], beta1, beta2, eps, wd, lr, step_size)
        if low:
            torch._foreach_copy_(params, p32)


CPU_CHUNK = 1 << 18  # elements: 1 MiB per fp32 list, so the eight passes of a chunk stay in cache
GPU_CHUNK = 1 << 25  # elements: bounds the temporary sqrt(v) + eps to 128 MiB; a few launches more


def _chunks(params):
    """Index ranges of the multi-tensor passes. On CPU chunks of about CPU_CHUNK elements:
    measured on the 2-core VM, eight passes over all of a model's state at once ran up to 1.6x
    slower than fairseq's loop when other jobs shared the cache, chunks were not slower
    (results/fast-pieces-cpu.json). On a GPU large chunks: few launches, bounded extra memory."""
    limit = CPU_CHUNK if params[0].device.type == "cpu" else GPU_CHUNK
    out, start, size = [], 0, 0
    for i, p in enumerate(params):
        if size and size + p.numel() > limit:
            out.append((start, i))
            start, size = i, 0
        size += p.numel()
    out.append((start, len(params)))
    return out


def _adam_math(p32, grads, m, v, vmax, beta1, beta2, eps, wd, lr, step_size):
    """The operations of fairseq.optim.adam.Adam.step, in its order, on lists of tensors."""
    torch._foreach_mul_(m, beta1)
    torch._foreach_add_(m, grads, alpha=1 - beta1)
    torch._foreach_mul_(v, beta2)
    torch._foreach_addcmul_(v, grads, grads, value=1 - beta2)
    if vmax is not None:
        torch._foreach_maximum_(vmax, v)
        denom = torch._foreach_sqrt(vmax)
    else:
        denom = torch._foreach_sqrt(v)
    torch._foreach_add_(denom, eps)
    if wd != 0:
        torch._foreach_add_(p32, p32, alpha=-wd * lr)
    torch._foreach_addcdiv_(p32, m, denom, value=-step_size)


def clip_grad_norm_foreach(params, max_norm, aggregate_norm_fn=None) -> Tensor:
    """fairseq.utils.clip_grad_norm_ with the per-tensor norms from one ``torch._foreach_norm``."""
    params = [params] if isinstance(params, Tensor) else list(params)
    grads = [p.grad.detach() for p in params if p is not None and p.grad is not None and not hasattr(p, "expert")]
    expert_grads = [p.grad.detach() for p in params if p is not None and p.grad is not None and hasattr(p, "expert")]
    if len(grads) == 0:
        return params[0].new_tensor(0.0) if params else torch.tensor(0.0)
    if len(grads) == 1:
        total_norm = torch.norm(grads[0], p=2, dtype=torch.float32)
    else:
        # fp32 accumulation for fp16/bf16 gradients, as fairseq's torch.norm(g, dtype=torch.float32)
        total_norm = torch.norm(torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32)))
    if aggregate_norm_fn is not None:
        total_norm = aggregate_norm_fn(total_norm)
    if max_norm > 0:
        clip_coef = (float(max_norm) / (total_norm + 1e-6)).clamp_(max=1)
        torch._foreach_mul_(grads + expert_grads, clip_coef)
    return total_norm


@dataclass
class B2TAdamConfig(FairseqAdamConfig):
    """fairseq's Adam options, unchanged (--adam-betas, --adam-eps, --weight-decay)."""


class B2TAdam(FairseqAdam):
    """``--optimizer b2t_adam``: FairseqAdam's options and state with ``ForeachAdam`` underneath."""

    def __init__(self, cfg, params):
        FairseqOptimizer.__init__(self, cfg)  # not FairseqAdam's: that builds the per-parameter Adam
        if getattr(cfg, "tpu", False):
            raise B2TError("--optimizer b2t_adam does not run on TPUs (fairseq's --bf16 implies --tpu); "
                           "use --b2t-bf16 for bf16 on a GPU, or --optimizer adam on a TPU")
        if getattr(cfg, "fp16_adam_stats", False) or getattr(cfg, "use_old_adam", False):
            raise B2TError("--fp16-adam-stats and --use-old-adam are options of fairseq's adam; "
                           "drop them or use --optimizer adam")
        self._optimizer = ForeachAdam(params, **self.optimizer_config)

    def clip_grad_norm(self, max_norm, aggregate_norm_fn=None):
        return clip_grad_norm_foreach(self.params, max_norm, aggregate_norm_fn)


# fairseq refuses to resume a checkpoint whose optimizer class name differs; the state dict is
# FairseqAdam's, so say so, and checkpoints resume across --b2t-fast both ways
B2TAdam.__name__ = FairseqAdam.__name__

if OPTIMIZER_NAME not in OPTIMIZER_REGISTRY:
    register_optimizer(OPTIMIZER_NAME, dataclass=B2TAdamConfig)(B2TAdam)


def translate_argv(argv):
    """What b2t-train does with --b2t-fast: ``--optimizer adam`` becomes ``b2t_adam``."""
    argv = list(argv)
    if FAST_FLAG not in argv:
        return argv
    for i, a in enumerate(argv):
        if a == "--optimizer" and i + 1 < len(argv) and argv[i + 1] == "adam":
            argv[i + 1] = OPTIMIZER_NAME
        elif a == "--optimizer=adam":
            argv[i] = "--optimizer=" + OPTIMIZER_NAME
    return argv


# --- attention ---------------------------------------------------------------------------------


class FastMultiheadAttention(MultiheadAttention):
    """fairseq's MultiheadAttention; non-incremental attention through F.scaled_dot_product_attention."""

    def _fast_ok(self, query, incremental_state, need_weights, before_softmax, need_head_weights):
        return (incremental_state is None and not need_weights and not before_softmax and not need_head_weights
                and self.bias_k is None and not self.add_zero_attn and not self.onnx_trace
                and not self.use_xformers and not self.skip_embed_dim_check and query.device.type != "xla"
                and not torch.jit.is_scripting())

    def forward(self, query, key, value, key_padding_mask=None,
                incremental_state: Optional[Dict[str, Dict[str, Optional[Tensor]]]] = None,
                need_weights: bool = True, static_kv: bool = False, attn_mask: Optional[Tensor] = None,
                before_softmax: bool = False, need_head_weights: bool = False):
        if not self._fast_ok(query, incremental_state, need_weights, before_softmax, need_head_weights):
            return super().forward(query, key, value, key_padding_mask, incremental_state, need_weights,
                                   static_kv, attn_mask, before_softmax, need_head_weights)
        tgt_len, bsz, embed_dim = query.shape
        h, d = self.num_heads, self.head_dim
        if self.self_attention:
            key = value = query
        q = self.q_proj(query).view(tgt_len, bsz, h, d).permute(1, 2, 0, 3)
        k = self.k_proj(key).view(-1, bsz, h, d).permute(1, 2, 0, 3)
        v = self.v_proj(value).view(-1, bsz, h, d).permute(1, 2, 0, 3)
        expressible, mask, causal = self._sdpa_mask(attn_mask, key_padding_mask, tgt_len, k.size(2), q.dtype)
        if not expressible:  # a mask form SDPA cannot take as it is: fairseq's own kernel
            return super().forward(query, key, value, key_padding_mask, incremental_state, need_weights,
                                   static_kv, attn_mask, before_softmax, need_head_weights)
        p = self.dropout_module.p if (self.training or self.dropout_module.apply_during_inference) else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal)
        out = out.permute(2, 0, 1, 3).reshape(tgt_len, bsz, embed_dim)
        return self.out_proj(out), None

    def _sdpa_mask(self, attn_mask, key_padding_mask, tgt_len, src_len, dtype):
        """(expressible, mask, is_causal): SDPA's form of fairseq's (additive attn_mask, key_padding_mask
        True = pad), or expressible False where there is none and fairseq's kernel must run.

        The decoder's future mask becomes ``is_causal``; its padding mask can then be dropped only when
        every row's pads come after its real tokens (right padding): a padded position then attends to
        later pads instead of ignoring them, no real position attends to a pad, and padded positions carry
        no loss. Left-padded targets (--left-pad-target) put pads before real tokens: the mask must stay,
        and fairseq's kernel keeps it (a causal plus padding mask leaves the leading pads' rows with no
        key at all, which only fairseq's kernel handles as fairseq does).
        """
        if attn_mask is not None and attn_mask.dim() != 2:
            return False, None, False  # per-head or per-sentence masks: fairseq's layout, not SDPA's
        if key_padding_mask is not None:
            if key_padding_mask.dim() != 2 or key_padding_mask.dtype not in (torch.bool, torch.uint8):
                return False, None, False  # an additive (float) padding mask: fairseq's semantics
            key_padding_mask = key_padding_mask.to(torch.bool)
        causal = attn_mask is not None and tgt_len == src_len and self._is_future_mask(attn_mask)
        if causal:
            if key_padding_mask is not None and not self._is_right_padding(key_padding_mask):
                return False, None, False
            return True, None, True
        mask = None
        if key_padding_mask is not None:
            mask = ~key_padding_mask.view(key_padding_mask.size(0), 1, 1, src_len)
        if attn_mask is not None:
            add = attn_mask.to(dtype) if attn_mask.dtype != torch.bool else \
                torch.zeros_like(attn_mask, dtype=dtype).masked_fill(attn_mask, float("-inf"))
            mask = add if mask is None else add.masked_fill(~mask, float("-inf"))
        return True, mask, False

    _right: Dict = {}

    @staticmethod
    def _is_right_padding(key_padding_mask):
        """Does every row's padding come after all its real tokens? Every decoder layer gets the same
        tensor, so the answer is cached by its identity and version: one device sync per batch."""
        kpm = key_padding_mask
        key = (kpm.data_ptr(), tuple(kpm.shape), kpm.device, kpm._version)
        cached = FastMultiheadAttention._right.get(key)
        if cached is None:
            hit = bool((kpm[:, 1:] >= kpm[:, :-1]).all()) if kpm.size(1) > 1 else True
            if len(FastMultiheadAttention._right) >= 64:
                FastMultiheadAttention._right.clear()
            # the entry holds the tensor, so its memory cannot be reused by another mask meanwhile
            cached = FastMultiheadAttention._right[key] = (hit, kpm)
        return cached[0]

    _checked: Dict = {}

    def _is_future_mask(self, attn_mask):
        """Is attn_mask fairseq's buffered future mask (-inf above the diagonal, 0 elsewhere)?

        fairseq hands every layer a slice of one cached buffer, so the answer is cached by that
        buffer's identity and version: one device sync per buffer, not per call.
        """
        key = (attn_mask.data_ptr(), tuple(attn_mask.shape), attn_mask.dtype, attn_mask.device,
               attn_mask._version)
        cached = FastMultiheadAttention._checked.get(key)
        if cached is None:
            n = attn_mask.size(0)
            upper = torch.ones(n, n, dtype=torch.bool, device=attn_mask.device).triu(1)
            if attn_mask.dtype == torch.bool:
                hit = bool(torch.equal(attn_mask, upper))
            else:
                hit = bool(torch.isneginf(attn_mask[upper]).all() and (attn_mask[~upper] == 0).all())
            if len(FastMultiheadAttention._checked) >= 1024:
                FastMultiheadAttention._checked.clear()
            # the entry holds the mask, so its memory cannot be reused by another tensor meanwhile
            cached = FastMultiheadAttention._checked[key] = (hit, attn_mask)
        hit = cached[0]
        return hit


def use_fast_attention(model):
    """Turn every fairseq MultiheadAttention in the model into FastMultiheadAttention, in place.

    The class gains only a forward: sub-modules, parameters and their names stay as they are, so
    checkpoints load both ways. Returns how many modules were switched.
    """
    n = 0
    for m in model.modules():
        if type(m) is MultiheadAttention:
            m.__class__ = FastMultiheadAttention
            n += 1
    return n


# --- bf16 --------------------------------------------------------------------------------------


def bf16_autocast(device_type):
    return torch.autocast(device_type=device_type, dtype=torch.bfloat16)


def check_bf16_args(args):
    """--b2t-bf16 keeps fp32 weights: it cannot be combined with fairseq's fp16/bf16 weights."""
    if not getattr(args, "b2t_bf16", False):
        return
    for flag in ("fp16", "memory_efficient_fp16", "bf16", "memory_efficient_bf16"):
        if getattr(args, flag, False):
            raise B2TError(f"--b2t-bf16 cannot be combined with --{flag.replace('_', '-')}: --b2t-bf16 keeps fp32 "
                           "weights and runs the forward in bf16 autocast; drop one of them")
