"""``b2t-demo``: the paper's comparison in miniature, on Tatoeba English-German, on a CPU.

Trains Post-LN, Pre-LN and B2T transformers (``--archs`` adds DeepNorm and Admin, e.g.
``--archs post_ln,b2t,deepnorm,admin``) at a shallow and a deep depth with the same budget
(same updates, batch size, learning rate and seed), evaluates each on the test split with beam
search and sacreBLEU on detokenized text, measures per-layer gradient norms, and writes a report
folder (``--out``, default ``demo-out/``): results.json, results.md, loss_curves.png,
grad_norms_init.png, grad_norms_trained.png and index.md.

Training goes through fairseq's command line (``b2t-train`` in a subprocess, json logs parsed).
Each run keeps its checkpoints in ``OUT/runs/NAME-KEY`` (KEY: a hash of every option that shapes the
run, so a re-run with other options never reuses it); its ``result.json`` is written last, so an
interrupted demo run again skips finished runs and resumes unfinished ones from checkpoint_last.pt.
Stopping the demo (Ctrl-C, kill, kill -9) stops its training processes too.

A run is marked *diverged* when (a) training stopped on a non-finite loss or gradient or logged
a NaN/inf loss, or (b) its final validation nll_loss (bits/token) is not below the unigram level:
the cross-entropy of the validation targets under the add-one unigram model of the training
targets over the dictionary (b2t_fairseq/unigram.py, as the monitor and b2t-stability), i.e. what a
model reaches by learning word frequencies only.
"""

import argparse
import errno
import json
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from b2t_fairseq import layer_types

from ..commands import run_command
from ..errors import ToolError
from ..util import log
from . import children, data, lm
from .report import (
    do_grad_norms,
    do_layer_heatmap,
    do_stability_map,
    table_md,
    write_report,
)
from .runs import do_run

ARCHS = layer_types.PAPER_SHORTS
PROG = "b2t-demo"

# budgets: the default fits in about 15 minutes on 2 cores, --quick in about 3 (data prep included)
PRESETS = {
    "default": dict(depths=(6, 18), max_update=150, max_tokens=2048, lr=2e-3, warmup=40, vocab=4000, n_valid=500,
                    n_test=500, max_train=None, valid_every=30, gn_batches=2),
    "quick": dict(depths=(6, 18), max_update=60, max_tokens=1536, lr=2e-3, warmup=40, vocab=2000, n_valid=200,
                  n_test=100, max_train=20000, valid_every=30, gn_batches=2),
}


# --- command line --------------------------------------------------------------------------------

def get_parser():
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=("mt", "lm"), default="mt",
                   help="mt: translation (default); lm: decoder-only language models on the English side (demo/lm.py)")
    p.add_argument("--corpus", metavar="ZIP", help="Tatoeba deu-eng.zip (default: $B2T_TATOEBA_ZIP, else download)")
    p.add_argument("--out", default="demo-out", help="report folder (default: demo-out)")
    p.add_argument("--cache", metavar="DIR", help="prepared data cache (default: OUT/cache)")
    p.add_argument("--quick", action="store_true", help="a ~3-minute version on a slice of the data (for tests)")
    p.add_argument("--archs", default=",".join(layer_types.PAPER_SHORTS),
                   help=f"comma list of {', '.join(layer_types.SHORTS)} (default: the paper's three)")
    p.add_argument("--depths", help="comma list of layers per stack (default 6,18)")
    p.add_argument("--max-update", type=int, help="updates per run (default 150, --quick 60)")
    p.add_argument("--max-tokens", type=int, help="tokens per batch (default 2048, --quick 1536)")
    p.add_argument("--lr", type=float, help="peak learning rate (default 0.002)")
    p.add_argument("--warmup", type=int, help="warmup updates (default 40)")
    p.add_argument("--vocab", type=int, help="joint sentencepiece vocabulary size (default 4000, --quick 2000)")
    p.add_argument("--valid-every", type=int, help="validate and save every N updates (default 30)")
    p.add_argument("--dim", type=int, default=64, help="model width (FFN = 4x; default 64)")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--jobs", type=int, help="runs trained at the same time, sharing the cores "
                                            "(default: 2 on CPU, 1 with --fp16)")
    p.add_argument("--fp16", action="store_true", help="train and translate on CUDA with --fp16")
    p.add_argument("--no-grad-norms", dest="grad_norms", action="store_false")
    p.add_argument("--stability-map", action="store_true",
                   help="also run a small b2t-stability sweep (depths x lr, 2 lr) and add its map to the report")
    p.add_argument("--verbose", action="store_true", help="also show fairseq's own log lines and warnings")
    return p


