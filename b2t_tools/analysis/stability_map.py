"""The stability map of ``b2t-stability``: one panel per layer type, depth down, learning rate across.

Apart from the sweep (stability.py) so the demo's report draws the same figure from its own cells.
"""

from b2t_fairseq import layer_types

from ..util import pyplot

# status -> (mark before the loss, hatch, hatch colour); Okabe-Ito colours, told apart without colour too
MARKS = {"diverged": ("x ", "//", "#D55E00"), "under-trained": ("~ ", "..", "#0072B2"), "failed": ("! ", "//", "grey")}


def draw_map(records, cfg, unigram, path, title=None):
    """One panel per layer type: depth down, learning rate across, colour = final valid loss."""
    import numpy as np
    from matplotlib.colors import Normalize
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    plt = pyplot()
    types = [t for t in layer_types.SHORTS if any(r["layer_type"] == t for r in records)]
    depths = list(dict.fromkeys((r["encoder_layers"], r["decoder_layers"]) for r in records))
    lrs = sorted({r["lr"] for r in records})
    losses = [r["valid_nll_loss"] for r in records if r["valid_nll_loss"] is not None]
    lo = min(losses + [unigram]) - 0.1
    hi = max(losses + [unigram]) + 0.1
    norm, cmap = Normalize(lo, hi), plt.get_cmap("viridis")  # perceptually uniform, colour-blind safe
    panel_w, panel_h = 0.75 * len(lrs) + 0.3, 0.45 * len(depths) + 0.3
    left, right, top, bottom, gap = 1.2, 1.4, 0.8, 1.5, 0.25  # inches
    width = left + right + len(types) * panel_w + (len(types) - 1) * gap
    height = top + bottom + panel_h
    fig, axes = plt.subplots(1, len(types), figsize=(width, height), squeeze=False, sharey=True)
    fig.subplots_adjust(left=left / width, right=1 - right / width, top=1 - top / height, bottom=bottom / height,
                        wspace=gap / panel_w)
    by = {(r["layer_type"], r["encoder_layers"], r["decoder_layers"], r["lr"]): r for r in records}
    for ax, t in zip(axes[0], types):
        grid = np.full((len(depths), len(lrs)), np.nan)
        for i, (e, d) in enumerate(depths):
            for j, lr in enumerate(lrs):
                r = by.get((t, e, d, lr))
                if r is None:
                    continue
                v = r["valid_nll_loss"]
                if v is not None:
                    grid[i, j] = v
                bad = r["status"] != "ok"
                mark, hatch, edge = MARKS.get(r["status"], MARKS["failed"]) if bad else ("", None, None)
                ax.text(j, i, mark + (f"{v:.2f}" if v is not None else "n/a"), ha="center",
                        va="center", fontsize=8, color="white" if v is None or norm(v) < 0.6 else "black",
                        fontweight="bold" if bad else "normal")
                if bad:
                    ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch=hatch, edgecolor=edge,
                                               lw=0))
        ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, norm=norm, aspect="auto")
        ax.set_facecolor("#bbbbbb")
        ax.set_xticks(range(len(lrs)), [f"{lr:g}" for lr in lrs])
        ax.set_yticks(range(len(depths)), [f"{e}-{d}" for e, d in depths])
        ax.set_xlabel("peak learning rate (Adam)")
        lt = layer_types.BY_SHORT[t]
        ax.set_title(lt.label, color=lt.colour, fontweight="bold")
    axes[0][0].set_ylabel("layers (encoder-decoder)")
    sm = plt.cm.ScalarMappable(norm=norm, cmap=cmap)
    cax = fig.add_axes([1 - (right - 0.25) / width, bottom / height, 0.18 / width, panel_h / height])
    cb = fig.colorbar(sm, cax=cax)
    cb.set_label("final valid loss (nll, bits/token)")
    cb.ax.axhline(unigram, color="#D55E00", lw=2.5)
    handles = [Patch(facecolor="none", edgecolor="#D55E00", hatch="//",
                     label="x  diverged: non-finite loss, or final valid loss not below the unigram level "
                           "and training loss no longer falling"),
               Patch(facecolor="none", edgecolor="#0072B2", hatch="..",
                     label="~  under-trained: not below the unigram level yet, training loss still falling "
                           "(more --max-update would tell)"),
               Line2D([], [], color="#D55E00", lw=2.5,
                      label=f"unigram level on the colour bar: {unigram:.2f} bits/token (word frequencies only)"),
               Patch(facecolor="#bbbbbb", label="no valid loss (the run stopped)")]
    fig.legend(handles=handles, loc="lower left", bbox_to_anchor=(left / width, 0.02), ncol=1, fontsize=8,
               frameon=False)
    fig.suptitle(title or (f"Stability map: width {cfg.dim}, {cfg.max_update} updates of {cfg.max_tokens} tokens, "
                           f"{cfg.warmup} warm-up ({cfg.precision})"), fontsize=10)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
