"""Every Ray call of uda-ray lives here: Ray's Train/Tune API has moved several times
(Train V2 is the default in 2.60), so the rest of the package never imports Ray.

* :func:`train_worker` is Ray Train's per-worker function: the engine's :func:`~uda_ray.engine.fit`,
  unchanged, with checkpoints reported through ``ray.train.report`` and resumed from
  ``ray.train.get_checkpoint()`` after a failure.
* :func:`run_trainer` builds the ``TorchTrainer`` (DDP process group: gloo on CPU, NCCL on
  GPU), with ``FailureConfig`` and a checkpoint retention policy.
* :func:`tune_rows` runs Tune trials whose trainable is a small *driver* that builds a
  ``TorchTrainer`` per trial (``Tuner(trainer)`` no longer exists in V2), with Optuna
  search, ASHA and a concurrency limit.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

# Test hook: kill a Train worker process once, right after it reports this step, to show
# that the run resumes from its last checkpoint (see tests/test_ray.py).
KILL_ENV = "UDA_RAY_TEST_KILL_AT_STEP"


def _resolve_init_from(path: str) -> str:
    """A checkpoint on shared storage (``s3://...``) is fetched to a local folder first."""
    if not path or "://" not in path:
        return path
    import tempfile

    import ray.train

    local = tempfile.mkdtemp(prefix="uda-ray-init-")
    ray.train.Checkpoint(path).to_directory(local)
    return local


def train_worker(config: dict) -> None:
    """Per-worker function of the ``TorchTrainer``. ``config``: ``flat`` (the flat config),
    ``run_dir``, and optionally ``mlflow`` (tracking URI, experiment, run id to log into)."""
    import ray.train
    import ray.train.torch
    import torch

    from .config import build_config
    from .checkpoint import load_checkpoint_file
    from .engine import fit
    from .tracking import MlflowTracker

    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    flat = dict(config["flat"])
    device = ray.train.torch.get_device()
    flat["run.device"] = str(device) if device.type == "cuda" else "cpu"
    flat["run.init_from"] = _resolve_init_from(flat.get("run.init_from", ""))
    cfg = build_config(flat)
    if device.type == "cpu" and config.get("threads"):
        torch.set_num_threads(int(config["threads"]))

    resume = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            resume = load_checkpoint_file(d)

    tracker = None
    m = config.get("mlflow")
    if rank == 0 and m:
        tracker = MlflowTracker(experiment=m["experiment"], tracking_uri=m.get("tracking_uri"), run_id=m["run_id"])

    kill_at = int(os.environ.get(KILL_ENV, "0"))
    marker = Path(config["run_dir"]) / ".killed-once"

    def on_checkpoint(path: Path, metrics: dict) -> None:
        ckpt = ray.train.Checkpoint.from_directory(str(path.parent)) if rank == 0 else None
        ray.train.report({k: v for k, v in metrics.items() if v is not None}, checkpoint=ckpt)
        if kill_at and metrics.get("step") == kill_at and rank == 0 and not marker.exists():
            marker.touch()
            os._exit(1)  # a hard worker death, as a lost node would be

    fit(cfg, run_dir=config["run_dir"], tracker=tracker, on_checkpoint=on_checkpoint, resume_from=resume)


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


def tune_rows(trainable: Callable[[dict], Any], *, trials: list[dict] | None = None,
              space: Callable | None = None, num_samples: int = 1, metric: str | list[str] = "sel/mIoU",
              mode: str | list[str] = "max", seed: int = 0, storage_path: str, name: str,
              max_concurrent: int = 2, driver_cpus: float = 0.1, asha: dict | None = None,
              optuna_storage: str | None = None, optuna_study: str | None = None, resume: bool = True,
              verbose: int = 1):
    """Run Tune trials whose trainable is a Train driver.

    Either ``trials`` (a fixed list of trial configs, run as a grid) or ``space`` (an Optuna
    define-by-run function ``space(trial) -> dict | None`` of constants, searched with
    ``num_samples`` trials by a seeded TPE sampler, persisted in ``optuna_storage``).
    Returns the ``ResultGrid``. An interrupted run of the same ``name`` is restored.
    """
    from ray import tune

    import ray

    # Checkpoint-only reports carry no evaluation metrics; selection reads the ones that do
    # (here, not in init_ray: a caller may have connected to Ray itself).
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    # On a cluster whose head advertises "trial_driver" slots (cluster.yaml), drivers run
    # there and leave every CPU and GPU to the training workers; locally, a CPU share.
    res = {"trial_driver": 1} if ray.cluster_resources().get("trial_driver") else {"CPU": driver_cpus}
    driver = tune.with_resources(trainable, res)
    path = _join(storage_path, name)
    if resume and tune.Tuner.can_restore(path):
        tuner = tune.Tuner.restore(path, trainable=driver, resume_unfinished=True, resume_errored=False,
                                   restart_errored=False)
        return tuner.fit()
    tune_kw: dict = {"max_concurrent_trials": max_concurrent}
    if space is not None:
        import optuna

        from ._tune_search import MetricReportsOptunaSearch

        multi = isinstance(metric, (list, tuple))
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(4, max(1, num_samples // 2)))
        storage = optuna.storages.RDBStorage(optuna_storage) if optuna_storage else None
        search = MetricReportsOptunaSearch(space=space, metric=metric, mode=mode, sampler=sampler,
                              study_name=optuna_study, storage=storage, seed=None)
        tune_kw.update(search_alg=search, num_samples=num_samples)
        if asha and not multi:
            from ray.tune.schedulers import ASHAScheduler

            tune_kw["scheduler"] = ASHAScheduler(metric=metric, mode=mode, time_attr="step", **asha)
        param_space: dict = {}
    else:
        param_space = {"trial": tune.grid_search(trials or [])}
    tuner = tune.Tuner(driver, param_space=param_space, tune_config=tune.TuneConfig(**tune_kw),
                       run_config=tune.RunConfig(name=name, storage_path=storage_path, verbose=verbose,
                                                 failure_config=tune.FailureConfig(max_failures=0)))
    grid = tuner.fit()
    if space is not None and storage is not None and optuna_study:
        # optuna-dashboard labels its axes with these (otherwise "Objective 0")
        optuna.load_study(study_name=optuna_study, storage=storage).set_metric_names(
            list(metric) if multi else [metric])
    return grid


def trial_id() -> str:
    from ray import tune

    return tune.get_context().get_trial_id()


def tune_report_callback():
    from ray.tune.integration.ray_train import TuneReportCallback

    return TuneReportCallback()


def _join(storage: str, name: str) -> str:
    return f"{storage.rstrip('/')}/{name}" if "://" in storage else str(Path(storage) / name)
