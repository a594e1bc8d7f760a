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
    for title, png, *note in gn_files:
        page += [f"## {title}", "", *note, "" if note else None, f"![{title}]({png})", ""]
        page = [line for line in page if line is not None]
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
    made = {f[1].rsplit(".", 1)[0] for f in gn_files}
    for stem in ("grad_norms_init", "grad_norms_trained", "layer_norms", "stability_map"):
        if stem not in made:
            for ext in ("json", "csv", "png"):
                (out / f"{stem}.{ext}").unlink(missing_ok=True)


# --- per-layer norms while training (--log-layer-norms) and a small stability map --------------------

def layer_norm_series(log_lines):
    """{update: {"enc00_gnorm": ..., ...}} from a run's json log (the train_inner records)."""
    from ..util import parse_json_log

    out = {}
    for kind, rec in parse_json_log(log_lines):
        if kind == "train_inner":
            vals = {k: float(v) for k, v in rec.items() if k.endswith(("_gnorm", "_ingrad", "_amax")) and k[:3] in
                    ("enc", "dec")}
            if vals:
                out[int(float(rec["num_updates"]))] = vals
    return out


def plot_layer_heatmap(series_by_label, path, title, quantity="gnorm"):
    """Layer (rows, encoder bottom to decoder top) x update (columns), colour = log10 of the norm."""
    import math

    import numpy as np
    from matplotlib.colors import Normalize

    plt = pyplot()
    labels = list(series_by_label)
    fig, axes = plt.subplots(1, len(labels), figsize=(4.2 * len(labels) + 1.6, 5.2), squeeze=False, sharey=True)
    grids, lo, hi = {}, math.inf, -math.inf
    for label, series in series_by_label.items():
        updates = sorted(series)
        keys = sorted({k for v in series.values() for k in v if k.endswith("_" + quantity)},
                      key=lambda k: (k[:3] != "enc", int(k[3:5])))
        g = np.array([[series[u].get(k, np.nan) for u in updates] for k in keys], dtype=float)
        with np.errstate(divide="ignore", invalid="ignore"):
            g = np.log10(np.where(g > 0, g, np.nan))
        grids[label] = (updates, keys, g)
        if np.isfinite(g).any():
            lo, hi = min(lo, np.nanmin(g)), max(hi, np.nanmax(g))
    norm = Normalize(lo if math.isfinite(lo) else -1, hi if math.isfinite(hi) else 1)
    colours = {t.label: t.colour for t in layer_types.LAYER_TYPES}
    for ax, label in zip(axes[0], labels):
        updates, keys, g = grids[label]
        if not updates:
            ax.set_title(f"{label}: no norms logged")
            continue
        im = ax.imshow(g, aspect="auto", origin="lower", cmap="viridis", norm=norm, interpolation="nearest",
                       extent=(updates[0] - 2.5, updates[-1] + 2.5, -0.5, len(keys) - 0.5))
        n_enc = sum(k.startswith("enc") for k in keys)
        ax.axhline(n_enc - 0.5, color="white", lw=1.5)
        ticks = [i for i, k in enumerate(keys) if int(k[3:5]) in (0,) or i in (n_enc - 1, len(keys) - 1)]
        ax.set_yticks(ticks, [f"{'encoder' if keys[i][:3] == 'enc' else 'decoder'} {int(keys[i][3:5]) + 1}"
                              for i in ticks])
        ax.set_xlabel("update")
        ax.set_title(label, color=colours.get(label), fontweight="bold")
    axes[0][0].set_ylabel("layer (bottom to top; white line: encoder | decoder)")
    cb = fig.colorbar(im, ax=axes[0].tolist(), fraction=0.04, pad=0.02)
    cb.set_label({"gnorm": "parameter gradient norm (log10)", "ingrad": "input gradient norm (log10)",
                  "amax": "largest activation (log10)"}[quantity])
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def do_layer_heatmap(out, records, cfg):
    """The deepest runs' per-layer gradient norms over training, from their logs; [(title, png, note)]."""
    deep = max(r["layers"] for r in records)
    series = {}
    for r in (r for r in records if r["layers"] == deep):
        log_path = out / "runs" / r["run_dir"] / "train.log"
        if log_path.is_file():
            series[r["label"]] = layer_norm_series(log_path.read_text(errors="replace").splitlines())
    if not any(series.values()):
        return []
    title = f"Gradient norm of each layer's parameters while training, {deep}+{deep} layers"
    plot_layer_heatmap(series, out / "layer_norms.png", title)
    note = (f"Logged by b2t-train --log-layer-norms every 5 updates: a dark band low in the stack means the lower "
            f"layers receive little gradient (they barely learn). It shows the first {cfg.max_update} updates of a "
            "width-64 CPU run, not how a paper-sized model behaves over its full training.")
    return [(title, "layer_norms.png", note)]


def do_stability_map(out, data_root, cfg):
    """A small b2t-stability sweep on the demo's data: depths x (lr, 2 lr), one panel per architecture."""
    from ..analysis import stability

    lrs = f"{cfg.lr:g},{2 * cfg.lr:g}"
    depths = ",".join(f"{d}-{d}" for d in cfg.depths)
    args = stability.get_parser().parse_args([
        "--out", str(out / "stability"), "--data-bin", str(data_root / "bin"), "--layer-types", ",".join(cfg.archs),
        "--depths", depths, "--lrs", lrs, "--dim", str(cfg.dim), "--max-update", str(max(10, cfg.max_update // 3)),
        "--warmup", str(min(cfg.warmup, max(1, cfg.max_update // 6))), "--max-tokens", str(cfg.max_tokens),
        "--seed", str(cfg.seed), "--jobs", str(cfg.jobs)])
    scfg = stability.resolve(args)
    summary = stability.sweep(scfg)
    title = "Stability map: final valid loss by depth and learning rate"
    stability.draw_map(summary["cells"], scfg, summary["unigram_bits"], out / "stability_map.png")
    note = (f"Each cell is a separate {scfg.max_update}-update run (b2t-stability); crossed cells diverged or learned "
            "no more than word frequencies. A CPU budget this short is not the paper's: a cell that has not "
            "diverged here may still diverge later, and the loss differences say little about final quality.")
    return [(title, "stability_map.png", note)]
