"""MLflow tracking of a run: the flattened config as params, tags (method, switches, seed,
dataset, git commit, version), metrics by step and artifacts. ``mlflow`` is imported here
only, so the engine runs without it (e.g. on a GPU box that has only PyTorch); the study
runner and ``compare`` open their clients through :func:`mlflow_client`.

Bookkeeping that keeps a row what it says it is:

* a new SQLite store is created once, under a file lock beside it (two processes that create
  one at once race in its schema migration and leave it unusable);
* every run that uda-ray creates is tagged with its owning process (host, pid, process start
  time), and :func:`reap_orphans` marks KILLED the RUNNING runs whose process has died;
* ``uda-ray train`` records its run in ``RUN_DIR/mlflow_run.json``, so that resuming the run
  directory continues the same MLflow run (:meth:`MlflowTracker.for_run_dir`).

What a person sees in the MLflow UI (checked against MLflow 3.17's UI in headless Chromium,
``tests/test_mlflow_ui.py``):

* every run carries MLflow's standard source tags (:func:`source_tags`: ``mlflow.source.name``,
  ``mlflow.source.type``, ``mlflow.source.git.commit``, ``mlflow.user``), which fill the UI's
  Source, Version and "Created by" columns;
* an experiment created here on a SQLite store keeps its artifacts beside the store
  (:func:`artifact_root`), never in ``./mlruns`` of the current folder, which every new store
  would share (each numbers its first experiment 1);
* a study's experiment holds a shared view of its run list (:func:`set_run_list_view`): the
  rows' seed runs only, grouped by row, the columns row, ``val/mIoU``, ``sel/mIoU``, seed and
  method first (the metrics stay on a 1280 px screen beside MLflow's Assistant panel), opened
  directly by :func:`runs_url` (MLflow 3.17 otherwise opens an experiment on its GenAI overview
  page); and a second view of the search trials and the study's parent run
  (``runs_url(..., view=SEARCH_VIEW_KEY)``);
* a prediction mosaic logged as an image is headed with its run, step and mIoU
  (:meth:`MlflowTracker.image_title`);
* scores are in per cent, as the papers print them and as ``compare``'s tables, the figures
  and the parent run's ``row/*`` metrics are: the engine computes fractions, and
  :meth:`MlflowTracker.log_metrics` logs every score (:func:`is_score`: mIoU, mIoU13, mAcc,
  pixel_acc, per-class IoU and Acc) times 100 into a run tagged ``uda_ray.units=percent``
  (:data:`UNITS_TAG`). A run logged before that tag existed holds fractions;
  :func:`scores_in_percent` reads either kind in per cent, so old stores compare unchanged.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
from pathlib import Path

# MLflow 3 sends usage telemetry (a DNS query to its telemetry host on every tracked run).
# Off unless the user sets MLFLOW_DISABLE_TELEMETRY=false; set before mlflow is imported.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

RUN_RECORD = "mlflow_run.json"  # in a run directory: the MLflow run that `uda-ray train` logs into
HOST_TAG, PID_TAG, PID_START_TAG = "uda_ray.host", "uda_ray.pid", "uda_ray.pid_start"
_READY: set[str] = set()  # tracking URIs whose store this process has already opened

# The unit of a run's scores (see the module docstring). Every run uda-ray creates carries it;
# a run without it was logged in fractions by an older uda-ray.
UNITS_TAG, PERCENT = "uda_ray.units", "percent"
_SCORE_NAMES = frozenset({"mIoU", "mIoU13", "mAcc", "pixel_acc"})


def is_score(key: str) -> bool:
    """Whether a metric is an evaluation score (a fraction as the engine computes it, per cent
    in MLflow): ``<split>/mIoU``, ``mIoU13``, ``mAcc``, ``pixel_acc`` and the per-class
    ``<split>/IoU/<class>`` and ``<split>/Acc/<class>``; not losses, timings or the parent
    run's ``row/*`` summaries (already per cent)."""
    parts = key.split("/")
    return (len(parts) == 2 and parts[1] in _SCORE_NAMES) or (len(parts) == 3 and parts[1] in ("IoU", "Acc"))


