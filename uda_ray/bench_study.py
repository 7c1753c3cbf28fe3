"""``uda-ray bench study``: what a study costs beyond its training.

Runs a small fixed study (source-only, then AdaBN and AdaptSegNet from it, over a few seeds,
on the ``study-cpu`` preset and the embedded benchmark) through the same code as
``uda-ray study``, and accounts for every trial's wall time:

* **Tune's view**: from the trial's start to its end, as Tune's controller sees them (a Tune
  callback in the study process).
* **before the driver**: Tune's trial start to the trial function's first line (Tune calls a
  trial started once its process runs, so the process's own start is outside the wall;
  the in-fit share below counts it);
* **before fit**: the driver's first line to the engine's ``fit`` (the MLflow child run, Ray
  Train's controller and worker group when a trial uses them, the workers' imports);
* **fit**, by phase (:class:`uda_ray.engine.Phases`): setup (data, model, restore), prepare
  (e.g. AdaBN's statistics), proxy, **train** (the training steps alone), eval, checkpoint,
  reports;
* **after fit**: ``fit``'s end to the driver's last line (worker-group teardown, the MLflow
  run's end), and **after the driver**: to Tune's trial end.

Overhead of a trial = (Tune wall - training steps) / Tune wall; for a trial that trains
nothing (AdaBN) the seconds outside ``fit``'s own work are the figure. The *in-fit share*
is the sum over trials of time inside ``fit`` divided by (study wall x concurrency): how
much of the machine the study spent training and evaluating rather than starting things.

Everything but the timing is the real study path (Ray cluster, Tune, MLflow store, files).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path


def _timing_callback():
    from ray.tune import Callback

    class TrialClock(Callback):
        """Tune's own start and end of each trial, by trial id (driver side)."""

        def __init__(self):
            self.start: dict[str, float] = {}
            self.end: dict[str, float] = {}

        def on_trial_start(self, iteration, trials, trial, **info):
            self.start.setdefault(trial.trial_id, time.time())

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.end[trial.trial_id] = time.time()

        def on_trial_error(self, iteration, trials, trial, **info):
            self.end[trial.trial_id] = time.time()

    return TrialClock()


PHASES = ("setup", "prepare", "proxy", "train", "eval", "checkpoint", "reports")


def bench_study(*, seeds: int = 3, iterations: int = 60, concurrency: int = 2, ray_train: bool | None = None,
                data_root: str | None = None, out: str | None = None, address: str | None = None) -> dict:
    """Run the benchmark study and return its per-trial rows and totals (see the module)."""
    from . import tracking
    from .study import Row, Study, run_study

    base = {"preset": "study-cpu", "run.iterations": iterations, "run.checkpoint_every": 0,
            "run.log_every": max(1, min(25, iterations // 4)), "run.eval_every": 0}
    if data_root:
        base["data.root"] = data_root
    study = Study(name="bench-study", base=base, seeds=tuple(range(seeds)), max_concurrent=concurrency,
                  ray_train=ray_train, rows=[
                      Row("source_only", "source_only"),
                      Row("adabn", "adabn", init_from="source_only"),
                      Row("adaptseg", "adaptseg", init_from="source_only")])
    work = Path(out or tempfile.mkdtemp(prefix="uda-ray-bench-study-"))
    work.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{work / 'mlflow.db'}"
    clock = _timing_callback()
    t0 = time.time()
    rc = run_study(study, address=address, storage_path=str(work / "storage"), tracking_uri=uri,
                   out=str(work / "runs"), tune_callbacks=[clock])
    wall = time.time() - t0
    client = tracking.mlflow_client(uri)
    exp = client.get_experiment_by_name("bench-study")
    runs = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("uda_ray.kind") == "row"]
    rows = []
    for r in sorted(runs, key=lambda r: r.info.start_time):
        m, tid = r.data.metrics, r.data.tags.get("uda_ray.tune_trial", "")
        if "perf/fit_start_unix" not in m or tid not in clock.start or tid not in clock.end:
            continue
        tune_start, tune_end = clock.start[tid], clock.end[tid]
        row = {"trial": f"{r.data.tags['row']} s{r.data.tags['seed']}", "status": r.info.status,
               "tune_wall": tune_end - tune_start,
               "before_driver": m["perf/driver_start_unix"] - tune_start,
               "before_fit": m["perf/fit_start_unix"] - m["perf/driver_start_unix"],
               "fit": m["perf/fit_seconds"],
               **{p: m.get(f"perf/{p}_s", 0.0) for p in PHASES},
               "after_fit": m["perf/driver_end_unix"] - m["perf/fit_end_unix"],
               "after_driver": tune_end - m["perf/driver_end_unix"]}
        row["overhead"] = (row["tune_wall"] - row["train"]) / row["tune_wall"]
        row["outside_fit"] = row["tune_wall"] - row["fit"]
        rows.append(row)
    trains = [r for r in rows if r["train"] > 0]
    totals = {"study_wall": wall, "trials": len(rows), "returncode": rc, "concurrency": concurrency,
              "in_fit_share": sum(r["fit"] for r in rows) / (wall * concurrency) if rows else 0.0,
              "overhead_training_trials": (sum(r["tune_wall"] - r["train"] for r in trains)
                                           / sum(r["tune_wall"] for r in trains)) if trains else 0.0,
              "mean_outside_fit": statistics.mean(r["outside_fit"] for r in rows) if rows else 0.0,
              "mode": "Ray Train per trial" if not study.in_process else "in the trial's process",
              "iterations": iterations, "seeds": seeds, "work_dir": str(work)}
    return {"rows": rows, "totals": totals}


def format_report(result: dict) -> str:
    cols = ["trial", "tune_wall", "before_driver", "before_fit", "fit", *PHASES, "after_fit", "after_driver",
            "overhead"]
    head = {"tune_wall": "wall", "before_driver": "pre-drv", "before_fit": "pre-fit", "after_fit": "post-fit",
            "after_driver": "post-drv", "checkpoint": "ckpt", "overhead": "ovh%"}
    from .bench import text_table

    lines = [[r[c] if c == "trial" else f"{100 * r[c]:.0f}" if c == "overhead" else f"{r[c]:.1f}" for c in cols]
             for r in result["rows"]]
    text = text_table([head.get(c, c) for c in cols], lines, numbers_right=True).split("\n")
    t = result["totals"]
    text += ["", f"study wall {t['study_wall']:.1f} s for {t['trials']} trials ({t['mode']}, "
                 f"{t['iterations']} iterations per training row, {t['seeds']} seeds, {t['concurrency']} at a time)",
             f"overhead of training trials: {100 * t['overhead_training_trials']:.1f}% of their wall time "
             f"outside the training steps",
             f"mean seconds per trial outside fit: {t['mean_outside_fit']:.1f}",
             f"in-fit share of the machine: {100 * t['in_fit_share']:.1f}% "
             f"(sum of fit seconds / (study wall x {t['concurrency']}))",
             f"seconds: wall = Tune's trial start to end; pre-drv = to the trial function; pre-fit = to the "
             f"engine's fit; post-fit / post-drv = after it; work dir {t['work_dir']}"]
    return "\n".join(text)
