"""Early stopping of a search row's hopeless trials (``Study.asha``) on a local Ray: the
trials report ``sel/mIoU`` at intermediate evaluations, ASHA (one per search row, on the
selection split) stops those that fall behind, and a stopped trial is recorded as such:
its MLflow run KILLED with a ``pruned`` tag and no ``error``, PRUNED in Optuna, counted in
the search and never its best. A row's seed runs are never judged."""

from __future__ import annotations

import os

import pytest

from trees import tiny_cfg

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def local_ray():
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    if ray.is_initialized():  # a Ray of an earlier test module: use it
        yield
        return
    ray.init(num_cpus=2, log_to_driver=False)
    yield
    ray.shutdown()


def _lr_space(trial):
    """Learning rates from one that leaves the model where it started to one that moves it
    every step: their trials differ at the first evaluation already."""
    trial.suggest_float("optim.lr", 1e-6, 0.3, log=True)


def _base(data_root, tmp_path, **values) -> dict:
    return {k: v for k, v in tiny_cfg(data_root, tmp_path, "source_only", **values).flat().items()
            if not k.startswith("source_only.") and k != "method"}


def test_asha_stops_hopeless_search_trials_and_records_them_as_pruned(local_ray, data_root, tmp_path, capsys):
    import mlflow
    import optuna

    from uda_ray.study import Row, Study, run_study

    base = _base(data_root, tmp_path, **{"run.iterations": 6, "data.select_n": 2})
    study = Study(name="pruning", base=base, seeds=(0,), baseline="src", max_concurrent=2,
                  asha={"grace_period": 2, "reduction_factor": 2},
                  rows=[
                      # a seed run that evaluates and reports at every step, at a learning rate
                      # that would lose any comparison: never judged, never stopped
                      Row("src", "source_only", set={"optim.lr": 1e-7, "run.eval_every": 1,
                                                     "run.checkpoint_every": 1}),
                      Row("search", "source_only", space=_lr_space, num_samples=6),
                  ])
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    rc = run_study(study, storage_path=str(tmp_path / "storage"), tracking_uri=uri, out=str(tmp_path / "out"))
    out = capsys.readouterr().out
    assert rc == 0

    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("pruning")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    (parent,) = [r for r in runs if r.data.tags.get("uda_ray.kind") == "study"]
    trials = [r for r in runs if r.data.tags.get("uda_ray.kind") == "search_trial"]
    seeds = [r for r in runs if r.data.tags.get("uda_ray.kind") == "row"]
    pruned = [r for r in trials if "pruned" in r.data.tags]
    finished = [r for r in trials if r.info.status == "FINISHED"]
    assert len(trials) == 6 and pruned and finished and len(pruned) + len(finished) == 6
    for r in pruned:  # stopped, not failed: KILLED at an evaluation before the last step, no error
        assert r.info.status == "KILLED" and "error" not in r.data.tags, r.data.tags
        step = int(r.data.tags["pruned"])
        assert step in (2, 4) and r.data.params["run.eval_every"] == "2"
        assert max(m.step for m in client.get_metric_history(r.info.run_id, "sel/mIoU")) == step
    # Optuna: the stopped trials PRUNED, the others COMPLETE; the best is a COMPLETE one
    storage = f"sqlite:///{tmp_path / 'out' / 'pruning' / 'optuna.db'}"
    st = optuna.load_study(study_name="pruning.search", storage=storage)
    state = {t.params["optim.lr"]: t.state for t in st.trials}
    assert all(state[float(r.data.params["optim.lr"])] == optuna.trial.TrialState.PRUNED for r in pruned)
    assert all(state[float(r.data.params["optim.lr"])] == optuna.trial.TrialState.COMPLETE for r in finished)
    assert st.best_trial.state == optuna.trial.TrialState.COMPLETE
    # the row's seed runs: never stopped, whatever they report (src reported every step at a
    # learning rate that loses every comparison)
    assert {r.data.tags["row"] for r in seeds} == {"src", "search"}
    for r in seeds:
        assert r.info.status == "FINISHED" and "pruned" not in r.data.tags and "error" not in r.data.tags
    src = next(r for r in seeds if r.data.tags["row"] == "src")
    assert [m.step for m in client.get_metric_history(src.info.run_id, "sel/mIoU")] == [1, 2, 3, 4, 5, 6]
    best = next(r for r in seeds if r.data.tags["row"] == "search")
    assert best.data.tags["best_trial"] in {r.data.tags["trial"] for r in finished}
    assert best.data.params["optim.lr"] == str(st.best_trial.params["optim.lr"])
    assert best.data.params["run.eval_every"] == "0"  # the search's evaluations are its trials' only
    # counted in the search, not among the failed
    assert f"search search: 6 trials, {len(pruned)} stopped early by ASHA" in out
    assert parent.data.tags["search_pruned.search"] == str(len(pruned))
    assert "failed" not in out.split("search search:")[1]


