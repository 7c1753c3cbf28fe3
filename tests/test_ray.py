"""Ray Train and Tune on a real local 2-node Ray cluster (one CPU per node)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from trees import tiny_cfg
from uda_ray.checkpoint import checkpoint_path, load_checkpoint_file
from uda_ray.engine import fit

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def cluster():
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "120")
    import ray
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    c.add_node(num_cpus=1)
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False)
    yield c
    ray.shutdown()
    c.shutdown()


def _model_state(path):
    return load_checkpoint_file(path)["modules"]


def test_two_workers_take_the_step_of_one_worker_with_the_doubled_batch(cluster, data_root, tmp_path):
    from uda_ray.distributed import run_trainer

    # Frozen BN: batch statistics would otherwise differ between 2 x 1 and 1 x 2 images.
    common = {"model.bn": "frozen", "run.iterations": 2, "data.select_n": 1}
    one = fit(tiny_cfg(data_root, tmp_path, "adaptseg", **{**common, "data.batch_size": 2, "run.name": "one"}))
    flat = tiny_cfg(data_root, tmp_path, "adaptseg", **{**common, "data.batch_size": 1, "run.name": "two"}).flat()
    result = run_trainer(flat, run_dir=str(tmp_path / "runs" / "two"), name="ddp", num_workers=2,
                         cpus_per_worker=0.5, storage_path=str(tmp_path / "storage"))
    assert result.error is None
    a = _model_state(checkpoint_path(one.run_dir))

    b = _model_state(os.path.join(result.checkpoint.path, "last.pt"))
    for name in a:  # the segmenter and both discriminators
        # float32 sums in another order. Segmenter (SGD): 1e-5 relative, 1e-6 absolute; its
        # step is linear in the gradient, so it pins the averaging (a sum over the ranks
        # instead of a mean would double it). Discriminators (Adam): Adam divides each
        # gradient element by its own magnitude, which turns reduction-order noise in
        # near-zero elements into up to a fraction of a step; bound: 5% of one Adam step per
        # iteration (a wrong gradient moves weights by whole steps).
        atol = 1e-6 if name == "model" else 0.05 * 1e-4 * 2
        for k, v in a[name].items():
            if v.is_floating_point():
                torch.testing.assert_close(b[name][k], v, rtol=1e-5, atol=atol)


def test_proxy_labels_of_two_workers_equal_those_of_one(cluster, data_root, tmp_path):
    """MAT's proxy stage on 2 Train workers: the histogram passes are sharded over the ranks
    and their counts summed, so t1, t2 and every label PNG are those of a single process."""
    from uda_ray.distributed import run_trainer

    common = {"model.arch": "mat_tiny", "data.select_n": 1, "mat.ndf": 8}
    src = fit(tiny_cfg(data_root, tmp_path, "source_only", **{"model.arch": "mat_tiny", "data.select_n": 1,
                                                              "run.iterations": 1, "run.name": "src"}))
    adapted = fit(tiny_cfg(data_root, tmp_path, "mat", **{**common, "run.iterations": 1, "run.name": "adapt",
                                                          "run.init_from": str(src.run_dir)}))
    proxy = {**common, "run.iterations": 1, "mat.proxy": True, "mat.p1": 0.6, "mat.p2": 0.5,
             "run.init_from": str(adapted.run_dir)}
    one = fit(tiny_cfg(data_root, tmp_path, "mat", **{**proxy, "run.name": "one"}))
    flat = tiny_cfg(data_root, tmp_path, "mat", **{**proxy, "run.name": "two"}).flat()
    run_dir = tmp_path / "runs" / "two"
    result = run_trainer(flat, run_dir=str(run_dir), name="ddp-proxy", num_workers=2, cpus_per_worker=0.5,
                         storage_path=str(tmp_path / "storage"))
    assert result.error is None
    files = sorted(p.relative_to(one.run_dir / "proxies") for p in (one.run_dir / "proxies").rglob("*.png"))
    assert files and files == sorted(p.relative_to(run_dir / "proxies") for p in (run_dir / "proxies").rglob("*.png"))
    for f in files:
        assert (one.run_dir / "proxies" / f).read_bytes() == (run_dir / "proxies" / f).read_bytes(), f


def test_a_killed_worker_resumes_from_its_last_checkpoint(cluster, data_root, tmp_path):
    from uda_ray.distributed import KILL_ENV, run_trainer

    values = {"run.iterations": 4, "run.checkpoint_every": 2, "run.name": "ref"}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the Ray worker (1 CPU): same float reduction order
    try:
        ref = fit(tiny_cfg(data_root, tmp_path, "source_only", **values))
    finally:
        torch.set_num_threads(threads)
    flat = tiny_cfg(data_root, tmp_path, "source_only", **{**values, "run.name": "killed"}).flat()
    run_dir = tmp_path / "runs" / "killed"
    result = run_trainer(flat, run_dir=str(run_dir), name="kill", num_workers=1, max_failures=1,
                         storage_path=str(tmp_path / "storage"), env={KILL_ENV: "2"})
    assert result.error is None
    assert (run_dir / ".killed-once").exists()  # the worker really died at step 2
    assert result.metrics["step"] == 4
    a = _model_state(checkpoint_path(ref.run_dir))["model"]
    b = _model_state(os.path.join(result.checkpoint.path, "last.pt"))["model"]
    for k in a:  # resumed at step 2 from the checkpoint: identical to the uninterrupted run
        assert torch.equal(a[k], b[k]), k


def _space(trial):
    trial.suggest_float("adaptseg.lambda_adv_main", 1e-4, 1e-2, log=True)


def test_study_across_two_nodes_records_rows_and_skips_finished_ones(cluster, data_root, tmp_path, capsys):
    import mlflow

    from uda_ray.study import Row, Study, run_study

    base = {k: v for k, v in tiny_cfg(data_root, tmp_path, "source_only", **{"run.iterations": 2}).flat().items()
            if not k.startswith("source_only.") and k != "method"}
    study = Study(name="smoke", base=base, seeds=(0,), baseline="source_only", rows=[
        Row("source_only", "source_only"),
        Row("adabn", "adabn", init_from="source_only"),
        Row("adaptseg", "adaptseg", init_from="source_only", set={"adaptseg.gan": "ls"}),
        # checkpoints every step: reports without the objective reach the Optuna searcher
        Row("adaptseg_search", "adaptseg", init_from="source_only", space=_space, num_samples=2,
            set={"run.checkpoint_every": 1}),
        Row("broken", "source_only", set={"optim.lr": 1e30, "run.iterations": 4}),
    ])
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    kw = dict(address=cluster.address, storage_path=str(tmp_path / "storage"), tracking_uri=uri,
              out=str(tmp_path / "out"))
    assert run_study(study, **kw) == 1  # the broken row failed; the others went on
    out = capsys.readouterr().out
    assert "study smoke:" in out and "broken s0" in out and "mlflow ui --backend-store-uri" in out
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("smoke")
    runs = client.search_runs([exp.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("uda_ray.kind") == "study"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    # a search trial is tagged search_row (not row), so that MLflow's "group by row" leaves it out
    status = {(r.data.tags.get("row") or r.data.tags["search_row"], r.data.tags["search"]): r.info.status
              for r in children}
    assert status[("broken", "0")] == "FAILED"
    for row in ("source_only", "adabn", "adaptseg", "adaptseg_search"):
        assert status[(row, "0")] == "FINISHED", row
    trials = [r for r in children if r.data.tags["search"] == "1"]  # the Optuna trials
    assert len(trials) == 2 and all(r.data.tags["uda_ray.kind"] == "search_trial" and "row" not in r.data.tags
                                    for r in trials)
    best = next(r for r in children if r.data.tags.get("row") == "adaptseg_search")
    assert best.data.tags["best_trial"] and "val/mIoU" in best.data.metrics and "sel/mIoU" in best.data.metrics
    adabn = next(r for r in children if r.data.tags.get("row") == "adabn")
    assert adabn.data.params["run.init_from"].endswith("checkpoint_000000") or "checkpoint" in \
        adabn.data.params["run.init_from"]
    assert (tmp_path / "out" / "smoke" / "smoke_compare.csv").is_file()
    assert (tmp_path / "out" / "smoke" / "smoke_seeds.parquet").is_file()
    assert (tmp_path / "out" / "smoke" / "smoke_bars.pdf").is_file()
    assert "viewStateShareKey=" in out and "--workers 1" in out and "optuna-dashboard sqlite:///" in out

    # Again: every finished row x seed is skipped; only the broken row runs (and fails) again,
    # continuing its FAILED child run rather than adding another.
    assert run_study(study, **kw) == 1
    out = capsys.readouterr().out
    assert out.count("already finished, skipped") == 4
    again = [r for r in client.search_runs([exp.experiment_id])
             if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.info.run_id for r in again) == sorted(r.info.run_id for r in children)
    broken = next(r for r in again if r.data.tags.get("row") == "broken")
    # the first run diverged (NonFiniteLoss); the second refuses to resume the diverged run
    assert broken.info.status == "FAILED" and "this run diverged" in broken.data.tags["error"]


def _study_base(data_root, tmp_path, **values) -> dict:
    return {k: v for k, v in tiny_cfg(data_root, tmp_path, "source_only", **values).flat().items()
            if not k.startswith("source_only.") and k != "method"}


def _child_runs(uri: str, study: str) -> list:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(study)
    return [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("uda_ray.kind") == "row"]


def test_a_killed_in_process_trial_resumes_bit_identically(cluster, data_root, tmp_path):
    """A single-worker CPU trial fits in its Tune trial's process (no TorchTrainer); killed
    hard right after its step-2 checkpoint, Tune restarts it from that checkpoint and the
    row ends with the weights of an uninterrupted run."""
    from uda_ray.distributed import KILL_ENV
    from uda_ray.study import Row, Study, run_study

    values = {"run.iterations": 4, "run.checkpoint_every": 2}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the trial (1 CPU): same float reduction order
    try:
        ref = fit(tiny_cfg(data_root, tmp_path, "source_only", **values, **{"run.name": "ref"}))
    finally:
        torch.set_num_threads(threads)
    study = Study(name="killed", base=_study_base(data_root, tmp_path, **values), seeds=(0,),
                  rows=[Row("a", "source_only")], cpus_per_worker=0.9)
    assert study.in_process
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert run_study(study, address=cluster.address, storage_path=str(tmp_path / "storage"), tracking_uri=uri,
                     out=str(tmp_path / "out"), env={KILL_ENV: "2"}) == 0
    (run,) = _child_runs(uri, "killed")
    (run_dir,) = (tmp_path / "out" / "killed").glob("a-s0-*")
    assert (run_dir / ".killed-once").exists()  # the trial's process really died at step 2
    assert run.info.status == "FINISHED" and "val/mIoU" in run.data.metrics
    assert run.data.tags["checkpoint"].startswith(str(tmp_path / "storage"))  # persisted by Tune
    a = _model_state(checkpoint_path(ref.run_dir))["model"]
    b = _model_state(os.path.join(run.data.tags["checkpoint"], "last.pt"))["model"]
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_a_study_with_ray_train_fits_each_trial_with_a_torch_trainer(cluster, data_root, tmp_path):
    """ray_train=True keeps the TorchTrainer path (what multi-worker and GPU studies use)."""
    from uda_ray.study import Row, Study, run_study

    study = Study(name="trainer", base=_study_base(data_root, tmp_path, **{"run.iterations": 2}), seeds=(0,),
                  rows=[Row("a", "source_only"), Row("b", "adabn", init_from="a")], ray_train=True)
    assert not study.in_process
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert run_study(study, address=cluster.address, storage_path=str(tmp_path / "storage"), tracking_uri=uri,
                     out=str(tmp_path / "out")) == 0
    runs = {r.data.tags["row"]: r for r in _child_runs(uri, "trainer")}
    assert {r.info.status for r in runs.values()} == {"FINISHED"}
    # Ray Train's own run folder (named after the row x seed and its lineage) holds the checkpoint
    assert f"trainer-a-s0-{runs['a'].data.tags['lineage']}" in runs["a"].data.tags["checkpoint"]
    assert runs["b"].data.params["run.init_from"] == runs["a"].data.tags["checkpoint"]


def test_ray_train_false_refuses_several_workers():
    from uda_ray.study import Row, Study

    with pytest.raises(ValueError, match="need Ray Train"):
        Study(name="x", rows=[Row("a", "source_only")], workers_per_trial=2, ray_train=False)


def _by_row_seed(uri: str, study: str) -> dict:
    """(row, seed) -> the FINISHED row run of a study."""
    return {(r.data.tags["row"], r.data.tags["seed"]): r for r in _child_runs(uri, study)
            if r.info.status == "FINISHED"}


def test_an_edited_row_reruns_exactly_the_rows_downstream_of_it(cluster, data_root, tmp_path, capsys):
    from dataclasses import replace

    from uda_ray.compare import compare_study
    from uda_ray.study import Row, Study, run_study

    study = Study(name="edited", base=_study_base(data_root, tmp_path, **{"run.iterations": 2}), seeds=(0,),
                  baseline="src", rows=[Row("src", "source_only"), Row("ad", "adaptseg", init_from="src"),
                                        Row("other", "source_only", set={"optim.lr": 0.02})])
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    kw = dict(address=cluster.address, storage_path=str(tmp_path / "storage"), tracking_uri=uri,
              out=str(tmp_path / "out"))
    assert run_study(study, **kw) == 0
    first = _by_row_seed(uri, "edited")
    ad = first[("ad", "0")].data
    # the record: the dependent row's lineage is its config over its parent's
    assert ad.tags["parent_lineage"] == first[("src", "0")].data.tags["lineage"]
    assert ad.tags["parent_run_id"] == first[("src", "0")].info.run_id
    assert ad.params["run.init_from"] == first[("src", "0")].data.tags["checkpoint"]
    capsys.readouterr()
    # the source row edited: it and the row that starts from it train again; the other row is kept
    edited = replace(study, rows=[replace(study.rows[0], set={"run.iterations": 3}), *study.rows[1:]])
    assert run_study(edited, **kw) == 0
    out = capsys.readouterr().out
    assert "other s0: already finished, skipped" in out
    assert "src s0: already finished" not in out and "ad s0: already finished" not in out
    runs = [r for r in _child_runs(uri, "edited") if r.info.status == "FINISHED"]
    src2 = max((r for r in runs if r.data.tags["row"] == "src"), key=lambda r: r.info.start_time)
    ad2 = max((r for r in runs if r.data.tags["row"] == "ad"), key=lambda r: r.info.start_time)
    assert src2.info.run_id != first[("src", "0")].info.run_id and ad2.info.run_id != first[("ad", "0")].info.run_id
    assert ad2.data.tags["parent_run_id"] == src2.info.run_id
    assert ad2.data.tags["parent_lineage"] == src2.data.tags["lineage"]
    assert load_checkpoint_file(os.path.join(ad2.data.tags["checkpoint"], "last.pt"))["parent_lineage"] == \
        src2.data.tags["lineage"]
    # a third run skips every row of the edited study
    assert run_study(edited, **kw) == 0
    assert capsys.readouterr().out.count("already finished, skipped") == 3
    # edited back: the first runs are the study's again, and compare reports them
    assert run_study(study, **kw) == 0
    assert capsys.readouterr().out.count("already finished, skipped") == 3
    seeds = compare_study("edited", tracking_uri=uri, out_dir=tmp_path / "cmp", log_to_parent=False).seeds
    counted = set(seeds[seeds["counted"]]["run_id"])
    assert counted == {first[k].info.run_id for k in first}


def test_until_decided_adds_seeds_to_undecided_claims_and_dependent_rows_record_checkpoint_uris(
        cluster, data_root, tmp_path, capsys):
    """--until-decided: the study's seeds first, then a round of new seeds (as many as it runs
    at once) for the rows of the claims not decided and the rows they start from; never a
    row x seed already finished again, never a row outside the claims.

    Storage given as a URI (as s3://... on a cluster; file:// here): a dependent row's
    trial fetches its parent's checkpoint through it, records the URI (never the temporary
    local copy) and deletes the copy."""
    import glob
    import tempfile

    from uda_ray.study import Claim, Row, Study, run_study

    copies = set(glob.glob(os.path.join(tempfile.gettempdir(), "uda-ray-init-*")))

    study = Study(name="decide", base=_study_base(data_root, tmp_path, **{"run.iterations": 2}), seeds=(0, 1),
                  rows=[Row("a", "source_only"), Row("b", "adaptseg", init_from="a"),
                        Row("c", "source_only", set={"optim.lr": 0.02})],
                  claims=[Claim("b beats a", better="b", than="a")], max_concurrent=2)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert run_study(study, address=cluster.address, storage_path=f"file://{tmp_path / 'storage'}",
                     tracking_uri=uri, out=str(tmp_path / "out"), until_decided=True, max_seeds=3) == 0
    out = capsys.readouterr().out
    assert "until-decided, look 1 of at most 2 (stop rule at the 97.50% level): 0 of 1 claims" in out
    assert "adding seed(s) 2 to rows a, b" in out
    runs = _child_runs(uri, "decide")
    seeds = {}
    for r in runs:
        assert r.info.status == "FINISHED"
        seeds.setdefault(r.data.tags["row"], []).append(r.data.tags["seed"])
    assert {k: sorted(v) for k, v in seeds.items()} == {"a": ["0", "1", "2"], "b": ["0", "1", "2"], "c": ["0", "1"]}
    assert "b beats a [b vs a]" in out.split("until-decided: the claims at the first look and now")[1]
    by = _by_row_seed(uri, "decide")
    for seed in ("0", "1", "2"):
        a, b = by[("a", seed)], by[("b", seed)]
        assert a.data.tags["checkpoint"].startswith(f"file://{tmp_path / 'storage'}/")
        assert b.data.params["run.init_from"] == a.data.tags["checkpoint"]
        assert b.data.tags["parent_run_id"] == a.info.run_id
        assert b.data.tags["parent_lineage"] == a.data.tags["lineage"]
        # what the lineage covers, readable on the run (and in a committed results file)
        assert len(a.data.tags["code_fingerprint"]) == 16
        assert a.data.tags["data_fingerprint"].startswith("files:")  # the test's tree in the real layouts
    assert set(glob.glob(os.path.join(tempfile.gettempdir(), "uda-ray-init-*"))) == copies


_INTERRUPTED_STUDY = """
from uda_ray.study import Row, Study

