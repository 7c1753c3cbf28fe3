"""MLflow tracking of a run: the flattened config as params, tags (method, switches, seed,
dataset, git commit, version), metrics by step and artifacts. ``mlflow`` is imported here
only, so the engine runs without it (e.g. on a GPU box that has only PyTorch); the study
runner and ``compare`` open their clients through :func:`mlflow_client`.

Bookkeeping that keeps a row what it says it is:

* a new SQLite store is created once, under a file lock beside it (two processes that create
  one at once race in its schema migration and leave it unusable).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

# MLflow 3 sends usage telemetry (a DNS query to its telemetry host on every tracked run).
# Off unless the user sets MLFLOW_DISABLE_TELEMETRY=false; set before mlflow is imported.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

_READY: set[str] = set()  # tracking URIs whose store this process has already opened


@contextlib.contextmanager
def file_lock(path: str | Path, *, blocking: bool = True):
    """An exclusive ``flock`` on ``path`` (created if missing) for the ``with`` block. Yields
    the open lock file, or None when ``blocking`` is False and another process holds it.
    The lock goes with the process: a killed holder leaves no stale lock behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield None
            return
        try:
            yield f
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def resolve_uri(uri: str | None = None) -> str:
    """``uri``, or MLflow's default (``MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``)."""
    import mlflow

    return uri or mlflow.get_tracking_uri()


def mlflow_client(uri: str | None = None):
    """An ``MlflowClient`` on ``uri`` (None: MLflow's default). A SQLite store is opened the
    first time under an exclusive lock on ``<db file>.lock``: the first process creates the
    schema, the others wait for it instead of migrating the same file at once."""
    import mlflow

    uri = resolve_uri(uri)
    db = _sqlite_file(uri)
    if db is None or uri in _READY:
        return mlflow.MlflowClient(tracking_uri=uri)
    with file_lock(db.with_name(db.name + ".lock")):
        client = mlflow.MlflowClient(tracking_uri=uri)
        client.search_experiments(max_results=1)  # creates or upgrades the schema, under the lock
    _READY.add(uri)
    return client


def _sqlite_file(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///") or uri == "sqlite:///:memory:":
        return None
    return Path(uri[len("sqlite:///"):].split("?", 1)[0])


def experiment_id(client, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    return exp.experiment_id if exp is not None else client.create_experiment(name)


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
        self.tracking_uri = resolve_uri(tracking_uri)
        self.client = mlflow_client(self.tracking_uri)
        self.experiment_id = experiment_id(self.client, experiment)
        if run_id is None:
            all_tags = dict(tags or {})
            if parent_run_id:
                all_tags["mlflow.parentRunId"] = parent_run_id
            if run_name:
                all_tags["mlflow.runName"] = run_name
            run_id = self.client.create_run(self.experiment_id, run_name=run_name, tags=all_tags).info.run_id
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