def to_percent(value: float) -> float:
    """A fraction in per cent: the one conversion every place uses, so that a score logged in
    per cent and one read from an old run's fraction are the same float."""
    return 100.0 * value


def percent_scores(metrics: dict) -> dict:
    """Metrics as the engine computes them (scores in fractions) with the scores in per cent."""
    return {k: to_percent(v) if is_score(k) else v for k, v in metrics.items()}


def scores_in_percent(metrics: dict, tags: dict) -> dict:
    """A run's metrics with its scores in per cent, whichever unit the run was logged in."""
    return dict(metrics) if tags.get(UNITS_TAG) == PERCENT else percent_scores(metrics)


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
    """``uri``, or MLflow's default (``MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``).

    Raises:
        UserError: a URI that no MLflow tracking store reads (an unknown scheme such as
            ``garbage://x``), naming it and the schemes that work, before anything is
            tracked (MLflow itself fails only when a client is opened, with a traceback).
    """
    import mlflow

    resolved = uri or mlflow.get_tracking_uri()
    try:  # MLflow's registry of tracking stores by URI scheme (the lookup opens nothing)
        from mlflow.exceptions import MlflowException
        from mlflow.tracking._tracking_service.utils import _tracking_store_registry
    except ImportError:  # a private name moved: MLflow's own error says it when a client opens
        return resolved
    try:
        _tracking_store_registry.get_store_builder(resolved)
    except MlflowException:
        from .errors import UserError

        where = "tracking URI" if uri else "MLFLOW_TRACKING_URI"
        raise UserError(f"{where} {resolved!r}: MLflow has no tracking store of that scheme; use "
                        "sqlite:///PATH (a database file, e.g. sqlite:///mlflow.db), http://HOST:PORT or "
                        "https://HOST:PORT (a tracking server), a folder path or file:///PATH (a file store), "
                        "or postgresql://, mysql:// or mssql:// (a database server)") from None
    return resolved


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


def artifact_root(uri: str) -> Path | None:
    """Where the artifacts of a SQLite store's experiments go: ``<store>-artifacts/`` beside the
    database file (``mlflow.db`` -> ``mlflow-artifacts/``), one folder per experiment below it.
    None for other stores (a tracking server decides its own artifact root)."""
    db = _sqlite_file(uri)
    return None if db is None else db.resolve().with_name(f"{db.stem}-artifacts")


