"""The study's trial source (RowScheduler) on its own: no stage barriers, failed
dependencies, a search's re-runs queued when its trials end. Pure logic, no Ray cluster."""

from __future__ import annotations

import pytest

pytest.importorskip("ray.tune")

from ray.tune.search import Searcher  # noqa: E402

from uda_ray._tune_schedule import RowScheduler  # noqa: E402


def _jobs(rows, seeds=(0, 1, 2)):
    return [{"row": r, "seed": s, "after": (after, s) if after else None, "set": {}, "tags": {}}
            for r, after in rows for s in seeds]


def _run(rs: RowScheduler):
    resolved = []
    rs.resolve = lambda job: (resolved.append((job["row"], job["seed"])), ("run", f"ckpt-{job['after']}"))[1]
    return resolved


def _key(config):
    t = config.get("trial") or config.get("search")
    return t["row"], t["seed"]


def test_a_row_starts_as_soon_as_its_init_from_finished_not_after_the_whole_stage():
    rs = RowScheduler(_jobs([("src", None), ("ada", "src")]), [], resolve=None,
                      metric="sel/mIoU", mode="max")
    _run(rs)
    a, b = rs.suggest("t1"), rs.suggest("t2")  # two slots
    assert [_key(a), _key(b)] == [("src", 0), ("src", 1)]
    rs.on_trial_complete("t1")
    assert _key(rs.suggest("t3")) == ("src", 2)
    rs.on_trial_complete("t2")
    c = rs.suggest("t4")
    assert _key(c) == ("ada", 0)  # while src s2 still runs
    assert c["trial"]["init_from"] == "ckpt-('src', 0)"
    assert _key(rs.suggest("t5")) == ("ada", 1)  # src s1 is done too
    assert rs.suggest("t6") is None  # ada s2 waits for src s2, which still runs
    rs.on_trial_complete("t3")
    assert _key(rs.suggest("t6")) == ("ada", 2)
    for t in ("t4", "t5", "t6"):
        rs.on_trial_complete(t)
    assert rs.suggest("t7") == Searcher.FINISHED


def test_a_failed_init_from_fails_its_dependents_and_the_rest_goes_on():
    rs = RowScheduler(_jobs([("src", None), ("ada", "src")], seeds=(0, 1)), [], resolve=None,
                      metric="sel/mIoU", mode="max")
    _run(rs)
    t = {_key(rs.suggest(i)): i for i in ("t1", "t2")}
    rs.on_trial_complete(t[("src", 0)], error=True)
    rs.on_trial_complete(t[("src", 1)])
    c = rs.suggest("t3")
    assert _key(c) == ("ada", 1)
    assert rs.failures == ["ada s0: its init_from row src has no finished run"]
    rs.on_trial_complete("t3")
    assert rs.suggest("t4") == Searcher.FINISHED


