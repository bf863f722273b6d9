"""The benchmarks' plot helper labels what it draws."""

import sys

import matplotlib.image


def test_speed_quality_plot_has_titles_axis_labels_and_a_legend_per_panel(root, tmp_path):
    sys.path.insert(0, str(root / "benchmarks"))
    from plot import speed_quality

    points = [("vanilla", 256, 100.0, 0.07), ("threshold", 256, 500.0, 0.08), ("vanilla", 1024, 40.0, 0.05),
              ("threshold", 1024, 300.0, 0.06)]
    panels = [{"title": "markov model", "xlabel": "tokens/s", "ylabel": "true NLL (nats/token)", "points": points},
              {"title": "corpus model", "xlabel": "tokens/s", "ylabel": "entropy (bits/byte)", "points": points[:2]}]
    fig = speed_quality(tmp_path / "p.png", panels, title="t")
    assert len(fig.axes) == 2
    for ax, panel in zip(fig.axes, panels):
        assert (ax.get_title(), ax.get_xlabel(), ax.get_ylabel()) == (panel["title"], panel["xlabel"], panel["ylabel"])
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
        methods = list(dict.fromkeys(m for m, *_ in panel["points"]))
        lengths = sorted({n for _, n, *_ in panel["points"]})
        assert labels == methods + [f"length {n}" for n in lengths]
        assert len(ax.collections) == len(panel["points"])
    img = matplotlib.image.imread(tmp_path / "p.png")
    assert img.shape[0] > 300 and img.shape[1] > 600


def test_accuracy_plot_marks_every_decoder_apart_and_draws_each_curve(root, tmp_path):
    sys.path.insert(0, str(root / "benchmarks"))
    from plot import accuracy_vs_nfe

    names = [f"decoder_{i}" for i in range(23)]  # more than one colour cycle
    points = [(n, 2.0 + i, i / 30) for i, n in enumerate(names)]
    curves = {"first three": names[:3], "a missing one": ["decoder_5", "absent"]}
    panels = [{"title": "tier a", "points": points, "curves": curves}, {"title": "tier b", "points": points[:10], "curves": curves}]
    fig = accuracy_vs_nfe(tmp_path / "a.png", panels, title="t")
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == names + list(curves)
    handles = fig.legends[0].legend_handles[: len(names)]
    styles = {(tuple(h.get_color()) if not isinstance(h.get_color(), str) else h.get_color(), h.get_marker()) for h in handles}
    assert len(styles) == len(names)
    for ax, panel in zip(fig.axes, panels):
        assert ax.get_title() == panel["title"] and "NFE" in ax.get_xlabel() and ax.get_ylabel() == "exact-solve rate"
        assert len(ax.collections) == len(panel["points"]) and len(ax.lines) == 1  # the curve with one point left is not drawn
    assert matplotlib.image.imread(tmp_path / "a.png").shape[1] > 1000
