"""The study's MLflow view in a real browser: a study's runs written by the study runner's own
code (StudyRecord, drive_trial with a stand-in trainer; tests/test_ray.py runs a real study),
``mlflow ui --workers 1`` on the store, and the URL of the closing message loaded in headless
Chromium: the run list shows the rows, seed, method and ``val/mIoU`` without any clicking, grouped
by row with the compare table's means (the search trial stays out of its row's group).
Skipped, saying why, where Debian's ``chromium`` package is not installed (.ci/run installs it)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

import mlflow_ui
from trees import tiny_cfg

pytestmark = pytest.mark.skipif(mlflow_ui.chromium() is None,
                                reason="no chromium: `apt-get install chromium` (Debian) to run the MLflow UI check")

# val/mIoU by (row, seed), exact in binary so that the UI's means print exactly
VAL = {("a", 0): 0.25, ("a", 1): 0.375, ("b", 0): 0.5, ("b", 1): 0.625}


@pytest.fixture(scope="module")
def study_store(tmp_path_factory, data_root):
    from mlflow.entities import Metric

    from uda_ray import distributed, tracking
    from uda_ray.compare import compare_study
    from uda_ray.study import Row, Study, StudyRecord, closing_message, drive_trial

    root = tmp_path_factory.mktemp("ui")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    base = {k: v for k, v in tiny_cfg(data_root, root).flat().items()
            if not k.startswith("source_only.") and k != "method"}
    study = Study(name="uitest", base=base, seeds=(0, 1), baseline="a",
                  rows=[Row("a", "source_only"), Row("b", "source_only", set={"optim.lr": 0.02})])
    record = StudyRecord(study, "uitest", uri)

    def trainer(flat, **kw):  # logs what a training run would, into the driver's run
        row = Path(kw["run_dir"]).name.split("-s")[0]
        val = 0.9 if "-t9-" in Path(kw["run_dir"]).name else VAL[(row, flat["run.seed"])]
        record.client.set_tag(kw["mlflow"]["run_id"], "method", flat["method"])  # as fit's run_tags
        record.client.log_batch(kw["mlflow"]["run_id"], metrics=[
            Metric("val/mIoU", val, 0, 1), Metric("sel/mIoU", val, 0, 1), Metric("val/IoU/road", val, 0, 1)])
        return SimpleNamespace(error=None, checkpoint=None)

    mp = pytest.MonkeyPatch()
    mp.setattr(distributed, "tune_report_callback", lambda: None)
    mp.setattr(distributed, "run_trainer", trainer)
    flats = {r.name: {str(s): study.flat(r, s) for s in study.seeds} for r in study.rows}
    ctx = {"study": "uitest", "parent_id": record.parent_id, "experiment_id": record.experiment_id,
           "tracking_uri": record.tracking_uri, "storage_path": str(root / "storage"), "out": str(root / "runs"),
           "workers": 1, "cpus": 1, "gpus": 0, "max_failures": 0, "flats": flats}
    for (row, seed) in VAL:
        mp.setattr(distributed, "trial_id", lambda: "t0")
        drive_trial({"trial": {"row": row, "seed": seed, "set": {}, "tags": {}}}, ctx)
    # a search trial of row a (sampled values, no "trial" entry), with a val/mIoU far off the seeds'
    mp.setattr(distributed, "trial_id", lambda: "t9")
    drive_trial({"optim.lr": 0.05}, dict(ctx, row="a", seed=0))
    mp.undo()
    record.finish()
    result = compare_study("uitest", tracking_uri=uri, out_dir=root / "out")
    return {"uri": uri, "record": record, "message": closing_message(record, result.files), "result": result}


def test_closing_message_gives_the_run_list_url(study_store):
    from uda_ray import tracking

    msg, record = study_store["message"], study_store["record"]
    assert f"mlflow ui --backend-store-uri {study_store['uri']} --workers 1" in msg
    url = f"http://127.0.0.1:5000/#/experiments/{record.experiment_id}/runs?workflowType=machine_learning"
    assert f"then open  {url}&viewStateShareKey={tracking.VIEW_KEY}" in msg
    assert "uda-ray compare uitest" in msg


def test_run_list_in_a_browser_shows_rows_seeds_and_val_miou_grouped_by_row(study_store):
    text = mlflow_ui.run_list_text(study_store["uri"], "uitest")
    # the run list itself (not the GenAI overview), the columns, the row groups
    for word in ("val/mIoU", "sel/mIoU", "row", "seed", "method", "Group: a", "Group: b", "a-s0", "b-s1"):
        assert word in text, (word, text[:3000])
    # each group's mean is the compare table's (in fractions): the search trial is not in row a's group
    grid = text[text.find("Group by"):][:3000]
    assert "0.3125 (average)" in grid and "0.5625 (average)" in grid, grid
    t = study_store["result"].table
    assert list(t["mIoU"]) == [31.25, 56.25]
    # the search trial and the study's parent run are listed apart from the row groups (collapsed)
    assert "Group: a 2 " in grid and "Group: b 2 " in grid and "Additional runs 2 " in grid, grid
