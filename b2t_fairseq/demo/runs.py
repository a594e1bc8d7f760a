"""One demo run: train with b2t-train in a subprocess, follow its json log, translate, score.

A run keeps its checkpoints in ``OUT/runs/NAME``; its ``result.json`` is written last, so an
interrupted demo run again skips finished runs and resumes unfinished ones from checkpoint_last.pt.
"""

import json
import math
import os
import subprocess
import sys
import time

from .. import recipe
from ..errors import B2TError
from ..util import atomic_write, log, parse_generate_output, parse_json_log, write_json

LABELS = recipe.LABELS


# --- training ------------------------------------------------------------------------------------

def train_command(data_bin, run_dir, arch, layers, cfg):
    """The b2t-train command line of one run."""
    cmd = [sys.executable, "-m", "b2t_fairseq.commands.cli", "train", str(data_bin),
           "--arch", f"transformer_{arch}_tiny", "--encoder-layers", str(layers), "--decoder-layers", str(layers),
           "--encoder-embed-dim", str(cfg.dim), "--decoder-embed-dim", str(cfg.dim),
           "--encoder-ffn-embed-dim", str(4 * cfg.dim), "--decoder-ffn-embed-dim", str(4 * cfg.dim),
           "--encoder-attention-heads", str(cfg.heads), "--decoder-attention-heads", str(cfg.heads),
           "--dropout", str(cfg.dropout), *recipe.optimizer_argv(lr=cfg.lr, warmup=cfg.warmup),
           "--max-tokens", str(cfg.max_tokens), "--max-update", str(cfg.max_update), "--seed", str(cfg.seed),
           "--save-dir", str(run_dir), "--no-epoch-checkpoints", "--save-interval-updates", str(cfg.valid_every),
           "--keep-interval-updates", "1", "--validate-interval-updates", str(cfg.valid_every),
           "--log-format", "json", "--log-interval", "5", "--num-workers", "0", "--no-progress-bar"]
    cmd += ["--fp16"] if cfg.fp16 else ["--cpu"]
    return cmd


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


def run_training(cmd, run_dir, name, cfg, env):
    """Run b2t-train, append its output to train.log, show progress; returns (returncode, seconds)."""
    t0 = time.time()
    with open(run_dir / "train.log", "a") as logf:
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        try:
            for line in p.stdout:
                logf.write(line)
                for kind, rec in parse_json_log([line]):
                    if kind == "valid":
                        log(f"  {name}: update {rec.get('valid_num_updates')}/{cfg.max_update} "
                            f"valid loss {rec.get('valid_loss')}")
                    elif kind == "train_inner" and int(float(rec["num_updates"])) % 25 == 0:
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

    cmd = [sys.executable, "-m", "b2t_fairseq.commands.cli", "generate", str(data_bin), "--path", str(checkpoint),
           "--gen-subset", "test", "--beam", "4", "--lenpen", "1.0", "--batch-size", "64",
           "--max-len-a", "1.5", "--max-len-b", "10", "--post-process", "sentencepiece", "--num-workers", "0"]
    cmd += ["--fp16"] if cfg.fp16 else ["--cpu"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise B2TError(f"b2t-generate failed on {checkpoint}: {p.stderr.strip().splitlines()[-1:]}; "
                       "delete that run's folder and run b2t-demo again")
    hyps = parse_generate_output(p.stdout, "D")
    refs = (raw_dir / "test.de").read_text(encoding="utf-8").splitlines()
    out = [hyps.get(i, "") for i in range(len(refs))]
    return sacrebleu.corpus_bleu(out, [refs]).score, out


def count_params(checkpoint):
    import torch

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
    atomic_write(run_dir / "seconds.json", json.dumps(secs))
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
        atomic_write(run_dir / "test.hyp.de", "\n".join(hyps) + "\n")
    rec["curves"] = curves
    for extra in list(run_dir.glob("checkpoint_*_*.pt")) + [run_dir / "checkpoint_best.pt"]:
        extra.unlink(missing_ok=True)  # checkpoint_last.pt is all the report and a re-run need
    write_json(done, rec)
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
    return {"arch": arch, "label": LABELS.get(arch, arch), "layers": layers, "updates": last_t.get("num_updates", 0),
            "wall_s": round(secs, 1), "train_loss": last_t.get("loss"), "valid_loss": last_v.get("valid_loss"),
            "valid_nll_loss": v_nll if math.isfinite(v_nll) else None, "unigram_bits": unigram_bits,
            "diverged": bool(nonfinite or not_learning),
            "diverged_why": ("non-finite loss/gradient" if nonfinite else
                             "valid nll not below unigram level" if not_learning else None)}
