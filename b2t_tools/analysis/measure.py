"""How b2t-bench measures: timed updates, peak memory, saved activations, and a profile of one update.

Peak memory on CUDA is read from ``torch.cuda.max_memory_allocated`` each time fairseq's Trainer
resets it (``cuda_peaks`` intercepts ``torch.cuda.reset_peak_memory_stats`` for the span of one
measurement only: a scoped measurement hook, not a repair); on CPU it is the peak of live tensor
bytes from torch.profiler's allocator events.
"""

import contextlib
import json
import os
import re
import statistics
import time

import torch

MATMUL_KERNEL = re.compile(r"gemm|cutlass|xmma|nvjet|cublas|matmul|Kernel2", re.I)


def log(msg):
    import sys

    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# measuring


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def run_updates(trainer, batches, device, cpu_time=False):
    """Wall seconds for one update per batch (fairseq's Trainer.train_step, update_freq 1);
    with cpu_time, also this process's CPU seconds (robust to other jobs on a shared CPU)."""
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    for sample in batches:
        if trainer.train_step([sample]) is None:  # fairseq skipped it: fp16 overflow, or out of memory
            trainer.b2t_bench_skipped = getattr(trainer, "b2t_bench_skipped", 0) + 1
    sync(device)
    wall = time.perf_counter() - t0
    return (wall, time.process_time() - c0) if cpu_time else wall


@contextlib.contextmanager
def cuda_peaks():
    """Collect torch.cuda.max_memory_allocated() each time fairseq's Trainer resets it (once per update)."""
    peaks, real = [], torch.cuda.reset_peak_memory_stats

    def reset(*a, **k):
        peaks.append(torch.cuda.max_memory_allocated())
        real(*a, **k)

    torch.cuda.synchronize()
    real()
    torch.cuda.reset_peak_memory_stats = reset
    try:
        yield peaks
    finally:
        torch.cuda.reset_peak_memory_stats = real
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated())


