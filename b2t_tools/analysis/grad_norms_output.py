"""How ``b2t-grad-norms`` shows its numbers: the CSV rows, the three-panel figure and the labels.

Kept apart from the measuring (grad_norms.py) so the demo's report and the command draw alike.
"""

import csv
from pathlib import Path

from b2t_fairseq import layer_types

from ..util import atomic_open, pyplot

LN_POINTS = ("self_attn_ln", "cross_attn_ln", "ffn_ln")  # the LayerNorms whose input and output are measured
LABELS = {t.short: t.label for t in layer_types.LAYER_TYPES}


def label(name, res):
    """The plot's label: the built layer type, with the run's name where that says more."""
    kind = res.get("label") or LABELS.get(name, name)
    short = layer_types.BY_KEY[res["layer_type"]].short if res.get("layer_type") in layer_types.BY_KEY else None
    return kind if name == short else f"{name} ({kind})"


def write_csv(results, path):
    """One row a (model, stack, layer, quantity): layer = parameter gradient norm of the whole layer."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "w") as f:
        w = csv.writer(f)
        w.writerow(["model", "stack", "layer", "quantity", "grad_norm"])
        for name, res in results.items():
            for side in (s for s in ("encoder", "decoder") if s in res):  # a language model: decoder only
                for i, v in enumerate(res[side]):
                    w.writerow([name, side, i, "layer", v])
                    for k, v2 in res[f"{side}_sublayers"][i].items():
                        w.writerow([name, side, i, f"param:{k}", v2])
                    for k, v2 in res[f"{side}_ln_points"][i].items():
                        w.writerow([name, side, i, f"activation:{k}", v2])


def plot(results, path, title=None):
    """Three panels: encoder and decoder per-layer norms, and the LayerNorm points of the top decoder layer."""
    plt = pyplot()
    sides = [s for s in ("encoder", "decoder") if any(s in r for r in results.values())]  # LMs: decoder only
    fig, axes = plt.subplots(1, len(sides) + 1, figsize=(5 * (len(sides) + 1), 4.2))
    for ax, side in zip(axes[:-1], sides):
        for name, res in ((n, r) for n, r in results.items() if side in r):
            ax.plot(range(1, len(res[side]) + 1), res[side], marker="o", ms=3, label=label(name, res))
        ax.set_yscale("log")
        ax.set_xlabel(f"{side} layer (1 = lowest)")
        ax.set_ylabel("gradient norm of the layer's parameters")
        ax.set_title(side)
        ax.grid(alpha=0.3)
        ax.legend()
    ax = axes[-1]
    keys = [f"{s}.{w}" for s in LN_POINTS for w in ("in", "out")
            if any(f"{s}.{w}" in r["decoder_ln_points"][-1] for r in results.values())]
    width = 0.8 / max(len(results), 1)
    for j, (name, res) in enumerate(results.items()):
        top = res["decoder_ln_points"][-1]
        ax.bar([i + j * width for i in range(len(keys))], [top.get(k, float("nan")) for k in keys], width,
               label=label(name, res))
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(keys))])
    ax.set_xticklabels([k.replace("_ln.", " LN ") for k in keys], rotation=30, ha="right", fontsize=8)
    ax.set_yscale("log")
    ax.set_title("top decoder layer: grad w.r.t. LN input (sum) / output")
    ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def default_title(results):
    sources = sorted({"fresh initialization" if r["source"] == "fresh init" else "trained" for r in results.values()})
    depths = sorted({"+".join(map(str, r["layers"].values())) + " layers" for r in results.values()})
    return f"gradient norms, {' and '.join(sources)}, {', '.join(depths)}"
