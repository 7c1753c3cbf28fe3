"""Every Ray call of uda-ray lives here: Ray's Train/Tune API has moved several times
(Train V2 is the default in 2.60), so the rest of the package never imports Ray.

* :func:`train_worker` is Ray Train's per-worker function: the engine's :func:`~uda_ray.engine.fit`,
  unchanged, with checkpoints reported through ``ray.train.report`` and resumed from
  ``ray.train.get_checkpoint()`` after a failure.
* :func:`run_trainer` builds the ``TorchTrainer`` (DDP process group: gloo on CPU, NCCL on
  GPU), with ``FailureConfig`` and a checkpoint retention policy.
* :func:`fit_in_trial` fits a single-process CPU trial inside its Tune trial (no worker group
  to start), with Tune's checkpoints and restarts.
* :func:`tune_rows` runs a study's Tune trials, whose trainable is a small *driver* that fits
  in its own process or builds a ``TorchTrainer`` per trial (``Tuner(trainer)`` no longer
  exists in V2), with a concurrency limit; :func:`optuna_searcher` is a search row's searcher.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

# Test hook: kill a Train worker process once, right after it reports this step, to show
# that the run resumes from its last checkpoint (see tests/test_ray.py).
KILL_ENV = "UDA_RAY_TEST_KILL_AT_STEP"


def _fetch_init_from(uri: str) -> None:
    """A parent checkpoint on shared storage (``s3://...``) is fetched to a temporary local
    folder, loaded, and the folder deleted at once (:func:`uda_ray.checkpoint.preload`): the
    config keeps the URI, so the run's record (``run.init_from``) names the parent's
    checkpoint, never a temporary path, and no copy is left on the worker's disk."""
    if not uri or "://" not in uri:
        return
    import tempfile

    import ray.train

    from .checkpoint import preload

    local = tempfile.mkdtemp(prefix="uda-ray-init-")
    try:
        ray.train.Checkpoint(uri).to_directory(local)
    finally:
        preload(uri, local)  # deletes the copy, also when the fetch failed half-way


def _loaded(checkpoint) -> dict | None:
    """The uda-ray checkpoint state inside a Ray (Train or Tune) checkpoint, or None."""
    if checkpoint is None:
        return None
    from .checkpoint import load_checkpoint_file

    with checkpoint.as_directory() as d:
        return load_checkpoint_file(d)


def _trial_config(flat: dict, device: str):
    """The config a training process fits: ``flat`` on ``device``, its init_from fetched
    (released by :func:`_release` when the fit ends)."""
    from .config import build_config

    _fetch_init_from(flat.get("run.init_from", ""))
    return build_config({**flat, "run.device": device})


def _release(cfg) -> None:
    from .checkpoint import release

    release(cfg.run.init_from)


def _tracker(mlflow: dict | None):
    """The MLflow tracker of the run the study's driver created (None without one)."""
    if not mlflow:
        return None
    from .tracking import MlflowTracker

    return MlflowTracker(experiment=mlflow["experiment"], tracking_uri=mlflow.get("tracking_uri"),
                         run_id=mlflow["run_id"])


def _die_once_at(run_dir: str | Path) -> Callable[[dict], None]:
    """The test hook of :data:`KILL_ENV`: ``die(metrics)`` kills this process hard, once per
    run directory, right after the checkpoint of that step was reported (as a lost node)."""
    kill_at = int(os.environ.get(KILL_ENV, "0"))
    marker = Path(run_dir) / ".killed-once"

    def die(metrics: dict) -> None:
        if kill_at and metrics.get("step") == kill_at and not marker.exists():
            marker.touch()
            os._exit(1)

    return die


def _reported(metrics: dict) -> dict:
    """What a checkpoint reports to Tune: its metrics with the scores in per cent, the unit of
    MLflow and of every table (:mod:`uda_ray.tracking`); Tune's trial tables print them, and the
    search and its scheduler compare them."""
    from .tracking import is_score, to_percent

    return {k: to_percent(v) if is_score(k) else v for k, v in metrics.items() if v is not None}


def train_worker(config: dict) -> None:
    """Per-worker function of the ``TorchTrainer``. ``config``: ``flat`` (the flat config),
    ``run_dir``, and optionally ``mlflow`` (tracking URI, experiment, run id to log into)."""
    import ray.train
    import ray.train.torch
    import torch

    from .engine import fit

    rank = ray.train.get_context().get_world_rank()
    device = ray.train.torch.get_device()
    cfg = _trial_config(config["flat"], str(device) if device.type == "cuda" else "cpu")
    if device.type == "cpu" and config.get("threads"):
        torch.set_num_threads(int(config["threads"]))
    resume = _loaded(ray.train.get_checkpoint())
    tracker = _tracker(config.get("mlflow")) if rank == 0 else None
    die = _die_once_at(config["run_dir"])

    def on_checkpoint(path: Path, metrics: dict) -> None:
        ckpt = ray.train.Checkpoint.from_directory(str(path.parent)) if rank == 0 else None
        ray.train.report(_reported(metrics), checkpoint=ckpt)
        if rank == 0:
            die(metrics)  # a hard worker death

    try:
        fit(cfg, run_dir=config["run_dir"], tracker=tracker, on_checkpoint=on_checkpoint, resume_from=resume)
    finally:
        _release(cfg)


def fit_in_trial(flat: dict, *, run_dir: str, storage_path: str, threads: int = 1, mlflow: dict | None = None,
                 env: dict | None = None) -> str | None:
    """Fit one single-process CPU config inside the running Tune trial itself, without a
    ``TorchTrainer``: a worker group adds nothing to one CPU process but ~20 s of start and
    teardown per trial (``uda-ray bench study``). The same guarantees by Tune's means: each
    checkpoint is reported with ``ray.tune.report`` (persisted under the study's storage, as
    Ray Train does), and a trial restarted after a failure (``FailureConfig(max_failures)``
    of the Tune run) resumes from ``ray.tune.get_checkpoint()``; the training code is the
    same :func:`~uda_ray.engine.fit`. Returns the persisted path (or URI) of the last
    checkpoint, which dependent rows start from."""
    import ray.tune
    import torch

    from .engine import fit

    os.environ.update(env or {})
    cfg = _trial_config(flat, "cpu")
    torch.set_num_threads(max(1, threads))
    resume = _loaded(ray.tune.get_checkpoint())  # a restarted trial
    tracker = _tracker(mlflow)
    die = _die_once_at(run_dir)
    last: list[str] = []

    def on_checkpoint(path: Path, metrics: dict) -> None:
        ray.tune.report(_reported(metrics), checkpoint=ray.tune.Checkpoint.from_directory(str(path.parent)))
        # where Tune persisted it: the trial's current checkpoint folder once reported
        storage = ray.tune.get_context().get_storage()
        last[:] = [_join(storage_path, str(Path(storage.checkpoint_fs_path).relative_to(storage.storage_fs_path)))]
        die(metrics)  # a hard death of the trial's process

    try:
        fit(cfg, run_dir=run_dir, tracker=tracker, on_checkpoint=on_checkpoint, resume_from=resume)
    finally:
        _release(cfg)
    return last[0] if last else None


def run_trainer(flat: dict, *, run_dir: str, name: str, storage_path: str, num_workers: int = 1,
                use_gpu: bool = False, cpus_per_worker: float = 1.0, gpus_per_worker: float | None = None,
                max_failures: int = 1, keep_checkpoints: int = 2, mlflow: dict | None = None,
                callbacks: list | None = None, env: dict | None = None):
    """Fit one config with Ray Train. Returns Ray's ``Result``."""
    import ray.train
    from ray.train.torch import TorchTrainer

    resources = {"CPU": cpus_per_worker}
    if use_gpu:
        resources["GPU"] = gpus_per_worker if gpus_per_worker is not None else 1
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"flat": flat, "run_dir": run_dir, "mlflow": mlflow,
                           "threads": max(1, int(cpus_per_worker))},
        scaling_config=ray.train.ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage_path,
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=keep_checkpoints),
            callbacks=callbacks or [],
            worker_runtime_env={"env_vars": env} if env else None),
    )
    return trainer.fit()


