"""One demo run: train with b2t-train in a subprocess, follow its json log, translate, score.

A run keeps its checkpoints in ``OUT/runs/NAME-KEY``, KEY being a hash of everything that shapes
the run (its whole b2t-train and b2t-generate command lines but the paths, and the prepared data's
tag); its ``result.json`` (which repeats the key) is written last, so an interrupted demo run again
skips finished runs of the same configuration and resumes unfinished ones from checkpoint_last.pt,
and a run with other options never reuses them.

The run's state (updates done, finished or not, last validation loss) is read from its
checkpoint_last.pt, not from the log: b2t-train writes its own log (train.log, line-buffered)
and the curves keep only the records up to the checkpoint's update.
"""

import json
import math
import os
import subprocess
import sys
import time

from b2t_fairseq import layer_types, recipe

from ..checkpoints import position, read_checkpoint
from ..errors import ToolError
from ..util import (
    atomic_write,
    json_digest,
    log,
    parse_generate_output,
    parse_json_log,
    write_json,
)
from . import children

LABELS = {t.short: t.label for t in layer_types.LAYER_TYPES}


# --- training ------------------------------------------------------------------------------------

def train_command(data_bin, run_dir, arch, layers, cfg):
    """The b2t-train command line of one run."""
    if _lm(cfg):
        from .lm import train_argv

        model = train_argv(arch, layers, cfg)
    else:
        model = ["--arch", f"transformer_{arch}_tiny", "--encoder-layers", str(layers), "--decoder-layers", str(layers),
                 "--encoder-embed-dim", str(cfg.dim), "--decoder-embed-dim", str(cfg.dim),
                 "--encoder-ffn-embed-dim", str(4 * cfg.dim), "--decoder-ffn-embed-dim", str(4 * cfg.dim),
                 "--encoder-attention-heads", str(cfg.heads), "--decoder-attention-heads", str(cfg.heads),
                 "--dropout", str(cfg.dropout), *recipe.optimizer_argv(lr=cfg.lr, warmup=cfg.warmup)]
    cmd = [sys.executable, "-m", "b2t_tools.commands.cli", "train", str(data_bin), *model,
           "--max-tokens", str(cfg.max_tokens), "--max-update", str(cfg.max_update), "--seed", str(cfg.seed),
           "--save-dir", str(run_dir), "--no-epoch-checkpoints", "--save-interval-updates", str(cfg.valid_every),
           "--keep-interval-updates", "1", "--validate-interval-updates", str(cfg.valid_every),
           "--log-format", "json", "--log-interval", "5", "--num-workers", "0", "--no-progress-bar",
           # per-layer norms in the log for the report's heat map; a non-finite loss named in one line
           "--log-layer-norms", "--on-divergence", "warn", "--divergence-patience", "0"]
    cmd += ["--fp16"] if cfg.fp16 else ["--cpu"]
    return cmd


def _lm(cfg):
    return getattr(cfg, "task", "mt") == "lm"  # b2t-demo --task lm (demo/lm.py)


def parse_log(lines):
    """fairseq json log lines -> {"train": [...], "valid": [...], "error": str or None}; later lines win per update."""
    train, valid, error = {}, {}, None
    for line in lines:
        recs = parse_json_log([line])
        if recs:
            kind, rec = recs[0]
            if kind == "train_inner":
                train[int(float(rec["num_updates"]))] = _floats(rec, "loss", "nll_loss", "lr", "gnorm")
            elif kind == "valid":
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


def _progress(line, name, cfg):
    for kind, rec in parse_json_log([line]):
        if kind == "valid":
            log(f"  {name}: update {rec.get('valid_num_updates')}/{cfg.max_update} "
                f"valid loss {rec.get('valid_loss')}")
        elif kind == "train_inner" and int(float(rec["num_updates"])) % 25 == 0:
            log(f"  {name}: update {rec['num_updates']}/{cfg.max_update} train loss {rec['loss']}")
    if getattr(cfg, "verbose", False):
        log(f"  {name}| {line.rstrip()}")


def run_training(cmd, run_dir, name, cfg, env):
    """Run b2t-train with its output appended to train.log (written by the child itself, unbuffered,
    so nothing is lost when the demo is killed); follow the file for progress lines.

    Returns (returncode, seconds); raises children.Stopped when the demo is being stopped.
    """
    t0 = time.time()
    path = run_dir / "train.log"
    with open(path, "ab") as logf:
        start = logf.tell()
        p = children.popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=dict(env, PYTHONUNBUFFERED="1"))
    try:
        with open(path, "rb") as f:
            f.seek(start)
            buf = b""
            while True:
                finished = p.poll() is not None
                buf += f.read()
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    _progress(line.decode("utf-8", "replace"), name, cfg)
                if finished:
                    break
                time.sleep(0.3)
    finally:
        if p.poll() is None:
            children.stop_group(p)
        children.forget(p)
    if children.STOPPING.is_set():
        raise children.Stopped()
    return p.returncode, time.time() - t0


