"""A study's trials in one Tune run, without stage barriers (imported only where Tune runs).

:class:`RowScheduler` is the Tune searcher of a study: it hands out each row x seed trial as
soon as the row x seed it starts from (``init_from``) has finished, so trials of different
rows fill every free slot. A search row's Optuna trials (on its first seed) are handed out
the same way once their ``init_from`` has finished, through the row's own Optuna searcher;
when the last of them ends, the best configuration's re-runs over the seeds join the queue,
and the rows that start from the search row follow them.

The study decides the rest through callbacks: ``resolve(job)`` says whether a row x seed
runs (and from which checkpoint, setting ``job["start"]`` to the lineage it starts from),
is skipped (finished earlier with the same lineage), or fails (its ``init_from`` has no
finished run); a search's ``best()`` reads its best configuration once its trials are done.
"""

from __future__ import annotations

from typing import Callable

from ray.tune.search import Searcher

Key = tuple  # (row name, seed)


class RowScheduler(Searcher):
    """Tune's source of a study's trials (see the module).

    ``jobs``: ``{"row", "seed", "after": (row, seed) or None, "set": {...}, "tags": {...}}``.
    ``searches``: ``{"row", "seed", "after", "seeds", "todo": trials still to run,
    "make": () -> Optuna searcher, "best": () -> (best values, trial) or None,
    "init_from_of": seed -> (row, seed) or None}``, and optionally ``"iterations"`` (its
    trials' ``run.iterations``) and ``"set"`` (flat values of its trials only, e.g. the
    intermediate evaluations a trial scheduler judges).
    ``pruned``: trial id -> (row, step) of the search trials a trial scheduler stopped early
    (:func:`search_only_asha`'s): told to Optuna as PRUNED, never COMPLETE with a partial value.
    """

    def __init__(self, jobs: list[dict], searches: list[dict], *, resolve: Callable[[dict], tuple[str, str]],
                 metric: str, mode: str, pruned: dict | None = None):
        super().__init__(metric=metric, mode=mode)
        self.pruned = pruned if pruned is not None else {}
        self.trial_iterations: dict[str, int] = {}  # search trial id -> its run.iterations
        self.pending = list(jobs)
        self.searches = {s["row"]: {**s, "searcher": None, "running": set(), "init_from": None, "start": None}
                         for s in searches}
        self.resolve = resolve
        self.running: dict[str, tuple] = {}  # trial id -> ("row", key) | ("search", row name)
        self.status: dict[Key, str] = {(j["row"], j["seed"]): "pending" for j in jobs}
        for s in searches:  # a search row's seeds finish with its re-runs
            self.status.update({(s["row"], seed): "pending" for seed in s["seeds"]})
        self.failures: list[str] = []

    # --- what can start ---------------------------------------------------------------
    def _ready(self, after: Key | None) -> str:
        """'yes', 'wait' or 'failed' for a trial that starts from ``after``."""
        state = self.status.get(after, "done") if after is not None else "done"  # not in this run: finished earlier
        return {"pending": "wait", "running": "wait", "done": "yes"}.get(state, "failed")

    def _fail(self, key: Key, why: str) -> None:
        self.status[key] = "failed"
        self.failures.append(f"{key[0]} s{key[1]}: {why}")

    def suggest(self, trial_id: str):
        for job in list(self.pending):
            key, ready = (job["row"], job["seed"]), self._ready(job["after"])
            if ready == "wait":
                continue
            self.pending.remove(job)
            if ready == "failed":
                self._fail(key, f"its init_from row {job['after'][0]} has no finished run")
                continue
            verdict, init_from = self.resolve(job)
            if verdict == "skip":
                self.status[key] = "done"
                continue
            if verdict == "fail":
                self._fail(key, init_from)
                continue
            self.status[key] = "running"
            self.running[trial_id] = ("row", key)
            return {"trial": {"row": job["row"], "seed": job["seed"], "set": job["set"], "tags": job["tags"],
                              "init_from": init_from, "start": job.get("start")}}
        for s in self.searches.values():
            if s["todo"] <= 0:
                self._search_done(s)  # e.g. a search completed by an earlier run: queue its re-runs
                continue
            ready = self._ready(s["after"])
            if ready == "wait":
                continue
            if ready == "failed":
                self._search_done(s, failed=f"its init_from row {s['after'][0]} has no finished run")
                continue
            if s["searcher"] is None:
                probe = {"row": s["row"], "seed": s["seed"], "after": s["after"], "set": {}, "tags": {},
                         "search": True}
                verdict, init_from = self.resolve(probe)
                if verdict == "fail":
                    self._search_done(s, failed=init_from)
                    continue
                s["init_from"], s["start"], s["searcher"] = init_from, probe.get("start"), s["make"]()
            config = s["searcher"].suggest(trial_id)
            if config is None:
                continue
            if config == Searcher.FINISHED:
                self._search_done(s)
                continue
            s["todo"] -= 1
            s["running"].add(trial_id)
            self.running[trial_id] = ("search", s["row"])
            if s.get("iterations") is not None:
                self.trial_iterations[trial_id] = int(config.get("run.iterations", s["iterations"]))
            return {**config, "search": {"row": s["row"], "seed": s["seed"], "init_from": s["init_from"],
                                         "start": s["start"], **({"set": s["set"]} if s.get("set") else {})}}
        if not self.pending and not self.running and all(s["todo"] <= 0 for s in self.searches.values()):
            return Searcher.FINISHED
        if not self.running:  # everything left waits for something that cannot start: never wait forever
            for job in self.pending:
                self._fail((job["row"], job["seed"]), f"its init_from row {job['after'][0]} never ran")
            self.pending = []
            for s in self.searches.values():
                if s["todo"] > 0:
                    self._search_done(s, failed=f"its init_from row {s['after'][0]} never ran")
            return Searcher.FINISHED
        return None  # something is running that what waits depends on

    # --- what ended -------------------------------------------------------------------
    def on_trial_result(self, trial_id: str, result: dict) -> None:
        kind, what = self.running.get(trial_id, (None, None))
        if kind == "search":
            self.searches[what]["searcher"].on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        from .distributed import ERROR_KEY

        error = error or bool((result or {}).get(ERROR_KEY))  # failed without an exception (not retried)
        kind, what = self.running.pop(trial_id, (None, None))
        if kind == "row":
            self.status[what] = "failed" if error else "done"
        elif kind == "search":
            s = self.searches[what]
            step, iterations = (result or {}).get("step"), self.trial_iterations.pop(trial_id, None)
            if trial_id in self.pruned:  # stopped early by the trial scheduler: PRUNED (no value)
                s["searcher"].on_trial_complete(trial_id, result=None, error=False)
            elif not error and step is not None and iterations is not None and step < iterations:
                # stopped before its last step otherwise (the study interrupted): its value is
                # no result, and a partial one must never win the search
                s["searcher"].on_trial_complete(trial_id, result=None, error=True)
            else:
                s["searcher"].on_trial_complete(trial_id, result=result, error=error)
            s["running"].discard(trial_id)
            if s["todo"] <= 0 and not s["running"]:
                self._search_done(s)

    def _search_done(self, s: dict, failed: str | None = None) -> None:
        """The search hands out no more trials; once its running ones have ended, queue the
        best configuration's re-runs (or fail its seeds, with ``failed`` or no best)."""
        s["todo"] = 0
        if s["running"] or s.get("ended"):
            return
        s["ended"] = True
        best = None if failed else s["best"]()
        if best is None:
            for seed in s["seeds"]:
                self._fail((s["row"], seed), failed or "every search trial failed")
            return
        values, trial = best
        for seed in s["seeds"]:
            self.pending.append({"row": s["row"], "seed": seed, "after": s["init_from_of"](seed), "set": values,
                                 "tags": {"best_trial": trial}})

    def save(self, checkpoint_path: str) -> None:
        raise NotImplementedError  # a re-run of the study rebuilds the queue from MLflow