def init_ray(address: str | None = None, *, num_cpus: int | None = None) -> None:
    """Connect to a cluster (``address``/``RAY_ADDRESS``) or start a local one."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(num_cpus=num_cpus, log_to_driver=False)


def unreachable(paths: dict[str, str]) -> list[tuple[str, str, str]]:
    """On a cluster of several nodes: ``(name, path, node address)`` for each local ``paths``
    entry that some alive node cannot see (a task pinned to each node looks for it). A
    single-node cluster sees what this process sees: nothing is checked. Local nodes that
    share this machine's disk (tests' clusters) see everything."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) <= 1 or not paths:
        return []

    @ray.remote(num_cpus=0)
    def missing(ps: dict) -> list[str]:
        return [k for k, p in ps.items() if not os.path.exists(p)]

    refs = [(n, missing.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
             .remote(paths)) for n in nodes]
    out = []
    for n, ref in refs:
        for k in ray.get(ref, timeout=120):
            out.append((k, paths[k], f"{n.get('NodeManagerAddress', '?')} ({n['NodeID'][:8]})"))
    return out


def dashboard_url() -> str:
    """The Ray dashboard of the connected cluster (``http://127.0.0.1:8265`` for a local one),
    '' when there is none (Ray without its dashboard extras)."""
    from ray._private.worker import get_dashboard_url  # public only as ray.init()'s return value

    try:
        url = get_dashboard_url() or ""
    except Exception:  # not connected, or no dashboard
        return ""
    return url if not url or "://" in url else f"http://{url}"


