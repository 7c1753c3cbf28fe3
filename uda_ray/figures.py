"""The figures of ``uda-ray compare``, sized for a two-column paper and written as PDF and SVG
(vector, text kept as text) and a 300 dpi PNG:

* ``<study>_bars``: each row's mean target-val mIoU ± sample std, every seed's own value as a
  point, and n under the row's name;
* ``<study>_paired_delta``: the seed-paired differences to the baseline row (the same seed on
  both sides), each seed's difference as a point, their mean ± std and the seeds won;
* ``<study>_per_class``: per-class IoU of every row as a heatmap (rows × classes);
* ``<study>_importances``: the hyperparameter importances of each search row, titled with the
  number of completed Optuna trials they come from, and a warning below
  :data:`MIN_IMPORTANCE_TRIALS`.

Print size: a figure is exactly as wide as it is meant to be printed (:data:`COLUMN_IN`, or
:data:`PAGE_IN` for a wide one; include it at its natural size, ``\\includegraphics`` without a
width, or scaled by at most a few percent), its text at least 8 pt (a heatmap cell's number
7 pt): a title or label too long for the width is wrapped, never allowed to widen the page.
Seed points have one colour (and marker) per seed, the same in every row and in both the bars
and the paired-Δ figure, listed in a small legend: a seed can be followed across rows.

The figures read the compare table and the per-seed table (:mod:`uda_ray.compare`), never MLflow.
Matplotlib is used through its object API on an Agg canvas: no pyplot global state, no GUI.
"""

from __future__ import annotations

import math
from pathlib import Path

COLUMN_IN = 3.4   # one column of a two-column paper (CVPR, IEEE: 3.25-3.5 in)
PAGE_IN = 7.0     # the full text width
FORMATS = ("png", "pdf", "svg")
# Importances from fewer completed trials than this are shown with a warning: with a handful of
# trials, PED-ANOVA/fANOVA rank parameters on noise (a rule of thumb, not a test).
MIN_IMPORTANCE_TRIALS = 10
FONT_PT, CELL_PT = 8, 7   # the smallest text at print size; a heatmap cell's number
# "standard" bbox: the saved page is the figure's size (a "tight" one grows or shrinks with the text)
_STYLE = {"font.size": FONT_PT, "axes.titlesize": FONT_PT, "axes.labelsize": FONT_PT, "xtick.labelsize": FONT_PT,
          "ytick.labelsize": FONT_PT, "legend.fontsize": FONT_PT, "legend.title_fontsize": FONT_PT,
          "figure.titlesize": FONT_PT, "axes.linewidth": 0.6, "lines.linewidth": 0.8, "pdf.fonttype": 42,
          "ps.fonttype": 42, "svg.fonttype": "none", "savefig.bbox": "standard"}
_BASE, _ROW = "#e69f00", "#0072b2"   # Okabe-Ito orange and blue: distinct for colour-blind readers
# Seed points: Paul Tol's "muted" scheme (colour-blind safe, neither the bars' orange nor their
# blue), the light colours last; past its 9 colours the marker changes too.
SEED_COLORS = ("#cc6677", "#332288", "#117733", "#882255", "#44aa99", "#999933", "#aa4499", "#88ccee", "#ddcc77")
SEED_MARKERS = ("o", "s", "^", "D", "v")
_EDGE = 0.02  # in: the margin that text keeps from the figure's edges


def _figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _title(fig, text: str, **kw) -> None:
    """The figure's (or subfigure's) title, from its left edge: the whole width, not only the axes'."""
    fig.suptitle(text, x=_EDGE / fig.figure.get_figwidth(), ha="left", **kw)


def _fit_text(fig) -> None:
    """Wrap, at spaces, every text that would stick out of the figure (a long study, row or
    parameter name), until the laid-out figure holds all its text: the figure keeps its size."""
    import textwrap
    import warnings

    from matplotlib.text import Text

    for _ in range(4):
        with warnings.catch_warnings():  # constrained layout may give up while a text is too wide
            warnings.simplefilter("ignore", UserWarning)
            fig.canvas.draw()
        renderer, width, pad = fig.canvas.get_renderer(), fig.bbox.width, _EDGE * fig.dpi
        changed = False
        for t in fig.findobj(lambda a: isinstance(a, Text) and a.get_visible() and " " in a.get_text()):
            box = t.get_window_extent(renderer)
            if box.x0 >= pad - 1 and box.x1 <= width - pad + 1:
                continue
            ha = t.get_horizontalalignment()
            if ha == "left":
                room = width - pad - box.x0
            elif ha == "right":
                room = box.x1 - pad
            else:
                mid = (box.x0 + box.x1) / 2
                room = 2 * min(mid - pad, width - pad - mid)
            lines = t.get_text().split("\n")
            chars = max(8, int(max(map(len, lines)) * room / box.width * 0.95))
            text = "\n".join(textwrap.fill(line, chars, break_long_words=False) for line in lines)
            if text != t.get_text():
                t.set_text(text)
                changed = True
        if not changed:
            return
    fig.canvas.draw()


