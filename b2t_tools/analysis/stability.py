"""b2t-stability: which layer types train at which depth and learning rate: a map of short runs.

For every layer type x encoder-decoder depth (unequal ones too: ``12-3`` is 12 encoder and 3
decoder layers) x peak learning rate, one short b2t-train run on the Tatoeba En-De corpus (or any
fairseq data-bin), then a map: one panel per layer type, depth down, learning rate across, each
cell coloured by its final valid loss and crossed where the run diverged (a non-finite loss, or a
final valid loss not below the unigram level while the training loss had stopped falling: the model
learned no more than word frequencies). A cell whose valid loss is not yet below the unigram level but
whose training loss is still falling is *under-trained* (more --max-update would tell), not diverged.
The unigram level is b2t_fairseq/unigram.py's, measured on the valid targets.

Each cell is keyed on every option that shapes it (layer type, depths, learning rate, sizes,
schedule, batch, seed, precision, the data's digest); a finished cell's ``cell.json`` is reused
by a later sweep with the same key, so a stopped sweep resumes where it stopped and a sweep with
other options never reuses it. Cells run ``--jobs`` at a time, longest first; one sweep at a time
writes to an ``--out`` (a lock on it: a second sweep there is refused).

The default grid (width 64, 100 updates) is sized for a 2-core CPU; ``--large`` is the paper-like
grid for a GPU (``--fp16``/``--bf16``).
"""

import argparse
import fcntl
import json
import math
import os
import sys
import time
from pathlib import Path

from b2t_fairseq import layer_types, unigram
from b2t_fairseq.errors import B2TError

from ..commands import run_command
from ..errors import ToolError
from ..util import fairseq_logging, file_digest, json_digest, log, machine, parse_json_log, write_json
from .stability_map import draw_map

PROG = "b2t-stability"
GRIDS = {
    # every layer type at a shallow and a deep depth: about 15 minutes on two idle cores (9 types)
    "default": dict(types=",".join(layer_types.SHORTS), depths="6-6,18-18", lrs="0.002,0.004",
                    dim=64, max_update=100, warmup=30, max_tokens=1024),
    "large": dict(types=",".join(layer_types.SHORTS), depths="6-6,12-12,18-18,36-36,12-3,18-1,40-6",
                  lrs="0.0005,0.001,0.002,0.003,0.005", dim=512, max_update=4000, warmup=1000, max_tokens=8192),
}
LOCK_NAME = ".b2t-stability.lock"
# the Tatoeba data the sweep prepares (b2t_tools/demo/data.py): small vocabulary, a slice of train
DATA = dict(vocab_size=2000, n_valid=300, n_test=100, max_train=40000, seed=1)


# --- options ---------------------------------------------------------------------------------------

def get_parser():
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="stability-out", help="folder for cells, map and JSON (default stability-out)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--corpus", metavar="ZIP", help="Tatoeba deu-eng.zip (default: $B2T_TATOEBA_ZIP, else download)")
    src.add_argument("--data-bin", metavar="DIR", help="any fairseq-preprocess output (one language pair) instead")
    p.add_argument("--large", action="store_true", help="the large grid (all layer types, 7 depths, 5 rates, "
                   "width 512, 4000 updates): for a GPU")
    p.add_argument("--layer-types", help=f"comma list of {', '.join(layer_types.SHORTS)}, or all (default all)")
    p.add_argument("--depths", help=f"comma list of ENC-DEC layer counts (default {GRIDS['default']['depths']})")
    p.add_argument("--lrs", help="comma list of peak learning rates (default 0.002,0.004)")
    p.add_argument("--dim", type=int, help="model width (FFN 4x, width/16 heads, at least 2; default 64)")
    p.add_argument("--max-update", type=int, help="updates per cell (default 100)")
    p.add_argument("--warmup", type=int, help="warm-up updates (default 30)")
    p.add_argument("--max-tokens", type=int, help="tokens per batch (default 1024)")
    p.add_argument("--seed", type=int, default=1)
    prec = p.add_mutually_exclusive_group()
    prec.add_argument("--fp16", action="store_true", help="train on the GPU in fp16")
    prec.add_argument("--bf16", action="store_true", help="train on the GPU with bf16 autocast (--b2t-bf16)")
    p.add_argument("--jobs", type=int, help="cells at a time (default: the CPU cores; 1 on a GPU)")
    return p