# --- evaluation ----------------------------------------------------------------------------------

def generate_command(data_bin, checkpoint, cfg):
    cmd = [sys.executable, "-m", "b2t_tools.commands.cli", "generate", str(data_bin), "--path", str(checkpoint),
           "--gen-subset", "test", "--beam", "4", "--lenpen", "1.0", "--batch-size", "64",
           "--max-len-a", "1.5", "--max-len-b", "10", "--post-process", "sentencepiece", "--num-workers", "0"]
    return cmd + (["--fp16"] if cfg.fp16 else ["--cpu"])


def translate_and_score(data_bin, raw_dir, checkpoint, cfg, env):
    """Beam search on the test split, sentencepiece removed; sacreBLEU (13a) against the raw references."""
    import sacrebleu

    p = children.run(generate_command(data_bin, checkpoint, cfg), env=env)
    if p.returncode != 0:
        raise ToolError(f"b2t-generate failed on {checkpoint}: {p.stderr.strip().splitlines()[-1:]}; "
                       "delete that run's folder and run b2t-demo again")
    hyps = parse_generate_output(p.stdout, "D")
    refs = (raw_dir / "test.de").read_text(encoding="utf-8").splitlines()
    out = [hyps.get(i, "") for i in range(len(refs))]
    return sacrebleu.corpus_bleu(out, [refs]).score, out


def checkpoint_state(checkpoint):
    """What a checkpoint says about its run: updates done, last validation loss, parameter count."""
    state = read_checkpoint(str(checkpoint), f"delete {checkpoint.parent} and run b2t-demo again", flag="checkpoint")
    model, extra = state["model"], state.get("extra_state") or {}
    seen, n = set(), 0
    for t in model.values():
        key = (t.data_ptr(), t.shape)
        if key not in seen:  # shared embeddings are stored once
            seen.add(key)
            n += t.numel()
    val = extra.get("val_loss")
    return {"updates": int(position(state)[1] or 0), "params": n,
            "val_loss": float(val) if isinstance(val, (int, float)) else None}


def count_params(checkpoint):
    return checkpoint_state(checkpoint)["params"]


def run_key(arch, layers, data_root, cfg):
    """A hash of everything that shapes a run: its train and generate command lines (paths left out:
    every other option is in them) and the prepared data's tag (corpus digest, splits, vocabulary, seed)."""
    shape = {"train": train_command("DATA", "RUN", arch, layers, cfg)[1:],
             "generate": generate_command("DATA", "CKPT", cfg)[1:], "data": data_root.name}
    return json_digest(shape, 10)


def truncate_curves(curves, updates):
    """Only the log records up to the checkpoint's update: later ones came from a run killed before saving."""
    return dict(curves, train=[r for r in curves["train"] if r["num_updates"] <= updates],
                valid=[r for r in curves["valid"] if r["num_updates"] <= updates])


# --- one run -------------------------------------------------------------------------------------