def _save(fig, stem: Path) -> list[Path]:
    _fit_text(fig)
    out = []
    for fmt in FORMATS:
        path = stem.with_name(f"{stem.name}.{fmt}")
        fig.savefig(path, dpi=300)
        out.append(path)
    return out


def _seed_key(seed):
    s = str(seed)
    return (0, int(s), "") if s.lstrip("-").isdigit() else (1, 0, s)


def seed_styles(seeds) -> dict:
    """{seed: (colour, marker)} of the study's seeds (e.g. the per-seed table's ``seed`` column),
    in seed order: the same seed has the same colour in every row and figure."""
    order = sorted(set(seeds), key=_seed_key)
    n = len(SEED_COLORS)
    return {s: (SEED_COLORS[i % n], SEED_MARKERS[(i // n) % len(SEED_MARKERS)]) for i, s in enumerate(order)}


def _seed_points(ax, xs, ys, seeds, styles, *, zorder: int = 4) -> None:
    for x, y, s in zip(xs, ys, seeds):
        color, marker = styles[s]
        ax.scatter([x], [y], s=14, color=color, marker=marker, edgecolors="black", linewidths=0.3, zorder=zorder)


def _seed_legend(fig, styles: dict, shown) -> None:
    """A one-line legend of the seeds shown ("seed 0", then the others' numbers), below the axes."""
    from matplotlib.lines import Line2D

    shown = sorted(set(shown), key=_seed_key)
    if not shown:
        return
    handles = [Line2D([], [], linestyle="none", marker=styles[s][1], markerfacecolor=styles[s][0],
                      markeredgecolor="black", markeredgewidth=0.3, markersize=4) for s in shown]
    labels = [f"seed {s}" if i == 0 else str(s) for i, s in enumerate(shown)]
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(shown), 8), frameon=False,
               handletextpad=0.1, columnspacing=0.6, borderaxespad=0.1, borderpad=0.1)


def write_figures(name: str, table, seeds, *, report: str, baseline: str, importances: dict,
                  importance_trials: dict, out_dir: Path) -> list[Path]:
    """Write every figure that has data; return the files (PNG, PDF, SVG of each)."""
    import matplotlib

    split, col = (report.split("/")[0], report.rsplit("/", 1)[-1]) if "/" in report else (report, report)
    files: list[Path] = []
    with matplotlib.rc_context(_STYLE):
        files += bars(name, table, seeds, col=col, split=split, baseline=baseline, stem=out_dir / f"{name}_bars")
        if baseline and seeds["delta_paired"].notna().any():
            files += paired_delta(name, table, seeds, baseline=baseline, col=col,
                                  stem=out_dir / f"{name}_paired_delta")
        classes = [c for c in table.columns if c.startswith("IoU/")]
        if classes and table[classes].notna().any().any():
            files += per_class(name, table, classes, split=split, stem=out_dir / f"{name}_per_class")
        if importances:
            files += importance(name, importances, importance_trials, stem=out_dir / f"{name}_importances")
    return files


def _row_labels(table, sep: str = "\n") -> list[str]:
    return [f"{r}{sep}(n={n})" for r, n in zip(table["row"], table["n"])]


def bars(name: str, table, seeds, *, col: str, split: str, baseline: str, stem: Path) -> list[Path]:
    """Mean ± std bars with every counted seed's value as a point (coloured by seed) and n under
    each row."""
    n = len(table)
    fig = _figure(COLUMN_IN if n <= 8 else PAGE_IN, 2.5)
    ax = fig.add_subplot()
    x = list(range(n))
    means = [0.0 if math.isnan(v) else v for v in table[col]]
    stds = [0.0 if math.isnan(v) else v for v in table[f"{col}_std"]]
    colors = [_BASE if r == baseline else _ROW for r in table["row"]]
    ax.bar(x, means, width=0.65, color=colors, alpha=0.45, edgecolor=colors, linewidth=0.8, zorder=1)
    ax.errorbar(x, means, yerr=stds, fmt="none", ecolor="black", elinewidth=0.8, capsize=2.5, zorder=3)
    styles = seed_styles(seeds["seed"])
    counted = seeds[seeds["counted"]]
    shown = []
    for i, row in enumerate(table["row"]):
        pts = counted.loc[(counted["row"] == row) & counted[col].notna(), ["seed", col]]
        k = len(pts)
        offs = [0.0] * k if k <= 1 else [-0.2 + 0.4 * j / (k - 1) for j in range(k)]
        _seed_points(ax, [i + o for o in offs], list(pts[col]), list(pts["seed"]), styles)
        shown += list(pts["seed"])
        if not k:
            ax.text(i, 0.03, "no runs", ha="center", va="bottom", rotation=90, transform=ax.get_xaxis_transform())
    if n > 4:  # slanted, on one line each (two-line labels of neighbours would overlap)
        ax.set_xticks(x, _row_labels(table, " "), rotation=30, ha="right", rotation_mode="anchor")
    else:
        ax.set_xticks(x, _row_labels(table))
    ax.set_ylabel(f"target-{split} {col} (%)")
    # Bars start at 0 (a cut axis would magnify the differences); the paired-Δ figure shows them.
    ax.set_ylim(0, max([m + s for m, s in zip(means, stds)] + list(counted[col].dropna()) + [1.0]) * 1.08)
    _title(fig, f"{name}: mean ± std over seeds; points: seeds")
    _seed_legend(fig, styles, shown)
    ax.grid(axis="y", linewidth=0.3, alpha=0.5)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    return _save(fig, stem)


def paired_delta(name: str, table, seeds, *, baseline: str, col: str, stem: Path) -> list[Path]:
    """The seed-paired differences to the baseline: one line per row, each seed a point (its
    colour as in the bars), the mean ± std of the differences as a marker with a bar, and
    wins/n at the right."""
    rows = [r for r in table["row"] if r != baseline and seeds.loc[seeds["row"] == r, "delta_paired"].notna().any()]
    fig = _figure(COLUMN_IN, 0.8 + 0.3 * max(1, len(rows)))
    ax = fig.add_subplot()
    ax.axvline(0.0, color="black", linewidth=0.6)
    styles = seed_styles(seeds["seed"])
    shown = []
    for i, row in enumerate(rows):
        t = table[table["row"] == row].iloc[0]
        paired = (seeds["row"] == row) & seeds["counted"] & seeds["delta_paired"].notna()
        d = seeds.loc[paired, ["seed", "delta_paired"]]
        _seed_points(ax, list(d["delta_paired"]), [i] * len(d), list(d["seed"]), styles, zorder=3)
        shown += list(d["seed"])
        std = t["delta_paired_std"] if not math.isnan(t["delta_paired_std"]) else 0.0
        ax.errorbar([t["delta_paired"]], [i + 0.22], xerr=[std], fmt="D", color=_ROW, markersize=3.5, capsize=2.5,
                    elinewidth=0.8, zorder=2)
        ax.annotate(f"{t['wins']}/{t['n_paired']} seeds won", (1.0, i), xycoords=("axes fraction", "data"),
                    xytext=(3, 0), textcoords="offset points", va="center")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_xlabel(f"Δ {col} vs {baseline}, same seed")
    _title(fig, f"{name}: seed-paired Δ; ◆: mean ± std")
    _seed_legend(fig, styles, shown)
    ax.grid(axis="x", linewidth=0.3, alpha=0.5)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    return _save(fig, stem)


def per_class(name: str, table, classes: list[str], *, split: str, stem: Path) -> list[Path]:
    """Rows × classes heatmap of mean per-class IoU (%), each cell labelled."""
    import numpy as np

    data = table[classes].to_numpy(dtype=float)
    fig = _figure(min(PAGE_IN, 1.8 + 0.3 * len(classes)), 1.1 + 0.24 * len(table))
    ax = fig.add_subplot()
    im = ax.imshow(np.ma.masked_invalid(data), cmap="viridis", vmin=0, vmax=100, aspect="auto")
    for (i, j), v in np.ndenumerate(data):
        if not math.isnan(v):
            ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=CELL_PT, color="white" if v < 60 else "black")
    ax.set_xticks(range(len(classes)), [c[len("IoU/"):].replace("_", " ") for c in classes], rotation=45,
                  ha="right", rotation_mode="anchor")
    ax.set_yticks(range(len(table)), list(table["row"]))
    ax.tick_params(length=0)
    cbar = fig.colorbar(im, ax=ax, fraction=0.025, pad=0.01)
    cbar.set_label(f"target-{split} IoU (%)")
    _title(fig, f"{name}: per-class IoU, mean over seeds")
    return _save(fig, stem)


def importance(name: str, importances: dict, trials: dict, *, stem: Path) -> list[Path]:
    """One panel per search row: the parameters' importances as horizontal bars, titled with the
    number of completed trials; a warning in red below :data:`MIN_IMPORTANCE_TRIALS`."""
    rows = list(importances)
    heights = [0.75 + 0.2 * len(importances[r]) for r in rows]
    fig = _figure(COLUMN_IN, sum(heights) + 0.3)
    panels = fig.subfigures(len(rows), 1, squeeze=False, height_ratios=heights)[:, 0]
    for i, (sub, row) in enumerate(zip(panels, rows)):
        ax = sub.add_subplot()
        imp = sorted(importances[row].items(), key=lambda kv: kv[1])
        ax.barh(range(len(imp)), [v for _, v in imp], color=_ROW, height=0.6)
        ax.set_yticks(range(len(imp)), [k for k, _ in imp])
        ax.set_xlim(0, 1)
        n = trials.get(row, 0)
        title = f"{row}: importance from {n} completed trials"
        if n < MIN_IMPORTANCE_TRIALS:
            _title(sub, title + f"\nfewer than {MIN_IMPORTANCE_TRIALS} trials: not reliable", color="#c00000")
        else:
            _title(sub, title)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
        if i == len(rows) - 1:
            ax.set_xlabel("importance (Optuna's default evaluator; sums to 1 per row)")
    return _save(fig, stem)