def _trial(tid: str, row: str | None, **config):
    from types import SimpleNamespace

    return SimpleNamespace(trial_id=tid, config={**config, **({"search": {"row": row}} if row else {"trial": {}})})


def test_asha_judges_each_search_row_apart_never_a_seed_run_nor_a_last_step():
    from ray.tune.schedulers import TrialScheduler

    from uda_ray._tune_schedule import search_only_asha

    CONT, STOP = TrialScheduler.CONTINUE, TrialScheduler.STOP
    spec = {"iterations": 6, "grace_period": 2, "reduction_factor": 2}
    stops = []
    asha = search_only_asha({"a": spec, "b": spec}, "sel/mIoU", "max", on_stop=lambda *a: stops.append(a))
    a1, a2, a3, b1, seed = _trial("a1", "a"), _trial("a2", "a"), _trial("a3", "a"), _trial("b1", "b"), \
        _trial("s", None)
    for t in (a1, a2, a3, b1, seed):
        asha.on_trial_add(None, t)

    def report(t, step, value=None):
        return asha.on_trial_result(None, t, {"step": step, **({"sel/mIoU": value} if value is not None else {})})

    assert report(a1, 2, 0.5) == CONT  # the first at the rung
    assert report(b1, 2, 0.1) == CONT  # another search's rung: not compared with a1
    assert report(seed, 2, 0.0) == CONT and report(seed, 6, 0.0) == CONT  # a seed run: never judged
    assert report(a2, 2) == CONT  # a checkpoint without an evaluation: nothing to judge
    assert report(a2, 2, 0.2) == STOP  # behind a1 at the rung
    assert asha.pruned == {"a2": ("a", 2)} and stops == [("a2", "a", 2)]
    assert report(a1, 4, 0.6) == CONT
    # a trial's last report is its result: never stopped, even behind every other
    assert report(a3, 2, 0.9) == CONT and report(a3, 6, 0.0) == CONT and "a3" not in asha.pruned


def test_a_pruned_trial_is_told_to_optuna_as_pruned_and_an_interrupted_one_never_completes():
    from uda_ray._tune_schedule import RowScheduler

    class Searcher:
        def __init__(self):
            self.told = {}
            self.n = 0

        def suggest(self, trial_id):
            self.n += 1
            return {"optim.lr": 0.01 * self.n}

        def on_trial_result(self, trial_id, result):
            pass

        def on_trial_complete(self, trial_id, result=None, error=False):
            self.told[trial_id] = (result, error)

    fake = Searcher()
    search = {"row": "s", "seed": 0, "after": None, "seeds": [0], "todo": 3, "make": lambda: fake,
              "best": lambda: ({"optim.lr": 0.01}, "t1"), "init_from_of": lambda seed: None, "iterations": 6,
              "set": {"run.eval_every": 2, "run.checkpoint_every": 2}}
    pruned = {}
    rs = RowScheduler([], [search], resolve=lambda job: ("run", ""), metric="sel/mIoU", mode="max", pruned=pruned)
    configs = [rs.suggest(t) for t in ("t1", "t2", "t3")]
    assert all(c["search"]["set"] == {"run.eval_every": 2, "run.checkpoint_every": 2} for c in configs)
    pruned["t2"] = ("s", 2)  # what the trial scheduler records when it stops t2
    rs.on_trial_complete("t1", result={"step": 6, "sel/mIoU": 0.3})
    rs.on_trial_complete("t2", result={"step": 2, "sel/mIoU": 0.1})
    rs.on_trial_complete("t3", result={"step": 4, "sel/mIoU": 0.9})  # the study interrupted at step 4
    assert fake.told == {"t1": ({"step": 6, "sel/mIoU": 0.3}, False),  # COMPLETE
                         "t2": (None, False),  # PRUNED (Ray's OptunaSearch: no value, no error)
                         "t3": (None, True)}  # FAIL: its partial 0.9 must never win the search
