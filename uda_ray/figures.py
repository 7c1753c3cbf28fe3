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
_STYLE = {"font.size": 7, "axes.titlesize": 7, "axes.labelsize": 7, "xtick.labelsize": 6, "ytick.labelsize": 6,
          "legend.fontsize": 6, "axes.linewidth": 0.6, "lines.linewidth": 0.8, "pdf.fonttype": 42,
          "ps.fonttype": 42, "svg.fonttype": "none", "savefig.bbox": "tight", "savefig.pad_inches": 0.02}
_BASE, _ROW = "#e69f00", "#0072b2"   # Okabe-Ito orange and blue: distinct for colour-blind readers


def _figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, stem: Path) -> list[Path]:
    out = []
    for fmt in FORMATS:
        path = stem.with_name(f"{stem.name}.{fmt}")
        fig.savefig(path, dpi=300)
        out.append(path)
    return out


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


def _row_labels(table) -> list[str]:
    return [f"{r}\n(n={n})" for r, n in zip(table["row"], table["n"])]


def bars(name: str, table, seeds, *, col: str, split: str, baseline: str, stem: Path) -> list[Path]:
    """Mean ± std bars with every counted seed's value as a point and n under each row."""
    n = len(table)
    fig = _figure(COLUMN_IN if n <= 8 else PAGE_IN, 2.3)
    ax = fig.add_subplot()
    x = list(range(n))
    means = [0.0 if math.isnan(v) else v for v in table[col]]
    stds = [0.0 if math.isnan(v) else v for v in table[f"{col}_std"]]
    colors = [_BASE if r == baseline else _ROW for r in table["row"]]
    ax.bar(x, means, width=0.65, color=colors, alpha=0.45, edgecolor=colors, linewidth=0.8, zorder=1)
    ax.errorbar(x, means, yerr=stds, fmt="none", ecolor="black", elinewidth=0.8, capsize=2.5, zorder=3)
    counted = seeds[seeds["counted"]]
    for i, row in enumerate(table["row"]):
        vals = list(counted.loc[counted["row"] == row, col].dropna())
        k = len(vals)
        offs = [0.0] * k if k <= 1 else [-0.18 + 0.36 * j / (k - 1) for j in range(k)]
        ax.scatter([i + o for o in offs], vals, s=9, color="black", zorder=4, linewidths=0)
        if not k:
            ax.text(i, 0.03, "no runs", ha="center", va="bottom", fontsize=6, rotation=90,
                    transform=ax.get_xaxis_transform())
    ax.set_xticks(x, _row_labels(table), rotation=30 if n > 4 else 0, ha="right" if n > 4 else "center")
    ax.set_ylabel(f"target-{split} {col} (%)")
    # Bars start at 0 (a cut axis would magnify the differences); the paired-Δ figure shows them.
    ax.set_ylim(0, max([m + s for m, s in zip(means, stds)] + list(counted[col].dropna()) + [1.0]) * 1.08)
    ax.set_title(f"{name}: mean ± std over seeds; points: seeds", loc="left")
    ax.grid(axis="y", linewidth=0.3, alpha=0.5)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    return _save(fig, stem)


def paired_delta(name: str, table, seeds, *, baseline: str, col: str, stem: Path) -> list[Path]:
    """The seed-paired differences to the baseline: one line per row, each seed a point, the mean
    ± std of the differences as a marker with a bar, and wins/n at the right."""
    rows = [r for r in table["row"] if r != baseline and seeds.loc[seeds["row"] == r, "delta_paired"].notna().any()]
    fig = _figure(COLUMN_IN, 0.45 + 0.28 * max(1, len(rows)))
    ax = fig.add_subplot()
    ax.axvline(0.0, color="black", linewidth=0.6)
    for i, row in enumerate(rows):
        t = table[table["row"] == row].iloc[0]
        d = seeds.loc[(seeds["row"] == row) & seeds["counted"], "delta_paired"].dropna()
        ax.scatter(d, [i] * len(d), s=9, color="black", linewidths=0, zorder=3)
        std = t["delta_paired_std"] if not math.isnan(t["delta_paired_std"]) else 0.0
        ax.errorbar([t["delta_paired"]], [i], xerr=[std], fmt="D", color=_ROW, markersize=3.5, capsize=2.5,
                    elinewidth=0.8, zorder=2)
        ax.annotate(f"{t['wins']}/{t['n_paired']} seeds won", (1.0, i), xycoords=("axes fraction", "data"),
                    xytext=(3, 0), textcoords="offset points", va="center", fontsize=6)
    ax.set_yticks(range(len(rows)), rows)
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_xlabel(f"Δ {col} vs {baseline}, same seed (points)")
    ax.set_title(f"{name}: seed-paired Δ; ●: seeds, ◆: mean ± std", loc="left")
    ax.grid(axis="x", linewidth=0.3, alpha=0.5)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    return _save(fig, stem)


def per_class(name: str, table, classes: list[str], *, split: str, stem: Path) -> list[Path]:
    """Rows × classes heatmap of mean per-class IoU (%), each cell labelled."""
    import numpy as np

    data = table[classes].to_numpy(dtype=float)
    fig = _figure(min(PAGE_IN, 1.8 + 0.3 * len(classes)), 0.9 + 0.22 * len(table))
    ax = fig.add_subplot()
    im = ax.imshow(np.ma.masked_invalid(data), cmap="viridis", vmin=0, vmax=100, aspect="auto")
    for (i, j), v in np.ndenumerate(data):
        if not math.isnan(v):
            ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=5, color="white" if v < 60 else "black")
    ax.set_xticks(range(len(classes)), [c[len("IoU/"):].replace("_", " ") for c in classes], rotation=45,
                  ha="right")
    ax.set_yticks(range(len(table)), list(table["row"]))
    ax.tick_params(length=0)
    cbar = fig.colorbar(im, ax=ax, fraction=0.025, pad=0.01)
    cbar.set_label(f"target-{split} IoU (%)")
    ax.set_title(f"{name}: per-class IoU, mean over seeds", loc="left")
    return _save(fig, stem)


def importance(name: str, importances: dict, trials: dict, *, stem: Path) -> list[Path]:
    """One panel per search row: the parameters' importances as horizontal bars, titled with the
    number of completed trials; a warning in red below :data:`MIN_IMPORTANCE_TRIALS`."""
    rows = list(importances)
    heights = [0.65 + 0.2 * len(importances[r]) for r in rows]
    fig = _figure(COLUMN_IN, sum(heights) + 0.2)
    axes = fig.subplots(len(rows), 1, squeeze=False, gridspec_kw={"height_ratios": heights})[:, 0]
    for ax, row in zip(axes, rows):
        imp = sorted(importances[row].items(), key=lambda kv: kv[1])
        ax.barh(range(len(imp)), [v for _, v in imp], color=_ROW, height=0.6)
        ax.set_yticks(range(len(imp)), [k for k, _ in imp])
        ax.set_xlim(0, 1)
        n = trials.get(row, 0)
        title = f"{row}: importance from {n} completed trials"
        if n < MIN_IMPORTANCE_TRIALS:
            ax.set_title(title + f"\nfewer than {MIN_IMPORTANCE_TRIALS} trials: not reliable", loc="left",
                         color="#c00000")
        else:
            ax.set_title(title, loc="left")
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    axes[-1].set_xlabel("importance (Optuna's default evaluator; sums to 1 per row)")
    return _save(fig, stem)