def do_run(arch, layers, data_root, out, cfg, unigram_bits):
    if children.STOPPING.is_set():
        raise children.Stopped()
    key = run_key(arch, layers, data_root, cfg)
    name = f"{arch}-{layers}L"
    run_dir = out / "runs" / f"{name}-{key}"
    done = run_dir / "result.json"
    if done.is_file():
        rec = _read_json(done, {})
        if rec.get("key") == key:
            log(f"{name}: finished earlier with the same options, reusing {done}")
            if rec.get("unigram_bits") != unigram_bits and rec.get("curves"):
                # judged against another unigram level (an older definition): judge it again, never stale
                fresh = summarize(arch, layers, rec["curves"], 0.0, unigram_bits, cfg)
                rec.update({k: fresh[k] for k in ("unigram_bits", "diverged", "diverged_why")})
            return rec
        log(f"{name}: {done} was made with other options; running again")
        done.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(cfg.threads), MKL_NUM_THREADS=str(cfg.threads))
    ckpt = run_dir / "checkpoint_last.pt"
    state = checkpoint_state(ckpt) if ckpt.is_file() else None
    if state and state["updates"] >= cfg.max_update:
        # training had finished when the demo was stopped; fairseq restarted at max_update would
        # run one update more, so go straight to the evaluation
        rc, secs = 0, 0.0
    else:
        resumed = f" (resuming at update {state['updates']})" if state else ""
        log(f"{name}: training{resumed}, {cfg.max_update} updates")
        bin_dir = data_root / ("lm-bin" if _lm(cfg) else "bin")
        rc, secs = run_training(train_command(bin_dir, run_dir, arch, layers, cfg), run_dir, name, cfg, env)
        state = checkpoint_state(ckpt) if ckpt.is_file() else None
    prev = _read_json(run_dir / "seconds.json", 0.0)
    secs += prev
    atomic_write(run_dir / "seconds.json", json.dumps(secs))
    log_text = (run_dir / "train.log").read_text(errors="replace") if (run_dir / "train.log").is_file() else ""
    curves = parse_log(log_text.splitlines())
    crashed = rc != 0
    if crashed and not curves["error"]:
        tail = log_text.strip().splitlines()[-1:]
        raise ToolError(f"training {name} failed (exit {rc}: {tail}); see {run_dir / 'train.log'}, "
                       "then run b2t-demo again to resume")
    updates = state["updates"] if state else 0
    curves = truncate_curves(curves, updates)
    last_valid = curves["valid"][-1]["num_updates"] if curves["valid"] else -1
    if state and state["val_loss"] is not None and last_valid < updates:
        # the log lost its last validation (edited, or written by an old demo): the checkpoint has it
        curves["valid"].append({"num_updates": updates, "valid_loss": state["val_loss"]})
    if not crashed and updates < cfg.max_update:
        raise ToolError(f"training {name} ended at update {updates} of {cfg.max_update} without an error; "
                       f"see {run_dir / 'train.log'}, then run b2t-demo again to resume")
    rec = summarize(arch, layers, curves, secs, unigram_bits, cfg)
    rec["updates"] = updates  # the checkpoint's count, not the log's
    if state and state["val_loss"] is not None:
        rec["valid_loss"] = state["val_loss"]  # fairseq validates before it saves: the loss at `updates`
    rec["params"] = state["params"] if state else None
    if _lm(cfg):  # a language model: perplexity, nothing to translate
        rec["bleu"] = None
        rec["ppl"] = 2 ** rec["valid_loss"] if rec["valid_loss"] is not None and rec["valid_loss"] < 64 else None
    elif rec["diverged"] and (crashed or state is None):
        rec["bleu"] = 0.0
    else:
        log(f"{name}: translating {cfg.n_test} test sentences (beam 4)")
        rec["bleu"], hyps = translate_and_score(data_root / "bin", data_root / "raw", ckpt, cfg, env)
        atomic_write(run_dir / "test.hyp.de", "\n".join(hyps) + "\n")
    rec["curves"] = curves
    rec["key"] = key
    rec["run_dir"] = run_dir.name
    for extra in list(run_dir.glob("checkpoint_*_*.pt")) + [run_dir / "checkpoint_best.pt"]:
        extra.unlink(missing_ok=True)  # checkpoint_last.pt is all the report and a re-run need
    write_json(done, rec)
    score = f"perplexity {rec['ppl']}" if _lm(cfg) else f"BLEU {rec['bleu']:.2f}"
    log(f"{name}: done in {secs:.0f}s, valid loss {rec['valid_loss']}, {score}"
        f"{', DIVERGED' if rec['diverged'] else ''}")
    return rec


def _read_json(path, default):
    """A small state file's content, or default when it is missing or damaged (it is then rebuilt)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return default


def summarize(arch, layers, curves, secs, unigram_bits, cfg):
    train, valid = curves["train"], curves["valid"]
    last_t = train[-1] if train else {}
    last_v = valid[-1] if valid else {}
    losses = [r.get("loss", math.nan) for r in train] + [r.get("valid_loss", math.nan) for r in valid]
    nonfinite = any(not math.isfinite(x) for x in losses) or curves["error"] is not None
    # without the nll, the label-smoothed loss (never below it) stands in: the verdict errs towards "learned"
    # only when the smoothed loss itself is below the unigram level
    v_nll = last_v.get("valid_nll_loss", last_v.get("valid_loss", math.nan))
    not_learning = not (v_nll < unigram_bits)  # NaN counts as not learning
    return {"arch": arch, "label": LABELS.get(arch, arch), "layers": layers, "updates": last_t.get("num_updates", 0),
            "wall_s": round(secs, 1), "train_loss": last_t.get("loss"), "valid_loss": last_v.get("valid_loss"),
            "valid_nll_loss": v_nll if math.isfinite(v_nll) else None, "unigram_bits": unigram_bits,
            "diverged": bool(nonfinite or not_learning),
            "diverged_why": ("non-finite loss/gradient" if nonfinite else
                             "valid nll not below unigram level" if not_learning else None)}
