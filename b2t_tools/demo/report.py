"""The demo's report: results.json, results.md, loss_curves.png, grad-norm plots and index.md."""

import json

from b2t_fairseq import layer_types

from ..analysis import grad_norms
from ..util import (
    atomic_write,
    describe_machine,
    json_digest,
    log,
    machine,
    pyplot,
    write_json,
)

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


def plot_curves(records, path, ylabel="label-smoothed loss (bits/token)", depth_label="{}+{} layers"):
    plt = pyplot()
    depths = sorted({r["layers"] for r in records})
    fig, axes = plt.subplots(1, len(depths), figsize=(6 * len(depths), 4.2), squeeze=False)
    colors = {t.short: t.colour for t in layer_types.LAYER_TYPES}
    for ax, d in zip(axes[0], depths):
        for r in (r for r in records if r["layers"] == d):
            c = r["curves"]
            ax.plot([p["num_updates"] for p in c["train"]], [p.get("loss") for p in c["train"]], color=colors.get(r["arch"]),
                    alpha=0.5, label=f"{r['label']} train")
            ax.plot([p["num_updates"] for p in c["valid"]], [p.get("valid_loss") for p in c["valid"]], "o-",
                    color=colors.get(r["arch"]), label=f"{r['label']} valid")
        ax.axhline(records[0]["unigram_bits"], color="gray", ls=":", label="unigram level (valid nll)")
        ax.set_title(depth_label.format(d, d))
        ax.set_xlabel("updates")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(out, records, cfg, meta, total_s, gn_files):
    remove_stale(out, gn_files)
    public = [{k: v for k, v in r.items() if k != "curves"} for r in records]
    payload = {"runs": public, "config": vars(cfg) | {"depths": list(cfg.depths)}, "data": meta,
               "total_wall_s": round(total_s, 1), "machine": machine()}
    write_json(out / "results.json", payload)
    atomic_write(out / "results.md", table_md(records))
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
            f"Machine: {describe_machine(payload['machine'])}; total wall time {total_s / 60:.1f} min.", "",
            "## Loss curves", "", "![loss curves](loss_curves.png)", ""]
    for title, png in gn_files:
        page += [f"## {title}", "", f"![{title}]({png})", ""]
    atomic_write(out / "index.md", "\n".join(page))


# --- gradient norms ------------------------------------------------------------------------------

def grad_norms_key(kind, specs, deep, model_args, data_root, cfg, records):
    """A hash of what shapes one grad-norm measurement: models (and the runs they come from), data, batches."""
    shape = {"kind": kind, "archs": [a for a, _, _ in specs], "layers": deep, "model": model_args,
             "batches": cfg.gn_batches, "max_tokens": cfg.max_tokens, "seed": cfg.seed, "data": data_root.name,
             "runs": sorted(r["key"] for r in records if r["layers"] == deep) if kind == "trained" else []}
    return json_digest(shape, 10)


def do_grad_norms(out, data_root, cfg, records):
    """Fresh-init and trained gradient norms of the deep models (cached in OUT/grad_norms/KIND-KEY.json,
    KEY a hash of what shapes them; copied to OUT/grad_norms_KIND.json for the report)."""
    deep = max(cfg.depths)
    model_args = ["--encoder-embed-dim", str(cfg.dim), "--decoder-embed-dim", str(cfg.dim),
                  "--encoder-ffn-embed-dim", str(4 * cfg.dim), "--decoder-ffn-embed-dim", str(4 * cfg.dim),
                  "--encoder-attention-heads", str(cfg.heads), "--decoder-attention-heads", str(cfg.heads)]
    lm = getattr(cfg, "task", "mt") == "lm"
    family, bin_dir, stacks = ("transformer_", data_root / "bin", f"{deep}+{deep}")
    if lm:  # decoder-only models (demo/lm.py)
        from .lm import LM_BIN, model_argv

        family, bin_dir, stacks = "transformer_lm_", data_root / LM_BIN, f"{deep}"
        model_args = model_argv("b2t", deep, cfg)[4:]  # the sizes, without --arch and --decoder-layers
    files = []
    for kind, title in (("init", f"Gradient norms at initialization, {stacks} layers"),
                        ("trained", f"Gradient norms after training, {stacks} layers")):
        js = out / f"grad_norms_{kind}.json"
        if kind == "init":
            specs = [(a, f"{family}{a}_tiny", None) for a in cfg.archs]
        else:
            specs = [(r["arch"], None, out / "runs" / r["run_dir"] / "checkpoint_last.pt")
                     for r in records if r["layers"] == deep]
            specs = [s for s in specs if s[2].is_file()]
        if not specs or (kind == "trained" and cfg.quick):
            continue
        key = grad_norms_key(kind, specs, deep, model_args, data_root, cfg, records)
        cached = out / "grad_norms" / f"{kind}-{key}.json"
        if cached.is_file():
            res = json.loads(cached.read_text())
        else:
            log(f"gradient norms ({kind}, {deep} layers)")
            res = grad_norms.run_models(bin_dir, specs, layers=deep, model_args=model_args,
                                        k=cfg.gn_batches, max_tokens=cfg.max_tokens, seed=cfg.seed,
                                        log=lambda m: log("  " + m))
            write_json(cached, res)
        write_json(js, res)
        grad_norms.write_csv(res, out / f"grad_norms_{kind}.csv")
        grad_norms.plot(res, out / f"grad_norms_{kind}.png", title=title)
        files.append((title, f"grad_norms_{kind}.png"))
    return files


def remove_stale(out, gn_files):
    """Report files an earlier run with other options left and this report does not make."""
    made = {png.rsplit(".", 1)[0] for _, png in gn_files}
    for kind in ("init", "trained"):
        if f"grad_norms_{kind}" not in made:
            for ext in ("json", "csv", "png"):
                (out / f"grad_norms_{kind}.{ext}").unlink(missing_ok=True)