def pickle_by_value(module) -> None:
    """Ship a module's functions by value (a study script is not importable on workers)."""
    if module is None or module.__name__.startswith(("uda_ray.", "builtins")) or module.__name__ == "__main__":
        return
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(module)


def cluster_resources() -> dict:
    import ray

    return ray.cluster_resources()


DRIVER_CPUS = 0.1  # a Train-driving trial's own share of a CPU (its workers ask for theirs)


class StopOnSignal:
    """``with StopOnSignal() as stop:`` around a Tune run: SIGINT (Ctrl-C) or SIGTERM stops
    the run's trials and lets it return (``stop.signal`` then says which signal), instead of
    Tune's own SIGINT handling, after which the caller could not tell an interrupted run from
    a finished one, and instead of SIGTERM's default, which kills the driver with its trials'
    runs left RUNNING. It asks Tune to stop through Tune's SIGUSR1 handler (which ends the
    run, stops every trial and returns). A second signal raises KeyboardInterrupt at once.
    Main thread only (elsewhere it does nothing)."""

    SIGNALS = ("SIGINT", "SIGTERM")

    def __init__(self):
        self.signal = 0
        self._old: dict = {}

    def _handle(self, signum, frame) -> None:
        import signal
        import sys

        if self.signal:
            raise KeyboardInterrupt
        self.signal = signum
        print(f"uda-ray: {signal.Signals(signum).name} received: stopping the study's trials (send it again to "
              f"stop at once)", file=sys.stderr, flush=True)
        tune_handler = signal.getsignal(signal.SIGUSR1)
        if callable(tune_handler) and tune_handler != self._before_tune:
            tune_handler(signal.SIGUSR1, frame)  # Tune's: end the run, stop its trials
        else:  # Tune has not started its loop yet
            raise KeyboardInterrupt

    def _before_tune(self, signum, frame) -> None:
        """SIGUSR1's handler until Tune installs its own (so that one left by an earlier Tune
        run in this process is never taken for this run's)."""

    def __enter__(self):
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"  # read by tune.run when it starts
            for name in self.SIGNALS:
                sig = getattr(signal, name)
                self._old[sig] = signal.signal(sig, self._handle)
            self._old[signal.SIGUSR1] = signal.signal(signal.SIGUSR1, self._before_tune)
        return self

    def __exit__(self, exc_type, exc, tb):
        import signal

        for sig, old in self._old.items():
            signal.signal(sig, old)
        os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
        if self.signal and exc_type is KeyboardInterrupt:
            return True  # interrupted before or during the run's start: reported as stop.signal
        return False