def test_finished_rows_are_skipped_and_a_search_queues_the_best_re_runs():
    class FakeOptuna:
        def __init__(self):
            self.n = 0
            self.completed = []

        def suggest(self, trial_id):
            self.n += 1
            return {"adaptseg.lambda_adv_main": 0.001 * self.n}

        def on_trial_result(self, trial_id, result):
            pass

        def on_trial_complete(self, trial_id, result=None, error=False):
            self.completed.append(trial_id)

    fake = FakeOptuna()
    search = {"row": "s", "seed": 0, "after": ("src", 0), "seeds": [0, 1], "todo": 2, "make": lambda: fake,
              "best": lambda: ({"adaptseg.lambda_adv_main": 0.002}, "t7"), "init_from_of": lambda seed: ("src", seed)}
    rs = RowScheduler(_jobs([("src", None)], seeds=(0, 1)) + _jobs([("dep", "s")], seeds=(0, 1)), [search],
                      resolve=None, metric="sel/mIoU", mode="max")
    def resolve(job):
        if job["row"] == "src" and job["seed"] == 1:
            return "skip", ""
        job["start"] = "lineage-of-src"  # what the trial starts from, passed on to it
        return "run", "ck"

    rs.resolve = resolve
    assert _key(rs.suggest("t1")) == ("src", 0)  # src s1 finished earlier: skipped
    assert rs.suggest("t2") is None  # the search and dep wait for src s0 / the search
    rs.on_trial_complete("t1")
    s1, s2 = rs.suggest("t3"), rs.suggest("t4")
    assert s1["search"] == {"row": "s", "seed": 0, "init_from": "ck", "start": "lineage-of-src"} and \
        "adaptseg.lambda_adv_main" in s1
    assert _key(s2) == ("s", 0) and "search" in s2
    assert rs.suggest("t5") is None  # dep waits for the search row's re-runs
    rs.on_trial_complete("t3", result={"sel/mIoU": 0.1})
    rs.on_trial_complete("t4", result={"sel/mIoU": 0.2})
    assert fake.completed == ["t3", "t4"]
    r0, r1 = rs.suggest("t6"), rs.suggest("t7")  # the best's re-runs over the seeds
    assert {_key(r0), _key(r1)} == {("s", 0), ("s", 1)}
    assert r0["trial"]["set"] == {"adaptseg.lambda_adv_main": 0.002} and r0["trial"]["tags"] == {"best_trial": "t7"}
    rs.on_trial_complete("t6")
    assert _key(rs.suggest("t8"))[0] == "dep"


def test_trials_that_can_never_start_fail_instead_of_waiting_forever():
    jobs = [{"row": "a", "seed": 0, "after": ("b", 0), "set": {}, "tags": {}},
            {"row": "b", "seed": 0, "after": ("a", 0), "set": {}, "tags": {}}]
    rs = RowScheduler(jobs, [], resolve=None, metric="sel/mIoU", mode="max")
    _run(rs)
    assert rs.suggest("t1") == Searcher.FINISHED
    assert sorted(rs.failures) == ["a s0: its init_from row b never ran", "b s0: its init_from row a never ran"]


def test_a_circular_init_from_is_refused_when_the_study_is_built():
    from uda_ray.study import Row, Study

    with pytest.raises(ValueError, match="circular init_from"):
        Study(name="x", rows=[Row("a", "source_only", init_from="b"), Row("b", "source_only", init_from="a")])


def _space(hi: float):
    """An adaptseg space up to ``hi``, with a conditional parameter."""
    def space(trial):
        trial.suggest_float("adaptseg.lambda_adv_main", 1e-4, hi, log=True)
        if trial.suggest_categorical("adaptseg.gan", ["vanilla", "ls"]) == "ls":
            trial.suggest_float("adaptseg.lr_d", 1e-5, 1e-3, log=True)
    return space


_wide, _near = _space(1.0), _space(3e-3)


def test_a_search_refuses_stored_trials_of_another_space(tmp_path):
    """Stored trials count towards num_samples and compete for the best: after an edit of
    the row's space the study names the changed parameter instead of mixing the two."""
    import optuna

    from uda_ray.errors import UserError
    from uda_ray.study import Row, _check_stored_space

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    st = optuna.create_study(study_name="s.search", storage=storage, direction="maximize",
                             sampler=optuna.samplers.RandomSampler(seed=1))
    st.optimize(lambda t: (_wide(t), 0.5)[1], n_trials=6)
    assert {t.params["adaptseg.gan"] for t in st.trials} == {"vanilla", "ls"}  # both branches stored
    _check_stored_space(Row("search", "adaptseg", space=_wide), "s.search", storage)  # same space: goes on
    _check_stored_space(Row("search", "adaptseg", space=_near), "s.other", storage)  # nothing stored there
    with pytest.raises(UserError, match=r"search row search: .*adaptseg.lambda_adv_main: stored 0.0001..1 log, "
                                        r"now 0.0001..0.003 log"):
        _check_stored_space(Row("search", "adaptseg", space=_near), "s.search", storage)
