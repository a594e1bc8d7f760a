"""``b2t-demo --task lm``: the same comparison for decoder-only language models (transformer_lm_*).

The English side of the demo's Tatoeba split (same sentencepiece pieces) is binarized with
``fairseq-preprocess --only-source`` into CACHE/.../lm-bin and modelled with fairseq's language_modeling
task: sentences concatenated into blocks of ``TOKENS_PER_SAMPLE`` tokens (``--sample-break-mode none``),
cross-entropy (no label smoothing), no translation. Each run reports its validation loss and
perplexity; a run is *diverged* by the translation demo's rules, the unigram level being that of the
English validation text. Training, resuming, keys and gradient norms are the translation demo's
(runs.py, report.py).
"""

import sys

from b2t_fairseq import recipe
from b2t_fairseq.unigram import of_data_bin as unigram_level

from ..errors import ToolError
from ..util import atomic_write, describe_machine, log, machine, write_json
from . import children, data

TOKENS_PER_SAMPLE = 64  # about 6 Tatoeba sentences a block
LM_BIN = "lm-bin"


def prepare(data_root):
    """The LM data-bin beside the translation one (built once); returns the unigram level of valid.en."""
    def make(tmp):
        sp = data_root / "spm"
        cmd = [sys.executable, "-m", "fairseq_cli.preprocess", "--only-source",
               "--trainpref", str(sp / "train.en"), "--validpref", str(sp / "valid.en"),
               "--testpref", str(sp / "test.en"), "--destdir", str(tmp), "--workers", "1"]
        p = children.run(cmd)
        if p.returncode != 0:
            raise ToolError(f"fairseq-preprocess failed ({p.stderr.strip().splitlines()[-1:]}); "
                           f"delete {data_root} and run again")

    if not (data_root / LM_BIN).exists():
        log("data: binarizing the English side for the language models (fairseq-preprocess --only-source)")
    data._step(data_root / LM_BIN, make)
    return unigram_level(data_root / LM_BIN)


def optimizer_argv(cfg):
    """The translation demo's optimizer and schedule; cross-entropy, since an LM has no label smoothing here."""
    skip = {"--share-all-embeddings", "--criterion", "--label-smoothing"}
    flags = [(f, v) for f, v in recipe.OPTIMIZATION if f not in skip]
    flags = dict(flags, **{"--lr": str(cfg.lr), "--warmup-updates": str(cfg.warmup)})
    return recipe.flags_to_argv(flags.items()) + ["--criterion", "cross_entropy"]


def model_argv(arch, layers, cfg):
    d = str(cfg.dim)
    return ["--arch", f"transformer_lm_{arch}_tiny", "--decoder-layers", str(layers), "--decoder-embed-dim", d,
            "--decoder-input-dim", d, "--decoder-output-dim", d, "--decoder-ffn-embed-dim", str(4 * cfg.dim),
            "--decoder-attention-heads", str(cfg.heads), "--share-decoder-input-output-embed"]


def train_argv(arch, layers, cfg):
    """The LM part of a run's b2t-train command (runs.train_command adds data, budget and logging)."""
    return ["--task", "language_modeling", "--tokens-per-sample", str(TOKENS_PER_SAMPLE),
            "--sample-break-mode", "none", *model_argv(arch, layers, cfg), "--dropout", str(cfg.dropout),
            *optimizer_argv(cfg)]


def table_md(records):
    rows = ["| architecture | layers | parameters | updates | wall time (s) | train loss | valid loss | "
            "valid perplexity | diverged |", "|" + "---|" * 9]
    for r in records:
        fmt = lambda v, d=3: "n/a" if v is None else f"{v:.{d}f}"  # noqa: E731
        params = f"{r['params']:,}" if r["params"] else "n/a"
        rows.append(f"| {r['label']} | {r['layers']} | {params} | {r['updates']} | {r['wall_s']:.0f} | "
                    f"{fmt(r['train_loss'])} | {fmt(r['valid_loss'])} | {fmt(r.get('ppl'), 1)} | "
                    f"{'yes' if r['diverged'] else 'no'} |")
    return "\n".join(rows) + "\n"


def write_report(out, records, cfg, meta, total_s, gn_files, unigram):
    from .report import plot_curves, remove_stale

    remove_stale(out, gn_files)
    public = [{k: v for k, v in r.items() if k != "curves"} for r in records]
    payload = {"task": "lm", "runs": public, "config": vars(cfg) | {"depths": list(cfg.depths)}, "data": meta,
               "unigram_valid_xent_bits_en": unigram, "total_wall_s": round(total_s, 1), "machine": machine()}
    write_json(out / "results.json", payload)
    atomic_write(out / "results.md", table_md(records))
    plot_curves(records, out / "loss_curves.png", ylabel="cross-entropy (bits/token)", depth_label="{} layers")
    page = [f"# b2t-demo --task lm report{' (--quick)' if cfg.quick else ''}", "",
            f"Decoder-only language models on the English side of Tatoeba ({meta['pairs']['train']:,} training "
            f"sentences, {meta['pairs']['valid']} valid), sentencepiece vocabulary of {meta['vocab_size']}, "
            f"blocks of {TOKENS_PER_SAMPLE} tokens. Every run: width {cfg.dim}, {cfg.max_update} updates of up to "
            f"{cfg.max_tokens} tokens, Adam lr {cfg.lr} with {cfg.warmup} warmup updates (inverse sqrt), "
            f"cross-entropy, seed {cfg.seed}. Losses are fairseq's (base 2); perplexity is 2^(valid loss).", "",
            table_md(records), "",
            f"Diverged = non-finite loss, or final valid loss not below the unigram level ({unigram:.2f} "
            "bits/token).", "",
            f"Machine: {describe_machine(payload['machine'])}; total wall time {total_s / 60:.1f} min.", "",
            "## Loss curves", "", "![loss curves](loss_curves.png)", ""]
    for title, png, *note in gn_files:  # the heat map comes with a sentence on what it shows
        page += [f"## {title}", "", *note, *([""] if note else []), f"![{title}]({png})", ""]
    atomic_write(out / "index.md", "\n".join(page))
    log(f"report written ({len(records)} runs)")
