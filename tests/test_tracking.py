"""MLflow bookkeeping on a real SQLite store: a fresh store opened by two processes at once,
runs killed with SIGKILL (marked KILLED, resumed into the same MLflow run), the error tag of a
failed run, a study's child run continued on a re-run, one process per study, and telemetry
off by default. One fresh store for the module (creating one costs ~6 s)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from trees import tiny_cfg
from uda_ray import tracking

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}


def _python(code: str, *args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], env=ENV, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A fresh SQLite store that two processes open at once, each creating a tracked run."""
    root = tmp_path_factory.mktemp("tracking")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    code = """
        import sys
        from uda_ray.tracking import MlflowTracker
        t = MlflowTracker(experiment="race", tracking_uri=sys.argv[1], run_name=sys.argv[2])
        t.finish()
    """
    procs = [_python(code, uri, f"racer{i}") for i in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    return {"uri": uri, "root": root, "racers": [(p.returncode, o) for p, o in zip(procs, outs)]}


def _client(store):
    return tracking.mlflow_client(store["uri"])


def _runs(client, experiment: str) -> list:
    return client.search_runs([client.get_experiment_by_name(experiment).experiment_id])


def _dead_owner(**extra) -> dict:
    """Owner tags of a process of this host that has ended: this process's pid with another
    start time, i.e. a pid reused since."""
    return {**tracking.owner_tags(), tracking.PID_START_TAG: "1", **extra}


def test_two_processes_creating_a_fresh_store_at_once_both_succeed(store):
    for rc, out in store["racers"]:
        assert rc == 0, out
    runs = _runs(_client(store), "race")
    assert sorted(r.info.run_name for r in runs) == ["racer0", "racer1"]
    assert all(r.info.status == "FINISHED" for r in runs)
    assert Path(store["root"] / "mlflow.db.lock").is_file()


def test_a_store_keeps_its_artifacts_beside_it_and_runs_carry_mlflow_source_tags(store):
    client = _client(store)
    exp = client.get_experiment_by_name("race")
    # not ./mlruns/<id> of the current folder, which every new store would share
    assert exp.artifact_location == (store["root"] / "mlflow-artifacts" / "race").as_uri()
    assert tracking.artifact_root("sqlite:///a/x.db") != tracking.artifact_root("sqlite:///a/y.db")
    assert tracking.artifact_root("http://127.0.0.1:5000") is None  # a server decides
    for run in _runs(client, "race"):
        t = run.data.tags
        assert t["mlflow.source.type"] == "LOCAL" and t["mlflow.source.name"] and t["mlflow.user"]
        assert len(t["mlflow.source.git.commit"]) == 40  # this checkout's commit: the UI's Version


def test_scores_are_logged_in_per_cent_and_an_older_fraction_run_keeps_its_unit(store):
    """Issue 29, item 5: one unit (per cent) wherever a user reads a score. A new run is tagged
    percent and gets its scores times 100; losses and other metrics are left as they are. A run
    of an older uda-ray (no units tag), continued, stays in fractions; read back, both give the
    same per-cent values, the same floats as 100 * the fraction."""
    client = _client(store)
    metrics = {"val/mIoU": 0.3, "sel/mIoU": 0.1, "val/IoU/road": 0.7, "val/Acc/sky": 0.5, "val/mIoU13": 0.2,
               "val/pixel_acc": 0.9, "loss/seg": 0.3, "perf/sec_per_iter": 0.1}
    new = tracking.MlflowTracker(experiment="units", tracking_uri=store["uri"], run_name="new")
    new.log_metrics(metrics, step=1)
    old_id = client.create_run(client.get_experiment_by_name("units").experiment_id).info.run_id
    old = tracking.MlflowTracker(experiment="units", tracking_uri=store["uri"], run_id=old_id)
    old.log_metrics(metrics, step=1)
    runs = {r.info.run_id: r for r in _runs(client, "units")}
    got_new, got_old = runs[new.run_id].data, runs[old_id].data
    assert got_new.tags[tracking.UNITS_TAG] == "percent" and tracking.UNITS_TAG not in got_old.tags
    assert got_new.metrics["val/mIoU"] == 100 * 0.3 and got_new.metrics["val/IoU/road"] == 100 * 0.7
    assert got_new.metrics["val/mIoU13"] == 100 * 0.2 and got_new.metrics["val/pixel_acc"] == 100 * 0.9
    assert got_new.metrics["loss/seg"] == 0.3 and got_new.metrics["perf/sec_per_iter"] == 0.1
    assert got_old.metrics == metrics
    assert tracking.scores_in_percent(got_old.metrics, got_old.tags) == got_new.metrics
    assert not tracking.is_score("row/adabn/mIoU") and not tracking.is_score("proxy/acc")
    # what a checkpoint reports to Tune (its trial tables, the search, the scheduler): per cent too
    from uda_ray.distributed import _reported

    assert _reported({**metrics, "step": 4, "none": None}) == {**got_new.metrics, "step": 4}
    # the mosaic's title reads the score in per cent from either kind of run
    assert new.image_title("mosaic/val", 1).endswith("val/mIoU 30.00")
    assert old.image_title("mosaic/val", 1).endswith("val/mIoU 30.00")


def test_run_list_url_and_ui_command():
    url = tracking.runs_url("sqlite:///x/mlflow.db", "7")
    assert url == ("http://127.0.0.1:5000/#/experiments/7/runs?workflowType=machine_learning"
                   f"&viewStateShareKey={tracking.VIEW_KEY}")
    assert tracking.runs_url("http://head:5000/", "3").startswith("http://head:5000/#/experiments/3/runs?")
    assert tracking.ui_command("sqlite:///x/mlflow.db") == "mlflow ui --backend-store-uri sqlite:///x/mlflow.db --workers 1"
    assert tracking.ui_command("http://head:5000") == ""
    view = tracking.run_list_view()
    # the metrics right after the row, so that they stay on screen at laptop widths (tests/test_mlflow_ui.py)
    assert view["selectedColumns"][:5] == ["tags.`row`", "metrics.`val/mIoU`", "metrics.`sel/mIoU`", "tags.`seed`",
                                           "tags.`method`"]
    assert view["groupBy"]["groupByKeys"] == [{"mode": "tag", "groupByData": "row"}]


def test_owner_of_this_process_is_alive_and_a_reused_pid_is_not():
    assert tracking.owner_alive(tracking.owner_tags())
    assert not tracking.owner_alive(_dead_owner())
    assert tracking.owner_alive({**_dead_owner(), tracking.HOST_TAG: "another-host"})  # cannot tell: alive
    assert tracking.owner_alive({})  # a run without owner tags is never reaped


# A `uda-ray train` that logs steps 1-2, checkpoints them, then hangs in its step-3 log: killed
# there with SIGKILL, it leaves its MLflow run RUNNING with a checkpoint at step 2.
HANGING_TRAIN = """
    import sys, time
    from uda_ray import tracking
    log = tracking.MlflowTracker.log_metrics
    def log_then_hang(self, metrics, step):
        log(self, metrics, step)
        if step >= 3:
            print("HANGING", flush=True)
            time.sleep(600)
    tracking.MlflowTracker.log_metrics = log_then_hang
    from uda_ray.cli import main
    sys.exit(main(sys.argv[1:]))
"""


def test_killed_train_is_marked_killed_and_its_resume_continues_the_same_run(store, data_root, tmp_path):
    from uda_ray.cli import main as cli

    client = _client(store)
    uri = store["uri"]
    cfg = tmp_path / "run.yaml"
    cfg.write_text(tiny_cfg(data_root, tmp_path, "source_only", **{"run.name": "killed", "run.iterations": 4,
                                                                 "run.checkpoint_every": 1}).to_yaml())
    proc = _python(HANGING_TRAIN, "train", str(cfg), "--tracking-uri", uri, "--experiment", "kill", "--quiet")
    deadline = time.time() + 120
    for line in proc.stdout:
        if "HANGING" in line or time.time() > deadline:
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    run_dir = tmp_path / "runs" / "killed"
    (run,) = _runs(client, "kill")
    assert run.info.status == "RUNNING"
    assert run.data.tags[tracking.PID_TAG] == str(proc.pid)
    assert (run_dir / tracking.RUN_RECORD).is_file() and (run_dir / "checkpoints" / "last.pt").is_file()

    # The next `train` of the experiment marks the orphan KILLED, saying why.
    other = tmp_path / "other.yaml"
    other.write_text(tiny_cfg(data_root, tmp_path, "source_only", **{"run.name": "other",
                                                                   "run.iterations": 1}).to_yaml())
    assert cli(["train", str(other), "--tracking-uri", uri, "--experiment", "kill", "--quiet"]) == 0
    killed = client.get_run(run.info.run_id)
    assert killed.info.status == "KILLED"
    assert f"pid {proc.pid}" in killed.data.tags["error"]

    # Resuming the run directory continues that MLflow run (steps 3-4 from the step-2 checkpoint).
    assert cli(["train", str(run_dir), "--tracking-uri", uri, "--experiment", "kill", "--quiet"]) == 0
    runs = _runs(client, "kill")
    assert len(runs) == 2  # killed (resumed) and other: no third run
    resumed = client.get_run(run.info.run_id)
    assert resumed.info.status == "FINISHED" and "error" not in resumed.data.tags
    assert resumed.data.tags[tracking.PID_TAG] == str(os.getpid())
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss/seg_src")]
    assert sorted(steps) == [1, 2, 3, 3, 4]
    assert "val/mIoU" in resumed.data.metrics


def test_failed_train_run_carries_an_error_tag(store, data_root, tmp_path, capsys):
    from uda_ray.cli import main as cli

    cfg = tmp_path / "bad.yaml"
    cfg.write_text(tiny_cfg(data_root, tmp_path, "source_only", **{"run.name": "bad", "optim.lr": 1e30,
                                                                 "run.iterations": 4}).to_yaml())
    assert cli(["train", str(cfg), "--tracking-uri", store["uri"], "--experiment", "fail", "--quiet"]) == 2
    assert "loss/seg_src" in capsys.readouterr().err
    (run,) = _runs(_client(store), "fail")
    assert run.info.status == "FAILED"
    assert run.data.tags["error"].startswith("NonFiniteLoss: loss/seg_src")


def test_refused_run_dir_leaves_its_mlflow_run_alone_and_overwrite_starts_a_new_one(store, data_root, tmp_path,
                                                                                   capsys):
    """A run directory claimed by another config is refused before any MLflow run is opened,
    so the owner's FINISHED row keeps its status and parameters; --overwrite starts a new row
    (the old one stays the old model's)."""
    from uda_ray.cli import main as cli

    client, uri = _client(store), store["uri"]
    base = {"run.name": "reused", "run.iterations": 1}
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text(tiny_cfg(data_root, tmp_path, "source_only", **base).to_yaml())
    second.write_text(tiny_cfg(data_root, tmp_path, "source_only", **base, **{"optim.lr": 0.5}).to_yaml())
    args = ["--tracking-uri", uri, "--experiment", "reuse", "--quiet"]
    assert cli(["train", str(first), *args]) == 0
    (old,) = _runs(client, "reuse")
    assert cli(["train", str(second), *args]) == 2
    assert "another config" in capsys.readouterr().err
    (again,) = _runs(client, "reuse")  # no new run, and the old one untouched
    assert again.info.status == "FINISHED" and again.data.params["optim.lr"] == old.data.params["optim.lr"] != "0.5"
    assert cli(["train", str(second), "--overwrite", *args]) == 0
    runs = {r.info.run_id: r for r in _runs(client, "reuse")}
    assert len(runs) == 2 and runs[old.info.run_id].data.params["optim.lr"] != "0.5"
    (new,) = [r for i, r in runs.items() if i != old.info.run_id]
    assert new.info.status == "FINISHED" and new.data.params["optim.lr"] == "0.5"


def test_study_rerun_continues_an_unfinished_child_and_reaps_a_dead_driver(store, data_root, tmp_path,
                                                                          monkeypatch):
    """Ray is replaced by a stand-in trainer here (tests/test_ray.py runs a real study); the
    MLflow side is real: the parent and child runs, the reaping, the continued child."""
    from types import SimpleNamespace

    from uda_ray import distributed
    from uda_ray.study import Row, Study, StudyRecord, config_hash, drive_trial

    base = {k: v for k, v in tiny_cfg(data_root, tmp_path).flat().items()
            if not k.startswith("source_only.") and k != "method"}
    study = Study(name="rerun", base=base, seeds=(0,), rows=[Row("a", "source_only")])
    record = StudyRecord(study, "rerun", store["uri"])
    client = record.client
    flat = study.flat(study.rows[0], 0)
    # the study's driver was killed -9 while row a, seed 0 ran: parent and child left RUNNING
    child = client.create_run(record.experiment_id, run_name="a-s0", tags={
        "mlflow.parentRunId": record.parent_id, "uda_ray.kind": "row", "study": "rerun", "row": "a", "seed": "0",
        "trial": "", "search": "0", "config_hash": config_hash(flat), **_dead_owner()}).info.run_id
    for k, v in _dead_owner().items():
        client.set_tag(record.parent_id, k, v)

    record = StudyRecord(study, "rerun", store["uri"])  # the study started again
    assert client.get_run(child).info.status == "KILLED"
    assert "ended while the run was RUNNING" in client.get_run(child).data.tags["error"]
    parent = client.get_run(record.parent_id)
    assert parent.info.status == "RUNNING" and parent.data.tags[tracking.PID_TAG] == str(os.getpid())

    monkeypatch.setattr(distributed, "trial_id", lambda: "t0")
    monkeypatch.setattr(distributed, "tune_report_callback", lambda: None)
    monkeypatch.setattr(distributed, "run_trainer",
                        lambda flat, **kw: SimpleNamespace(error=None, checkpoint=None, kw=kw))
    ctx = {"study": "rerun", "parent_id": record.parent_id, "experiment_id": record.experiment_id,
           "tracking_uri": record.tracking_uri, "storage_path": str(tmp_path / "storage"), "out": str(tmp_path),
           "workers": 1, "cpus": 1, "gpus": 0, "max_failures": 0, "flats": {"a": {"0": flat}}}
    drive_trial({"trial": {"row": "a", "seed": 0, "set": {}, "tags": {}}}, ctx)
    children = record.children(row="a")
    assert [r.info.run_id for r in children] == [child]  # continued, not duplicated
    assert children[0].info.status == "FINISHED" and "error" not in children[0].data.tags

    # the experiment holds the run list's view; the study's source tags are on its runs
    import json

    exp = client.get_experiment(record.experiment_id)
    assert json.loads(exp.tags[f"mlflow.sharedViewState.{tracking.VIEW_KEY}"]) == tracking.run_list_view()
    assert exp.tags["mlflow.experiment.primaryMetric.name"] == "val/mIoU"
    assert client.get_run(record.parent_id).data.tags["mlflow.source.type"] == "LOCAL"
    # a search trial is another kind of run: no row tag, so that grouping by row leaves it out
    monkeypatch.setattr(distributed, "trial_id", lambda: "t7")
    drive_trial({"optim.lr": 0.02}, dict(ctx, row="a", seed=0))
    (trial,) = record.children(row="a", search="1")
    t = trial.data.tags
    assert (t["uda_ray.kind"], t["search_row"], t["trial"], "row" in t) == ("search_trial", "a", "t7", False)
    assert t["mlflow.source.type"] == "LOCAL" and trial.info.run_name == "a-s0-t7"
    assert [r.info.run_id for r in record.children(row="a")] == [child]  # the seed runs only


def test_second_study_of_the_same_name_exits_2_at_once(data_root, tmp_path, capsys):
    from uda_ray.cli import main as cli
    from uda_ray.study import STUDY_LOCK

    script = tmp_path / "dup.py"
    script.write_text("from uda_ray.study import Row, Study\n"
                      f"STUDY = Study(name='dup', seeds=(0,), base={{'data.root': {str(data_root)!r}}}, "
                      "rows=[Row('a', 'source_only')])\n")
    out = tmp_path / "out"
    with tracking.file_lock(out / "dup" / STUDY_LOCK) as held:  # the first study, running
        held.write("pid 1234 on somewhere\n")
        held.flush()
        t0 = time.perf_counter()
        # an unreachable Ray address: were the lock not checked first, this would not return 2
        assert cli(["study", str(script), "--out", str(out), "--address", "127.0.0.1:9"]) == 2
        assert time.perf_counter() - t0 < 10
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "study dup is already running (pid 1234 on somewhere holds" in err[0]


def test_telemetry_is_off_once_tracking_is_imported_unless_turned_on():
    code = "import os, uda_ray.tracking; print(os.environ.get('MLFLOW_DISABLE_TELEMETRY'))"
    env = {k: v for k, v in ENV.items() if k != "MLFLOW_DISABLE_TELEMETRY"}
    run = lambda e: subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, text=True,  # noqa: E731
                                   check=True).stdout.strip()
    assert run(env) == "true"
    assert run({**env, "MLFLOW_DISABLE_TELEMETRY": "false"}) == "false"  # the user's choice is kept