def _ints(flag, text):
    try:
        vals = tuple(int(x) for x in str(text).strip("()").replace(" ", "").split(","))
    except ValueError:
        vals = ()
    if not vals or any(v < 1 for v in vals):
        raise ToolError(f"{flag} {text} is not a comma list of positive integers; pass e.g. {flag} 6,18")
    return tuple(sorted(set(vals)))


def check_config(cfg):
    """Every option's value, checked before anything is built: one line naming the flag and the fix."""
    def need(ok, msg):
        if not ok:
            raise ToolError(msg)

    for flag, v in (("--max-update", cfg.max_update), ("--max-tokens", cfg.max_tokens), ("--warmup", cfg.warmup),
                    ("--dim", cfg.dim), ("--heads", cfg.heads), ("--jobs", cfg.jobs),
                    ("--valid-every", cfg.valid_every)):
        need(v >= 1, f"{flag} {v} must be at least 1; pass a positive {flag}")
    need(cfg.vocab >= 50, f"--vocab {cfg.vocab} is too small for a sentencepiece vocabulary; pass --vocab 50 or more")
    need(math.isfinite(cfg.lr) and cfg.lr > 0, f"--lr {cfg.lr} must be a positive number; pass e.g. --lr 0.002")
    need(math.isfinite(cfg.dropout) and 0 <= cfg.dropout < 1,
         f"--dropout {cfg.dropout} must be in [0, 1); pass e.g. --dropout 0.1")
    need(cfg.seed >= 0, f"--seed {cfg.seed} must be 0 or more; pass e.g. --seed 1")
    example = cfg.heads * max(1, round(cfg.dim / cfg.heads))
    need(cfg.dim % cfg.heads == 0, f"--dim {cfg.dim} is not divisible by --heads {cfg.heads}; pass a --dim that "
                                   f"is a multiple of {cfg.heads} (e.g. {example})")
    need(max(cfg.depths) <= 100, f"--depths {max(cfg.depths)} is more layers than the demo trains on a CPU; "
                                 "pass depths of 100 or fewer (the paper's are 6 and 18)")


