"""The fast path's loss-curve check: the plain and the fast path train the same model on the same
batches; their per-update training losses must give the same curve (scripts/gpu-checks.sh --fast-path).

    python -m b2t_tools.analysis.fast_curve --layers 18 --updates 200 --dtype fp16 [--json PATH]
"""

import argparse
import logging
import math
import sys

import torch

from b2t_fairseq import layer_types
from b2t_fairseq.fast import translate_argv

from ..commands import run_command
from ..errors import ToolError
from ..util import write_json
from . import bench

# --- the GPU loss-curve check (scripts/gpu-checks.sh --fast-path) --------------------------------

PROG = "b2t-fast-curve"


def learnable_batches(dictionary, max_tokens, n, seed=1):
    """fairseq-style batches of a task a model learns within 200 updates: Zipf-distributed source
    words, the target the source shifted by one word id (so the loss curve falls, not flat)."""
    from fairseq.data import data_utils

    batches = bench.make_batches(dictionary, max_tokens, n, seed=seed)
    g = torch.Generator().manual_seed(seed)
    lo, hi = dictionary.nspecial, len(dictionary)
    ranks = torch.arange(1, hi - lo + 1, dtype=torch.float64)
    zipf = 1.0 / ranks
    out = []
    for b in batches:
        src_lens = b["net_input"]["src_lengths"].tolist()
        sents = [torch.cat([lo + torch.multinomial(zipf, k - 1, replacement=True, generator=g),
                            torch.tensor([dictionary.eos()])]) for k in src_lens]
        tgts = [torch.cat([lo + (s[:-1] - lo + 1) % (hi - lo), s[-1:]]) for s in sents]
        pad, eos = dictionary.pad(), dictionary.eos()
        out.append({"id": b["id"], "nsentences": len(sents), "ntokens": int(sum(len(t) for t in tgts)),
                    "net_input": {"src_tokens": data_utils.collate_tokens(sents, pad, eos, left_pad=True),
                                  "src_lengths": torch.tensor(src_lens),
                                  "prev_output_tokens": data_utils.collate_tokens(tgts, pad, eos,
                                                                                  move_eos_to_beginning=True)},
                    "target": data_utils.collate_tokens(tgts, pad, eos)})
    return out


def loss_curves(size, layers, max_tokens, updates, device, dtype, ln="b2t", n_batches=16, seed=1):
    """Per-update training losses of the plain and the fast path, same seed and batches."""
    import tempfile

    from fairseq.data import Dictionary

    variant = "plugin_" + layer_types.BY_KEY[ln].short
    curves = {}
    with tempfile.TemporaryDirectory(prefix="b2t-fast-curve-") as workdir:
        bench.write_dictionary(workdir, bench.SIZES[size]["vocab"])
        batches = learnable_batches(Dictionary.load(workdir + "/dict.src.txt"), max_tokens, n_batches, seed)
        for name, extra in (("plain", []), ("fast", ["--b2t-fast"])):
            argv = translate_argv(bench.fairseq_argv(variant, workdir, size, layers, max_tokens, device, dtype, seed)
                                  + extra + ["--warmup-updates", "50"])
            trainer = bench.build_trainer(argv)
            losses, real = [], trainer.task.train_step

            def capture(*a, _real=real, _losses=losses, **k):
                out = _real(*a, **k)
                _losses.append(out[0].detach())  # per-sample-size below; no host sync per update
                _losses.append(out[1])
                return out

            trainer.task.train_step = capture
            for i in range(updates):
                trainer.train_step([batches[i % len(batches)]])
            curves[name] = [float(losses[j]) / float(losses[j + 1]) / math.log(2) for j in range(0, len(losses), 2)]
            del trainer
            if device == "cuda":
                torch.cuda.empty_cache()
    return curves


def compare_curves(plain, fast_, window=20, rtol=0.02):
    """Window means of the two curves agree within rtol (fp16/bf16 rounding makes two runs drift
    apart update by update; a real difference in the math shifts the whole curve)."""
    n = min(len(plain), len(fast_))
    worst = 0.0
    for s in range(0, n, window):
        a = sum(plain[s:s + window]) / len(plain[s:s + window])
        b = sum(fast_[s:s + window]) / len(fast_[s:s + window])
        worst = max(worst, abs(a - b) / abs(a))
    return {"updates": n, "window": window, "rtol": rtol, "max_window_rel_diff": worst,
            "max_update_abs_diff": max(abs(a - b) for a, b in zip(plain, fast_)),
            "first": [plain[0], fast_[0]], "last_window_mean": [sum(plain[-window:]) / window,
                                                                sum(fast_[-window:]) / window],
            "same_curve": worst <= rtol and len(plain) == len(fast_)}


def run(argv):
    p = argparse.ArgumentParser(prog=PROG, description="training loss curve of the plain and the fast path, "
                                "same seed and batches; exit 1 if they differ")
    p.add_argument("--size", choices=("quick", "cpu", "paper"), default="paper")
    p.add_argument("--layers", type=int, default=18)
    p.add_argument("--ln-position", choices=[t.key for t in layer_types.LAYER_TYPES if t.in_paper], default="b2t")
    p.add_argument("--max-tokens", type=int, default=3584)
    p.add_argument("--updates", type=int, default=200)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default="fp16")
    p.add_argument("--json", metavar="PATH")
    opts = p.parse_args(argv)
    if opts.device == "cuda" and not torch.cuda.is_available():
        raise ToolError("no CUDA device is visible; run on a GPU machine or pass --device cpu")
    if opts.device == "cpu" and opts.dtype == "fp16":
        raise ToolError("--dtype fp16 needs CUDA (fairseq --fp16); use --dtype fp32 or bf16 on CPU")
    logging.getLogger("fairseq").setLevel(logging.WARNING)
    curves = loss_curves(opts.size, opts.layers, opts.max_tokens, opts.updates, opts.device, opts.dtype,
                         opts.ln_position)
    result = dict(compare_curves(curves["plain"], curves["fast"]), layers=opts.layers, size=opts.size,
                  ln_position=opts.ln_position, max_tokens=opts.max_tokens, device=opts.device, dtype=opts.dtype,
                  curves=curves)
    if opts.json:
        write_json(opts.json, result)
    print(f"{PROG}: {opts.layers}L {opts.ln_position} {opts.dtype}, {result['updates']} updates: loss (bits) "
          f"{result['first'][0]:.3f} -> {result['last_window_mean'][0]:.3f} plain, "
          f"{result['first'][1]:.3f} -> {result['last_window_mean'][1]:.3f} fast; largest difference of "
          f"{result['window']}-update means {100 * result['max_window_rel_diff']:.2f}% (<= {100 * result['rtol']:.0f}%: "
          f"{'same curve' if result['same_curve'] else 'DIFFERENT'})")
    return 0 if result["same_curve"] else 1


def main(argv=None):
    return run_command(PROG, run, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