def experiment_id(client, name: str) -> str:
    """The id of experiment ``name``, created if missing; on a SQLite store with its artifacts
    under :func:`artifact_root` (a folder named after the experiment)."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    root = artifact_root(client.tracking_uri)
    where = None if root is None else (root / _safe_name(name)).as_uri()
    return client.create_experiment(name, artifact_location=where)


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "_"


# --- what the MLflow UI shows ---------------------------------------------------------------

VIEW_KEY = "uda-ray"  # the shared view of a study's run list: experiment tag mlflow.sharedViewState.<key>
UI_ADDRESS = "http://127.0.0.1:5000"  # where `mlflow ui` listens by default
PRIMARY_METRIC = "val/mIoU"


def source_tags(source: str | None = None) -> dict[str, str]:
    """MLflow's standard tags of a run started here: the command (``mlflow.source.name``, as
    ``uda-ray train`` or ``studies/NAME.py``), ``mlflow.source.type`` LOCAL, the git commit of
    this checkout (``mlflow.source.git.commit``, when there is one) and the user. The UI shows
    them as Source, Version and "Created by"."""
    import getpass
    import sys

    if source is None:
        prog = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
        source = " ".join([prog, *sys.argv[1:2]]) if prog == "uda-ray" else prog
    tags = {"mlflow.source.name": source, "mlflow.source.type": "LOCAL"}
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    try:
        tags["mlflow.user"] = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (some containers)
        pass
    return tags


def git_commit() -> str:
    """The commit of the uda-ray checkout, '' when it is not a git checkout."""
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


# The widths (px) that keep row, val/mIoU and sel/mIoU on screen beside the pinned columns
# (selection 73 px, run name, created) in the 698 px that MLflow 3.17 leaves the run table of a
# 1280 px wide window with its Assistant panel open (tests/test_mlflow_ui.py measures it), with
# 20 px to spare for a vertical scrollbar: a group's name (in the run name column, e.g. "Group:
# source_only") readable up to about 16 characters, created (the run's status icon and how long
# ago) narrowed from 150 px, so that its time may end in "...".
_WIDTHS = {"attributes.`Run Name`": 240, "runDateAndNestInfo": 90, "tags.`row`": 95,
           f"metrics.`{PRIMARY_METRIC}`": 90, "metrics.`sel/mIoU`": 90}
SEARCH_VIEW_KEY = "uda-ray-search"  # the view of the runs outside the row groups (search trials, parent)
ROW_RUNS = "tags.`uda_ray.kind` = 'row'"  # the runs of the row groups: a row's seed runs
# Start order by MLflow's alias of attributes.start_time ("Created", the UI's name of it): ordered
# by start_time itself, MLflow 3.17's UI adds the parent run of every listed child run whatever
# the search filter says (the study's run, which would be a group of its own again).
START_ORDER = "attributes.`Created`"


def run_list_view(*, group_by: str | None = "row", search: bool = False) -> dict:
    """The UI state of a study's run list (MLflow 3.17's shared-view format), runs in start order.

    The study's view (:data:`VIEW_KEY`): only a row's seed runs (search filter :data:`ROW_RUNS`),
    with ``group_by``, grouped by that tag with the mean of each group, so that a group's mean
    is the compare table's and the Charts tab's grouped curves are the rows' alone (the runs
    without a ``row`` tag, search trials and the study's parent run, would otherwise form one
    more group, "Additional runs" in the table and "Unassigned" in the charts, averaged over
    unrelated trials). The first columns: row, ``val/mIoU``, ``sel/mIoU``, seed, method, at
    widths that keep the metrics on a 1280 px screen beside MLflow's Assistant panel.

    ``search``: the view of the other runs (:data:`SEARCH_VIEW_KEY`): the search trials, each
    on its own (a mean over trials means nothing), and the parent run; first columns search row,
    ``val/mIoU``, ``sel/mIoU``, trial and pruned.
    """
    tag, metric, attr = (lambda k: f"tags.`{k}`"), (lambda k: f"metrics.`{k}`"), (lambda k: f"attributes.`{k}`")
    first = [tag("search_row"), metric(PRIMARY_METRIC), metric("sel/mIoU"), tag("trial"), tag("pruned")] if search \
        else [tag("row"), metric(PRIMARY_METRIC), metric("sel/mIoU"), tag("seed"), tag("method")]
    cols = [*first, *([tag("seed"), tag("method")] if search else []), attr("User"), attr("Source"), attr("Version")]
    widths = {k.replace("tags.`row`", "tags.`search_row`") if search else k: v for k, v in _WIDTHS.items()}
    view = {"selectedColumns": cols, "columnOrder": [attr("Run Name"), "runDateAndNestInfo", *cols, "duration"],
            "columnWidths": widths, "orderByKey": START_ORDER, "orderByAsc": True,
            "searchFilter": ROW_RUNS.replace(" = ", " != ") if search else ROW_RUNS}
    if group_by and not search:
        view["groupBy"] = {"aggregateFunction": "average", "groupByKeys": [{"mode": "tag", "groupByData": group_by}]}
    return view


def set_run_list_view(client, exp_id: str) -> None:
    """Store :func:`run_list_view` in the experiment (the view that :func:`runs_url` opens), and
    the view of its search trials (``runs_url(..., view=SEARCH_VIEW_KEY)``), and name
    ``val/mIoU`` its primary metric (higher is better)."""
    client.set_experiment_tag(exp_id, f"mlflow.sharedViewState.{VIEW_KEY}", json.dumps(run_list_view()))
    client.set_experiment_tag(exp_id, f"mlflow.sharedViewState.{SEARCH_VIEW_KEY}",
                              json.dumps(run_list_view(search=True)))
    client.set_experiment_tag(exp_id, "mlflow.experiment.primaryMetric.name", PRIMARY_METRIC)
    client.set_experiment_tag(exp_id, "mlflow.experiment.primaryMetric.greaterIsBetter", "true")


def ui_base(uri: str) -> str:
    """The address of the UI that shows ``uri``: the tracking server itself, else ``mlflow ui``'s."""
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else UI_ADDRESS


