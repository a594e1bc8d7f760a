"""Per-piece CPU timing of the fast path against fairseq's code, interleaved round by round.

Shapes of b2t-bench's cpu size (width 128, FFN 512, 4 heads, vocabulary 4000, 18+18 layers for the
optimizer's tensor list; attention T=30, B=16). Reported: median ms per call and the median of
per-round ratios fast/fairseq (time: below 1 is faster). Usage: python results/fast-pieces-cpu.py OUT.json
"""
import json, statistics, sys, time, torch
torch.set_num_threads(1)
import b2t_fairseq
from b2t_fairseq import fast
from fairseq.modules.multihead_attention import MultiheadAttention
from fairseq.optim.adam import Adam
from fairseq import utils

def timeit(fn, reps):
    t = time.perf_counter()
    for _ in range(reps): fn()
    return (time.perf_counter() - t) / reps

res = {}
torch.manual_seed(0)
# optimizer: the parameter shapes of the 6+6-layer cpu-size model (width 128, ffn 512, vocab 4000)
shapes = [(4000, 128)] + [(128, 128), (128,)] * 4 * 18 + [(512, 128), (512,), (128, 512), (128,)] * 12 + [(128,)] * 2 * 30
def opt_pair():
    ps = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    for p in ps: p.grad = torch.randn(p.shape)
    return ps
pa, pb = opt_pair(), opt_pair()
oa, ob = Adam(pa, lr=1e-3, betas=(0.9, 0.98)), fast.ForeachAdam(pb, lr=1e-3, betas=(0.9, 0.98))
ta, tb, na, nb = [], [], [], []
for r in range(25):
    ta.append(timeit(oa.step, 5)); tb.append(timeit(ob.step, 5))
    na.append(timeit(lambda: utils.clip_grad_norm_(pa, 0.0), 5)); nb.append(timeit(lambda: fast.clip_grad_norm_foreach(pb, 0.0), 5))
def rec(a, b, names):
    return {names[0]: 1e3 * statistics.median(a), names[1]: 1e3 * statistics.median(b),
            "paired_time_ratio": statistics.median(y / x for x, y in zip(a, b))}
res["adam_step_ms"] = dict(rec(ta, tb, ("fairseq", "b2t_adam")), tensors=len(shapes))
res["grad_norm_ms"] = rec(na, nb, ("fairseq", "b2t_adam"))
# attention forward+backward, T x B x C = 30 x 16 x 128, 4 heads
T, B, C = 30, 16, 128
def attn_case(kind):
    torch.manual_seed(0)
    m = MultiheadAttention(C, 4, self_attention=kind != "cross", encoder_decoder_attention=kind == "cross")
    f = MultiheadAttention(C, 4, self_attention=kind != "cross", encoder_decoder_attention=kind == "cross")
    f.load_state_dict(m.state_dict()); f.__class__ = fast.FastMultiheadAttention
    x = torch.randn(T, B, C, requires_grad=True); enc = torch.randn(T + 3, B, C)
    kpm = torch.zeros(B, T + 3 if kind == "cross" else T, dtype=torch.bool); kpm[:3, :4] = True
    mask = torch.triu(utils.fill_with_neg_inf(torch.zeros(T, T)), 1) if kind == "dec_self" else None
    def run(mod):
        def go():
            if kind == "cross":
                y, _ = mod(x, enc, enc, key_padding_mask=kpm, static_kv=True, need_weights=False)
            else:
                y, _ = mod(x, x, x, key_padding_mask=kpm if kind == "enc_self" else None, attn_mask=mask, need_weights=False)
            y.sum().backward()
        return go
    ya = []; yb = []
    for r in range(15):
        ya.append(timeit(run(m), 10)); yb.append(timeit(run(f), 10))
    return rec(ya, yb, ("fairseq", "fast"))
for kind in ("enc_self", "dec_self", "cross"):
    res[f"attention_{kind}_fwd_bwd_ms"] = attn_case(kind)
res["machine"] = "2-core AMD EPYC VM shared with other jobs, 1 torch thread, torch " + torch.__version__
print(json.dumps(res, indent=1))
json.dump(res, open(sys.argv[1], "w"), indent=1)
