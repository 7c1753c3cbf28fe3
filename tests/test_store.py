"""The stage store: a finished stage is reused by any later study whose row has its exact
lineage (config keys that change weights, parent, data, pretrained weights, code), never by
one that differs in any of them; plans, ls/du/gc, the lock per lineage, S3."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time

import pytest
import torch

from trees import tiny_cfg
from uda_ray.checkpoint import checkpoint_path, config_hash, lineage_of, load_checkpoint_file
from uda_ray.engine import fit
from uda_ray.fingerprint import code_fingerprint, data_fingerprint
from uda_ray.models.from_config import start_of
from uda_ray.store import StageStore

pytestmark = pytest.mark.timeout(900)


# --- what a lineage covers ------------------------------------------------------------------

def _lineage(cfg):
    return lineage_of(cfg, start=start_of(cfg))["lineage"]


def test_eval_log_and_checkpoint_intervals_change_neither_the_weights_nor_the_lineage(data_root, tmp_path):
    states, lineages = {}, {}
    for name, every in (("a", 0), ("b", 1)):
        cfg = tiny_cfg(data_root, tmp_path / name, "adaptseg", **{
            "run.iterations": 3, "run.name": name, "run.eval_every": every, "run.log_every": 1 + every,
            "run.checkpoint_every": every, "run.mosaic_images": every})
        states[name] = load_checkpoint_file(checkpoint_path(fit(cfg).run_dir))["modules"]["model"]
        lineages[name] = _lineage(cfg)
    for k, v in states["a"].items():
        assert torch.equal(v, states["b"][k]), k
    assert lineages["a"] == lineages["b"]


def test_a_weight_changing_key_data_weights_or_code_change_the_lineage(data_root, tmp_path, monkeypatch):
    cfg = tiny_cfg(data_root, tmp_path, "source_only", **{"run.iterations": 1})
    base = _lineage(cfg)
    # not identity: the run's name and folder, and where the same data lies
    moved = tmp_path / "moved_data"
    shutil.copytree(data_root, moved, copy_function=shutil.copy2)  # same files, sizes and times
    assert _lineage(tiny_cfg(moved, tmp_path / "x", "source_only", **{"run.iterations": 1,
                                                                     "run.name": "other"})) == base
    # a key that changes the weights
    assert _lineage(tiny_cfg(data_root, tmp_path, "source_only", **{"run.iterations": 1, "optim.lr": 0.02})) != base
    # the data: one image more in the target folder
    extra = moved / "cityscapes" / "leftImg8bit" / "train"
    city = next(p for p in extra.iterdir() if p.is_dir())
    img = next(city.iterdir())
    shutil.copy2(img, city / img.name.replace("_leftImg8bit", "_copy_leftImg8bit"))
    changed = tiny_cfg(moved, tmp_path / "x", "source_only", **{"run.iterations": 1})
    from uda_ray import fingerprint

    fingerprint._DATA.clear()  # once per process: a new process sees the new file
    assert data_fingerprint(changed) != data_fingerprint(cfg)
    assert _lineage(changed) != base
    # pretrained weights: other bytes, another lineage
    from uda_ray.models import build_model

    w = tmp_path / "enc.pth"
    torch.save(build_model("tiny", num_classes=19).backbone.state_dict(), w)
    with_w = tiny_cfg(data_root, tmp_path, "source_only", **{"run.iterations": 1, "model.pretrained": str(w)})
    first = _lineage(with_w)
    torch.save({k: v + 1 if v.is_floating_point() else v
                for k, v in build_model("tiny", num_classes=19).backbone.state_dict().items()}, w)
    os.utime(w, ns=(1, 1))
    assert _lineage(with_w) != first
    # the code: another training code fingerprint, another lineage
    monkeypatch.setattr(fingerprint, "code_fingerprint", lambda package=None: "code:0000000000000000")
    assert _lineage(cfg) != base


def test_the_code_fingerprint_covers_training_code_not_docstrings_or_reporting(tmp_path):
    import uda_ray

    pkg = tmp_path / "uda_ray"
    shutil.copytree(os.path.dirname(uda_ray.__file__), pkg, ignore=shutil.ignore_patterns("__pycache__"))
    first = code_fingerprint(str(pkg))
    losses = pkg / "losses.py"
    text = losses.read_text()
    # a docstring and a comment edited: the same code
    losses.write_text(text.replace('"""', '"""Edited. ', 1) + "\n# a comment\n")
    code_fingerprint.cache_clear()
    assert code_fingerprint(str(pkg)) == first
    # a reporting module edited: the same training code
    (pkg / "compare.py").write_text((pkg / "compare.py").read_text() + "\nX = 1\n")
    code_fingerprint.cache_clear()
    assert code_fingerprint(str(pkg)) == first
    # a line of training code edited: another fingerprint
    losses.write_text(text + "\nEPS = 1e-9\n")
    code_fingerprint.cache_clear()
    assert code_fingerprint(str(pkg)) != first
    code_fingerprint.cache_clear()


# --- the store itself -----------------------------------------------------------------------

def _stage_files(tmp_path):
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "last.pt").write_bytes(b"x" * 100)
    return ck


def test_a_stage_is_complete_only_once_its_record_is_written_and_ls_du_gc_see_it(tmp_path, capsys):
    from uda_ray.cli import main as cli

    store = StageStore(str(tmp_path / "stages"))
    ck = _stage_files(tmp_path)
    assert store.get("abc") is None
    store._copy_in(str(ck), "half")  # a checkpoint copied, no stage.json: an interrupted put
    assert store.get("half") is None
    meta = store.put("abc", str(ck), {"study": "s", "row": "r", "seed": 0, "run_id": "1234567890"})
    assert store.get("abc")["checkpoint"] == meta["checkpoint"] == str(tmp_path / "stages" / "abc" / "checkpoint")
    assert (tmp_path / "stages" / "abc" / "checkpoint" / "last.pt").read_bytes() == b"x" * 100
    store.touch("abc", used_by="t/r/s0")
    assert store.get("abc")["used_by"] == ["t/r/s0"]
    assert cli(["store", "ls", "--store", store.root]) == 0
    out = capsys.readouterr().out
    assert "abc" in out and "t/r/s0" in out and "(incomplete)" in out
    assert cli(["store", "du", "--store", store.root]) == 0
    assert "in 2 stages" in capsys.readouterr().out
    # gc: nothing references either stage in this (empty) MLflow store
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    import mlflow

    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("keep")
    client.create_run(exp, tags={"lineage": "abc"})
    assert cli(["store", "gc", "--store", store.root, "--tracking-uri", uri, "--dry-run"]) == 0
    assert "would remove half" in capsys.readouterr().out and (tmp_path / "stages" / "half").is_dir()
    assert cli(["store", "gc", "--store", store.root, "--tracking-uri", uri]) == 0
    assert store.lineages() == ["abc"]


def test_the_lock_of_a_lineage_lets_one_process_train_it(tmp_path):
    store = StageStore(str(tmp_path / "stages"))
    order, waited = [], []

    def job(name):
        with store.lock("L", on_wait=lambda: waited.append(name)):
            order.append(f"{name} in")
            time.sleep(0.3)
            order.append(f"{name} out")

    threads = [threading.Thread(target=job, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
        time.sleep(0.05)
    for t in threads:
        t.join()
    assert order == ["a in", "a out", "b in", "b out"] and waited == ["b"]


def test_the_store_works_on_an_s3_compatible_server(tmp_path, monkeypatch):
    moto = pytest.importorskip("moto.server", reason="the [cluster] extra (moto[server], boto3) is not installed")
    import boto3

    server = moto.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        for k, v in {"AWS_ENDPOINT_URL_S3": endpoint, "AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "x",
                     "AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": "us-east-1"}.items():
            monkeypatch.setenv(k, v)
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="stages")
        store = StageStore("s3://stages/store")
        ck = _stage_files(tmp_path)
        assert store.get("abc") is None
        with store.lock("abc"):
            store.put("abc", str(ck), {"study": "s", "row": "r", "seed": 1, "run_id": "r1"})
        got = store.get("abc")
        assert got["checkpoint"] == "s3://stages/store/abc/checkpoint" and got["seed"] == 1
        assert store.lineages() == ["abc"] and store.size("abc") > 100
        # a stage on S3 is where dependents start from: copy it back as Ray Train would
        import pyarrow.fs

        fs, path = pyarrow.fs.FileSystem.from_uri(got["checkpoint"] + "/last.pt")
        with fs.open_input_stream(path) as f:
            assert f.read() == b"x" * 100
        store.remove("abc")
        assert store.lineages() == []
        # a lease its holder stopped renewing (killed with its node) is taken without waiting;
        # a held one is renewed while its holder trains
        store._write(json.dumps({"host": "gone", "pid": 1, "time": time.time() - 1000}).encode(), ".locks", "L.json")
        waited = []
        with store.lock("L", on_wait=lambda: waited.append(1)):
            held = json.loads(store._read(".locks", "L.json"))
            assert (held["host"], held["pid"]) != ("gone", 1) and time.time() - held["time"] < 30
        assert not waited and store._read(".locks", "L.json") is None
    finally:
        server.stop()


# --- studies that share stages ---------------------------------------------------------------

@pytest.fixture(scope="module")
def ray_local():
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    ray.init(num_cpus=2, log_to_driver=False)
    yield
    ray.shutdown()


def _base(data_root, tmp_path, **values) -> dict:
    return {k: v for k, v in tiny_cfg(data_root, tmp_path, "source_only", **values).flat().items()
            if not k.startswith("source_only.") and k != "method"}


def _rows(uri: str, study: str) -> dict:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(study)
    return {(r.data.tags["row"], r.data.tags["seed"]): r for r in client.search_runs([exp.experiment_id])
            if r.data.tags.get("uda_ray.kind") == "row" and r.info.status == "FINISHED"}


def test_a_later_study_reuses_the_stage_an_earlier_one_trained(ray_local, data_root, tmp_path, capsys, uda_ray_store,
                                                              monkeypatch):
    from uda_ray.compare import compare_study
    from uda_ray.study import Row, Study, run_study

    base = _base(data_root, tmp_path, **{"run.iterations": 2})
    first = Study(name="table", base=base, seeds=(0,), baseline="src",
                  rows=[Row("src", "source_only"), Row("ad", "adaptseg", init_from="src")])
    second = Study(name="search", base={**base, "run.eval_every": 1}, seeds=(0,), baseline="src",
                   rows=[Row("src", "source_only"),
                         Row("ad_ls", "adaptseg", init_from="src", set={"adaptseg.gan": "ls"})])
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    kw = dict(storage_path=str(tmp_path / "storage"), tracking_uri=uri, out=str(tmp_path / "out"))
    # The training code edited while the first study runs: its trials (fresh processes) record
    # the new code's lineage, not the one its driver computed when it started; the rows it
    # trained in this invocation still count as finished, so their dependents start from them.
    from uda_ray import fingerprint

    with monkeypatch.context() as m:
        m.setattr(fingerprint, "code_fingerprint", lambda package=None: "code:driver-only")
        assert run_study(first, **kw) == 0
    a = _rows(uri, "table")
    assert a[("ad", "0")].data.tags["parent_lineage"] == a[("src", "0")].data.tags["lineage"]
    capsys.readouterr()
    # the plan of the second study: its source row is in the store, its own row trains
    assert run_study(second, **kw, plan=True) == 0
    out = capsys.readouterr().out
    src_line = next(ln for ln in out.splitlines() if ln.startswith("search ") and " src " in ln)
    assert " reuse " in src_line and "study table" in src_line
    assert " train " in next(ln for ln in out.splitlines() if " ad_ls " in ln)
    assert "total: 2 iterations to train of 4 asked" in out
    assert run_study(second, **kw, plan=True, reuse="never") == 0
    assert "total: 4 iterations to train of 4 asked" in capsys.readouterr().out

    t0 = time.time()
    assert run_study(second, **kw) == 0
    out = capsys.readouterr().out
    assert "src s0: reused stage" in out
    a, b = _rows(uri, "table"), _rows(uri, "search")
    src_a, src_b = a[("src", "0")], b[("src", "0")]
    # a real row: the same metrics, the reused run named, its checkpoint the store's
    assert src_b.data.tags["reused"] == "1" and src_b.data.tags["reused_from_run"] == src_a.info.run_id
    assert src_b.data.tags["reused_from_study"] == "table" and src_b.data.tags["lineage"] == \
        src_a.data.tags["lineage"]
    for k in ("val/mIoU", "sel/mIoU"):
        assert src_b.data.metrics[k] == src_a.data.metrics[k]
    stage_ck = src_b.data.tags["checkpoint"]
    assert stage_ck.startswith(str(uda_ray_store))  # UDA_RAY_STORE (tests/conftest.py)
    # its dependent row started from the stored checkpoint
    ad_ls = b[("ad_ls", "0")]
    assert ad_ls.data.params["run.init_from"] == stage_ck
    assert ad_ls.data.tags["parent_lineage"] == src_a.data.tags["lineage"]
    assert "reused" not in ad_ls.data.tags
    # what the study's runs trained: nothing for the reused row, its own row's iterations
    from uda_ray.plan import trained

    done = trained("search", uri)
    assert done["src"] == {"runs": 1, "iterations": 0, "reused": 1, "pruned": 0}
    assert done["ad_ls"]["iterations"] == 2 and done["ad_ls"]["reused"] == 0
    # compare marks the reused row x seed
    seeds = compare_study("search", tracking_uri=uri, out_dir=tmp_path / "cmp", log_to_parent=False).seeds
    reused = dict(zip(seeds["row"], seeds["reused"]))
    assert reused["src"] and not reused["ad_ls"]
    # --reuse never trains it again
    third = Study(name="fresh", base=base, seeds=(0,), baseline="src", rows=[Row("src", "source_only")])
    assert run_study(third, **kw, reuse="never") == 0
    fresh = _rows(uri, "fresh")[("src", "0")]
    assert "reused" not in fresh.data.tags and fresh.data.tags["lineage"] == src_a.data.tags["lineage"]
    assert time.time() - t0 < 600


def test_train_reuses_a_stored_stage_and_never_trains_anyway(data_root, tmp_path, capsys):
    from uda_ray.cli import main as cli

    args = ["train", "tiny-cpu", "--method", "source_only", "--no-mlflow", "--quiet"]
    sets = [f"data.root={data_root}", "data.synth=false", "data.source_w=64", "data.source_h=32",
            "data.target_w=64", "data.target_h=32", "data.select_n=1", "run.iterations=2", "run.num_workers=0",
            f"run.out={tmp_path / 'runs'}"]
    run = lambda *more: cli(args + [x for s in [*sets, *more] for x in ("--set", s)])  # noqa: E731
    assert run("run.name=a") == 0
    capsys.readouterr()
    assert run("run.name=b", "run.eval_every=1") == 0  # not identity: the same stage
    out = capsys.readouterr().out
    assert "b: reused stage" in out and "no training" in out
    a = load_checkpoint_file(tmp_path / "runs" / "a")
    b = load_checkpoint_file(tmp_path / "runs" / "b")
    assert b["lineage"] == a["lineage"] and all(torch.equal(v, b["modules"]["model"][k])
                                                for k, v in a["modules"]["model"].items())
    assert cli(args + ["--reuse", "never"] + [x for s in [*sets, "run.name=c"] for x in ("--set", s)]) == 0
    assert "reused" not in capsys.readouterr().out
    assert run("run.name=d", "optim.lr=0.02") == 0  # another stage
    assert "reused" not in capsys.readouterr().out



def _lr_space(trial):
    return {"optim.lr": trial.suggest_float("optim.lr", 1e-4, 1e-2, log=True)}


def test_the_plan_prints_the_least_a_search_with_early_stopping_can_train(data_root, tmp_path, monkeypatch):
    """A search of 4 trials x 9 iterations with ASHA (grace period 3): at most 36, at least one
    trial to its end and three stopped at their grace period, 9 + 3 x 3 = 18. Without early
    stopping the search counts in full, unless --asha asks what it would be."""
    from uda_ray.plan import format_plan, plan_studies
    from uda_ray.study import Row, Study

    monkeypatch.chdir(tmp_path)  # no Optuna storage of earlier trials here
    base = _base(data_root, tmp_path, **{"run.iterations": 9})
    rows = [Row("src", "source_only"), Row("ad", "adaptseg", init_from="src", space=_lr_space, num_samples=4)]
    kw = dict(store_root=str(tmp_path / "store"), with_mlflow=False)
    pruned = plan_studies([Study(name="s", base=base, seeds=(0, 1), baseline="src", rows=rows, asha=True)], **kw)
    search = next(s for s in pruned.steps if s.action == "search")
    assert (search.iterations, search.least) == (36, 18)
    # trained: src 2 x 9, the 4 trials, ad s1 (its s0 is the best trial, reused): asked 18 + 36 + 18
    assert (pruned.total(), pruned.least(), pruned.asked) == (18 + 36 + 9, 18 + 18 + 9, 72)
    out = format_plan(pruned, per_step=False)
    assert "search trials: 36 of the 63 (50.0% of asked); without them 27 (37.5%)" in out
    assert "early stopping (1 of 1 searches): at least 45 (62.5%)" in out

    full = Study(name="f", base=base, seeds=(0, 1), baseline="src", rows=rows)
    plain = plan_studies([full], **kw)
    assert next(s for s in plain.steps if s.action == "search").least is None and plain.least() == plain.total()
    assert "early stopping" not in format_plan(plain, per_step=False)
    what_if = plan_studies([full], **kw, asha_all=True)
    assert what_if.least() == 45 and "as if every search stopped trials early (--asha)" in format_plan(what_if)


def test_plan_trained_sums_the_studies_against_what_they_ask(tmp_path, capsys, monkeypatch):
    """``uda-ray plan A B --trained`` over a real MLflow store: a trained run counts its last
    logged step, a reused one 0; the total is put against what the two studies ask (5 each)."""
    import mlflow

    from uda_ray.cli import main as cli

    monkeypatch.chdir(tmp_path)
    for name in ("a", "b"):
        (tmp_path / f"{name}.py").write_text(
            "from uda_ray.study import Row, Study\n"
            f"STUDY = Study(name={name!r}, base={{'run.iterations': 5}}, seeds=(0,), baseline='src',\n"
            "              rows=[Row('src', 'source_only')])\n")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    for name, tags in (("a", {}), ("b", {"reused": "1"})):
        run = client.create_run(client.create_experiment(name),
                                tags={"uda_ray.kind": "row", "row": "src", "seed": "0", **tags})
        if not tags:
            for step in range(1, 6):
                client.log_metric(run.info.run_id, "loss/seg_src", 1.0 / step, step=step)
        client.set_terminated(run.info.run_id)
    assert cli(["plan", "a.py", "b.py", "--trained", "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    assert "src                                    1          0      1      0" in out  # b: reused
    assert "all 2 studies: 5 iterations trained of 10 asked (50.0%)" in out


def test_the_plan_counts_no_iterations_for_a_method_that_trains_nothing(data_root, tmp_path, monkeypatch):
    """AdaBN re-estimates BatchNorm statistics and trains nothing, whatever run.iterations says
    (the engine runs 0 iterations): the plan neither trains nor asks for its 9."""
    from uda_ray.plan import plan_studies
    from uda_ray.study import Row, Study

    monkeypatch.chdir(tmp_path)
    base = _base(data_root, tmp_path, **{"run.iterations": 9})
    study = Study(name="bn", base=base, seeds=(0,), baseline="src",
                  rows=[Row("src", "source_only"), Row("bn", "adabn", init_from="src")])
    plan = plan_studies([study], store_root=str(tmp_path / "store"), with_mlflow=False)
    assert [(s.row, s.action, s.iterations) for s in plan.steps] == [("src", "train", 9), ("bn", "train", 0)]
    assert (plan.total(), plan.asked) == (9, 9)