STUDY = Study(name="ctrlc", base={base!r}, seeds=(0, 1), max_concurrent=2, rows=[
    Row("src", "source_only", set={{"run.iterations": 240, "run.checkpoint_every": 20}}),
    Row("ad", "adaptseg", init_from="src", set={{"run.iterations": 6, "run.checkpoint_every": 2}}),
])
"""


def test_ctrl_c_stops_a_study_and_a_rerun_equals_an_uninterrupted_one(cluster, data_root, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    import mlflow

    from uda_ray.study import load_study, run_study

    script = tmp_path / "ctrlc.py"
    script.write_text(_INTERRUPTED_STUDY.format(base=_study_base(data_root, tmp_path)))
    study = load_study(script)
    # the reference: the same study, uninterrupted, in another store and folder
    ref_uri = f"sqlite:///{tmp_path / 'ref.db'}"
    assert run_study(study, address=cluster.address, storage_path=str(tmp_path / "ref-storage"),
                     tracking_uri=ref_uri, out=str(tmp_path / "ref"), store=str(tmp_path / "ref-stages")) == 0
    ref = _by_row_seed(ref_uri, "ctrlc")
    # each trial's storage keeps its last two checkpoints (src reports 12), and the last, which
    # its row names and ad starts from, is one of them
    trials = list((tmp_path / "ref-storage").glob("ctrlc-*/drive_trial_*"))
    assert len(trials) == 4 and all(len(list(t.glob("checkpoint_*"))) == 2 for t in trials), trials
    assert all((Path(r.data.tags["checkpoint"]) / "last.pt").is_file() for r in _child_runs(ref_uri, "ctrlc"))

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [sys.executable, "-m", "uda_ray.cli", "study", str(script), "--address", cluster.address,
            "--storage-path", str(tmp_path / "storage"), "--tracking-uri", uri, "--out", str(tmp_path / "out")]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    deadline = time.monotonic() + 240
    while not list((tmp_path / "out" / "ctrlc").glob("src-s*/checkpoints/last.pt")):  # mid-way through src
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in a terminal: the whole foreground process group
    out = proc.communicate(timeout=180)[0]
    assert proc.returncode == 130, out[-3000:]
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("ctrlc")
    runs = client.search_runs([exp.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("uda_ray.kind") == "study"]
    assert parent.info.status == "KILLED"
    children = [r for r in runs if r.data.tags.get("uda_ray.kind") == "row"]
    assert children and "RUNNING" not in {r.info.status for r in children}
    assert "KILLED" in {r.info.status for r in children}, [(r.info.status, r.data.tags.get("error")) for r in children]
    assert not any(r.data.tags["row"] == "ad" and r.info.status == "FINISHED" for r in children)

    # the re-run finishes the study: one run per row x seed, equal seed for seed to the reference
    proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    runs = [r for r in _child_runs(uri, "ctrlc")]
    assert {r.info.status for r in runs} == {"FINISHED"} and len(runs) == 4
    done = _by_row_seed(uri, "ctrlc")
    assert all("checkpoint" in r.data.tags for r in done.values())  # continued runs recorded theirs too
    for key, r in ref.items():
        assert done[key].data.metrics["val/mIoU"] == r.data.metrics["val/mIoU"], key
        assert done[key].data.tags["lineage"] == r.data.tags["lineage"], key
    (parent,) = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("uda_ray.kind") == "study"]
    assert parent.info.status == "FINISHED"


def test_a_local_path_a_node_cannot_see_is_refused_before_any_trial(cluster, tmp_path, monkeypatch):
    """On several nodes, each path the trials share is looked for by a task on every node:
    this cluster's nodes share the disk, so a path here is seen and a missing one is named
    per node; the study's refusal is one line that says what to pass instead."""
    from uda_ray import distributed
    from uda_ray.study import StudyError, _check_reachable

    assert distributed.unreachable({"storage": str(tmp_path)}) == []
    missing = distributed.unreachable({"storage": str(tmp_path / "nowhere")})
    assert len(missing) == 2 and {m[0] for m in missing} == {"storage"}
    _check_reachable("s", str(tmp_path / "storage"), str(tmp_path / "stages"), f"sqlite:///{tmp_path / 'm.db'}")
    assert not list((tmp_path / "storage").iterdir())  # its marker is removed again
    monkeypatch.setattr(distributed, "unreachable", lambda paths: [
        (k, p, "10.0.0.2 (abcdef12)") for k, p in paths.items() if k == "storage"])
    with pytest.raises(StudyError) as e:
        _check_reachable("s", str(tmp_path / "storage"), "s3://b/stages", "http://127.0.0.1:5000")
    msg = str(e.value)
    assert "\n" not in msg and "--storage-path s3://" in msg and "10.0.0.2" in msg and str(tmp_path / "storage") in msg
