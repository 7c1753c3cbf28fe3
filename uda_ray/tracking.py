"""MLflow tracking of a run: the flattened config as params, tags (method, switches, seed,
dataset, git commit, version), metrics by step and artifacts. ``mlflow`` is imported here
only, so the engine runs without it (e.g. on a GPU box that has only PyTorch)."""

from __future__ import annotations

from pathlib import Path


class MlflowTracker:
    """One MLflow run. ``tracking_uri`` None keeps MLflow's own default (``sqlite:///mlflow.db``
    in the working directory); point it at a server with ``http://host:5000``."""

    def __init__(self, *, experiment: str = "uda-ray", run_name: str | None = None,
                 tracking_uri: str | None = None, run_id: str | None = None, parent_run_id: str | None = None,
                 tags: dict | None = None):
        import mlflow

        self._mlflow = mlflow
        if tracking_uri:
            mlflow.set_tracking_uri(tracking_uri)
        self.client = mlflow.MlflowClient()
        exp = self.client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(experiment)
        if run_id is None:
            all_tags = dict(tags or {})
            if parent_run_id:
                all_tags["mlflow.parentRunId"] = parent_run_id
            if run_name:
                all_tags["mlflow.runName"] = run_name
            run_id = self.client.create_run(exp_id, run_name=run_name, tags=all_tags).info.run_id
        self.run_id = run_id

    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        new = [Param(k, str(v)) for k, v in params.items() if k not in existing]
        for i in range(0, len(new), 100):
            self.client.log_batch(self.run_id, params=new[i:i + 100])

    def set_tags(self, tags: dict) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_metrics(self, metrics: dict, step: int) -> None:
        import math
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        ms = [Metric(_metric_key(k), float(v), ts, step) for k, v in metrics.items()
              if isinstance(v, (int, float)) and math.isfinite(v)]
        for i in range(0, len(ms), 500):
            self.client.log_batch(self.run_id, metrics=ms[i:i + 500])

    def log_artifact(self, path: Path, subdir: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path=subdir)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


def _metric_key(k: str) -> str:
    # MLflow keys allow letters, digits, _ - . / and spaces; class names are already safe.
    return k.replace("(", "").replace(")", "")