def runs_url(uri: str, exp_id: str, *, view: bool | str = True) -> str:
    """The URL of an experiment's run list (MLflow 3.17 opens ``#/experiments/<id>`` on its GenAI
    overview, without runs), with the study's shared view when ``view`` (True: the row groups,
    :data:`VIEW_KEY`; or a view's key, e.g. :data:`SEARCH_VIEW_KEY`)."""
    url = f"{ui_base(uri)}/#/experiments/{exp_id}/runs?workflowType=machine_learning"
    key = VIEW_KEY if view is True else view
    return url + (f"&viewStateShareKey={key}" if key else "")


def ui_command(uri: str) -> str:
    """The command that serves the UI of ``uri`` (none needed for a tracking server). One web
    worker: ``mlflow ui``'s default of 4 takes about 3 GiB."""
    if uri.startswith(("http://", "https://")):
        return ""
    return f"mlflow ui --backend-store-uri {uri} --workers 1"


def error_text(e: BaseException) -> str:
    """The ``error`` tag of a FAILED run: ``ExceptionType: message``."""
    return f"{type(e).__name__}: {e}"[:4000]


# --- owning processes -----------------------------------------------------------------------

def _proc_stat(pid: int) -> tuple[str, str] | None:
    """(state, start time in clock ticks since boot) of a process, None if it does not exist;
    raises OSError where there is no /proc."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) ": field 3 onwards
    return fields[0], fields[19]  # state (field 3), starttime (field 22)


def owner_tags() -> dict[str, str]:
    """Tags naming this process as a run's owner: host, pid and the process's start time, so
    that a later process that reuses the pid is not taken for the owner."""
    try:
        stat = _proc_stat(os.getpid())
    except OSError:
        stat = None
    return {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid()), PID_START_TAG: stat[1] if stat else ""}


def owner_alive(tags: dict) -> bool:
    """Whether the process named by a run's owner tags still runs. Only answerable on the
    owner's host: a run of another host, or without owner tags, counts as alive."""
    if tags.get(HOST_TAG) != socket.gethostname() or not tags.get(PID_TAG, "").isdigit():
        return True
    pid = int(tags[PID_TAG])
    try:
        stat = _proc_stat(pid)
    except OSError:  # no /proc (macOS): signal 0 tells whether the pid exists
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True
    if stat is None or stat[0] in ("Z", "X"):  # gone, or a zombie nobody has reaped yet
        return False
    return not tags.get(PID_START_TAG) or tags[PID_START_TAG] == stat[1]


