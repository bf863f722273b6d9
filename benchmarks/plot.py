"""Speed-quality plots with matplotlib: one panel per model, tokens/s against a quality measure,
one colour per method, filled markers for the shortest generation length and hollow ones for
longer lengths. Every panel has a title, axis labels with units, and a legend."""

from __future__ import annotations

import math
import textwrap

import matplotlib

matplotlib.use("Agg")  # files only, no display

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import NullFormatter, ScalarFormatter  # noqa: E402


def _save(fig, path, title: str):
    if title:  # wrapped to the figure's width (about 11 characters an inch at the default size)
        fig.suptitle("\n".join(textwrap.wrap(title, int(fig.get_figwidth() * 11))))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return fig


def _plain_log_ticks(ax, values, mantissas=(1, 2, 3, 5)):
    """Ticks of a log x axis at m * 10^e (m in `mantissas`) around `values`, written as plain
    numbers; no minor labels (matplotlib's default 'a x 10^b' minor labels run into each other)."""
    lo, hi = min(values) / 1.5, max(values) * 1.5
    e0, e1 = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    ax.set_xticks([m * 10.0**e for e in range(e0, e1 + 1) for m in mantissas if lo <= m * 10.0**e <= hi])
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())


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
        if panel.get("xscale", "log") == "log":
            _plain_log_ticks(ax, [x for _, _, x, _ in panel["points"]])
        ax.set_xlabel(panel["xlabel"])
        ax.set_ylabel(panel["ylabel"])
        ax.set_title(panel["title"])
        ax.grid(True, alpha=0.3)
    return _save(fig, path, title)


def accuracy_vs_nfe(path, panels: list[dict], title: str = ""):
    """panels: [{'title', 'points': [(decoder, nfe, accuracy)], 'curves': {label: [decoder, ...]}}]: every
    decoder a point with its own colour and marker (the same in every panel), each curve a line
    through its decoders in the order given (e.g. top-k at k = 1, 2, 5; a threshold rule at tau =
    0.99 .. 0.7). One legend below the panels. Writes a PNG, returns the figure."""
    decoders = list(dict.fromkeys(d for panel in panels for d, _, _ in panel["points"]))
    curves = list(dict.fromkeys(c for panel in panels for c in panel.get("curves", {})))
    cmap, markers = plt.get_cmap("tab10"), "osD^vP*Xh<>"
    style = {d: (cmap(i % 10), markers[(i // 10) % len(markers)]) for i, d in enumerate(decoders)}
    line = {c: (f"C{j % 10}", ["-", "--", ":", "-."][j % 4]) for j, c in enumerate(curves)}
    rows = -(-(len(decoders) + len(curves)) // 4)
    fig, axes = plt.subplots(1, len(panels), figsize=(7.0 * len(panels), 5.5 + 0.22 * rows), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        where = {d: (x, y) for d, x, y in panel["points"]}
        for d, x, y in panel["points"]:
            ax.scatter([x], [y], s=55, color=style[d][0], marker=style[d][1], zorder=3, edgecolors="black", linewidths=0.4)
        for label, names in panel.get("curves", {}).items():
            xy = [where[n] for n in names if n in where]
            if len(xy) > 1:
                ax.plot(*zip(*xy), color=line[label][0], linestyle=line[label][1], linewidth=1.2, alpha=0.7, zorder=2)
        ax.set_xscale("log")
        _plain_log_ticks(ax, [x for _, x, _ in panel["points"]])
        ax.set_xlabel("forward passes (NFE) per problem, log scale")
        ax.set_ylabel("exact-solve rate")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(panel["title"])
        ax.grid(True, alpha=0.3)
    handles = [Line2D([], [], linestyle="", marker=style[d][1], color=style[d][0], markeredgecolor="black", markeredgewidth=0.4,
                      label=d) for d in decoders]
    handles += [Line2D([], [], color=line[c][0], linestyle=line[c][1], label=c) for c in curves]
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.035 * rows, 1, 1))
    fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=7.5, frameon=False)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return fig
