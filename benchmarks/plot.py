"""Speed-quality plots with matplotlib: one panel per model, tokens/s against a quality measure,
one colour per method, filled markers for the shortest generation length and hollow ones for
longer lengths. Every panel has a title, axis labels with units, and a legend."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only, no display

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402


def speed_quality(path, panels: list[dict], title: str = ""):
    """panels: [{'title', 'xlabel', 'ylabel', 'points': [(method, length, x, y)]}], methods in legend
    order of first appearance. Writes a PNG and returns the figure (closed)."""
    fig, axes = plt.subplots(1, len(panels), figsize=(6.4 * len(panels), 4.8), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        methods = list(dict.fromkeys(m for m, *_ in panel["points"]))
        lengths = sorted({n for _, n, *_ in panel["points"]})
        colors = {m: f"C{i % 10}" for i, m in enumerate(methods)}
        for m, n, x, y in panel["points"]:
            filled = n == lengths[0]
            ax.scatter([x], [y], s=60, marker="o", color=colors[m] if filled else "none", edgecolors=colors[m], linewidths=1.5)
        handles = [Line2D([], [], marker="o", linestyle="", color=colors[m], label=m) for m in methods]
        handles += [Line2D([], [], marker="o", linestyle="", color="black" if n == lengths[0] else "none",
                           markeredgecolor="black", label=f"length {n}") for n in lengths]
        ax.legend(handles=handles, fontsize=8, loc="best")
        ax.set_xscale(panel.get("xscale", "log"))
        ax.set_xlabel(panel["xlabel"])
        ax.set_ylabel(panel["ylabel"])
        ax.set_title(panel["title"])
        ax.grid(True, alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return fig