def reap_orphans(client, experiment_id: str) -> list[str]:
    """Mark KILLED, with an ``error`` tag that says why, every RUNNING run of the experiment
    whose owning process was on this host and has ended (a ``kill -9``, a lost study driver).
    Runs owned by another host are left alone: whether their process lives cannot be seen
    from here (run ``compare`` or the next study on that host). Returns the run ids marked."""
    host = socket.gethostname()
    runs = client.search_runs([experiment_id], max_results=5000,
                              filter_string=f"attributes.status = 'RUNNING' and tags.`{HOST_TAG}` = '{host}'")
    killed = []
    for run in runs:
        tags = run.data.tags
        if owner_alive(tags):
            continue
        client.set_tag(run.info.run_id, "error",
                       f"killed: its process (pid {tags[PID_TAG]} on {host}) ended while the run was RUNNING; "
                       f"marked KILLED by pid {os.getpid()}")
        client.set_terminated(run.info.run_id, "KILLED")
        killed.append(run.info.run_id)
    return killed


def reopen(client, run_id: str) -> None:
    """Continue an unfinished run in this process: RUNNING again, owned by this process,
    without the ``error`` tag of its interruption."""
    if "error" in client.get_run(run_id).data.tags:
        client.delete_tag(run_id, "error")
    for k, v in owner_tags().items():
        client.set_tag(run_id, k, v)
    client.update_run(run_id, status="RUNNING")


