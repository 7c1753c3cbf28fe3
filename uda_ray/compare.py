"""``uda-ray compare STUDY``: a study's table printed the way UDA papers print ablation tables,
read from MLflow alone (the study runner's parent run and its child runs).

Written to ``runs/STUDY/`` by default (``out_dir``) and logged to the study's parent run under
``compare/``: the table (``STUDY_compare.{csv,parquet,md,tex}``; the ``.tex`` is the compact table
``--format latex`` prints, for one column of a two-column paper, with per-class IoU in
``STUDY_compare_per_class.tex``, a full-width ``table*``), the per-seed table
(``STUDY_seeds.{csv,parquet}``: one line per seed run, counted or not, and the stage it reused), the importances
(``STUDY_importances.csv``) and the figures of :mod:`uda_ray.figures` (PNG, PDF, SVG). The parent
run also gets the table as an MLflow table (``compare/table.json``) and each row's means as
metrics (``row/<row>/mIoU`` ...), so that the MLflow UI shows them without opening a file.

One line per row: the finished seeds' mean ± sample std of the reported target-val mIoU (in %),
Δ against the baseline row in points (difference of the means, and the mean ± std of the
seed-paired differences with the number of seeds on which the row beats the baseline), the
selection-split mIoU, failed runs (counted and listed,
never averaged), per-class IoU, and the best hyperparameters of search rows. Below the table, the
honest-selection check: the row that the objective (a split disjoint from val) would pick against
the best row on the reported metric, the gap being what picking on val would overstate.

``mlflow``, ``pandas``, ``matplotlib`` and ``optuna`` are imported inside the functions, so that
importing this module stays light.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from . import tracking
from .errors import UserError, did_you_mean

DEFAULT_OBJECTIVE = "sel/mIoU"
DEFAULT_REPORT = "val/mIoU"
SEL_METRIC = "sel/mIoU"
# Label-free model-selection criteria the runner may log, with the direction that is "better".
LABEL_FREE = (("src/mIoU", "max"), ("tgt/entropy", "min"))
# Column order of per-class IoU: the Cityscapes 19-class order (uda_ray.data.labels.CLASSES_19, spaces
# as '_' the way the tracker logs them). Not imported from there: uda_ray.data pulls in torch.
CLASS_ORDER = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic_light", "traffic_sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle",
    "bicycle",
)
_FAILED = ("FAILED", "KILLED")
_DASH = "—"


@dataclass
class CompareResult:
    """What ``compare_study`` found and wrote.

    Args:
        table: one line per row, numeric columns (mIoU etc. in %, Δ in points), the best
            hyperparameters of search rows as ``hp/<key>`` columns.
        text: the table (in the requested format), the selection check and notes, ready to print.
        files: the files written in ``out_dir`` (tables, per-seed table, figures, importances).
        importances: ``{row: {param: importance}}`` for search rows with >= 2 completed Optuna trials.
        selection: the honest-selection check (see ``compare_study``).
        seeds: one line per seed run of every row (``counted``: it is in the row's mean).
        importance_trials: ``{row: completed Optuna trials}`` behind each row's importances.
        verdicts: the claims' :class:`uda_ray.verdict.Verdict`, in the study's order.
        differences: with ``against``, the row x seeds that differ from the committed results.
    """

    table: "pandas.DataFrame"  # noqa: F821 (imported lazily)
    text: str
    files: list[Path] = field(default_factory=list)
    importances: dict[str, dict[str, float]] = field(default_factory=dict)
    selection: dict = field(default_factory=dict)
    seeds: "pandas.DataFrame | None" = None  # noqa: F821
    importance_trials: dict[str, int] = field(default_factory=dict)
    verdicts: list = field(default_factory=list)    # uda_ray.verdict.Verdict per claim
    differences: int | None = None                  # row x seeds that differ from --against


@dataclass
class _Run:
    run_id: str
    status: str
    start_time: int
    row: str
    seed: str
    trial: str
    search: bool
    method: str
    metrics: dict
    params: dict
    tags: dict


def study_name(study: str | Path) -> str:
    """``studies/quickstart.py`` (or any path) -> ``quickstart``; a plain name is kept as is."""
    s = str(study)
    if s.endswith(".py") or "/" in s or "\\" in s:
        return Path(s).stem
    return s


FORMATS = ("text", "markdown", "latex")


def compare_study(study: str | Path, *, tracking_uri: str | None = None, out_dir: str | Path | None = None,
                  log_to_parent: bool = True, per_class: bool = False, fmt: str = "text",
                  baseline: str | None = None, claims: list | None = None, against: str | Path | None = None,
                  save_results: str | Path | None = None) -> CompareResult:
    """Build the ablation table of ``study`` from MLflow and write it with its figures.

    Args:
        study: the study name, or the path of its study file (the name is the file stem).
        tracking_uri: MLflow tracking URI; None keeps MLflow's default (``sqlite:///mlflow.db``).
        out_dir: folder of the files (see the module's docstring); None: ``runs/<study>``, where
            ``uda-ray study`` writes them.
        log_to_parent: also log these files as artifacts of the study's parent run, under
            ``compare/``, with the table as an MLflow table and each row's means as metrics.
        per_class: per-class IoU columns in ``text`` (the files always have them).
        fmt: ``text`` (fixed width), ``markdown`` or ``latex`` (booktabs) for ``text``.
        baseline: another row as the Δ columns' baseline (e.g. each parent of a row that
            combines two methods' components); the files are then ``<study>_vs_<row>_*`` and
            nothing is logged to the parent run. None: the study's own baseline.
        claims: the study's claims (:class:`uda_ray.verdict.Claim`) to judge from the seeds;
            None: those the study recorded on its parent run (tag ``claims``). The verdict
            table is printed below the table and written as ``STUDY_verdicts.{csv,md,tex}``.
        against: a committed results file (``studies/results/STUDY_seeds.csv``): every row x
            seed whose target-val mIoU differs from it (to the last digit), and those on one
            side only, are listed (``CompareResult.differences`` counts them).
        save_results: write the counted seed runs there as a results file
            (:func:`uda_ray.verdict.write_results`: values, lineage, git commit, data and code
            fingerprints).

    Returns:
        A ``CompareResult``. ``selection`` holds ``criterion``, ``mode``, ``picked`` (the row with
        the best mean objective), ``picked_report`` (its mean reported metric, %), ``best`` (the row
        with the best mean reported metric), ``best_report`` and ``gap = best_report - picked_report``
        (points); ``selection["label_free"]`` holds the same for each label-free criterion
        (``src/mIoU`` max, ``tgt/entropy`` min) logged on every row that has finished runs.

    Side effect: RUNNING runs of the study whose owning process ran on this host and has ended
    are first marked KILLED (:func:`uda_ray.tracking.reap_orphans`); runs owned by processes
    of another host are left alone.

    Raises:
        UnknownStudy: no experiment or no study run named ``study`` in the store (a ValueError).
    """
    if fmt not in FORMATS:
        raise UserError(f"format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    name = study_name(study)
    uri = tracking.resolve_uri(tracking_uri)
    _check_sqlite_exists(uri, name)
    client = tracking.mlflow_client(uri)
    exp = client.get_experiment_by_name(name)
    if exp is None or exp.lifecycle_stage != "active":
        raise UnknownStudy(_unknown(name, uri, f"no MLflow experiment {name!r}" + _did_you_mean(client, name)))
    # Runs left RUNNING by a killed process of this host count as KILLED (failed), not as
    # "not finished yet"; those of another host are left as they are.
    tracking.reap_orphans(client, exp.experiment_id)
    parent = _find_parent(client, exp.experiment_id, name)
    if parent is None:
        raise UnknownStudy(_unknown(name, uri, f"experiment {name!r} has no study run (tag uda_ray.kind=study)"))
    runs = _children(client, exp.experiment_id, parent.info.run_id)

    tags = parent.data.tags
    notes: list[str] = []
    spec = _spec(tags, runs, notes)
    if baseline is not None:
        if baseline not in spec.rows:
            raise UserError(f"--baseline {baseline}: not a row of study {name}{did_you_mean(baseline, spec.rows)} "
                            f"(its rows: {', '.join(spec.rows)})")
        spec.baseline, log_to_parent = baseline, False
    rows = _aggregate(spec, runs, notes)
    table = _table(spec, rows)
    seeds = _seed_table(spec, rows, runs)
    selection = _selection(spec, rows)
    importances, trials = _importances(name, spec, notes)

    from .figures import write_figures

    out = Path(out_dir) if out_dir is not None else Path("runs") / name
    out.mkdir(parents=True, exist_ok=True)
    stem = name if baseline is None else f"{name}_vs_{baseline}"
    files = [out / f"{stem}_compare.csv", out / f"{stem}_compare.parquet", out / f"{stem}_seeds.csv",
             out / f"{stem}_seeds.parquet", out / f"{stem}_compare.md", out / f"{stem}_compare.tex"]
    table.to_csv(files[0], index=False)
    table.to_parquet(files[1], index=False)
    seeds.to_csv(files[2], index=False)
    seeds.to_parquet(files[3], index=False)
    files[4].write_text(_render(name, spec, rows, table, selection, importances, trials, notes,
                                per_class=True, fmt="markdown") + "\n")
    # LaTeX: the compact table that --format latex prints (one column of a two-column paper),
    # and per-class IoU in its own full-width table
    per_class_tex = out / f"{stem}_compare_per_class.tex"
    files[5].write_text(_render(name, spec, rows, table, selection, importances, trials, notes,
                                fmt="latex", per_class_file=per_class_tex.name) + "\n")
    if any(c.startswith("IoU/") for c in table.columns):
        per_class_tex.write_text("\n".join(_latex_per_class(name, spec, table)) + "\n")
        files.append(per_class_tex)
    files += write_figures(stem, table, seeds, report=spec.report, baseline=spec.baseline,
                           importances=importances, importance_trials=trials, out_dir=out)
    if importances:
        files.append(_write_importances(importances, trials, out / f"{stem}_importances.csv"))
    from . import verdict as vd

    if claims is None:
        try:
            claims = vd.claims_from_json(tags.get("claims"))
        except (ValueError, TypeError, KeyError) as e:
            notes.append(f"the study run's claims tag is not readable ({e}): no verdicts")
            claims = []
    claims = [c for c in claims if c.better in spec.rows and c.than in spec.rows]
    values = vd.values_of_seeds(seeds, spec.report_col)
    verdicts = vd.judge_all(claims, values)
    if verdicts and baseline is None:
        vtable = vd.table(verdicts)
        vfiles = [out / f"{stem}_verdicts.csv", out / f"{stem}_verdicts.md", out / f"{stem}_verdicts.tex"]
        vtable.to_csv(vfiles[0], index=False)
        vfiles[1].write_text(vd.render(verdicts, "markdown", f"Verdicts of study {name}") + f"\n\n{vd.RULE}.\n")
        vfiles[2].write_text(vd.render(verdicts, "latex", f"Verdicts of study {name}") + "\n")
        files += vfiles
    if save_results is not None:
        meta = {r.run_id: {"lineage": r.tags.get("lineage", ""),
                           "code_commit": r.tags.get("mlflow.source.git.commit", ""),
                           "code_fingerprint": r.tags.get("code_fingerprint", ""),
                           "data_fingerprint": r.tags.get("data_fingerprint", "")} for r in runs}
        files.append(vd.write_results(save_results, seeds, meta))
    differences, against_lines = None, []
    if against is not None:
        committed = vd.values_of_results(vd.read_results(against))
        against_lines, differences = vd.against(values, committed)
        against_lines[0] = f"against {against}: {against_lines[0]}"
    if log_to_parent:
        _log_to_parent(client, parent.info.run_id, spec, table, files)

    text = _render(name, spec, rows, table, selection, importances, trials, notes, per_class=per_class, fmt=fmt,
                   per_class_file=per_class_tex.name)
    if verdicts:
        vfmt = {"text": "text", "markdown": "markdown", "latex": "latex"}[fmt]
        text += "\n\n" + vd.render(verdicts, vfmt, f"claims of study {name}: seed-paired Δ of {spec.report} (points)")
    if against_lines:
        text += "\n\n" + "\n".join(against_lines)
    return CompareResult(table=table, text=text, files=files, importances=importances, selection=selection,
                         seeds=seeds, importance_trials=trials, verdicts=verdicts, differences=differences)


def _log_to_parent(client, parent_id: str, spec: "_Spec", table, files: list[Path]) -> None:
    """The files under ``compare/``, the table as an MLflow table, each row's means as metrics.

    The table is written here in ``MlflowClient.log_table``'s format (pandas' ``split`` JSON,
    the run's ``mlflow.loggedArtifacts`` tag naming it a table) and logged as a plain artifact,
    which replaces the file: ``log_table`` appends to an existing table, so every ``compare``
    would add another copy of every row."""
    import json
    import tempfile
    import time

    from mlflow.entities import Metric
    from mlflow.utils.mlflow_tags import MLFLOW_LOGGED_ARTIFACTS

    for f in files:
        client.log_artifact(parent_id, str(f), artifact_path="compare")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "table.json"
        table.astype(object).where(table.notna(), None).to_json(path, orient="split", index=False,
                                                                 date_format="iso")
        client.log_artifact(parent_id, str(path), artifact_path="compare")
    logged = json.loads(client.get_run(parent_id).data.tags.get(MLFLOW_LOGGED_ARTIFACTS, "[]"))
    entry = {"path": "compare/table.json", "type": "table"}
    if entry not in logged:  # what makes the UI's artifact view show it as a table
        client.set_tag(parent_id, MLFLOW_LOGGED_ARTIFACTS, json.dumps([*logged, entry]))
    col, ts = spec.report_col, int(time.time() * 1000)
    metrics = []
    for _, t in table.iterrows():
        key = "".join(c if c.isalnum() or c in "_-. " else "_" for c in t["row"])
        for name, value in ((col, t[col]), (f"{col}_std", t[f"{col}_std"]), ("delta", t["delta"]),
                            ("delta_paired", t["delta_paired"]), ("n", t["n"]), ("n_failed", t["n_failed"])):
            if isinstance(value, (int, float)) and math.isfinite(value):
                metrics.append(Metric(f"row/{key}/{name}", float(value), ts, 0))
    for i in range(0, len(metrics), 500):
        client.log_batch(parent_id, metrics=metrics[i:i + 500])


# --------------------------------------------------------------------------------------------
# Reading MLflow
# --------------------------------------------------------------------------------------------
class UnknownStudy(UserError, ValueError):
    """No study of that name in the MLflow store."""


def _did_you_mean(client, name: str) -> str:
    """``; did you mean 'x'?`` for the closest study names of the store, '' if none is close."""
    from .errors import did_you_mean

    return did_you_mean(name, [e.name for e in client.search_experiments(max_results=1000)])


def _unknown(name: str, uri: str, why: str) -> str:
    return (f"unknown study {name!r} at tracking URI {uri}: {why}; run `uda-ray study` for it first "
            f"(or pass the tracking URI it logged to)")


def _check_sqlite_exists(uri: str, name: str) -> None:
    # MLflow would create an empty store (and a stray mlflow.db) for a path that does not exist.
    if uri.startswith("sqlite:///") and uri != "sqlite:///:memory:":
        path = Path(uri[len("sqlite:///"):])
        if not path.is_file():
            raise UnknownStudy(_unknown(name, uri, f"there is no MLflow store at {path}"))


def _search_all(client, exp_id: str, filter_string: str, order_by: list[str] | None = None):
    token = None
    while True:
        page = client.search_runs([exp_id], filter_string, max_results=1000, order_by=order_by,
                                  page_token=token)
        yield from page
        token = page.token
        if not token:
            return


SELECTED_TAG = "uda_ray.selected"  # ms since the epoch when the study last ran or skipped this run as current


def _find_parent(client, exp_id: str, name: str):
    # Most recent first: a study re-run starts a new parent run, and the table is the latest one's.
    for run in _search_all(client, exp_id, "tags.`uda_ray.kind` = 'study'",
                           order_by=["attributes.start_time DESC"]):
        if run.data.tags.get("study", name) == name:
            return run
    return None


def _children(client, exp_id: str, parent_id: str) -> list[_Run]:
    out = []
    for r in _search_all(client, exp_id, f"tags.mlflow.parentRunId = '{parent_id}'",
                         order_by=["attributes.start_time ASC"]):
        t = r.data.tags
        # A search trial is tagged search_row (uda_ray.kind=search_trial); stores written before
        # that tag it row with search=1.
        search = t.get("search", "0") == "1" or t.get("uda_ray.kind") == "search_trial"
        out.append(_Run(run_id=r.info.run_id, status=r.info.status, start_time=r.info.start_time or 0,
                        row=t.get("row") or t.get("search_row", ""), seed=t.get("seed", ""),
                        trial=t.get("trial", ""), search=search, method=t.get("method", ""),
                        metrics=tracking.scores_in_percent(r.data.metrics, t), params=dict(r.data.params),
                        tags=dict(t)))
    return out


# --------------------------------------------------------------------------------------------
# Aggregation
# --------------------------------------------------------------------------------------------
@dataclass
class _Spec:
    rows: list[str]
    baseline: str
    objective: str
    mode: str
    report: str
    search_space: dict[str, list[str]]
    storage: str

    @property
    def split(self) -> str:            # "val" of "val/mIoU"
        return self.report.split("/")[0] if "/" in self.report else self.report

    @property
    def report_col(self) -> str:       # "mIoU" of "val/mIoU"
        return self.report.rsplit("/", 1)[-1]

    @property
    def iou_prefix(self) -> str:       # "val/IoU/"
        return f"{self.split}/IoU/"


def _split_list(s: str | None) -> list[str]:
    return [x.strip() for x in (s or "").split(",") if x.strip()]


def _spec(tags: dict, runs: list[_Run], notes: list[str]) -> _Spec:
    rows = _split_list(tags.get("rows"))
    seen = list(dict.fromkeys(r.row for r in runs if r.row))
    if not rows:
        rows = seen
    elif extra := [r for r in seen if r not in rows]:
        # The runner reuses the parent run when a study is launched again: rows dropped from the
        # study file keep their old runs, but they are not part of the table any more.
        notes.append(f"runs of rows not in the study's current rows are not shown: {', '.join(extra)}")
    mode = tags.get("objective_mode", "max") or "max"
    if mode not in ("max", "min"):
        notes.append(f"objective_mode {mode!r} is neither max nor min; using max")
        mode = "max"
    space = {k[len("search_space."):]: _split_list(v) for k, v in tags.items() if k.startswith("search_space.")}
    spec = _Spec(rows=rows, baseline=tags.get("baseline", "") or "",
                 objective=tags.get("objective", "") or DEFAULT_OBJECTIVE, mode=mode,
                 report=tags.get("report_metric", "") or DEFAULT_REPORT, search_space=space,
                 storage=tags.get("optuna_storage", "") or "")
    if spec.baseline and spec.baseline not in spec.rows:
        notes.append(f"baseline {spec.baseline!r} is not a row of the study: no Δ column")
        spec.baseline = ""
    return spec


@dataclass
class _Row:
    name: str
    method: str
    finished: list[_Run]
    failed: list[_Run]
    hparams: dict[str, str]
    is_search: bool
    runs: list[_Run] = field(default_factory=list)   # every seed run (finished, failed, running)

    def values(self, key: str) -> list[float]:
        return [r.metrics[key] for r in self.finished if key in r.metrics and math.isfinite(r.metrics[key])]

    def mean(self, key: str) -> float:
        v = self.values(key)
        return statistics.fmean(v) if v else math.nan

    def std(self, key: str) -> float:
        v = self.values(key)            # sample std (ddof=1), undefined for one seed
        return statistics.stdev(v) if len(v) >= 2 else math.nan


def _better(a: float, b: float, mode: str) -> bool:
    return a > b if mode == "max" else a < b


def _aggregate(spec: _Spec, runs: list[_Run], notes: list[str]) -> list[_Row]:
    out = []
    for name in spec.rows:
        mine = [r for r in runs if r.row == name]
        seeds = [r for r in mine if not r.search]          # search trials are never averaged
        trials = [r for r in mine if r.search]
        finished: dict[str, _Run] = {}
        # the run the study last chose for its row x seed wins (the study's current lineage:
        # after a row was edited and edited back, an older run is current again), else the latest
        for r in sorted(seeds, key=lambda r: (int(r.tags.get(SELECTED_TAG) or 0), r.start_time)):
            if r.status == "FINISHED":
                key = r.seed or r.run_id
                if key in finished:
                    notes.append(f"{name} seed {r.seed}: several finished runs, the latest ({r.run_id[:8]}) kept")
                finished[key] = r
        failed = [r for r in seeds if r.status in _FAILED]
        running = [r for r in seeds if r.status not in _FAILED and r.status != "FINISHED"]
        if running:
            notes.append(f"{name}: {len(running)} run(s) not finished yet ({running[0].status}), not counted")
        methods = list(dict.fromkeys(r.method for r in mine if r.method))
        is_search = name in spec.search_space or bool(trials)
        hp = _best_hparams(name, spec, seeds, trials, notes) if is_search else {}
        out.append(_Row(name=name, method=",".join(methods), finished=list(finished.values()), failed=failed,
                        hparams=hp, is_search=is_search, runs=seeds))
    return out


def _best_hparams(name: str, spec: _Spec, seeds: list[_Run], trials: list[_Run], notes: list[str]) -> dict:
    keys = spec.search_space.get(name, [])
    if not keys:
        return {}
    src = seeds
    if not src:
        done = [t for t in trials if t.status == "FINISHED" and math.isfinite(t.metrics.get(spec.objective, math.nan))]
        if not done:
            return {}
        best = done[0]
        for t in done[1:]:
            if _better(t.metrics[spec.objective], best.metrics[spec.objective], spec.mode):
                best = t
        fmt = ".2f" if tracking.is_score(spec.objective) else ".4g"
        notes.append(f"{name}: not re-run over seeds yet; best hyperparameters from search trial "
                     f"{best.trial or best.run_id[:8]} ({spec.objective} {best.metrics[spec.objective]:{fmt}})")
        src = [best]
    hp = {}
    for k in keys:
        vals = list(dict.fromkeys(r.params[k] for r in src if k in r.params))
        hp[k] = "|".join(vals)           # one value expected; several would show as a|b
    return hp


def _classes(spec: _Spec, rows: list[_Row]) -> list[str]:
    names = {k[len(spec.iou_prefix):] for row in rows for r in row.finished for k in r.metrics
             if k.startswith(spec.iou_prefix)}
    order = {c: i for i, c in enumerate(CLASS_ORDER)}
    return sorted(names, key=lambda c: (order.get(c, len(order)), c))


def _base_seeds(spec: _Spec, rows: list[_Row]) -> dict[str, float]:
    """The baseline row's reported metric by seed (its counted runs)."""
    base = next((r for r in rows if r.name == spec.baseline), None)
    return {r.seed: r.metrics[spec.report] for r in (base.finished if base else [])
            if math.isfinite(r.metrics.get(spec.report, math.nan))}


def _hp_keys(spec: _Spec) -> list[str]:
    return list(dict.fromkeys(k for keys in spec.search_space.values() for k in keys))


def _hp_columns(df, keys: list[str]):
    """``hp/<key>`` columns as numbers where every value is one, else as text."""
    import pandas as pd

    for k in keys:
        c = f"hp/{k}"
        num = pd.to_numeric(df[c].replace("", None), errors="coerce")
        df[c] = num if (num.notna() | df[c].isin(["", None])).all() else df[c].fillna("").astype(str)
    return df


def _table(spec: _Spec, rows: list[_Row]):
    import pandas as pd

    classes = _classes(spec, rows)
    m13 = f"{spec.split}/mIoU13"
    has13 = any(m13 in r.metrics for row in rows for r in row.finished)
    base = next((r for r in rows if r.name == spec.baseline), None)
    base_mean = base.mean(spec.report) if base else math.nan
    base_seed = _base_seeds(spec, rows)
    hp_keys = _hp_keys(spec)
    col = spec.report_col
    records = []
    for row in rows:
        mean = row.mean(spec.report)
        # seed-paired differences to the baseline: the same seed's data order and init on
        # both sides, so they see through the seed-to-seed spread that Δ of means carries
        diffs = [r.metrics[spec.report] - base_seed[r.seed] for r in row.finished
                 if r.seed in base_seed and math.isfinite(r.metrics.get(spec.report, math.nan))]
        rec = {"row": row.name, "method": row.method, "n": len(row.finished), col: mean,
               f"{col}_std": row.std(spec.report),
               "delta": mean - base_mean if spec.baseline else math.nan,
               "delta_paired": statistics.fmean(diffs) if diffs and spec.baseline else math.nan,
               "delta_paired_std": statistics.stdev(diffs) if len(diffs) >= 2 and spec.baseline else math.nan,
               "n_paired": len(diffs) if spec.baseline else 0,
               "wins": sum(d > 0 for d in diffs) if spec.baseline else 0,
               "sel_mIoU": row.mean(SEL_METRIC), "n_failed": len(row.failed)}
        if has13:
            rec["mIoU13"] = row.mean(m13)
        for c in classes:
            rec[f"IoU/{c}"] = row.mean(spec.iou_prefix + c)
        for k in hp_keys:
            rec[f"hp/{k}"] = row.hparams.get(k)
        records.append(rec)
    cols = ["row", "method", "n", col, f"{col}_std", "delta", "delta_paired", "delta_paired_std", "n_paired",
            "wins", "sel_mIoU", "n_failed"]
    cols += ["mIoU13"] * has13 + [f"IoU/{c}" for c in classes] + [f"hp/{k}" for k in hp_keys]
    df = pd.DataFrame.from_records(records, columns=cols)
    df = df.astype({"n": "int64", "n_failed": "int64", "n_paired": "int64", "wins": "int64"})
    return _hp_columns(df, hp_keys)


def _seed_key(seed: str):
    return (0, int(seed), "") if seed.isdigit() else (1, 0, seed)


def _seed_table(spec: _Spec, rows: list[_Row], runs: list[_Run]):
    """One line per seed run of every row (search trials are not seeds): its status, whether it
    is counted in the row's mean, its metrics (in %) and its seed-paired difference to the
    baseline (points), per-class IoU and, for search rows, its hyperparameters."""
    import pandas as pd

    col, m13 = spec.report_col, f"{spec.split}/mIoU13"
    classes = _classes(spec, rows)
    hp_keys = _hp_keys(spec)
    has13 = any(m13 in r.metrics for row in rows for r in row.runs)
    base_seed = _base_seeds(spec, rows)
    records = []
    for row in rows:
        counted = {r.run_id for r in row.finished}
        for r in sorted(row.runs, key=lambda r: (_seed_key(r.seed), r.start_time)):
            pct = lambda k: r.metrics[k] if math.isfinite(r.metrics.get(k, math.nan)) else math.nan  # noqa: E731
            rec = {"row": row.name, "method": r.method, "seed": r.seed, "status": r.status,
                   "counted": r.run_id in counted, "run_id": r.run_id,
                   # a stage taken from the store: the study and run that trained it
                   "reused": (f"{r.tags.get('reused_from_study', '')}:{r.tags['reused_from_run'][:8]}"
                              if r.tags.get("reused_from_run") else ""),
                   col: pct(spec.report),
                   "sel_mIoU": pct(SEL_METRIC)}
            rec["delta_paired"] = (rec[col] - base_seed[r.seed]
                                   if spec.baseline and r.seed in base_seed and rec["counted"] else math.nan)
            if has13:
                rec["mIoU13"] = pct(m13)
            for c in classes:
                rec[f"IoU/{c}"] = pct(spec.iou_prefix + c)
            for k in hp_keys:
                rec[f"hp/{k}"] = r.params.get(k) if k in spec.search_space.get(row.name, []) else None
            records.append(rec)
    cols = ["row", "method", "seed", "status", "counted", "run_id", "reused", col, "sel_mIoU", "delta_paired"]
    cols += ["mIoU13"] * has13 + [f"IoU/{c}" for c in classes] + [f"hp/{k}" for k in hp_keys]
    df = pd.DataFrame.from_records(records, columns=cols).astype({"counted": "bool"})
    return _hp_columns(df, hp_keys)


def _pick(rows: list[_Row], key: str, mode: str, report: str) -> dict | None:
    cand = [(r, r.mean(key), r.mean(report)) for r in rows if r.finished]
    cand = [c for c in cand if math.isfinite(c[1]) and math.isfinite(c[2])]
    if not cand:
        return None
    picked = cand[0]
    for c in cand[1:]:
        if _better(c[1], picked[1], mode):
            picked = c
    best = cand[0]
    for c in cand[1:]:
        if c[2] > best[2]:
            best = c
    return {"criterion": key, "mode": mode, "picked": picked[0].name, "picked_value": picked[1],
            "picked_report": picked[2], "best": best[0].name, "best_report": best[2],
            "gap": best[2] - picked[2]}


def _selection(spec: _Spec, rows: list[_Row]) -> dict:
    sel = _pick(rows, spec.objective, spec.mode, spec.report) or {}
    done = [r for r in rows if r.finished]
    label_free = {}
    for key, mode in LABEL_FREE:
        if done and all(r.values(key) for r in done):
            label_free[key] = _pick(rows, key, mode, spec.report)
    if label_free:
        sel["label_free"] = label_free
    return sel


def _importances(name: str, spec: _Spec, notes: list[str]) -> tuple[dict[str, dict[str, float]], dict[str, int]]:
    """``({row: {param: importance}}, {row: completed trials})`` of the search rows."""
    rows = [r for r in spec.rows if r in spec.search_space]
    if not rows:
        return {}, {}
    if not spec.storage:
        notes.append("no optuna_storage tag on the study run: no hyperparameter importances")
        return {}, {}
    if spec.storage.startswith("sqlite:///") and not Path(spec.storage[len("sqlite:///"):]).is_file():
        # optuna.load_study would create an empty database there.
        notes.append(f"Optuna storage {spec.storage} not found: no hyperparameter importances")
        return {}, {}
    import optuna
    from optuna.trial import TrialState

    out, trials = {}, {}
    for row in rows:
        sname = f"{name}.{row}"
        try:
            st = optuna.load_study(study_name=sname, storage=spec.storage)
        except KeyError:
            notes.append(f"{row}: no Optuna study {sname!r} in {spec.storage}")
            continue
        n = len(st.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
        if n < 2:
            notes.append(f"{row}: {n} completed Optuna trial(s), importances need 2")
            continue
        if len(st.directions) > 1:
            notes.append(f"{row}: multi-objective Optuna study, importances not computed")
            continue
        try:
            imp = optuna.importance.get_param_importances(st)
        except (ValueError, RuntimeError) as e:   # e.g. a single distinct configuration
            notes.append(f"{row}: importances failed: {e}")
            continue
        out[row] = {k: float(v) for k, v in imp.items()}
        trials[row] = n
    return out, trials


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------
def _write_importances(importances: dict, trials: dict, path: Path) -> Path:
    import pandas as pd

    recs = [{"row": row, "param": k, "importance": v, "n_trials": trials.get(row, 0)}
            for row, imp in importances.items() for k, v in sorted(imp.items(), key=lambda kv: -kv[1])]
    pd.DataFrame.from_records(recs, columns=["row", "param", "importance", "n_trials"]).to_csv(path, index=False)
    return path


def _f(v: float, signed: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return f"{v:+.1f}" if signed else f"{v:.1f}"


def _paired(t) -> str:
    """``+1.2 ± 0.3 (3/3)``: mean ± std of the seed-paired differences, and the seeds won."""
    std = "" if math.isnan(t["delta_paired_std"]) else f" ± {t['delta_paired_std']:.1f}"
    return f"{t['delta_paired']:+.1f}{std} ({t['wins']}/{t['n_paired']})"


def _grid(header: list[str], lines: list[list[str]], right: list[bool]) -> list[str]:
    w = [max(len(header[j]), *(len(r[j]) for r in lines)) for j in range(len(header))]
    def fmt(cells):
        return "  ".join(c.rjust(w[j]) if right[j] else c.ljust(w[j]) for j, c in enumerate(cells)).rstrip()
    return [fmt(header)] + [fmt(r) for r in lines]


def _markdown(header: list[str], lines: list[list[str]], right: list[bool]) -> list[str]:
    esc = lambda c: c.replace("|", "\\|")  # noqa: E731
    return (["| " + " | ".join(map(esc, header)) + " |", "|" + "|".join("---:" if r else ":---" for r in right) + "|"]
            + ["| " + " | ".join(map(esc, cells)) + " |" for cells in lines])


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
        "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "±": r"$\pm$", "—": "--",
        "Δ": r"$\Delta$"}


def _tex(text: str) -> str:
    out = "".join(_TEX.get(c, c) for c in text)
    return "$-$" + out[1:] if out[:1] == "-" and out[1:2].isdigit() else out  # a minus, not a hyphen


def _hp_text(value) -> str:
    """A hyperparameter's value with at most 3 significant digits (Optuna's
    ``0.0016051911333587634`` is ``0.00161``); integers such as 5000 stay integers, text
    (a choice) stays as it is, several values (``a|b``) each rounded."""
    parts = []
    for v in str(value).split("|"):
        try:
            f = float(v)
        except ValueError:
            parts.append(v)
            continue
        if not math.isfinite(f):
            parts.append(v)
        elif f.is_integer() and len(str(int(abs(f))).rstrip("0")) <= 3:
            parts.append(str(int(f)))
        else:
            parts.append(f"{f:.3g}")
    return "|".join(parts)


def _hp_short(keys) -> dict[str, str]:
    """Each dotted key by its last part (``adaptseg.lambda_adv_main`` -> ``lambda_adv_main``),
    unless two keys share it."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: s if last.count(s) == 1 else k for k, s in zip(keys, last)}


# The LaTeX tables' preamble needs; each table file says it in its first line.
_TEX_PACKAGES = r"% needs \usepackage{booktabs,graphicx}"


def _fit(width: str) -> str:
    r"""``\resizebox`` that shrinks its tabular to ``width`` only where it is wider (a long row
    name), else leaves it at its natural size (graphicx's ``\width`` is the natural width)."""
    return rf"\resizebox{{\ifdim\width>{width}{width}\else\width\fi}}{{!}}{{%"


def _tex_pm(cell: str) -> str:
    r"""A cell in LaTeX, a ``mean ± std`` one with the std smaller (``32.0{\scriptsize\,$\pm$\,2.0}``)."""
    mean, pm, std = cell.partition(" ± ")
    return _tex(mean) + (rf"{{\scriptsize\,$\pm$\,{_tex(std)}}}" if pm else "")


def _latex_main(name: str, title: str, spec: _Spec, rows: list[_Row], table) -> list[str]:
    r"""The compact booktabs table for one column of a two-column paper: row, n, mean ± std,
    Δ, seed-paired Δ and seeds won; the search rows' best hyperparameters (3 significant digits)
    in a note below it, per-class IoU in its own table (:func:`_latex_per_class`)."""
    col = spec.report_col
    header = ["row", "n", col] + ["Δ", "paired Δ", "won"] * bool(spec.baseline)
    lines = []
    for _, t in table.iterrows():
        cells = [t["row"], str(t["n"]), _mean_std(t, col)]
        if spec.baseline:
            base = t["row"] == spec.baseline
            cells.append(_DASH if base else _f(t["delta"], signed=True))
            if base or not t["n_paired"]:
                cells += [_DASH, _DASH]
            else:
                std = "" if math.isnan(t["delta_paired_std"]) else f" ± {t['delta_paired_std']:.1f}"
                cells += [f"{t['delta_paired']:+.1f}{std}", f"{t['wins']}/{t['n_paired']}"]
        lines.append(cells)
    hps = []
    for row in rows:
        if row.hparams:
            short = _hp_short(list(row.hparams))
            hps.append(_tex(f"{row.name}: ") + ", ".join(_tex(f"{short[k]}={_hp_text(v)}")
                                                         for k, v in row.hparams.items()))
    caption = title + (f"; paired Δ: mean ± std of the seed-paired differences to {spec.baseline}, won: the "
                       "seeds on which the row beats it" if spec.baseline else "")
    out = [_TEX_PACKAGES, r"\begin{table}[t]", r"\centering", r"\small", r"\setlength\tabcolsep{3pt}",
           _fit(r"\linewidth"), rf"\begin{{tabular}}{{@{{}}l{'r' * (len(header) - 1)}@{{}}}}", r"\toprule",
           " & ".join(_tex(h) for h in header) + r" \\", r"\midrule",
           *(" & ".join(_tex_pm(c) for c in cells) + r" \\" for cells in lines),
           r"\bottomrule", r"\end{tabular}}"]
    if hps:
        out += [r"\par\smallskip", r"{\footnotesize\raggedright Best hyperparameters: " + "; ".join(hps) + r".\par}"]
    return out + [rf"\caption{{{_tex(caption)}}}", rf"\label{{tab:{_tex(name)}}}", r"\end{table}"]


def _latex_per_class(name: str, spec: _Spec, table) -> list[str]:
    r"""Per-class IoU (mean over seeds, %) for a two-column paper's full width (``table*``):
    class names turned upright, the tabular shrunk to ``\linewidth`` only if wider."""
    classes = [c for c in table.columns if c.startswith("IoU/")]
    extra = [col for col in (spec.report_col, "mIoU13") if col in table.columns]
    header = ["row", *extra, *(c[len("IoU/"):].replace("_", " ") for c in classes)]
    head = [_tex(h) if j <= len(extra) else rf"\rotatebox{{90}}{{{_tex(h)}}}" for j, h in enumerate(header)]
    lines = [" & ".join([_tex(t["row"]), *(_f(t[c]) for c in extra + classes)]) + r" \\"
             for _, t in table.iterrows()]
    title = f"study {name}: target-{spec.split} IoU per class (%), mean over seeds"
    return [_TEX_PACKAGES, r"\begin{table*}[t]", r"\centering", r"\scriptsize", r"\setlength\tabcolsep{2pt}",
            _fit(r"\linewidth"), rf"\begin{{tabular}}{{@{{}}l{'r' * (len(header) - 1)}@{{}}}}", r"\toprule",
            " & ".join(head) + r" \\", r"\midrule", *lines, r"\bottomrule", r"\end{tabular}}",
            rf"\caption{{{_tex(title)}}}", rf"\label{{tab:{_tex(name)}-per-class}}", r"\end{table*}"]


def _mean_std(t, col: str) -> str:
    if t["n"] == 0:
        return _DASH
    if math.isnan(t[f"{col}_std"]):
        return f"{t[col]:4.1f}"
    return f"{t[col]:4.1f} ± {t[f'{col}_std']:.1f}"


def _render(name: str, spec: _Spec, rows: list[_Row], table, selection: dict, importances: dict,
            trials: dict, notes: list[str], *, per_class: bool = False, fmt: str = "text",
            per_class_file: str = "") -> str:
    """The table as printed (``fmt``). LaTeX: the compact main table, exactly the file
    ``STEM_compare.tex`` (``per_class_file`` names its per-class table, appended with ``per_class``)."""
    col = spec.report_col
    title = f"study {name}: target-{spec.split} {col} (%), mean ± std over seeds"
    if spec.baseline:
        title += f"; Δ vs {spec.baseline}"
    classes = [c for c in table.columns if c.startswith("IoU/")] if per_class else []
    has13 = "mIoU13" in table.columns
    has_hp = any(r.hparams for r in rows)
    header = ["row", "method", "n", col] + ["Δ", "paired Δ (wins)"] * bool(spec.baseline) + ["sel mIoU", "failed"]
    header += ["mIoU13"] * has13 + [c[len("IoU/"):] for c in classes] + ["best hyperparameters"] * has_hp
    right = [False, False, True, False] + [True, True] * bool(spec.baseline) + [True, True]
    right += [True] * has13 + [True] * len(classes) + [False] * has_hp
    lines = []
    for row, (_, t) in zip(rows, table.iterrows()):
        cells = [t["row"], t["method"], str(t["n"]), _mean_std(t, col)]
        if spec.baseline:
            cells.append(_DASH if t["row"] == spec.baseline else _f(t["delta"], signed=True))
            cells.append(_DASH if t["row"] == spec.baseline or not t["n_paired"] else _paired(t))
        cells += [_f(t["sel_mIoU"]), str(t["n_failed"]) if t["n_failed"] else ""]
        cells += ([_f(t["mIoU13"])] if has13 else []) + [_f(t[c]) for c in classes]
        cells += [", ".join(f"{k}={_hp_text(v)}" for k, v in row.hparams.items())] if has_hp else []
        lines.append(cells)
    if fmt == "markdown":
        out = [f"**{title}**", "", *_markdown(header, lines, right), ""]
    elif fmt == "latex":
        out = _latex_main(name, title, spec, rows, table)
    else:
        out = [title, *_grid(header, lines, right)]
    if fmt == "latex" and [c for c in table.columns if c.startswith("IoU/")]:  # the same with --per-class
        notes = [*notes, f"per-class IoU: the table in {per_class_file or 'STUDY_compare_per_class.tex'}"]
    elif not per_class and [c for c in table.columns if c.startswith("IoU/")]:
        notes = [*notes, "per-class IoU: --per-class, or the CSV/Parquet files"]

    after = []
    if not any(r.finished for r in rows):
        nf = sum(len(r.failed) for r in rows)
        after.append(f"note: no finished runs in study {name!r} yet ({nf} failed): every row has n = 0")
    if selection.get("picked"):
        after.append(_selection_line(f"honest selection: {spec.objective} ({spec.mode})", selection, spec))
        for key, s in selection.get("label_free", {}).items():
            after.append(_selection_line(f"label-free {key} ({s['mode']})", s, spec))
    elif any(r.finished for r in rows):
        after.append(f"honest selection: {spec.objective} not logged on any finished row: no check")
    failed = [(row.name, r) for row in rows for r in row.failed]
    if failed:
        after.append("failed runs (counted, not averaged): "
                     + "; ".join(f"{n} seed {r.seed} ({r.status.lower()}, run {r.run_id[:8]})" for n, r in failed))
    for row, imp in importances.items():
        from .figures import MIN_IMPORTANCE_TRIALS

        n = trials.get(row, 0)
        warn = f"; fewer than {MIN_IMPORTANCE_TRIALS}: not reliable" if n < MIN_IMPORTANCE_TRIALS else ""
        after.append(f"hyperparameter importance, {row} ({n} completed trials{warn}): "
                     + ", ".join(f"{k} {v:.2f}" for k, v in sorted(imp.items(), key=lambda kv: -kv[1])))
    after += [f"note: {n}" for n in notes]
    if fmt == "markdown":
        after = [f"- {a}" for a in after]
    elif fmt == "latex":
        after = [f"% {a}" for a in after]
        if per_class and [c for c in table.columns if c.startswith("IoU/")]:
            after += ["", *_latex_per_class(name, spec, table)]
    return "\n".join(out + after)


def _selection_line(prefix: str, s: dict, spec: _Spec) -> str:
    r = spec.report
    head = f"{prefix} picks {s['picked']} ({s['picked_report']:.1f} {r})"
    if s["picked"] == s["best"]:
        return f"{head}, the best row on {r}: gap 0.0 points"
    return f"{head}; best on {r} is {s['best']} ({s['best_report']:.1f}): gap {s['gap']:.1f} points"