def search_only_asha(rows: dict[str, dict], metric: str, mode: str,
                     on_stop: Callable[[str, str, int], None] | None = None):
    """ASHA that judges (and stops) only a search row's Optuna trials, never a row's seed runs.

    ``rows``: search row -> ``{"iterations", "grace_period", "reduction_factor", "brackets"}``
    (:func:`uda_ray.study.asha_of`). Each search row has its own ASHA (its own rungs, on the
    training ``step``, ``max_t`` its trials' iterations): trials of two searches (another
    method, another starting checkpoint) are never compared. It reads ``metric`` (the study's
    objective, ``sel/mIoU``) from the reports that carry it (those at evaluation steps).
    A trial's last report (its step reaching its iterations) is never stopped: it has its
    result. A stopped trial is kept in ``pruned`` (trial id -> (row, step)) and ``on_stop(trial
    id, row, step)`` is called before Tune stops it (its ``ray.tune.report`` then raises
    ``SystemExit(0)`` in the trial's thread)."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

    class SearchOnlyASHA(FIFOScheduler):
        def __init__(self):
            super().__init__()
            self.rows = {row: dict(spec) for row, spec in rows.items()}
            self.asha = {row: ASHAScheduler(metric=metric, mode=mode, time_attr="step", max_t=spec["iterations"],
                                            grace_period=spec["grace_period"],
                                            reduction_factor=spec["reduction_factor"],
                                            brackets=spec.get("brackets", 1))
                         for row, spec in self.rows.items()}
            self.pruned: dict[str, tuple[str, int]] = {}

        def _row(self, trial) -> str | None:
            row = ((trial.config or {}).get("search") or {}).get("row")
            return row if row in self.asha else None

        def on_trial_add(self, tune_controller, trial):
            if (row := self._row(trial)) is not None:
                self.asha[row].on_trial_add(tune_controller, trial)

        def on_trial_result(self, tune_controller, trial, result):
            row = self._row(trial)
            if row is None:
                return TrialScheduler.CONTINUE
            action = self.asha[row].on_trial_result(tune_controller, trial, result)
            step = result.get("step")
            iterations = (trial.config or {}).get("run.iterations", self.rows[row]["iterations"])
            if action != TrialScheduler.STOP or step is None or step >= iterations:
                return TrialScheduler.CONTINUE  # its last report: a result, not a trial to stop
            self.pruned[trial.trial_id] = (row, int(step))
            if on_stop is not None:
                try:
                    on_stop(trial.trial_id, row, int(step))
                except Exception as e:  # completed after the Tune run (StudyRecord.mark_pruned(final=True))
                    import logging

                    logging.getLogger(__name__).warning("recording the stop of trial %s: %s", trial.trial_id, e)
            return TrialScheduler.STOP

        def on_trial_complete(self, tune_controller, trial, result):
            if (row := self._row(trial)) is not None and trial.trial_id in self.asha[row]._trial_info:
                self.asha[row].on_trial_complete(tune_controller, trial, result or {})

        def on_trial_remove(self, tune_controller, trial):
            if (row := self._row(trial)) is not None and trial.trial_id in self.asha[row]._trial_info:
                self.asha[row].on_trial_remove(tune_controller, trial)

        def debug_string(self) -> str:
            return "\n".join(f"{row}: {a.debug_string()}" for row, a in self.asha.items())

    return SearchOnlyASHA()