class MlflowTracker:
    """One MLflow run. ``tracking_uri`` None keeps MLflow's own default (``sqlite:///mlflow.db``
    in the working directory); point it at a server with ``http://host:5000``. A new run is
    owned by this process (:func:`owner_tags`); ``run_id`` logs into an existing run (a Ray
    Train worker into its trial driver's run), ``reopen`` also continues it (:func:`reopen`).
    A new run is tagged ``uda_ray.units=percent`` and gets its scores in per cent; an existing
    run keeps the unit it was started with (a run of an older uda-ray, resumed, stays in
    fractions rather than mixing units in one history)."""

    def __init__(self, *, experiment: str = "uda-ray", run_name: str | None = None,
                 tracking_uri: str | None = None, run_id: str | None = None, parent_run_id: str | None = None,
                 tags: dict | None = None, reopen_run: bool = False):
        import mlflow

        self._mlflow = mlflow
        if tracking_uri:
            mlflow.set_tracking_uri(tracking_uri)
        self.tracking_uri = resolve_uri(tracking_uri)
        self.client = mlflow_client(self.tracking_uri)
        self.experiment_id = experiment_id(self.client, experiment)
        if run_id is None:
            all_tags = {**source_tags(), **owner_tags(), **(tags or {})}
            if parent_run_id:
                all_tags["mlflow.parentRunId"] = parent_run_id
            if run_name:
                all_tags["mlflow.runName"] = run_name
            all_tags.setdefault(UNITS_TAG, PERCENT)
            run_id = self.client.create_run(self.experiment_id, run_name=run_name, tags=all_tags).info.run_id
            self.percent = all_tags[UNITS_TAG] == PERCENT
        else:
            if reopen_run:
                reopen(self.client, run_id)
            self.percent = self.client.get_run(run_id).data.tags.get(UNITS_TAG) == PERCENT
        self.run_id = run_id

    @classmethod
    def for_run_dir(cls, run_dir: str | Path, *, experiment: str = "uda-ray", run_name: str | None = None,
                    tracking_uri: str | None = None) -> "MlflowTracker":
        """The tracker of ``uda-ray train`` on ``run_dir``. First marks KILLED the orphaned runs
        of the experiment (:func:`reap_orphans`). If ``run_dir/mlflow_run.json`` names a run of
        this tracking URI and experiment, continues that run, so that a resumed run directory
        stays one MLflow run; otherwise starts a run and records it there.

        Raises:
            ConfigError: the recorded run is still RUNNING under a live process (or one of
                another host), or the record is not readable.
        """
        from .config import ConfigError

        uri = resolve_uri(tracking_uri)
        client = mlflow_client(uri)
        exp_id = experiment_id(client, experiment)
        reap_orphans(client, exp_id)
        record = Path(run_dir) / RUN_RECORD
        run = _recorded_run(client, record, uri, exp_id)
        if run is not None and run.info.status == "RUNNING":
            t = run.data.tags
            raise ConfigError(f"{record}: its MLflow run {run.info.run_id} is still RUNNING (pid {t.get(PID_TAG, '?')} "
                              f"on {t.get(HOST_TAG, '?')}); wait for that process to end, or stop it, and resume again")
        tracker = cls(experiment=experiment, run_name=run_name, tracking_uri=uri,
                      run_id=run.info.run_id if run else None, reopen_run=run is not None)
        record.parent.mkdir(parents=True, exist_ok=True)
        tmp = record.with_name(record.name + ".tmp")
        tmp.write_text(json.dumps({"run_id": tracker.run_id, "tracking_uri": uri, "experiment": experiment}) + "\n")
        os.replace(tmp, record)  # never a half-written record
        return tracker

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
        finite = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        ms = [Metric(_metric_key(k), v, ts, step)
              for k, v in (percent_scores(finite) if self.percent else finite).items()]
        for i in range(0, len(ms), 500):
            self.client.log_batch(self.run_id, metrics=ms[i:i + 500])

    def log_artifact(self, path: Path, subdir: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path=subdir)

    def log_image(self, path: Path, key: str, step: int) -> None:
        """An image as MLflow's image series ``key`` at ``step`` (the UI compares the images of
        several runs side by side and steps through them), and as a plain artifact. A mosaic
        (``mosaic/<split>``) is first headed, in its file too, with :meth:`image_title`."""
        from PIL import Image

        if key.startswith("mosaic/"):
            from .mosaic import add_title

            add_title(path, self.image_title(key, step))
        with Image.open(path) as im:
            self.client.log_image(self.run_id, im.convert("RGB"), key=key, step=step, synchronous=True)
        self.log_artifact(path)

    def image_title(self, key: str, step: int) -> str:
        """What a mosaic names: the run, the step and, for ``mosaic/<split>``, the ``<split>/mIoU``
        this run logged at that step, as MLflow holds it (the engine logs an evaluation's
        metrics before its mosaic), in per cent, e.g. ``adabn-s0, step 2000, val/mIoU 31.25``."""
        run = self.client.get_run(self.run_id)
        title = f"{run.info.run_name or self.run_id[:8]}, step {step}"
        metric = f"{key.split('/', 1)[1]}/mIoU"
        at_step = [m.value for m in self.client.get_metric_history(self.run_id, metric) if m.step == step]
        if not at_step:
            return title
        value = at_step[-1] if self.percent else to_percent(at_step[-1])
        return title + f", {metric} {value:.2f}"

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)

    def fail(self, e: BaseException) -> None:
        """End the run on an exception: the ``error`` tag, then FAILED (KILLED on Ctrl-C)."""
        self.set_tags({"error": error_text(e)})
        self.finish("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")


def _recorded_run(client, record: Path, uri: str, exp_id: str):
    """The run that ``record`` names, if it is of this tracking URI and experiment and exists."""
    from mlflow.exceptions import MlflowException

    from .config import ConfigError

    if not record.is_file():
        return None
    try:
        saved = json.loads(record.read_text())
        run_id, saved_uri = saved["run_id"], saved["tracking_uri"]
    except (ValueError, KeyError, TypeError):
        raise ConfigError(f"{record}: expected JSON with run_id and tracking_uri (written by uda-ray train); "
                          f"delete it to start a new MLflow run") from None
    if saved_uri != uri:
        return None
    try:
        run = client.get_run(run_id)
    except MlflowException:  # deleted, or another store at the same URI
        return None
    if run.info.experiment_id != exp_id or run.info.lifecycle_stage != "active":
        return None
    return run


def _metric_key(k: str) -> str:
    # MLflow keys allow letters, digits, _ - . / and spaces; class names are already safe.
    return k.replace("(", "").replace(")", "")