def peak_cpu_tensor_bytes(trace_file):
    """Peak of the running sum of CPU allocations minus frees in a torch.profiler chrome trace."""
    with open(trace_file) as f:
        events = json.load(f)["traceEvents"]
    mem = sorted((e["ts"], e["args"]["Bytes"]) for e in events
                 if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type", 0) == 0)
    live = peak = 0
    for _, nbytes in mem:
        live += nbytes
        peak = max(peak, live)
    return peak


def build_and_measure_memory(build, batches, device, workdir):
    """Build one variant and run one update per batch; return (trainer, peak bytes it needed).

    CUDA: max_memory_allocated over the build and the updates, minus what was allocated before
    (the other variants). CPU: the peak of live tensor bytes over the same span, from the
    allocator events torch.profiler records (the CPU analogue of max_memory_allocated).
    """
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        with cuda_peaks() as peaks:
            trainer = build()
            run_updates(trainer, batches, device)
        return trainer, max(peaks) - before
    from torch.profiler import ProfilerActivity, profile

    with _quiet_profiler(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        trainer = build()
        run_updates(trainer, batches, device)
    trace = os.path.join(workdir, "mem-trace.json")
    prof.export_chrome_trace(trace)
    peak = peak_cpu_tensor_bytes(trace)
    os.remove(trace)
    return trainer, peak


@contextlib.contextmanager
def _quiet_profiler():
    """The profiler warns once per free of a block allocated before it started; hide that noise."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def saved_activation_bytes(trainer, sample):
    """Bytes of distinct non-parameter storages autograd saves for backward in one training forward."""
    model, criterion = trainer.model, trainer.criterion
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    sample, _ = trainer._prepare_sample(sample)
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _, _ = criterion(model, sample)
    del loss
    trainer.zero_grad()
    return sum(seen.values())


# ---------------------------------------------------------------------------------------------
# profile of one update


def matmul_peak_flops(device, dtype):
    """Measured FLOP/s of a large square matrix product on this device (fp16 8192^3 on CUDA)."""
    n, reps = (8192, 10) if device == "cuda" else (1024, 5)
    dt = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(dtype, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dt)
    b = torch.randn(n, n, device=device, dtype=dt)
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - t0), f"{n}x{n}x{n} {dt}"


def count_flops(trainer, sample):
    from torch.utils.flop_counter import FlopCounterMode

    try:
        with FlopCounterMode(display=False) as fc:
            trainer.train_step([sample])
        return fc.get_total_flops()
    except Exception as e:  # the count is a nicety; never let it sink the benchmark
        log(f"  flop count failed: {e!r}")
        return None


def union_length(intervals, lo, hi):
    total, end = 0.0, lo
    for s, e in sorted(intervals):
        s, e = max(s, end), min(e, hi)
        if e > s:
            total += e - s
            end = e
    return total


def summarize_trace(trace_file, device, top=10):
    with open(trace_file) as f:
        events = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]
    mark = [e for e in events if e.get("name") == "b2t_bench_update"]
    lo = min(e["ts"] for e in mark)
    cpu_end = max(e["ts"] + e["dur"] for e in mark)
    if device == "cuda":
        work = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    else:  # leaf-level CPU ops: time inside aten operators, against Python and framework glue
        work = [e for e in events if e.get("cat") == "cpu_op" and e["name"].startswith("aten::")]
    hi = max([cpu_end] + [e["ts"] + e["dur"] for e in work])
    busy = union_length([(e["ts"], e["ts"] + e["dur"]) for e in work], lo, hi)
    by_name = {}
    for e in work:
        t = by_name.setdefault(e["name"], [0.0, 0])
        t[0] += e["dur"]
        t[1] += 1
    # on CPU, aten ops nest (matmul -> mm): the union above handles that; the top list may double count
    kernel_sum = sum(t for t, _ in by_name.values())
    ranked = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]
    matmul = sum(t for name, (t, _) in by_name.items() if MATMUL_KERNEL.search(name) or name in ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"))
    return {
        "window_ms": (hi - lo) / 1000,
        "busy_ms": busy / 1000,
        "gap_ms": (hi - lo - busy) / 1000,
        "busy_fraction": busy / (hi - lo),
        "busy_what": "union of GPU kernels, memcpy, memset" if device == "cuda" else "union of aten operators",
        "matmul_ms": matmul / 1000,
        "matmul_share_of_work": matmul / kernel_sum if kernel_sum else None,
        "kernel_count": sum(c for _, c in by_name.values()),
        "top": [{"name": n[:160], "ms": t / 1000, "calls": c, "share_of_work": t / kernel_sum}
                for n, (t, c) in ranked],
    }


def profile_update(trainer, batches, device, dtype, workdir):
    """Where one update's time goes: kernels vs gaps, top kernels, achieved matrix throughput."""
    from torch.profiler import ProfilerActivity, profile, record_function

    sample = max(batches, key=lambda b: b["ntokens"])
    walls = [run_updates(trainer, [sample], device) for _ in range(5)]
    wall = statistics.median(walls)
    flops = count_flops(trainer, sample)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with _quiet_profiler(), profile(activities=acts) as prof:
        with record_function("b2t_bench_update"):
            trainer.train_step([sample])
        sync(device)
    trace = os.path.join(workdir, "profile-trace.json")
    prof.export_chrome_trace(trace)
    summary = summarize_trace(trace, device)
    os.remove(trace)
    peak, peak_what = matmul_peak_flops(device, dtype)
    achieved = flops / wall if flops else None
    summary.update({
        "device": device, "dtype": dtype, "target_tokens": sample["ntokens"],
        "update_ms_unprofiled": 1000 * wall, "tokens_per_s_unprofiled": sample["ntokens"] / wall,
        "flops_per_update": flops, "achieved_flops_per_s": achieved,
        "matmul_peak_flops_per_s": peak, "matmul_peak_measured_on": peak_what,
        "achieved_fraction_of_matmul_peak": achieved / peak if achieved else None,
        "matmul_kernel_flops_per_s": flops / (summary["matmul_ms"] / 1000) if flops and summary["matmul_ms"] else None,
    })
    return summary
