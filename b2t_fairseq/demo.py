"""``b2t-demo``: the paper's comparison in miniature, on Tatoeba English-German, on a CPU.

Trains Post-LN, Pre-LN and B2T transformers at a shallow and a deep depth with the same budget
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
import math
import os
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from . import grad_norms, tatoeba
from .errors import B2TError, fail

ARCHS = ("post_ln", "pre_ln", "b2t")
LABELS = grad_norms.LABELS
PROG = "b2t-demo"

# budgets: the default fits in about 15 minutes on 2 cores, --quick in about 3 (data prep included)
PRESETS = {
    "default": dict(depths=(6, 18), max_update=150, max_tokens=2048, lr=2e-3, warmup=40, vocab=4000, n_valid=500,
                    n_test=500, max_train=None, valid_every=30, gn_batches=2),
    "quick": dict(depths=(6, 18), max_update=60, max_tokens=1536, lr=2e-3, warmup=40, vocab=2000, n_valid=200,
                  n_test=100, max_train=20000, valid_every=30, gn_batches=2),
}

_print_lock = threading.Lock()


def log(msg):
    with _print_lock:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --- training ------------------------------------------------------------------------------------

def train_command(data_bin, run_dir, arch, layers, cfg):
    """The b2t-train command line of one run."""
    cmd = [sys.executable, "-m", "b2t_fairseq.demo", "--_train", str(data_bin),
           "--arch", f"transformer_{arch}_tiny", "--encoder-layers", str(layers), "--decoder-layers", str(layers),
           "--encoder-embed-dim", str(cfg.dim), "--decoder-embed-dim", str(cfg.dim),
           "--encoder-ffn-embed-dim", str(4 * cfg.dim), "--decoder-ffn-embed-dim", str(4 * cfg.dim),
           "--encoder-attention-heads", str(cfg.heads), "--decoder-attention-heads", str(cfg.heads),
           "--dropout", str(cfg.dropout), "--share-all-embeddings",
           "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)", "--clip-norm", "0.1", "--weight-decay", "0.0",
           "--lr", str(cfg.lr), "--lr-scheduler", "inverse_sqrt", "--warmup-updates", str(cfg.warmup),
           "--warmup-init-lr", "1e-07", "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1",
           "--max-tokens", str(cfg.max_tokens), "--max-update", str(cfg.max_update), "--seed", str(cfg.seed),
           "--save-dir", str(run_dir), "--no-epoch-checkpoints", "--save-interval-updates", str(cfg.valid_every),
           "--keep-interval-updates", "1", "--validate-interval-updates", str(cfg.valid_every),
           "--log-format", "json", "--log-interval", "5", "--num-workers", "0", "--no-progress-bar"]
    cmd += ["--fp16"] if cfg.fp16 else ["--cpu"]
    return cmd


_JSON_LINE = re.compile(r"\b(train_inner|valid|train)\b\s*[|:]\s*(\{.*\})\s*$")


def parse_log(lines):
    """fairseq json log lines -> {"train": [...], "valid": [...], "error": str or None}; later lines win per update."""
    train, valid, error = {}, {}, None
    for line in lines:
        m = _JSON_LINE.search(line)
        if m:
            try:
                rec = json.loads(m.group(2))
            except ValueError:
                continue
            if m.group(1) == "train_inner":
                train[int(float(rec["num_updates"]))] = _floats(rec, "loss", "nll_loss", "lr", "gnorm")
            elif m.group(1) == "valid":
                valid[int(float(rec["valid_num_updates"]))] = _floats(rec, "valid_loss", "valid_nll_loss")
        elif "FloatingPointError" in line or "Nan/Inf" in line or "non-finite" in line:
            error = line.strip()[-200:]
    return {"train": [dict(num_updates=k, **v) for k, v in sorted(train.items())],
            "valid": [dict(num_updates=k, **v) for k, v in sorted(valid.items())], "error": error}


def _floats(rec, *keys):
    out = {}
    for k in keys:
        try:
            out[k] = float(rec[k])
        except (KeyError, ValueError, TypeError):
            pass
    return out


def run_training(cmd, run_dir, name, cfg, env):
    """Run b2t-train, append its output to train.log, show progress; returns (returncode, seconds)."""
    t0 = time.time()
    with open(run_dir / "train.log", "a") as logf:
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        try:
            for line in p.stdout:
                logf.write(line)
                m = _JSON_LINE.search(line)
                if m and m.group(1) in ("train_inner", "valid"):
                    rec = json.loads(m.group(2))
                    if m.group(1) == "valid":
                        log(f"  {name}: update {rec.get('valid_num_updates')}/{cfg.max_update} "
                            f"valid loss {rec.get('valid_loss')}")
                    elif int(float(rec["num_updates"])) % 25 == 0:
                        log(f"  {name}: update {rec['num_updates']}/{cfg.max_update} train loss {rec['loss']}")
            p.wait()
        finally:
            if p.poll() is None:
                p.kill()
    return p.returncode, time.time() - t0


# --- evaluation ----------------------------------------------------------------------------------

def translate_and_score(data_bin, raw_dir, checkpoint, cfg, env):
    """Beam search on the test split, sentencepiece removed; sacreBLEU (13a) against the raw references."""
    import sacrebleu

    cmd = [sys.executable, "-m", "b2t_fairseq.demo", "--_generate", str(data_bin), "--path", str(checkpoint),
           "--gen-subset", "test", "--beam", "4", "--lenpen", "1.0", "--batch-size", "64",
           "--max-len-a", "1.5", "--max-len-b", "10", "--post-process", "sentencepiece", "--num-workers", "0"]
    cmd += ["--fp16"] if cfg.fp16 else ["--cpu"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise B2TError(f"b2t-generate failed on {checkpoint}: {p.stderr.strip().splitlines()[-1:]}; "
                       "delete that run's folder and run b2t-demo again")
    hyps = {}
    for line in p.stdout.splitlines():
        if line.startswith("D-"):
            idx, _, text = line[2:].split("\t", 2) + [""] * (3 - len(line[2:].split("\t", 2)))
            hyps[int(idx)] = text
    refs = (raw_dir / "test.de").read_text(encoding="utf-8").splitlines()
    out = [hyps.get(i, "") for i in range(len(refs))]
    return sacrebleu.corpus_bleu(out, [refs]).score, out


def count_params(checkpoint):
    import torch

    from . import compat  # noqa: F401

    state = torch.load(checkpoint, map_location="cpu")["model"]
    seen, n = set(), 0
    for t in state.values():
        key = (t.data_ptr(), t.shape)
        if key not in seen:  # shared embeddings are stored once
            seen.add(key)
            n += t.numel()
    return n


# --- one run -------------------------------------------------------------------------------------

def do_run(arch, layers, data_root, out, cfg, unigram_bits):
    name = f"{arch}-{layers}L"
    run_dir = out / "runs" / name
    done = run_dir / "result.json"
    if done.is_file():
        log(f"{name}: finished earlier, reusing {done}")
        return json.loads(done.read_text())
    run_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(cfg.threads), MKL_NUM_THREADS=str(cfg.threads))
    resumed = (run_dir / "checkpoint_last.pt").is_file()
    log_text = (run_dir / "train.log").read_text(errors="replace") if (run_dir / "train.log").is_file() else ""
    if resumed and "done training" in log_text:
        # training had finished when the demo was stopped; fairseq restarted at max_update would
        # run one update more, so go straight to the evaluation
        rc, secs = 0, 0.0
    else:
        log(f"{name}: training{' (resuming)' if resumed else ''}, {cfg.max_update} updates")
        rc, secs = run_training(train_command(data_root / "bin", run_dir, arch, layers, cfg), run_dir, name, cfg,
                                env)
    prev = json.loads((run_dir / "seconds.json").read_text()) if (run_dir / "seconds.json").is_file() else 0.0
    secs += prev
    (run_dir / "seconds.json").write_text(json.dumps(secs))
    curves = parse_log((run_dir / "train.log").read_text(errors="replace").splitlines())
    crashed = rc != 0
    if crashed and not curves["error"]:
        tail = (run_dir / "train.log").read_text(errors="replace").strip().splitlines()[-1:]
        raise B2TError(f"training {name} failed (exit {rc}: {tail}); see {run_dir / 'train.log'}, "
                       "then run b2t-demo again to resume")
    rec = summarize(arch, layers, curves, secs, unigram_bits, cfg)
    ckpt = run_dir / "checkpoint_last.pt"
    rec["params"] = count_params(ckpt) if ckpt.is_file() else None
    if rec["diverged"] and (crashed or not ckpt.is_file()):
        rec["bleu"] = 0.0
    else:
        log(f"{name}: translating {cfg.n_test} test sentences (beam 4)")
        rec["bleu"], hyps = translate_and_score(data_root / "bin", data_root / "raw", ckpt, cfg, env)
        (run_dir / "test.hyp.de").write_text("\n".join(hyps) + "\n", encoding="utf-8")
    rec["curves"] = curves
    for extra in list(run_dir.glob("checkpoint_*_*.pt")) + [run_dir / "checkpoint_best.pt"]:
        extra.unlink(missing_ok=True)  # checkpoint_last.pt is all the report and a re-run need
    tmp = run_dir / "result.json.tmp"
    tmp.write_text(json.dumps(rec, indent=1))
    os.replace(tmp, done)
    log(f"{name}: done in {secs:.0f}s, valid loss {rec['valid_loss']}, BLEU {rec['bleu']:.2f}"
        f"{', DIVERGED' if rec['diverged'] else ''}")
    return rec


def summarize(arch, layers, curves, secs, unigram_bits, cfg):
    train, valid = curves["train"], curves["valid"]
    last_t = train[-1] if train else {}
    last_v = valid[-1] if valid else {}
    losses = [r.get("loss", math.nan) for r in train] + [r.get("valid_loss", math.nan) for r in valid]
    nonfinite = any(not math.isfinite(x) for x in losses) or curves["error"] is not None
    v_nll = last_v.get("valid_nll_loss", math.nan)
    not_learning = not (v_nll < unigram_bits)  # NaN counts as not learning
    return {"arch": arch, "label": LABELS[arch], "layers": layers, "updates": last_t.get("num_updates", 0),
            "wall_s": round(secs, 1), "train_loss": last_t.get("loss"), "valid_loss": last_v.get("valid_loss"),
            "valid_nll_loss": v_nll if math.isfinite(v_nll) else None, "unigram_bits": unigram_bits,
            "diverged": bool(nonfinite or not_learning),
            "diverged_why": ("non-finite loss/gradient" if nonfinite else
                             "valid nll not below unigram level" if not_learning else None)}


# --- report --------------------------------------------------------------------------------------

TABLE_COLS = ("arch", "layers", "params", "updates", "wall_s", "train_loss", "valid_loss", "bleu", "diverged")


def table_md(records):
    head = "| architecture | layers (enc+dec) | parameters | updates | wall time (s) | train loss | valid loss | " \
           "BLEU | diverged |"
    rows = [head, "|" + "---|" * 9]
    for r in records:
        fmt = lambda v, d=3: "n/a" if v is None else f"{v:.{d}f}"  # noqa: E731
        params = f"{r['params']:,}" if r["params"] else "n/a"
        rows.append(f"| {r['label']} | {r['layers']}+{r['layers']} | {params} | {r['updates']} | "
                    f"{r['wall_s']:.0f} | {fmt(r['train_loss'])} | {fmt(r['valid_loss'])} | {fmt(r['bleu'], 2)} | "
                    f"{'yes' if r['diverged'] else 'no'} |")
    return "\n".join(rows) + "\n"


def plot_curves(records, path):
    import logging

    import matplotlib

    matplotlib.use("Agg")
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    import matplotlib.pyplot as plt

    depths = sorted({r["layers"] for r in records})
    fig, axes = plt.subplots(1, len(depths), figsize=(6 * len(depths), 4.2), squeeze=False)
    colors = {"post_ln": "tab:red", "pre_ln": "tab:blue", "b2t": "tab:green"}
    for ax, d in zip(axes[0], depths):
        for r in (r for r in records if r["layers"] == d):
            c = r["curves"]
            ax.plot([p["num_updates"] for p in c["train"]], [p.get("loss") for p in c["train"]], color=colors[r["arch"]],
                    alpha=0.5, label=f"{r['label']} train")
            ax.plot([p["num_updates"] for p in c["valid"]], [p.get("valid_loss") for p in c["valid"]], "o-",
                    color=colors[r["arch"]], label=f"{r['label']} valid")
        ax.axhline(records[0]["unigram_bits"], color="gray", ls=":", label="unigram level (valid nll)")
        ax.set_title(f"{d}+{d} layers")
        ax.set_xlabel("updates")
        ax.set_ylabel("label-smoothed loss (bits/token)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(out, records, cfg, meta, total_s, gn_files):
    public = [{k: v for k, v in r.items() if k != "curves"} for r in records]
    payload = {"runs": public, "config": vars(cfg) | {"depths": list(cfg.depths)}, "data": meta,
               "total_wall_s": round(total_s, 1), "machine": machine()}
    _atomic_write(out / "results.json", json.dumps(payload, indent=1))
    _atomic_write(out / "results.md", table_md(records))
    plot_curves(records, out / "loss_curves.png")
    page = [f"# b2t-demo report{' (--quick)' if cfg.quick else ''}", "",
            f"Tatoeba English-German: {meta['pairs']['train']:,} training pairs, {meta['pairs']['valid']} valid, "
            f"{meta['pairs']['test']} test; joint sentencepiece vocabulary of {meta['vocab_size']}. "
            f"Every run: width {cfg.dim}, {cfg.max_update} updates of up to {cfg.max_tokens} tokens, "
            f"Adam lr {cfg.lr} with {cfg.warmup} warmup updates (inverse sqrt), label smoothing 0.1, "
            f"seed {cfg.seed}. Losses are fairseq's (base 2, label-smoothed); BLEU is sacreBLEU (13a) on "
            f"detokenized beam-4 output of the test split.", "",
            table_md(records), "",
            f"Diverged = non-finite loss, or final valid nll_loss not below the unigram level "
            f"({meta['unigram_valid_xent_bits']:.2f} bits/token).", "",
            f"Machine: {machine()}; total wall time {total_s / 60:.1f} min.", "",
            "## Loss curves", "", "![loss curves](loss_curves.png)", ""]
    for title, png in gn_files:
        page += [f"## {title}", "", f"![{title}]({png})", ""]
    _atomic_write(out / "index.md", "\n".join(page))


def machine():
    import platform

    import torch

    return (f"{platform.machine()} {os.cpu_count()} CPU cores, torch {torch.__version__}, "
            f"{'CUDA ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'}")


def _atomic_write(path, text):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# --- gradient norms ------------------------------------------------------------------------------

def do_grad_norms(out, data_root, cfg, records):
    """Fresh-init and trained gradient norms of the deep models (cached in OUT/grad_norms_*.json)."""
    deep = max(cfg.depths)
    model_args = ["--encoder-embed-dim", str(cfg.dim), "--decoder-embed-dim", str(cfg.dim),
                  "--encoder-ffn-embed-dim", str(4 * cfg.dim), "--decoder-ffn-embed-dim", str(4 * cfg.dim),
                  "--encoder-attention-heads", str(cfg.heads), "--decoder-attention-heads", str(cfg.heads)]
    files = []
    for kind, title in (("init", f"Gradient norms at initialization, {deep}+{deep} layers"),
                        ("trained", f"Gradient norms after training, {deep}+{deep} layers")):
        js = out / f"grad_norms_{kind}.json"
        if kind == "init":
            specs = [(a, f"transformer_{a}_tiny", None) for a in cfg.archs]
        else:
            specs = [(r["arch"], None, out / "runs" / f"{r['arch']}-{deep}L" / "checkpoint_last.pt")
                     for r in records if r["layers"] == deep]
            specs = [s for s in specs if s[2].is_file()]
        if not specs or (kind == "trained" and cfg.quick):
            continue
        if js.is_file():
            res = json.loads(js.read_text())
        else:
            log(f"gradient norms ({kind}, {deep} layers)")
            res = grad_norms.run_models(data_root / "bin", specs, layers=deep, model_args=model_args,
                                        k=cfg.gn_batches, max_tokens=cfg.max_tokens, seed=cfg.seed,
                                        log=lambda m: log("  " + m))
            grad_norms.write_json(res, js)
        grad_norms.write_csv(res, out / f"grad_norms_{kind}.csv")
        grad_norms.plot(res, out / f"grad_norms_{kind}.png", title=title)
        files.append((title, f"grad_norms_{kind}.png"))
    return files


# --- command line --------------------------------------------------------------------------------

def get_parser():
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", metavar="ZIP", help="Tatoeba deu-eng.zip (default: $B2T_TATOEBA_ZIP, else download)")
    p.add_argument("--out", default="demo-out", help="report folder (default: demo-out)")
    p.add_argument("--cache", metavar="DIR", help="prepared data cache (default: OUT/cache)")
    p.add_argument("--quick", action="store_true", help="a ~3-minute version on a slice of the data (for tests)")
    p.add_argument("--archs", default=",".join(ARCHS), help="comma list of post_ln, pre_ln, b2t")
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
    bad = [a for a in args.archs if a not in ARCHS]
    if bad:
        raise B2TError(f"unknown --archs {','.join(bad)}; choose from {','.join(ARCHS)}")
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


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["--_train"], ["--_generate"]):  # internal: fairseq's command line with the plugin
        from . import cli

        return cli.train(argv[1:]) if argv[0] == "--_train" else cli.generate(argv[1:])
    args = get_parser().parse_args(argv)
    t0 = time.time()
    try:
        cfg = resolve_config(args)
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        cache = Path(cfg.cache) if cfg.cache else out / "cache"
        zip_path = tatoeba.find_corpus(cfg.corpus, cache, log=log)
        data_root = tatoeba.prepare(zip_path, cache, vocab_size=cfg.vocab, n_valid=cfg.n_valid, n_test=cfg.n_test,
                                    max_train=cfg.max_train, seed=cfg.seed, log=log)
        meta = json.loads((data_root / "meta.json").read_text())
        unigram = meta["unigram_valid_xent_bits"]
        jobs = [(a, d) for d in sorted(cfg.depths, reverse=True) for a in cfg.archs]  # longest runs first
        log(f"{len(jobs)} runs, {cfg.jobs} at a time with {cfg.threads} thread(s) each; report in {out}")
        with ThreadPoolExecutor(cfg.jobs) as pool:
            results = list(pool.map(lambda j: do_run(j[0], j[1], data_root, out, cfg, unigram), jobs))
        order = {a: i for i, a in enumerate(ARCHS)}
        records = sorted(results, key=lambda r: (r["layers"], order[r["arch"]]))
        gn_files = do_grad_norms(out, data_root, cfg, records) if cfg.grad_norms else []
        write_report(out, records, cfg, meta, time.time() - t0, gn_files)
    except B2TError as e:
        fail(PROG, str(e))
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; run the same command again to resume (finished runs are kept)", file=sys.stderr)
        return 130
    print(table_md(records))
    log(f"report: {out / 'index.md'} ({(time.time() - t0) / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