def check_out(path, flag):
    """An output folder that exists or can be made, and is writable."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ToolError(f"{flag} {path} is a file, not a folder; pass a folder path (it is created if missing)")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ToolError(f"cannot create {flag} {path} ({e.strerror}); pass a folder you can write to") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ToolError(f"{flag} {path} is not writable; pass a folder you can write to")
    return path


def resolve_config(args):
    preset = PRESETS["quick" if args.quick else "default"]
    for k, v in preset.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    args.depths = _ints("--depths", args.depths)
    archs = tuple(a.strip() for a in args.archs.split(",") if a.strip())
    if not archs:
        raise ToolError(f"--archs {args.archs!r} names no architecture; pass a comma list of "
                       f"{','.join(layer_types.SHORTS)}")
    bad = [a for a in archs if a not in layer_types.SHORTS]
    if bad:
        raise ToolError(f"unknown --archs {','.join(bad)}; choose from {','.join(layer_types.SHORTS)}")
    args.archs = tuple(dict.fromkeys(archs))
    if args.task == "lm" and getattr(args, "stability_map", False):
        raise ToolError("--stability-map sweeps encoder-decoder depths and has no language-model mode; drop it "
                        "with --task lm (b2t-stability runs the sweep on translation data)")
    if args.fp16:
        import torch

        if not torch.cuda.is_available():
            raise ToolError("--fp16 needs a CUDA GPU and none is visible; drop --fp16 to train on the CPU")
    cores = os.cpu_count() or 1
    if args.jobs is None:
        args.jobs = 1 if args.fp16 else max(1, min(2, cores))
    check_config(args)
    args.threads = max(1, cores // args.jobs) if "OMP_NUM_THREADS" not in os.environ or args.jobs > 1 \
        else int(os.environ["OMP_NUM_THREADS"])
    return args


def quiet(verbose=False):
    """Only the demo's own progress lines: torch's harmless warnings, fairseq's and matplotlib's chatter
    go (--verbose keeps fairseq's INFO lines and the warnings)."""
    import logging
    import warnings

    if not verbose:
        warnings.filterwarnings("ignore", category=UserWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
    for name in ("matplotlib", "PIL"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for name in ("fairseq", "fairseq_cli", "b2t_fairseq"):
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)


def run(argv):
    args = get_parser().parse_args(argv)
    quiet(args.verbose)
    children.install_stop_handlers()
    try:
        return _run(args)
    except BaseException as e:
        children.stop_all()  # Ctrl-C, a stop signal or an error: no training process outlives the demo
        if isinstance(e, OSError) and e.errno in WRITE_ERRORS and e.filename:
            raise ToolError(f"cannot write {e.filename} ({e.strerror}); free disk space or fix that path (or pass "
                           "another --out), then run b2t-demo again to resume") from None
        raise
    finally:
        children.STOPPING.clear()  # its children are ended: a later call in this process may start new ones


# a full disk, a read-only place, a file where a folder should be: the user's to fix, not a bug
WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EISDIR,
                errno.EEXIST}


def _run(args):
    t0 = time.time()
    cfg = resolve_config(args)
    out = check_out(cfg.out, "--out")
    cache = check_out(cfg.cache, "--cache") if cfg.cache else out / "cache"
    zip_path = data.find_corpus(cfg.corpus, cache, log=log)
    data_root = data.prepare(zip_path, cache, vocab_size=cfg.vocab, n_valid=cfg.n_valid, n_test=cfg.n_test,
                             max_train=cfg.max_train, seed=cfg.seed, log=log)
    meta = json.loads((data_root / "meta.json").read_text())
    longest = data.longest_sentence(data_root / "spm")
    if cfg.max_tokens < longest:  # fairseq would stop on an assertion inside b2t-train
        raise ToolError(f"--max-tokens {cfg.max_tokens} is below the longest sentence of the corpus ({longest} "
                       f"tokens); pass --max-tokens {longest} or more")
    # the one unigram level (b2t_fairseq/unigram.py) of the valid targets; meta.json's own copy from an older
    # demo (another definition) is replaced, so the report never shows a stale number
    unigram = lm.prepare(data_root) if cfg.task == "lm" else data.unigram_level(data_root)
    meta["unigram_valid_xent_bits"] = unigram
    jobs = [(a, d) for d in sorted(cfg.depths, reverse=True) for a in cfg.archs]  # longest runs first
    log(f"{len(jobs)} runs, {min(cfg.jobs, len(jobs))} at a time with {cfg.threads} thread(s) each; "
        f"report in {out}")
    pool = ThreadPoolExecutor(min(cfg.jobs, len(jobs)))
    try:
        results = list(pool.map(lambda j: do_run(j[0], j[1], data_root, out, cfg, unigram), jobs))
    except BaseException:
        children.stop_all()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown()
    order = {a: i for i, a in enumerate(layer_types.SHORTS)}
    records = sorted(results, key=lambda r: (r["layers"], order[r["arch"]]))
    if len({r["key"] for r in records}) != len(records):  # pragma: no cover - one key per (arch, depth)
        raise ToolError(f"two runs share a configuration key in {out}; delete {out / 'runs'} and run again")
    gn_files = do_grad_norms(out, data_root, cfg, records) if cfg.grad_norms else []
    gn_files += do_layer_heatmap(out, records, cfg)
    if cfg.task == "lm":
        lm.write_report(out, records, cfg, meta, time.time() - t0, gn_files, unigram)
    else:
        gn_files += do_stability_map(out, data_root, cfg) if cfg.stability_map else []
        write_report(out, records, cfg, meta, time.time() - t0, gn_files)
    print((lm.table_md if cfg.task == "lm" else table_md)(records))
    log(f"report: {out / 'index.md'} ({(time.time() - t0) / 60:.1f} min)")


def main(argv=None):
    return run_command(PROG, run, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