def tune_rows(trainable: Callable[[dict], Any], *, search_alg, storage_path: str, name: str,
              scheduler=None, max_concurrent: int = 2, verbose: int = 1, trial_resources: dict | None = None,
              max_failures: int = 0, callbacks: list | None = None, keep_checkpoints: int = 2):
    """Run the Tune trials that ``search_alg`` hands out until it says FINISHED (a study's
    :class:`~uda_ray._tune_schedule.RowScheduler`), with an optional trial ``scheduler``.
    Returns the ``ResultGrid``.

    ``trial_resources``: what each trial holds when it trains in its own process
    (:func:`fit_in_trial`; then Tune restarts a failed trial up to ``max_failures`` times);
    by default a trial holds only a driver's share and its ``TorchTrainer`` asks for the
    workers' resources (and restarts them itself). ``callbacks``: Tune callbacks.
    ``keep_checkpoints``: how many of a trial's latest checkpoints its storage keeps, as
    :func:`run_trainer` keeps of a Train trial's (a restart needs the last; dependent rows and
    the stage store read the last): the older ones are deleted as new ones arrive, where all
    of them stayed before, a full model with its optimizer state at every checkpoint.
    """
    from ray import tune

    import ray

    # Checkpoint-only reports carry no evaluation metrics; selection reads the ones that do
    # (here, not in init_ray: a caller may have connected to Ray itself).
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    # On a cluster whose head advertises "trial_driver" slots (cluster.yaml), drivers run
    # there and leave every CPU and GPU to the training workers; locally, a CPU share.
    if trial_resources is not None:
        res = trial_resources
    else:
        res = {"trial_driver": 1} if ray.cluster_resources().get("trial_driver") else {"CPU": DRIVER_CPUS}
    tune_kw: dict = {"max_concurrent_trials": max_concurrent, "search_alg": search_alg, "num_samples": -1}
    if scheduler is not None:
        tune_kw["scheduler"] = scheduler
    tuner = tune.Tuner(tune.with_resources(trainable, res), tune_config=tune.TuneConfig(**tune_kw),
                       run_config=tune.RunConfig(name=name, storage_path=storage_path, verbose=verbose,
                                                 callbacks=callbacks or [],
                                                 failure_config=tune.FailureConfig(max_failures=max_failures),
                                                 checkpoint_config=tune.CheckpointConfig(num_to_keep=keep_checkpoints)))
    return tuner.fit()


def optuna_searcher(space: Callable, *, metric, mode, seed: int, num_samples: int, storage: str | None = None,
                    study_name: str | None = None):
    """Tune's Optuna searcher of a define-by-run ``space``: a seeded TPE sampler, the study
    persisted in ``storage`` (an RDB URL) under ``study_name``."""
    import optuna

    from ._tune_search import MetricReportsOptunaSearch

    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(4, max(1, num_samples // 2)))
    rdb = optuna.storages.RDBStorage(storage) if storage else None
    search = MetricReportsOptunaSearch(space=space, metric=metric, mode=mode, sampler=sampler, study_name=study_name,
                                       storage=rdb, seed=None)
    if rdb is not None and study_name:
        # optuna-dashboard labels its axes with these (otherwise "Objective 0")
        optuna.load_study(study_name=study_name, storage=rdb).set_metric_names(
            list(metric) if isinstance(metric, (list, tuple)) else [metric])
    return search


ERROR_KEY = "uda_ray_error"  # a trial's last report when it failed for a reason a retry cannot fix


def report_metrics(metrics: dict) -> None:
    """Report a trial's metrics to Tune without training (a stage taken from the store)."""
    from ray import tune

    tune.report({k: v for k, v in metrics.items() if isinstance(v, (int, float))})


def report_error(text: str) -> None:
    """End a Tune trial as failed without an exception, so that Tune does not restart it (a
    user error, e.g. a diverged run, fails again on every retry); the study and its
    scheduler read the report."""
    from ray import tune

    tune.report({ERROR_KEY: text})


def trial_id() -> str:
    from ray import tune

    return tune.get_context().get_trial_id()


def tune_report_callback():
    from ray.tune.integration.ray_train import TuneReportCallback

    return TuneReportCallback()


def _join(storage: str, name: str) -> str:
    return f"{storage.rstrip('/')}/{name}" if "://" in storage else str(Path(storage) / name)
