"""``b2t-demo``: the paper's comparison in miniature, on Tatoeba English-German, on a CPU.

Trains Post-LN, Pre-LN and B2T transformers (``--archs`` adds DeepNorm and Admin, e.g.
``--archs post_ln,b2t,deepnorm,admin``) at a shallow and a deep depth with the same budget
(same updates, batch size, learning rate and seed), evaluates each on the test split with beam
search and sacreBLEU on detokenized text, measures per-layer gradient norms, and writes a report
folder (``--out``, default ``demo-out/``): results.json, results.md, loss_curves.png,
grad_norms_init.png, grad_norms_trained.png and index.md.

Training goes through fairseq's command line (``b2t-train`` in a subprocess, json logs parsed).
Each run keeps its checkpoints in ``OUT/runs/NAME``; its ``result.json`` is written last, so an
interrupted demo run again skips finished runs and resumes unfinished ones from checkpoint_last.pt.

A run is marked *diverged* when (a) training stopped on a non-finite loss or gradient or logged
a NaN/inf loss, or (b) its final validation nll_loss (bits/token) is not below the unigram level:
the cross-entropy of the validation targets under an add-one unigram model of the training
targets, i.e. what a model reaches by learning word frequencies only.
"""

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .. import recipe
from ..commands import run_command
from ..errors import B2TError
from ..util import log
from . import data
from .report import do_grad_norms, table_md, write_report
from .runs import do_run

ARCHS = recipe.PAPER_ARCHS
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
    p.add_argument("--corpus", metavar="ZIP", help="Tatoeba deu-eng.zip (default: $B2T_TATOEBA_ZIP, else download)")
    p.add_argument("--out", default="demo-out", help="report folder (default: demo-out)")
    p.add_argument("--cache", metavar="DIR", help="prepared data cache (default: OUT/cache)")
    p.add_argument("--quick", action="store_true", help="a ~3-minute version on a slice of the data (for tests)")
    p.add_argument("--archs", default=",".join(recipe.PAPER_ARCHS),
                   help=f"comma list of {', '.join(recipe.ARCHS)} (default: the paper's three)")
    p.add_argument("--depths", help="comma list of layers per stack (default 6,18)")
    p.add_argument("--max-update", type=int)
    p.add_argument("--max-tokens", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--warmup", type=int)
    p.add_argument("--dim", type=int, default=64, help="model width (FFN = 4x; default 64)")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--jobs", type=int, help="runs trained at the same time, sharing the cores "
                                            "(default: 2 on CPU, 1 with --fp16)")
    p.add_argument("--fp16", action="store_true", help="train and translate on CUDA with --fp16")
    p.add_argument("--no-grad-norms", dest="grad_norms", action="store_false")
    return p


def resolve_config(args):
    preset = PRESETS["quick" if args.quick else "default"]
    for k, v in preset.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    args.depths = tuple(int(x) for x in str(args.depths).strip("()").replace(" ", "").split(",") if x)
    args.archs = tuple(a.strip() for a in args.archs.split(",") if a.strip())
    bad = [a for a in args.archs if a not in recipe.ARCHS]
    if bad:
        raise B2TError(f"unknown --archs {','.join(bad)}; choose from {','.join(recipe.ARCHS)}")
    if args.fp16:
        import torch

        if not torch.cuda.is_available():
            raise B2TError("--fp16 needs a CUDA GPU and none is visible; drop --fp16 to train on the CPU")
    cores = os.cpu_count() or 1
    if args.jobs is None:
        args.jobs = 1 if args.fp16 else max(1, min(2, cores))
    args.threads = max(1, cores // args.jobs) if "OMP_NUM_THREADS" not in os.environ or args.jobs > 1 \
        else int(os.environ["OMP_NUM_THREADS"])
    return args


def quiet():
    """Only the demo's own progress lines: torch's harmless warnings and matplotlib's chatter go."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    for name in ("matplotlib", "PIL", "fairseq"):
        logging.getLogger(name).setLevel(logging.WARNING)


def run(argv):
    args = get_parser().parse_args(argv)
    quiet()
    t0 = time.time()
    cfg = resolve_config(args)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(cfg.cache) if cfg.cache else out / "cache"
    zip_path = data.find_corpus(cfg.corpus, cache, log=log)
    data_root = data.prepare(zip_path, cache, vocab_size=cfg.vocab, n_valid=cfg.n_valid, n_test=cfg.n_test,
                                max_train=cfg.max_train, seed=cfg.seed, log=log)
    meta = json.loads((data_root / "meta.json").read_text())
    unigram = meta["unigram_valid_xent_bits"]
    jobs = [(a, d) for d in sorted(cfg.depths, reverse=True) for a in cfg.archs]  # longest runs first
    log(f"{len(jobs)} runs, {cfg.jobs} at a time with {cfg.threads} thread(s) each; report in {out}")
    with ThreadPoolExecutor(cfg.jobs) as pool:
        results = list(pool.map(lambda j: do_run(j[0], j[1], data_root, out, cfg, unigram), jobs))
    order = {a: i for i, a in enumerate(recipe.ARCHS)}
    records = sorted(results, key=lambda r: (r["layers"], order[r["arch"]]))
    gn_files = do_grad_norms(out, data_root, cfg, records) if cfg.grad_norms else []
    write_report(out, records, cfg, meta, time.time() - t0, gn_files)
    print(table_md(records))
    log(f"report: {out / 'index.md'} ({(time.time() - t0) / 60:.1f} min)")


def main(argv=None):
    return run_command(PROG, run, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