EXAMPLES = {"--layer-types": "post_ln,b2t", "--depths": "6-6,18-18", "--lrs": "0.001,0.002"}


def _list(text, flag, conv):
    try:
        items = [conv(x.strip()) for x in text.split(",") if x.strip()]
    except ValueError:
        items = []
    if not items:
        raise ToolError(f"{flag} {text!r} is not a comma list of values; e.g. {flag} {EXAMPLES[flag]}")
    twice = next((x for i, x in enumerate(items) if x in items[:i]), None)
    if twice is not None:  # two forks would run one cell into one folder at once
        shown = f"{twice[0]}-{twice[1]}" if isinstance(twice, tuple) else f"{twice:g}" if isinstance(twice, float) \
            else twice
        raise ToolError(f"{flag} {text} names {shown} twice; name each value once")
    return items


def _depth(text):
    enc, dec = text.split("-")
    enc, dec = int(enc), int(dec)
    if not (1 <= enc <= 200 and 1 <= dec <= 200):
        raise ValueError(text)
    return enc, dec


def _given(value, default):
    """An option's value, the default only when the option was not given (0 or "" is the user's, and checked)."""
    return default if value is None else value


def resolve(args):
    g = dict(GRIDS["large" if args.large else "default"])
    types = _given(args.layer_types, g["types"])
    types = ",".join(layer_types.SHORTS) if types.strip() == "all" else types
    cfg = argparse.Namespace(
        out=Path(args.out), corpus=args.corpus, data_bin=args.data_bin, seed=args.seed,
        types=_list(types, "--layer-types", str),
        depths=_list(_given(args.depths, g["depths"]), "--depths", _depth),
        lrs=_list(_given(args.lrs, g["lrs"]), "--lrs", float),
        dim=_given(args.dim, g["dim"]), max_update=_given(args.max_update, g["max_update"]),
        warmup=_given(args.warmup, g["warmup"]), max_tokens=_given(args.max_tokens, g["max_tokens"]),
        precision="fp16" if args.fp16 else "bf16" if args.bf16 else "cpu",
    )
    if not str(args.out).strip():
        raise ToolError("--out '' names no folder; pass a folder path (it is created if missing)")
    bad = [t for t in cfg.types if t not in layer_types.BY_SHORT]
    if bad:
        raise ToolError(f"--layer-types {bad[0]} is not a layer type; choose from {', '.join(layer_types.SHORTS)}, all")
    if any(not (math.isfinite(lr) and lr > 0) for lr in cfg.lrs):
        raise ToolError(f"--lrs {args.lrs} must be positive numbers; e.g. --lrs 0.001,0.002")
    for flag, v in (("--dim", cfg.dim), ("--max-update", cfg.max_update), ("--max-tokens", cfg.max_tokens),
                    ("--jobs", args.jobs if args.jobs is not None else 1)):
        if v < 1:
            raise ToolError(f"{flag} {v} must be at least 1; leave {flag} out for the default")
    if cfg.warmup < 0:
        raise ToolError(f"--warmup {cfg.warmup} must be 0 or more; leave --warmup out for the default")
    if cfg.dim < 8:
        raise ToolError(f"--dim {cfg.dim} is too narrow; use at least 8")
    cfg.heads = max(2, cfg.dim // 16)
    if cfg.dim % cfg.heads:
        raise ToolError(f"--dim {cfg.dim} is not divisible into {cfg.heads} attention heads; use a multiple of 16")
    cfg.jobs = _given(args.jobs, 1 if cfg.precision != "cpu" else max(1, os.cpu_count() or 1))
    return cfg


# --- data ------------------------------------------------------------------------------------------

def find_data(cfg):
    """The data-bin to train on, its digest (part of every cell's key) and its unigram level."""
    if cfg.data_bin:
        data_bin = Path(cfg.data_bin)
        if not (data_bin / "dict.txt").exists() and not list(data_bin.glob("dict.*.txt")):
            raise ToolError(f"--data-bin {data_bin} holds no fairseq dictionary (dict.*.txt); pass the folder "
                           "fairseq-preprocess wrote (its --destdir)")
    else:
        from ..demo import data

        zip_path = data.find_corpus(cfg.corpus, cfg.out / "cache", log=log)
        data_bin = data.prepare(zip_path, cfg.out / "cache", log=log, **DATA) / "bin"
    digest = json_digest(sorted((f.name, file_digest(f)) for f in data_bin.iterdir() if f.is_file()))
    return data_bin, digest, unigram_level(data_bin)


def unigram_level(data_bin):
    """The unigram level of the valid targets (b2t_fairseq/unigram.py: the one definition the monitor and
    the demo use too): what a model that learned word frequencies only reaches."""
    try:
        return unigram.of_data_bin(data_bin, "valid")
    except B2TError as e:
        raise ToolError(f"--data-bin {e}") from None


# --- cells -----------------------------------------------------------------------------------------

def cells(cfg, digest):
    out = []
    for t in cfg.types:
        for enc, dec in cfg.depths:
            for lr in cfg.lrs:
                shape = dict(layer_type=t, encoder_layers=enc, decoder_layers=dec, lr=lr, dim=cfg.dim,
                             heads=cfg.heads, max_update=cfg.max_update, warmup=cfg.warmup,
                             max_tokens=cfg.max_tokens, seed=cfg.seed, precision=cfg.precision, data=digest)
                key = json_digest(shape)
                out.append(dict(shape, key=key, name=f"{t}-{enc}-{dec}-lr{lr:g}-{key[:8]}"))
    return out


def train_command(cell, data_bin, cell_dir):
    d = cell["dim"]
    cmd = [str(data_bin),
           "--arch", f"transformer_{cell['layer_type']}_tiny", "--share-all-embeddings",
           "--encoder-layers", cell["encoder_layers"], "--decoder-layers", cell["decoder_layers"],
           "--encoder-embed-dim", d, "--decoder-embed-dim", d, "--encoder-ffn-embed-dim", 4 * d,
           "--decoder-ffn-embed-dim", 4 * d, "--encoder-attention-heads", cell["heads"],
           "--decoder-attention-heads", cell["heads"], "--dropout", "0.1",
           "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)", "--lr", cell["lr"],
           "--lr-scheduler", "inverse_sqrt", "--warmup-updates", cell["warmup"], "--warmup-init-lr", "1e-07",
           "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1",
           "--max-tokens", cell["max_tokens"], "--max-update", cell["max_update"], "--seed", cell["seed"],
           "--save-dir", cell_dir / "checkpoints", "--no-save", "--num-workers", "0", "--no-progress-bar",
           "--log-format", "json", "--log-interval", "10", "--skip-invalid-size-inputs-valid-test",
           # norms in the log, and a non-finite loss named in one line (patches/layer_monitor.py); the
           # unigram rule is off: the map judges the final valid loss itself
           "--log-layer-norms", "--divergence-patience", "0"]
    cmd += {"cpu": ["--cpu"], "fp16": ["--fp16"], "bf16": ["--b2t-bf16"]}[cell["precision"]]
    return [str(c) for c in cmd]


def finished(cell, cfg):
    """The record of a finished cell with this key, or None."""
    cell_dir = cfg.out / "cells" / cell["name"]
    try:
        rec = json.loads((cell_dir / "cell.json").read_text())
    except (OSError, ValueError):
        return None  # not run, stopped, or damaged: run it (again)
    if rec.get("key") != cell["key"] or "returncode" not in rec:
        return None
    if "descending" not in rec:  # recorded before the under-trained state: read its log again
        try:
            rec.update(read_log((cell_dir / "train.log").read_text(errors="replace").splitlines()))
        except OSError:
            return None
    return rec


def _train_in_child(cell, argv, log_path, threads):
    """One cell in a forked child (fairseq is imported once, in the parent): b2t-train in-process, its
    output into the cell's train.log, (wall, CPU) seconds into times.json; never returns."""
    rc = 1
    try:
        import torch

        from ..commands import cli
        from ..demo import children

        children._die_with(os.getppid())()  # a killed sweep takes its cells down with it
        torch.set_num_threads(threads)
        t0, c0 = time.time(), time.process_time()
        with open(log_path, "w") as f:
            os.dup2(f.fileno(), 1)
            os.dup2(f.fileno(), 2)
        try:
            rc = cli.train(argv)
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else 1
        except BaseException as e:  # noqa: BLE001 - recorded as a failed cell
            print(f"{PROG}: error: {type(e).__name__}: {e}", flush=True)
            rc = 1
        write_json(Path(log_path).with_name("times.json"), [time.time() - t0, time.process_time() - c0])
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(rc or 0)  # no atexit handlers of the parent's in the child


def run_cells(jobs, n_parallel, on_done):
    """Fork one child per cell from this (single-threaded) process, n_parallel at a time."""
    running = {}
    try:
        for job in jobs:
            while len(running) >= n_parallel:
                pid, st = os.wait()
                if pid in running:
                    on_done(running.pop(pid), os.waitstatus_to_exitcode(st))
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                _train_in_child(*job)
            running[pid] = job
        while running:
            pid, st = os.wait()
            if pid in running:
                on_done(running.pop(pid), os.waitstatus_to_exitcode(st))
    except BaseException:
        for pid in running:
            try:
                os.kill(pid, 9)
            except OSError:
                pass
        raise


def record(cell, rc, seconds, cfg, unigram):
    cell_dir = cfg.out / "cells" / cell["name"]
    lines = (cell_dir / "train.log").read_text(errors="replace").splitlines()
    rec = dict(cell, seconds=round(seconds[0], 1), cpu_seconds=round(seconds[1], 1), returncode=rc, **read_log(lines))
    rec["status"] = status(rec, unigram)
    write_json(cell_dir / "cell.json", rec)
    log(f"  {cell['name']}: {rec['status']}, valid loss {rec['valid_nll_loss']} ({rec['seconds']:.0f} s)")
    return rec


def read_log(lines):
    """Final train and valid losses, the last update, whether the training loss was still falling at the
    end, and the one-line error of a failed run."""
    train, valid, error, updates, curve = None, None, None, 0, []
    for kind, rec in parse_json_log(lines):
        if kind == "train_inner":
            train, updates = rec, max(updates, int(float(rec["num_updates"])))
            curve.append(rec.get("nll_loss", rec.get("loss")))
        elif kind == "valid":
            valid, updates = rec, max(updates, int(float(rec.get("valid_num_updates", 0))))
    for line in lines:
        if ": error: " in line:
            error = line.split(": error: ", 1)[1].strip()[:400]

    def num(rec, key):
        try:
            v = float(rec[key])
        except (TypeError, KeyError, ValueError):
            return None
        return v if math.isfinite(v) else None

    return dict(updates=updates, train_nll_loss=num(train, "nll_loss"), valid_nll_loss=num(valid, "valid_nll_loss"),
                valid_loss=num(valid, "valid_loss"), error=error, descending=descending(curve))


def descending(losses):
    """The logged training losses were still falling at the end: the mean of the last third is below the
    mean of the third before it by more than 1% (batch noise is not a trend), every loss finite."""
    try:
        xs = [float(x) for x in losses]
    except (TypeError, ValueError):
        return False
    k = len(xs) // 3
    if k < 1 or not all(math.isfinite(x) for x in xs):
        return False
    last, before = sum(xs[-k:]) / k, sum(xs[-2 * k:-k]) / k
    return last < 0.99 * before


def status(rec, unigram):
    """ok (valid loss below the unigram level), under-trained (not below it yet, training loss still
    falling), diverged (non-finite, or stuck at or above it), or failed (the run stopped on an error)."""
    if rec["error"] and "training diverged" in rec["error"]:
        return "diverged"
    if rec["returncode"] != 0:
        return "failed"
    if rec["valid_nll_loss"] is not None and rec["valid_nll_loss"] < unigram:
        return "ok"
    return "under-trained" if rec["valid_nll_loss"] is not None and rec.get("descending") else "diverged"


def open_out(out):
    """Make --out and lock it for this sweep: two sweeps in one folder would run the same cells into the
    same files at once. flock: the kernel drops it when the process ends, however it ends."""
    if out.exists() and not out.is_dir():
        raise ToolError(f"--out {out} is a file, not a folder; pass a folder path (it is created if missing)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        f = open(out / LOCK_NAME, "a+")
    except OSError as e:
        raise ToolError(f"cannot use --out {out} ({e.strerror}); pass a folder you can write to") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise ToolError(f"--out {out} is in use by another {PROG} sweep; wait for it to finish, or pass "
                       "another --out") from None
    return f


# --- the sweep -------------------------------------------------------------------------------------

def sweep(cfg):
    lock = open_out(cfg.out)
    try:
        return _sweep(cfg)
    finally:
        lock.close()


def _sweep(cfg):
    import fairseq_cli.train  # noqa: F401  (imported once here; every forked cell starts with it)

    t0 = time.time()
    data_bin, digest, unigram = find_data(cfg)
    grid = cells(cfg, digest)
    done = {c["key"]: finished(c, cfg) for c in grid}
    todo = sorted((c for c in grid if done[c["key"]] is None),
                  key=lambda c: -(c["encoder_layers"] + c["decoder_layers"]))  # longest first
    log(f"{PROG}: {len(grid)} cells ({len(grid) - len(todo)} done before), {min(cfg.jobs, max(1, len(todo)))} at a "
        f"time; unigram level {unigram:.3f} bits/token")
    threads = max(1, (os.cpu_count() or 1) // cfg.jobs)
    jobs = []
    for c in todo:
        (cfg.out / "cells" / c["name"]).mkdir(parents=True, exist_ok=True)
        jobs.append((c, train_command(c, data_bin, cfg.out / "cells" / c["name"]),
                     cfg.out / "cells" / c["name"] / "train.log", threads))
    by_key = {c["key"]: c for c in grid}

    def finish(job, rc):
        cell = job[0]
        try:
            seconds = json.loads((Path(job[2]).with_name("times.json")).read_text())
        except (OSError, ValueError):
            seconds = [math.nan, math.nan]
        done[cell["key"]] = record(by_key[cell["key"]], rc, seconds, cfg, unigram)

    # one fresh fork per cell: no fairseq state carries over from one cell to the next
    run_cells(jobs, cfg.jobs, finish)
    records = [dict(done[c["key"]], status=status(done[c["key"]], unigram)) for c in grid]
    seconds = time.time() - t0
    summary = dict(grid=dict(layer_types=cfg.types, depths=[f"{e}-{d}" for e, d in cfg.depths], lrs=cfg.lrs,
                             dim=cfg.dim, heads=cfg.heads, max_update=cfg.max_update, warmup=cfg.warmup,
                             max_tokens=cfg.max_tokens, seed=cfg.seed, precision=cfg.precision, jobs=cfg.jobs),
                   unigram_bits=unigram, data=digest, wall_seconds=round(seconds, 1),
                   cells_cpu_seconds=round(sum(r.get("cpu_seconds") or 0 for r in records), 1),
                   cells_wall_seconds=round(sum(r.get("seconds") or 0 for r in records), 1), machine=machine(),
                   cells=[{k: v for k, v in r.items() if k != "name"} for r in records])
    write_json(cfg.out / "stability.json", summary)
    draw_map(records, cfg, unigram, cfg.out / "stability.png")
    for t in cfg.types:
        row = [r for r in records if r["layer_type"] == t]
        under = sum(r["status"] == "under-trained" for r in row)
        log(f"  {layer_types.BY_SHORT[t].label}: {sum(r['status'] == 'diverged' for r in row)}/{len(row)} diverged"
            + (f", {under} under-trained (still learning at the end: more --max-update)" if under else ""))
    log(f"map: {cfg.out / 'stability.png'}, cells: {cfg.out / 'stability.json'} ({seconds / 60:.1f} min)")
    return summary


def _logging_like_fairseq():
    """fairseq's lines (the data it loads) as fairseq prints them, on stdout; no DEBUG chatter of
    matplotlib's under the DEBUG root level that importing fairseq's models leaves."""
    import logging

    fairseq_logging(sys.stdout)
    for name in ("matplotlib", "PIL"):
        logging.getLogger(name).setLevel(logging.WARNING)


def main(argv=None):
    _logging_like_fairseq()
    return run_command(PROG, lambda a: sweep(resolve(get_parser().parse_args(a))),
                       sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
