"""Studies: a paper's ablation table or a hyperparameter search as one command.

A study (``studies/NAME.py``) declares a base config, named rows (a method and its
switches), the seeds of every row and, optionally, a search space per row. Running it:

1. connects to the current Ray cluster (a local one by default);
2. opens one MLflow parent run for the study (the experiment is the study's name);
3. runs every row x seed as a Tune trial that fits the config (in the trial's own process,
   or with Ray Train for multi-worker and GPU trials) and logs one child run; a row may start
   from another row's checkpoint of the same seed (e.g. AdaptSegNet from source-only), and
   its trial starts as soon as that one has finished: no stage waits for a whole other
   stage, so trials of different rows fill every free slot
   (:class:`uda_ray._tune_schedule.RowScheduler`, one Tune run per invocation);
4. for a search row, searches its space with Optuna on the row's first seed (as soon as its
   init_from has finished), selecting on the study's objective (the selection split by
   default, never the reported split), then re-runs the best configuration over all seeds;
   with ``Study.asha``, ASHA stops the trials that fall behind at intermediate evaluations of
   the selection split (recorded KILLED with a ``pruned`` tag, PRUNED in Optuna, counted in
   the search, never its best; a row's seed runs are never stopped);
5. prints the comparison table (:mod:`uda_ray.compare`).

A failed trial is recorded as FAILED and the other rows go on; running the study again
skips every row x seed already FINISHED with the same lineage (its config and, recursively,
the run it started from: :mod:`uda_ray.checkpoint`), so that editing a row re-runs exactly
the rows downstream of it, and continues the child run of one that is not (FAILED, or
KILLED with its driver) instead of adding another. Ctrl-C (SIGINT) or SIGTERM stops the
study's trials, marks its unfinished runs and the study's parent run KILLED and exits 130
(143 for SIGTERM); running it again finishes it. Only one process runs a study of a given
name at a time (a lock in ``<out>/<name>/``).
"""

from __future__ import annotations

import argparse
import os
from contextlib import nullcontext
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import tracking
from .checkpoint import LockHeld, config_hash, lineage_hash, owner_lock
from .config import build_config
from .errors import UserError
from .fingerprint import stage_context
from .store import StageStore, check_reuse, default_root
from .verdict import Claim, check_claims, claims_json  # noqa: F401  (studies declare claims as uda_ray.study.Claim)

# The papers' protocol at CPU scale: the encoder pretrained on the embedded ImageNet stand-in
# (uda_ray.pretrain) and BatchNorm frozen at its pretraining statistics, DeepLab-v2's
# batch-1 convention that MAT, DAST, JAL, PWW and AdaptSegNet inherit. In a model whose
# decoder has BatchNorm and no pretrained statistics (MAT's fusion blocks), frozen BN is the
# identity there (mean 0, variance 1, weight 1, bias 0, none of them trained).
PAPER_PROTOCOL = {"model.pretrained": "embedded", "model.bn": "frozen"}
# The curriculum's: its PSPNet-style model starts from ADE20k (the embedded stand-in) and
# trains its BatchNorm ("maintained independently on each GPU", batch 4 per GPU).
CURRICULUM_PROTOCOL = {"model.pretrained": "embedded_seg", "model.bn": "shared"}
# The control every table study keeps as its ``shared_bn`` variant: random initialisation and
# BatchNorm shared by source and target batches, the regime the papers never ran (where an
# adaptation row can gain from target images passing through BatchNorm alone).
SHARED_BN = {"model.pretrained": "", "model.bn": "shared"}


ASHA_KEYS = ("grace_period", "reduction_factor", "brackets", "eval_every")


def asha_of(asha: dict | bool | None, flat: dict) -> dict | None:
    """The ASHA of a search row whose trials fit ``flat`` (``Study.asha``; None: no early stopping).

    ``max_t`` is the trials' ``run.iterations``; ``grace_period`` (steps) defaults to a third of
    it and ``reduction_factor`` to 3: a trial is judged once, a third of the way in, against
    the trials of its search that reached that point, and stopped when below the best third
    of them (its last step is never judged). ``eval_every``: the search trials evaluate the
    selection split (``run.eval_every``) every this many steps, by default the grace period;
    trials report to Tune at checkpoints only, so their ``run.checkpoint_every`` is kept where
    it divides it and set to it otherwise (every evaluation is then reported). Returns
    ``{"iterations", "grace_period", "reduction_factor", "brackets", "set": the search
    trials' flat values}``.
    """
    if asha is None or asha is False:
        return None
    spec = {} if asha is True else dict(asha)
    iterations = int(flat.get("run.iterations", 0))
    if iterations <= 0:
        return None
    grace = min(iterations, max(1, int(spec.get("grace_period") or iterations // 3)))
    ckpt = int(flat.get("run.checkpoint_every", 0))
    every = max(1, int(spec.get("eval_every") or grace))
    if not ckpt or every % ckpt:
        ckpt = every
    return {"iterations": iterations, "grace_period": grace, "reduction_factor": spec.get("reduction_factor", 3),
            "brackets": spec.get("brackets", 1), "set": {"run.eval_every": every, "run.checkpoint_every": ckpt}}


class StudyError(UserError, ValueError):
    """A study that cannot run as declared (a row's init_from naming no row or itself, a
    circular init_from, duplicate row names, a baseline that is not a row, a study script with
    a syntax error): raised when the study is loaded, before anything runs."""


@dataclass
class Row:
    """One row of a study's table.

    Args:
        name: the row's label in the table.
        method: the method (``source_only``, ``adabn``, ``adaptseg``, ...).
        set: flat config values of this row over the study's base (switches, weights).
        init_from: another row whose checkpoint of the same seed starts this row.
        space: an Optuna define-by-run function ``space(trial) -> dict | None`` over flat
            keys (e.g. ``trial.suggest_float("adaptseg.lambda_adv_main", 1e-4, 1e-2, log=True)``).
        num_samples: search trials (with ``space``).
    """

    name: str
    method: str
    set: dict = field(default_factory=dict)
    init_from: str | None = None
    space: Callable | None = None
    num_samples: int = 8


@dataclass
class Study:
    """A study: a base config, rows, seeds, and how to run and select."""

    name: str
    rows: list[Row]
    base: dict = field(default_factory=dict)
    seeds: tuple[int, ...] = (0, 1, 2)
    baseline: str | None = None
    objective: str = "sel/mIoU"  # what selection reads: the selection split, not the reported val
    mode: str = "max"
    workers_per_trial: int = 1
    cpus_per_worker: float = 0.9  # the trial's driver takes 0.1
    gpus_per_worker: float = 0.0  # fractional GPUs share a card between trials
    max_concurrent: int = 2
    max_failures: int = 1  # restarts of a trial (its worker group, or its process) from its last checkpoint
    # Ray Train for each trial: None (default) where it adds something, i.e. several workers
    # or GPUs; a single-worker CPU trial then fits in its Tune trial's own process
    # (distributed.fit_in_trial: the same engine, checkpoints and restarts, without ~20 s of
    # worker-group start and teardown per trial). True: always; False: never (one worker).
    ray_train: bool | None = None
    # Early stopping of a search row's hopeless Optuna trials (never of a row's seed runs), by
    # ASHA on the study's objective (the selection split) at intermediate evaluations of the
    # search trials: True (the defaults) or a dict of ASHA_KEYS (see asha_of); None: off.
    asha: dict | bool | None = None
    smoke: dict = field(default_factory=dict)  # overrides of --smoke-test
    # Named variants of the whole study (``--variant NAME``): flat values set on every row
    # (over the row's own), run and recorded as the study ``<name>-<variant>``, e.g. the
    # ``shared_bn`` control of a table study run under the papers' protocol.
    variants: dict = field(default_factory=dict)
    # The paper's claims about pairs of rows (uda_ray.verdict.Claim): `uda-ray compare` judges
    # each from the seeds (holds / reverses / not decided, with a 95% interval), and
    # `--until-decided` adds seeds to the rows of the undecided ones.
    claims: list = field(default_factory=list)

    def __post_init__(self):
        names = [r.name for r in self.rows]
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise StudyError(f"study {self.name}: duplicate row names {dup} (each row needs its own name)")
        for r in self.rows:
            if r.init_from == r.name:
                raise StudyError(f"study {self.name}: row {r.name} starts from itself (init_from={r.init_from!r})")
            if r.init_from and r.init_from not in names:
                raise StudyError(f"study {self.name}: row {r.name} starts from unknown row {r.init_from!r}; "
                                 f"the rows are {names}")
            build_config({**self.base, **r.set}, method=r.method)  # fail early, naming the key
        if self.baseline and self.baseline not in names:
            raise StudyError(f"study {self.name}: baseline {self.baseline!r} is not a row; the rows are {names}")
        check_claims(self.name, self.claims, names)
        self.stages()  # refuses a circular init_from (whose trials would wait for each other forever)
        if isinstance(self.asha, dict) and (bad := sorted(set(self.asha) - set(ASHA_KEYS))):
            raise StudyError(f"study {self.name}: asha has unknown keys {bad}; its keys are {list(ASHA_KEYS)} "
                             f"(max_t is each search trial's run.iterations)")
        if self.ray_train is False and (self.workers_per_trial > 1 or self.gpus_per_worker):
            raise StudyError(f"study {self.name}: ray_train=False runs a trial in one CPU process; "
                             f"workers_per_trial={self.workers_per_trial} and gpus_per_worker="
                             f"{self.gpus_per_worker} need Ray Train")

    @property
    def in_process(self) -> bool:
        """Whether a trial fits in its own Tune process rather than with a TorchTrainer."""
        if self.ray_train is None:
            return self.workers_per_trial == 1 and not self.gpus_per_worker
        return not self.ray_train

    def row(self, name: str) -> Row:
        return next(r for r in self.rows if r.name == name)

    def search_asha(self, flat: dict, *, default: bool = False) -> dict | None:
        """The early stopping of this study's search trials that fit ``flat`` (:func:`asha_of`);
        ``default``: the default ASHA where the study sets none (``uda-ray plan --asha``)."""
        return asha_of(True if default and self.asha in (None, False) else self.asha, flat)

    def variant(self, name: str | None) -> "Study":
        """The study of variant ``name`` (``None``: this one): every row with the variant's
        values, named ``<study>-<variant>``; an unknown name is a one-line error."""
        from dataclasses import replace

        from .errors import UserError, did_you_mean

        if name is None:
            return self
        if name not in self.variants:
            raise UserError(f"--variant {name}: study {self.name} has no such variant{did_you_mean(name, self.variants)} "
                            f"(its variants: {', '.join(self.variants) or 'none'})")
        values = self.variants[name]
        return replace(self, name=f"{self.name}-{name}", variants={},
                       rows=[replace(r, set={**r.set, **values}) for r in self.rows])

    def flat(self, row: Row, seed: int, smoke: bool = False) -> dict:
        values = {**self.base, **row.set, **(self.smoke if smoke else {}), "run.seed": seed}
        if smoke and row.set.get("run.iterations") == 0:
            values["run.iterations"] = 0  # a row that only evaluates stays so in the smoke test
        flat = build_config(values, method=row.method).flat()
        # Trials run in other working directories (and on other nodes): absolute data paths.
        root = flat["data.root"]
        if "://" not in root:
            flat["data.root"] = str(Path(root).resolve())
        return flat

    def stages(self) -> list[list[Row]]:
        """Rows in dependency order: a row runs after the row it starts from."""
        done: set[str] = set()
        stages, left = [], list(self.rows)
        while left:
            ready = [r for r in left if not r.init_from or r.init_from in done]
            if not ready:
                raise StudyError(f"study {self.name}: circular init_from among {[r.name for r in left]}")
            stages.append(ready)
            done |= {r.name for r in ready}
            left = [r for r in left if r.name not in done]
        return stages

    def main(self, argv: list[str] | None = None) -> int:
        """``python studies/NAME.py [--smoke-test] ...`` (same options as ``uda-ray study``)."""
        args = study_arg_parser().parse_args(argv)
        tracking.resolve_uri(args.tracking_uri)  # an unsupported URI is refused before Ray starts
        return run_study(self, **vars(args))


def study_arg_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The options of ``uda-ray study`` (declared in :mod:`uda_ray.cli_spec`, which ``uda-ray
    --help`` reads without importing this module)."""
    from .cli_spec import add_study_args

    return add_study_args(parser or argparse.ArgumentParser(description="run a uda-ray study"))


def find_study(arg: str | Path) -> Path:
    """The script of a study given as a path or as a bare name (``quickstart`` is
    ``studies/quickstart.py`` of the current folder, else of the uda-ray checkout), as
    ``uda-ray compare`` takes either.

    Raises:
        UserError: no such script, with the closest study names.
    """
    from .errors import UserError, did_you_mean

    path = Path(arg)
    if path.is_file():
        return path
    folders = [path.parent] if path.suffix == ".py" or len(path.parts) > 1 else \
        [Path("studies"), Path(__file__).resolve().parents[1] / "studies"]
    if path.suffix != ".py" and len(path.parts) == 1:
        for d in folders:
            if (d / f"{arg}.py").is_file():
                return d / f"{arg}.py"
    names = sorted({q.stem for d in folders if d.is_dir() for q in d.glob("*.py") if not q.name.startswith("_")})
    raise UserError(f"{arg}: no study script of that path or name{did_you_mean(path.stem, names)} "
                    f"(studies in {folders[0]}: {', '.join(names) or 'none'})")


def load_study(path: str | Path) -> Study:
    """The ``STUDY`` object of a study script."""
    import importlib.util

    from .errors import UserError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: study script not found")
    if path.suffix != ".py":
        raise UserError(f"{path}: not a study script (expected a .py file that defines STUDY = Study(...), "
                        "e.g. studies/quickstart.py)")
    name = f"uda_ray_study_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # search spaces defined in the script are shipped by value
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:
        sys.modules.pop(name, None)
        raise StudyError(f"{e.filename or path}:{e.lineno}: syntax error: {e.msg}") from None
    except UserError as e:  # a study definition error (StudyError, a row's ConfigError): name the file
        sys.modules.pop(name, None)
        raise StudyError(f"{path}: {e}") from None
    study = getattr(module, "STUDY", None)
    if not isinstance(study, Study):
        raise UserError(f"{path}: not a study script (expected a module-level STUDY = Study(...))")
    return study


STUDY_LOCK = ".study.lock"  # in <out>/<study name>/: held by the one process running the study


# --- MLflow bookkeeping (driver side) -------------------------------------------------------

class StudyRecord:
    """The study's parent run and its child runs in MLflow.

    A row's seed runs are tagged ``uda_ray.kind=row`` and ``row=<row>``: they are the runs the
    compare table averages. A search row's Optuna trials are ``uda_ray.kind=search_trial`` with
    ``search_row=<row>`` and ``trial=<id>`` instead, so that grouping MLflow's run list by
    ``row`` gives the table's means. The experiment holds the run list's view
    (:func:`uda_ray.tracking.set_run_list_view`) that :meth:`runs_url` opens.
    """

    def __init__(self, study: Study, name: str, tracking_uri: str | None):
        self.tracking_uri = tracking.resolve_uri(tracking_uri)
        self.client = tracking.mlflow_client(self.tracking_uri)
        self.experiment_id = tracking.experiment_id(self.client, name)
        self.name = name
        # runs left RUNNING by a killed driver of this study (on this host) are KILLED first
        tracking.reap_orphans(self.client, self.experiment_id)
        parents = self.client.search_runs([self.experiment_id],
                                          filter_string=f"tags.`uda_ray.kind` = 'study' and tags.study = '{name}'",
                                          order_by=["attributes.start_time DESC"], max_results=1)
        if parents:
            self.parent_id = parents[0].info.run_id
            tracking.reopen(self.client, self.parent_id)
        else:
            self.parent_id = self.client.create_run(
                self.experiment_id, run_name=name,
                tags={"uda_ray.kind": "study", "study": name, tracking.UNITS_TAG: tracking.PERCENT,
                      **tracking.owner_tags()}).info.run_id
        tracking.set_run_list_view(self.client, self.experiment_id)
        tags = {**tracking.source_tags(), "rows": ",".join(r.name for r in study.rows), "baseline": study.baseline or "",
                "objective": study.objective, "objective_mode": study.mode, "report_metric": "val/mIoU",
                "seeds": ",".join(map(str, study.seeds)), "claims": claims_json(study.claims)}
        for r in study.rows:
            if r.space is not None:
                tags[f"search_space.{r.name}"] = ""  # filled once the keys are known
        for k, v in tags.items():
            self.client.set_tag(self.parent_id, k, v)

    @classmethod
    def attach(cls, ctx: dict) -> "StudyRecord":
        """The record of a running study, in one of its trial drivers (from the trials' ``ctx``)."""
        self = cls.__new__(cls)
        self.tracking_uri, self.experiment_id = ctx["tracking_uri"], ctx["experiment_id"]
        self.name, self.parent_id = ctx["study"], ctx["parent_id"]
        self.client = tracking.mlflow_client(self.tracking_uri)
        return self

    def children(self, **tags) -> list:
        """Child runs with these tag values; ``row`` names a search row's trials when
        ``search="1"`` (their tag is ``search_row``); an empty value matches a missing tag."""
        if tags.get("search") == "1" and "row" in tags:
            tags["search_row"] = tags.pop("row")
        flt = [f"tags.mlflow.parentRunId = '{self.parent_id}'"]
        flt += [f"tags.`{k}` = '{v}'" for k, v in tags.items() if v != ""]
        runs = self.client.search_runs([self.experiment_id], filter_string=" and ".join(flt), max_results=5000)
        empty = [k for k, v in tags.items() if v == ""]
        return [r for r in runs if not any(r.data.tags.get(k, "") for k in empty)]

    def runs_url(self) -> str:
        """The study's run list in the MLflow UI (:func:`uda_ray.tracking.runs_url`)."""
        return tracking.runs_url(self.tracking_uri, self.experiment_id)

    def finished(self, row: str, seed: int, *, lineage: str | None = None, chash: str | None = None,
                 selected_since: int | None = None):
        """The FINISHED run of this row x seed of this ``lineage`` (or, where the lineage
        cannot be known here, of this config hash ``chash``), None if there is none; with
        ``selected_since`` (ms), only a run the study selected since then."""
        from .compare import SELECTED_TAG

        key, value = ("lineage", lineage) if lineage is not None else ("config_hash", chash)
        for run in self.children(row=row, seed=str(seed), search="0"):
            if run.info.status == "FINISHED" and run.data.tags.get(key) == value and (
                    selected_since is None or int(run.data.tags.get(SELECTED_TAG) or 0) >= selected_since):
                return run
        return None

    def select(self, run_id: str) -> None:
        """Mark a row x seed's run as the one of the study's current definition (its lineage
        now), which ``compare`` reports among the row x seed's finished runs."""
        from .compare import SELECTED_TAG

        self.client.set_tag(run_id, SELECTED_TAG, str(int(time.time() * 1000)))

    def stop_unfinished(self, why: str) -> list[str]:
        """Mark KILLED, with an ``error`` tag saying ``why``, every child run still RUNNING (the
        trials of an interrupted study, whose processes were stopped). Returns their ids."""
        killed = []
        for run in self.children():
            if run.info.status == "RUNNING":
                self.client.set_tag(run.info.run_id, "error", why)
                self.client.set_terminated(run.info.run_id, "KILLED")
                killed.append(run.info.run_id)
        return killed

    def mark_pruned(self, tune_trial: str, step: int, *, final: bool = False) -> None:
        """Record a search trial that the study's trial scheduler stopped at ``step``: tag
        ``pruned`` = the step (set before Tune stops it, so that its driver ends its run KILLED
        without an ``error``); ``final``: once its process has ended, its run KILLED and
        without an ``error`` whatever it wrote when stopped."""
        for run in self.children(**{"uda_ray.tune_trial": tune_trial}):
            run_id = run.info.run_id
            self.client.set_tag(run_id, "pruned", str(step))
            if final:
                if "error" in self.client.get_run(run_id).data.tags:
                    self.client.delete_tag(run_id, "error")
                if self.client.get_run(run_id).info.status != "KILLED":
                    self.client.set_terminated(run_id, "KILLED")

    def unfinished(self, row: str, seed: int, search: str, trial: str, *, lineage: str, chash: str):
        """The latest child run of this row x seed (and search trial) and lineage (its config
        hash where the lineage is not known here) that did not finish (FAILED, or KILLED with
        its driver), to be continued rather than duplicated."""
        key = {"lineage": lineage} if lineage else {"config_hash": chash}
        runs = [r for r in self.children(row=row, seed=str(seed), search=search, trial=trial, **key)
                if r.info.status != "FINISHED"]
        return max(runs, key=lambda r: r.info.start_time or 0, default=None)

    def adopt(self, row: str, seed: int, flat: dict, stage: dict, store, tags: dict | None = None) -> str:
        """A row x seed's run that reuses a stored stage (:func:`adopt_stage`), selected and
        FINISHED at once; returns its id."""
        parent_tags = self.client.get_run(self.parent_id).data.tags
        run_tags = {"mlflow.parentRunId": self.parent_id, "study": self.name, "seed": str(seed), "search": "0",
                    tracking.UNITS_TAG: tracking.PERCENT,
                    "config_hash": config_hash(flat), "uda_ray.kind": "row", "row": row, **(tags or {}),
                    **{k: v for k, v in parent_tags.items() if k.startswith(("mlflow.source.", "mlflow.user"))},
                    **tracking.owner_tags()}
        run_id = self.client.create_run(self.experiment_id, run_name=f"{row}-s{seed}", tags=run_tags).info.run_id
        adopt_stage(self.client, run_id, stage, flat, used_by=f"{self.name}/{row}/s{seed}", store=store)
        self.client.log_metric(run_id, "perf/driver_start_unix", time.time())
        self.client.log_metric(run_id, "perf/driver_end_unix", time.time())
        self.select(run_id)
        self.client.set_terminated(run_id, "FINISHED")
        return run_id

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.parent_id, status)


# --- the trial driver (runs inside a Tune trial) --------------------------------------------

def drive_trial(config: dict, ctx: dict) -> None:
    """A Tune trial: fit one row x seed (x sampled hyperparameters) with Ray Train, or in
    this process (``ctx["in_process"]``, :func:`uda_ray.distributed.fit_in_trial`), and log
    one MLflow child run. The driver creates the run, so a restarted worker group or trial
    logs into the same run; a failure marks it FAILED. For ``uda-ray bench study`` it logs
    ``perf/driver_start_unix`` and ``perf/driver_end_unix`` (the fit logs its phases)."""
    from . import distributed

    t_start = time.time()

    # a row x seed: config["trial"]; a search trial: the sampled values and config["search"]
    t = dict(config.get("trial") or config.get("search") or {})
    row = t.get("row", ctx.get("row"))
    seed = t.get("seed", ctx.get("seed"))
    sampled = {k: v for k, v in config.items() if k not in ("trial", "search")}
    flat = {**ctx["flats"][row][str(seed)], **sampled, **t.get("set", {})}
    if t.get("init_from"):
        flat["run.init_from"] = t["init_from"]
    cfg = build_config(flat)  # validates sampled values, naming the key
    flat = cfg.flat()
    # the lineage this trial's fit will have (its config over what it starts from, its data and
    # code; the engine computes and records the same from the checkpoint or weights it loads)
    context = stage_context(cfg)  # "data:<fingerprint>|code:<fingerprint>"
    lineage = lineage_hash(config_hash(flat), t["start"], context) if t.get("start") else ""
    prints = dict(part.split(":", 1) for part in context.split("|") if ":" in part)
    search = "1" if "search" in config or (sampled and "trial" not in config) else "0"
    tid = distributed.trial_id()
    record = StudyRecord.attach(ctx)
    client = record.client
    # A search trial is another kind of run than the row's seed runs (see StudyRecord); the
    # source tags (command, commit, user) are the study's.
    parent_tags = client.get_run(ctx["parent_id"]).data.tags
    tags = {"mlflow.parentRunId": ctx["parent_id"], "study": ctx["study"], "seed": str(seed), "search": search,
            "config_hash": config_hash(flat), "uda_ray.tune_trial": tid, "uda_ray.node": _node_id(),
            **t.get("tags", {}),
            **({"lineage": lineage} if lineage else {}),
            # what the lineage covers, readable: the data and training-code fingerprints
            **{f"{k}_fingerprint": v for k, v in prints.items() if k in ("data", "code")},
            **{k: v for k, v in parent_tags.items() if k.startswith(("mlflow.source.", "mlflow.user"))}}
    if search == "1":
        tags.update({"uda_ray.kind": "search_trial", "search_row": row, "trial": tid})
    else:
        tags.update({"uda_ray.kind": "row", "row": row})
    run_name = f"{row}-s{seed}" + (f"-{tid}" if search == "1" else "")
    earlier = record.unfinished(row, seed, search, tags.get("trial", ""), lineage=lineage,
                                chash=tags["config_hash"])
    if earlier is not None:  # a re-run continues the row x seed's unfinished child run
        run_id = earlier.info.run_id
        tracking.reopen(client, run_id)
        for k, v in tags.items():
            client.set_tag(run_id, k, v)
    else:
        run_id = client.create_run(ctx["experiment_id"], run_name=run_name,
                                   tags={**tags, tracking.UNITS_TAG: tracking.PERCENT,
                                         **tracking.owner_tags()}).info.run_id
    # The run directory and Ray's run name carry the lineage: a row whose config or parent
    # changed between two runs of the study (an edited study script, an edited upstream row)
    # trains anew in its own directory instead of meeting the old run's checkpoint (which
    # would be refused).
    dir_name = f"{run_name}-{lineage or tags['config_hash']}"
    run_dir = str(Path(ctx["out"]) / ctx["study"] / dir_name)
    mlflow = {"experiment": ctx["study"], "tracking_uri": ctx["tracking_uri"], "run_id": run_id}
    store = StageStore(ctx["store"]) if ctx.get("store") and lineage else None
    try:
        with store.lock(lineage, on_wait=lambda: print(f"{run_name}: stage {lineage} is being trained by another "
                                                       f"process; waiting for it")) if store else nullcontext():
            stage = store.get(lineage) if store and ctx.get("reuse", "exact") == "exact" else None
            if stage is not None:  # trained meanwhile (another study, a row of the same lineage)
                adopt_stage(client, run_id, stage, flat, used_by=f"{ctx['study']}/{row}/s{seed}", store=store)
                checkpoint = stage["checkpoint"]
                distributed.report_metrics(tracking.scores_in_percent(
                    {k: v[-1][1] for k, v in stage.get("metrics", {}).items() if v}, stage.get("tags", {})))
            else:
                checkpoint = _fit_trial(ctx, flat, run_dir, dir_name, mlflow)
                if checkpoint is not None and store is not None:
                    store_stage(client, run_id, checkpoint, flat, store, study=ctx["study"], row=row, seed=seed,
                                tracking_uri=ctx["tracking_uri"])
        if checkpoint is not None:
            client.set_tag(run_id, "checkpoint", checkpoint)
        client.log_metric(run_id, "perf/driver_start_unix", t_start)
        client.log_metric(run_id, "perf/driver_end_unix", time.time())
        if search == "0":
            record.select(run_id)
        client.set_terminated(run_id, "FINISHED")
    except BaseException as e:
        # Stopped rather than failed: Ctrl-C, or Tune ending the trial's actor (SystemExit in
        # its thread) when the study is interrupted; a re-run continues it like any KILLED run.
        stopped = isinstance(e, (KeyboardInterrupt, SystemExit))
        if stopped and "pruned" in client.get_run(run_id).data.tags:
            # stopped early by the study's trial scheduler (its tag, set before Tune stopped the
            # trial, says at which step): not an error, not to be continued
            client.set_terminated(run_id, "KILLED")
            raise
        client.set_tag(run_id, "error", ("killed: the trial was stopped; " if stopped else "") + tracking.error_text(e))
        client.set_terminated(run_id, "KILLED" if stopped else "FAILED")
        from .errors import UserError

        if isinstance(e, UserError):  # deterministic (a config, a diverged run): a retry would fail again
            distributed.report_error(tracking.error_text(e))
            return
        raise


def _node_id() -> str:
    """The Ray node this trial runs on ('' where Ray is not running here: never starts it),
    recorded on every trial's run, so that a study's placement across nodes can be read from
    MLflow."""
    if "ray" not in sys.modules:
        return ""
    import ray

    return ray.get_runtime_context().get_node_id() or "" if ray.is_initialized() else ""


def _fit_trial(ctx: dict, flat: dict, run_dir: str, dir_name: str, mlflow: dict) -> str | None:
    """Fit a trial's config in this process or with Ray Train; the persisted checkpoint's
    path or URI (None where the fit wrote none)."""
    from . import distributed

    if ctx.get("in_process"):
        return distributed.fit_in_trial(flat, run_dir=run_dir, storage_path=ctx["storage_path"],
                                        threads=max(1, round(ctx["trial_cpus"])), mlflow=mlflow,
                                        env=ctx.get("env"))
    result = distributed.run_trainer(
        flat, run_dir=run_dir, name=f"{ctx['study']}-{dir_name}", storage_path=ctx["storage_path"],
        num_workers=ctx["workers"], use_gpu=ctx["gpus"] > 0, cpus_per_worker=ctx["cpus"],
        gpus_per_worker=ctx["gpus"] or None, max_failures=ctx["max_failures"], mlflow=mlflow,
        callbacks=[distributed.tune_report_callback()], env=ctx.get("env"))
    if result.error is not None:
        raise result.error
    return result.checkpoint.path if result.checkpoint is not None else None


# Tags of a stored run that say where and how it ran in its study, not what it is: a run that
# reuses the stage gets its own.
_RUN_PLACE_TAGS = ("study", "row", "seed", "search", "search_row", "trial", "best_trial", "uda_ray.kind",
                   "uda_ray.tune_trial", "uda_ray.selected", "checkpoint", "error", "pruned", "reused",
                   "reused_from_run", "reused_from_study", "reused_from_row", "config_hash")


def store_stage(client, run_id: str, checkpoint: str, flat: dict, store, *, study: str, row: str, seed,
                tracking_uri: str) -> dict | None:
    """Keep a finished trial's stage in ``store`` under the lineage its fit recorded: its
    checkpoint, every metric's history, its tags and the flat config (:mod:`uda_ray.store`)."""
    run = client.get_run(run_id)
    lineage = run.data.tags.get("lineage")
    if not lineage:
        return None
    history = {k: [[m.step, m.value, m.timestamp] for m in client.get_metric_history(run_id, k)]
               for k in run.data.metrics if not k.startswith("perf/driver_")}
    tags = {k: v for k, v in run.data.tags.items()
            if not k.startswith(("mlflow.", "uda_ray.owner")) and k not in _RUN_PLACE_TAGS}
    meta = {"study": study, "row": row, "seed": int(seed), "run_id": run_id, "tracking_uri": tracking_uri,
            "parent_lineage": tags.get("parent_lineage", ""), "iterations": int(flat.get("run.iterations", 0)),
            "sec_per_iter": run.data.metrics.get("perf/sec_per_iter"), "method": flat.get("method", ""),
            "config": flat, "tags": tags, "metrics": history}
    return store.put(lineage, checkpoint, meta)


def adopt_stage(client, run_id: str, stage: dict, flat: dict, *, used_by: str, store) -> None:
    """Make the MLflow run ``run_id`` a reused copy of a stored stage: this row's params, the
    stage's metrics (every step), its tags (lineage, parent) and ``reused`` with the run and
    study it came from; its ``checkpoint`` is the store's, which dependent rows start from.
    Scores are copied in per cent (:data:`uda_ray.tracking.UNITS_TAG`): a stage stored by an
    older uda-ray, in fractions, is converted as it is copied."""
    from mlflow.entities import Metric, Param, RunTag

    existing = client.get_run(run_id).data.params
    params = [Param(k, str(v)) for k, v in flat.items() if k not in existing]
    for i in range(0, len(params), 100):
        client.log_batch(run_id, params=params[i:i + 100])
    stage_tags = stage.get("tags", {})
    convert = stage_tags.get(tracking.UNITS_TAG) != tracking.PERCENT
    metrics = [Metric(k, tracking.to_percent(float(v)) if convert and tracking.is_score(k) else float(v),
                      int(ts), int(step)) for k, hist in stage.get("metrics", {}).items() for step, v, ts in hist]
    for i in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[i:i + 1000])
    tags = {**stage_tags, tracking.UNITS_TAG: tracking.PERCENT, "lineage": stage["lineage"], "reused": "1",
            "reused_from_run": stage.get("run_id", ""), "reused_from_study": stage.get("study", ""),
            "reused_from_row": f"{stage.get('row', '')} s{stage.get('seed', '')}", "checkpoint": stage["checkpoint"]}
    client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
    store.touch(stage["lineage"], used_by=used_by)


# --- running a study ------------------------------------------------------------------------

def run_study(study: Study, *, smoke_test: bool = False, address: str | None = None,
              storage_path: str | None = None, tracking_uri: str | None = None,
              max_concurrent: int | None = None, out: str = "runs", env: dict | None = None,
              tune_callbacks: list | None = None, variant: str | None = None, reuse: str = "exact",
              store: str | None = None, plan: bool = False, seeds: str | tuple | None = None, add_seeds: int = 0,
              until_decided: bool = False, max_seeds: int = 6) -> int:
    """Run ``study`` (see the module's docstring). Returns 0; 1 when a trial failed; 2 when
    another process is running the study of the same name (it holds ``<out>/<name>/.study.lock``);
    128 + the signal's number (130, 143) when SIGINT or SIGTERM stopped it.
    ``env``: environment variables of the trials' training processes; ``tune_callbacks``:
    Tune callbacks of every Tune run (e.g. timing, :mod:`uda_ray.bench_study`); ``variant``:
    run :meth:`Study.variant` of that name instead; ``reuse``: ``exact`` takes a row x seed
    whose lineage the stage store holds (:mod:`uda_ray.store`, at ``store`` or beside the
    storage path) instead of training it, ``never`` trains it anyway. ``seeds`` (``"0-5"``, ``"0,1,2,7"`` or a tuple)
    and ``add_seeds`` (more after those) replace the study's seeds: the finished row x seeds
    are skipped, so only the new ones train. ``until_decided``: then add seeds to the rows of
    the undecided claims, up to ``max_seeds`` per claim (:func:`_until_decided`)."""
    from dataclasses import replace

    check_reuse(reuse)
    if seeds is not None or add_seeds:
        study = replace(study, seeds=parse_seeds(seeds, add_seeds, study.seeds))
    if until_decided:
        if smoke_test:
            raise UserError("--until-decided: not with --smoke-test (one seed decides nothing)")
        if not study.claims:
            raise UserError(f"--until-decided: study {study.name} declares no claims (Study(claims=[Claim(...)]))")
        if max_seeds < max(2, len(study.seeds)):
            raise UserError(f"--max-seeds {max_seeds}: expected at least the study's {len(study.seeds)} seeds (and 2)")
    if plan:  # what it would do, without Ray or training (uda_ray.plan)
        from .plan import format_plan, plan_studies

        print(format_plan(plan_studies([study], smoke=smoke_test, tracking_uri=tracking_uri, store_root=store,
                                       storage_path=storage_path, reuse=reuse, variant=variant)))
        return 0
    study = study.variant(variant)
    name = study.name + ("-smoke" if smoke_test else "")
    lock = Path(out).resolve() / name / STUDY_LOCK
    try:
        held = owner_lock(lock)
    except LockHeld as e:
        print(f"uda-ray: error: study {name} is already running ({e.holder} holds {lock}); "
              f"wait for it to end, or stop it, and run it again", file=sys.stderr)
        return 2
    kw = dict(smoke_test=smoke_test, address=address, storage_path=storage_path, tracking_uri=tracking_uri,
              max_concurrent=max_concurrent, out=out, env=env, tune_callbacks=tune_callbacks, reuse=reuse,
              store_root=store)
    with held:
        if until_decided:
            return _until_decided(study, name, max_seeds, kw)
        return _run_locked(study, name, **kw)


def parse_seeds(text: str | tuple | list | None, add: int = 0, base: tuple = (0, 1, 2)) -> tuple[int, ...]:
    """``"0-5"`` -> (0, ..., 5), ``"0,1,2,7"``, ``"0-2,5"``; None: ``base``; then ``add`` more
    seeds after the largest. Order kept (the first seed is the one a search row searches on)."""
    if text is None:
        out = list(base)
    elif isinstance(text, (tuple, list)):
        out = [int(s) for s in text]
    else:
        out = []
        for part in str(text).split(","):
            part = part.strip()
            try:
                if "-" in part[1:]:
                    lo, hi = part.split("-", 1)
                    lo, hi = int(lo), int(hi)
                    if hi < lo:
                        raise ValueError
                    out += range(lo, hi + 1)
                else:
                    out.append(int(part))
            except ValueError:
                raise UserError(f"--seeds {text}: expected seeds as 0-5 or 0,1,2,7 (non-negative integers, "
                                f"ranges low-high)") from None
    if any(s < 0 for s in out):
        raise UserError(f"--seeds {text}: seeds are non-negative integers")
    if add < 0:
        raise UserError(f"--add-seeds {add}: expected a non-negative number")
    out = list(dict.fromkeys(out))
    if not out:
        raise UserError(f"--seeds {text}: no seeds")
    top = max(out)
    return tuple(out + list(range(top + 1, top + 1 + add)))


def _ancestors(study: Study, names) -> set[str]:
    """``names`` and every row they start from, recursively (a new seed needs its parents')."""
    out, todo = set(), list(names)
    while todo:
        r = todo.pop()
        if r not in out:
            out.add(r)
            if (src := study.row(r).init_from):
                todo.append(src)
    return out


def _until_decided(study: Study, name: str, max_seeds: int, kw: dict) -> int:
    """``--until-decided``: run the study's seeds, then, a round at a time, add seeds to the rows of
    the claims that are not decided (and to the rows they start from) until each is decided or
    has ``max_seeds`` paired seeds. A round adds as many seeds as the study runs trials at once
    (``max_concurrent``), so that the new seeds' chains fill the slots.

    Peeking after every round and stopping once an interval excludes 0 is optional stopping:
    at the plain 95% level it would call a null effect decided more often than 5% of the
    time. The stop rule therefore judges at 95% Bonferroni-corrected over the looks it can take
    (1 - 0.05 / looks); a claim it calls decided is decided at 95% too (what ``compare``
    prints), and one that is decided at 95% but not at the corrected level gets more seeds."""
    import math

    from .verdict import UNDECIDED, judge, render, values_of_seeds

    conc = max(1, kw.get("max_concurrent") or study.max_concurrent)
    looks = 1 + math.ceil(max(0, max_seeds - len(study.seeds)) / conc)
    level = 1 - 0.05 / looks
    row_seeds = {r.name: list(study.seeds) for r in study.rows}
    first, rc, box = None, 0, []
    for look in range(1, looks + 1):
        box = []
        code = _run_locked(study, name, row_seeds=row_seeds, result_box=box, **kw)
        if code not in (0, 1) or not box:
            return code
        rc = max(rc, code)
        values = values_of_seeds(box[0].seeds, "mIoU")
        verdicts = [judge(c, values, level) for c in study.claims]
        first = first if first is not None else box[0].verdicts
        open_ = [v for v in verdicts if v.verdict == UNDECIDED and v.n < max_seeds]
        print(f"until-decided, look {look} of at most {looks} (stop rule at the {100 * level:.2f}% level): "
              f"{len(verdicts) - len(open_)} of {len(verdicts)} claims decided or at {max_seeds} seeds"
              + (f"; not decided: {', '.join(v.claim.name for v in open_)}" if open_ else ""))
        if not open_ or look == looks:
            break
        need = _ancestors(study, {r for v in open_ for r in (v.claim.better, v.claim.than)})
        top = max(s for seeds in row_seeds.values() for s in seeds)
        add = list(range(top + 1, top + 1 + min(conc, max_seeds - min(v.n for v in open_))))
        print(f"  adding seed(s) {', '.join(map(str, add))} to rows {', '.join(sorted(need))}")
        for r in need:
            row_seeds[r] += add
    print("until-decided: the claims at the first look and now (95% intervals, as compare prints them):")
    print(render(first or [], "text", "first look"))
    print(render(box[0].verdicts if box else [], "text", "now"))
    return rc


def _run_locked(study: Study, name: str, *, smoke_test: bool, address: str | None, storage_path: str | None,
                tracking_uri: str | None, max_concurrent: int | None, out: str, env: dict | None = None,
                tune_callbacks: list | None = None, reuse: str = "exact", store_root: str | None = None,
                row_seeds: dict | None = None, result_box: list | None = None) -> int:
    """One invocation's trials. ``row_seeds``: the seeds of each row where they differ from the
    study's (``--until-decided``); ``result_box`` gets the compare result."""
    from . import distributed
    from .engine import ensure_data

    seeds = study.seeds[:1] if smoke_test else study.seeds
    row_seeds = row_seeds or {}
    all_seeds = list(dict.fromkeys([*seeds, *(s for v in row_seeds.values() for s in v)]))
    storage_path = storage_path or os.environ.get("UDA_RAY_STORAGE") or str(Path(out, "ray").resolve())
    if "://" not in storage_path:
        storage_path = str(Path(storage_path).resolve())
    out = str(Path(out).resolve())
    # Generate the embedded benchmark and pretrained weights once, before trials race to do it.
    needs = {}
    for row in study.rows:
        cfg = build_config({**study.base, **row.set}, method=row.method)
        d, m = cfg.data, cfg.model
        needs.setdefault((d.root, d.synth, d.synth_seed, d.synth_regime, m.pretrained, m.arch), cfg)
    for cfg in needs.values():
        ensure_data(cfg)
    distributed.init_ray(address)
    _check_reachable(name, storage_path, store_root or default_root(storage_path), tracking_uri)
    for row in study.rows:  # a space defined in the study script travels by value to the trials
        if row.space is not None:
            distributed.pickle_by_value(sys.modules.get(row.space.__module__))
    record = StudyRecord(study, name, tracking_uri)
    store = StageStore(store_root or default_root(storage_path))
    print(f"study {name}: {len(study.rows)} rows x {len(seeds)} seeds; MLflow parent run {record.parent_id} "
          f"({record.tracking_uri}); storage {storage_path}; stages {store.root}"
          + (" (not reused: --reuse never)" if reuse == "never" else ""))
    if dash := distributed.dashboard_url():
        print(f"  Ray dashboard (trials, workers, logs) while it runs: {dash}")
    ctx = {"study": name, "parent_id": record.parent_id, "experiment_id": record.experiment_id,
           "tracking_uri": record.tracking_uri, "storage_path": storage_path, "out": out,
           "workers": study.workers_per_trial, "cpus": study.cpus_per_worker, "gpus": study.gpus_per_worker,
           "max_failures": study.max_failures, "in_process": study.in_process, "env": env or {},
           # a trial that fits in its own process holds its worker's CPUs and its driver's share
           "trial_cpus": study.cpus_per_worker + distributed.DRIVER_CPUS,
           "store": store.root, "reuse": reuse}
    # How trials hold resources: a trial that fits in its own process holds them and is
    # restarted by Tune; otherwise it holds a driver's share and its TorchTrainer asks for
    # (and restarts) the workers.
    tune_kw = ({"trial_resources": {"CPU": ctx["trial_cpus"]}, "max_failures": study.max_failures}
               if study.in_process else {})
    conc = max_concurrent or study.max_concurrent
    failed: list[str] = []
    ctx["flats"] = flats = {row.name: {str(seed): study.flat(row, seed, smoke_test) for seed in all_seeds}
                            for row in study.rows}
    best_values: dict[str, dict] = {}  # a search row's best sampled values, once known
    starts: dict[str, str | None] = {}  # a root row's start identity by config hash

    def source(row: Row, seed: int):
        return (row.init_from, seed) if row.init_from else None

    def visible(memo: dict, key: str, compute: Callable[[], str]) -> str | None:
        """``compute()`` once per key; None where a file it reads is not visible from here."""
        if key not in memo:
            try:
                memo[key] = compute()
            except FileNotFoundError:
                memo[key] = None
        return memo[key]

    def root_start(flat: dict) -> str | None:
        """A root row's start identity (its pretrained weights' hash), None where the weights
        file is not visible from this process (e.g. torchvision's cache only on the workers):
        such a row is then matched by its config hash alone."""
        from .models.from_config import start_of

        return visible(starts, config_hash(flat), lambda: start_of(build_config(flat)))

    contexts: dict[str, str | None] = {}  # a config's data and code fingerprints by config hash
    # A row x seed this invocation trained (or reused) counts as finished whatever lineage its
    # trial recorded: the training code may have been edited while the study ran, so that its
    # trials record another code fingerprint than this process computed when it started.
    invocation_start = int(time.time() * 1000)

    def context(flat: dict) -> str | None:
        """A config's :func:`~uda_ray.fingerprint.stage_context`, None where its data is not
        visible from this process (its rows are then matched by config hash alone)."""
        return visible(contexts, config_hash(flat) + flat.get("data.root", ""),
                       lambda: stage_context(build_config(flat)))

    def lineage_of_job(name: str, seed: int, values: dict, start: str | None) -> str | None:
        flat = {**flats[name][str(seed)], **values}
        ctx_ = context(flat)
        return lineage_hash(config_hash(flat), start, ctx_) if start and ctx_ else None

    def finished_run(name: str, seed: int, values: dict):
        """The FINISHED run of row ``name`` x ``seed`` (with ``values`` over its config, a
        search's best) whose lineage is this study's: its config hash over the lineage of
        the finished run of its ``init_from`` row, recursively, or over its start identity."""
        row = study.row(name)
        flat = {**flats[name][str(seed)], **values}
        chash = config_hash(flat)
        if row.init_from:
            parent = finished_run(row.init_from, seed, best_values.get(row.init_from, {}))
            start = parent.data.tags.get("lineage") if parent is not None else None
            if not start:
                return None
        else:
            start = root_start(flat)
        lineage = lineage_of_job(name, seed, values, start)
        if lineage is None:
            return record.finished(name, seed, chash=chash)
        return record.finished(name, seed, lineage=lineage) or record.finished(
            name, seed, chash=chash, selected_since=invocation_start)

    def resolve(job: dict) -> tuple[str, str]:
        """('run', init_from checkpoint or ''), ('skip', '') or ('fail', why) for a row x seed
        (for a search's trials, only its init_from)."""
        row = study.row(job["row"])
        init_from = ""
        if row.init_from:
            src = finished_run(row.init_from, job["seed"], best_values.get(row.init_from, {}))
            if src is None or "checkpoint" not in src.data.tags:
                return "fail", f"its init_from row {row.init_from} has no finished run"
            init_from = src.data.tags["checkpoint"]
            job["start"] = src.data.tags["lineage"]
        else:
            job["start"] = root_start({**flats[row.name][str(job["seed"])], **job["set"]})
        if job.get("search"):
            return "run", init_from
        if (done := finished_run(row.name, job["seed"], job["set"])) is not None:
            print(f"  {row.name} s{job['seed']}: already finished, skipped")
            record.select(done.info.run_id)
            return "skip", ""
        lineage = lineage_of_job(row.name, job["seed"], job["set"], job["start"])
        if reuse == "exact" and (stage := store.get(lineage)) is not None:
            run_id = record.adopt(row.name, job["seed"], {**flats[row.name][str(job["seed"])], **job["set"]},
                                  stage, store, tags=job["tags"])
            print(f"  {row.name} s{job['seed']}: reused stage {lineage} (study {stage.get('study')}, row "
                  f"{stage.get('row')} s{stage.get('seed')}, run {str(stage.get('run_id'))[:8]})")
            return "skip", ""
        return "run", init_from

    jobs = [{"row": row.name, "seed": seed, "after": source(row, seed), "set": {}, "tags": {}}
            for row in study.rows if row.space is None for seed in row_seeds.get(row.name, seeds)]
    searches = [_search_plan(study, row, row_seeds.get(row.name, seeds), smoke_test, record, ctx, source, best_values)
                for row in study.rows if row.space is not None]
    from ._tune_schedule import RowScheduler, search_only_asha

    # ASHA per search row on the objective (sel/, never val/), its trials only
    asha_rows = {s["row"]: s["asha"] for s in searches if s.get("asha")}
    asha = search_only_asha(asha_rows, study.objective, study.mode,
                            on_stop=lambda tid, row, step: record.mark_pruned(tid, step)) if asha_rows else None
    scheduler = RowScheduler(jobs, searches, resolve=resolve, metric=study.objective, mode=study.mode,
                             pruned=asha.pruned if asha else None)
    with distributed.StopOnSignal() as stop:
        grid = distributed.tune_rows(
            drive_trial_with(ctx), search_alg=scheduler, storage_path=storage_path, scheduler=asha,
            name=f"{name}-{time.strftime('%Y%m%d-%H%M%S')}", max_concurrent=conc,
            callbacks=tune_callbacks, **tune_kw)
    for tid, (_, step) in (asha.pruned.items() if asha else ()):
        # every trial's process has ended: its record is completed here, whatever its thread
        # managed to write when it was stopped (or a Train trial, whose thread never learns)
        record.mark_pruned(tid, step, final=True)
    if stop.signal:
        return _interrupted(record, name, stop.signal)
    for r in grid:
        error = r.error if r.error is not None else (r.metrics or {}).get(distributed.ERROR_KEY)
        if error is not None:
            t = r.config.get("trial") or r.config.get("search") or {}
            kind = " search trial" if "search" in r.config else ""
            failed.append(f"{t.get('row')} s{t.get('seed')}{kind}: {error}")
    failed += scheduler.failures
    tallies = [_search_tally(s, record, asha is not None and s["row"] in asha_rows) for s in searches]
    record.finish()
    from .compare import compare_study

    result = compare_study(name, tracking_uri=record.tracking_uri, out_dir=Path(out) / name, claims=study.claims)
    if result_box is not None:
        result_box.append(result)
    print(result.text)
    for line in tallies:
        print(line)
    if failed:
        print("failed trials (recorded as FAILED in MLflow; the other rows went on):")
        for f in failed:
            print(f"  {f}")
    print(closing_message(record, result.files, tracking_uri=tracking_uri))
    return 1 if failed else 0


def _check_reachable(name: str, storage_path: str, store_root: str, tracking_uri: str | None) -> None:
    """On a cluster of several nodes, refuse (before any trial) local paths that the trials
    use but some node cannot see: the storage path (checkpoints, Tune state), the stage store
    and an SQLite MLflow store. The study's lock and Optuna storage are used by this process
    only. A marker written into a local storage path must be visible from every node (a
    shared file system passes).

    Raises:
        StudyError: one line naming the path, the node and what to pass instead.
    """
    import uuid

    from . import distributed

    paths: dict[str, str] = {}
    marker = None
    if "://" not in storage_path:
        Path(storage_path).mkdir(parents=True, exist_ok=True)
        marker = Path(storage_path) / f".uda-ray-visible-{uuid.uuid4().hex[:12]}"
        marker.write_text("written by the study's driver: every node must see it\n")
        paths["storage"] = str(marker)
    if "://" not in store_root:
        Path(store_root).mkdir(parents=True, exist_ok=True)
        paths["store"] = store_root
    db = tracking._sqlite_file(tracking.resolve_uri(tracking_uri))
    if db is not None:
        paths["mlflow"] = str(db.resolve().parent)
    try:
        missing = distributed.unreachable(paths)
    finally:
        if marker is not None:
            marker.unlink(missing_ok=True)
    if not missing:
        return
    what, path, node = missing[0]
    path = str(Path(path).parent) if what == "storage" else path
    fix = {"storage": "pass --storage-path s3://BUCKET/PATH (or a path on a file system every node mounts)",
           "store": "pass --store s3://BUCKET/PATH (or leave UDA_RAY_STORE unset: the store then lives under "
                    "--storage-path)",
           "mlflow": "run an MLflow tracking server (mlflow server --host 0.0.0.0 --backend-store-uri "
                     "sqlite:///... --default-artifact-root s3://...) and pass --tracking-uri http://HEAD:5000"}[what]
    label = {"storage": "storage path", "store": "stage store", "mlflow": "MLflow store"}[what]
    raise StudyError(f"study {name}: the {label} {path} is on this machine's disk and node {node} of this "
                     f"{len(distributed_nodes())}-node cluster cannot see it: {fix}")


def distributed_nodes() -> list:
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def _interrupted(record: StudyRecord, name: str, signum: int) -> int:
    """After SIGINT or SIGTERM stopped the study's trials: its unfinished runs and its parent
    run are KILLED (a re-run continues them); the exit status is 128 + the signal's number."""
    import signal

    sig = signal.Signals(signum).name
    killed = record.stop_unfinished(f"killed: the study was interrupted ({sig}) while this trial ran")
    record.finish("KILLED")
    print(f"study {name}: interrupted ({sig}); {len(killed)} unfinished run(s) and the study's run marked KILLED. "
          f"Run the same command again to finish it: finished rows are kept, stopped ones resume from their "
          f"last checkpoint.", file=sys.stderr)
    return 128 + signum


def closing_message(record: StudyRecord, files: list, *, tracking_uri: str | None = None) -> str:
    """Where a finished study's results are: its table and figures, the MLflow run list (the
    command that serves it and the URL that opens it), the Optuna dashboard of its search rows."""
    name = record.name
    cmd = tracking.ui_command(record.tracking_uri)
    lines = [f"\nResults of study {name}:",
             f"  table, per-seed table, figures: {Path(files[0]).parent if files else '?'}/",
             f"    the same again from MLflow alone:  uda-ray compare {name}"
             + (f" --tracking-uri {tracking_uri}" if tracking_uri else "")]
    if cmd:
        lines.append(f"  MLflow runs (rows, seeds, val/mIoU; grouped by row):  {cmd}")
        lines.append(f"    then open  {record.runs_url()}")
    else:
        lines.append(f"  MLflow runs (rows, seeds, val/mIoU; grouped by row):  {record.runs_url()}")
    tags = record.client.get_run(record.parent_id).data.tags
    if any(k.startswith("search_space.") for k in tags):
        lines.append("    search trials and the study's run:  "
                     + tracking.runs_url(record.tracking_uri, record.experiment_id, view=tracking.SEARCH_VIEW_KEY))
    storage = tags.get("optuna_storage")
    if storage:
        lines.append(f"  Optuna searches:  optuna-dashboard {storage}   (pip install optuna-dashboard)")
    return "\n".join(lines)


def drive_trial_with(ctx: dict):
    from ray import tune

    return tune.with_parameters(drive_trial, ctx=ctx)


def _search_plan(study: Study, row: Row, seeds, smoke: bool, record: StudyRecord, ctx: dict, source,
                 best_values: dict) -> dict:
    """A search row for :class:`uda_ray._tune_schedule.RowScheduler`: its Optuna trials on
    the first seed (those still to run, counting the completed and early-stopped trials kept
    in the study's Optuna storage), its searcher, its early stopping (``asha``: :func:`asha_of`),
    and how to read the best configuration once they end."""
    from . import distributed

    seed = seeds[0]
    n = 2 if smoke else row.num_samples
    storage = f"sqlite:///{Path(ctx['out']) / ctx['study'] / 'optuna.db'}"
    Path(ctx["out"], ctx["study"]).mkdir(parents=True, exist_ok=True)
    optuna_name = f"{ctx['study']}.{row.name}"
    record.client.set_tag(record.parent_id, "optuna_storage", storage)
    keys = sorted(_space_keys(row.space))
    _check_stored_space(row, optuna_name, storage)
    record.client.set_tag(record.parent_id, f"search_space.{row.name}", ",".join(keys))

    def make():
        return distributed.optuna_searcher(row.space, metric=study.objective, mode=study.mode, seed=seed,
                                           num_samples=n, storage=storage, study_name=optuna_name)

    def best():
        import optuna

        done = _completed(optuna_name, storage)
        if not done:
            return None
        top = (max if study.mode == "max" else min)(done, key=lambda t: t.value)
        runs = [r for r in record.children(row=row.name, search="1") if r.info.status == "FINISHED"]
        trial = next((r.data.tags.get("trial", "") for r in runs
                      if all(str(r.data.params.get(k)) == str(v) for k, v in top.params.items())), str(top.number))
        # constants the space derives from the sampled values (e.g. a tied auxiliary weight)
        consts = row.space(optuna.trial.FixedTrial(top.params)) or {}
        best_values[row.name] = {**top.params, **consts}
        return best_values[row.name], trial

    # early stopping (Study.asha): the trials' schedule of evaluations, and the scheduler's rungs
    asha = asha_of(study.asha, ctx["flats"][row.name][str(seed)])
    # trials stopped early count towards num_samples, like completed ones (never towards the best)
    return {"row": row.name, "seed": seed, "after": source(row, seed), "seeds": list(seeds),
            "todo": max(0, n - len(_completed(optuna_name, storage, pruned=True))), "make": make, "best": best,
            "init_from_of": lambda s: source(row, s), "optuna": (optuna_name, storage),
            "iterations": int(ctx["flats"][row.name][str(seed)]["run.iterations"]),
            **({"asha": asha, "set": asha["set"]} if asha else {})}


def _completed(name: str, storage: str, *, pruned: bool = False) -> list:
    """The COMPLETE trials (with a value) of Optuna study ``name``; ``pruned``: and the PRUNED ones."""
    import optuna

    try:
        st = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        return []
    TS = optuna.trial.TrialState
    return [t for t in st.trials if (t.state == TS.COMPLETE and t.value is not None) or
            (pruned and t.state == TS.PRUNED)]


def _search_tally(s: dict, record: StudyRecord, asha: bool) -> str:
    """``search ROW: N trials[, P stopped early by ASHA]`` from the row's Optuna storage (its
    trials of every run of the study), P also the study run's tag ``search_pruned.ROW``."""
    import optuna

    name, storage = s["optuna"]
    trials = _completed(name, storage, pruned=True)
    pruned = sum(t.state == optuna.trial.TrialState.PRUNED for t in trials)
    if asha:
        record.client.set_tag(record.parent_id, f"search_pruned.{s['row']}", str(pruned))
    return f"search {s['row']}: {len(trials)} trials" + (f", {pruned} stopped early by ASHA" if asha else "")


def _check_stored_space(row: Row, name: str, storage: str) -> None:
    """Refuse to continue a search whose stored trials came from another space.

    The completed (and early-stopped) trials in the study's Optuna storage count towards
    ``num_samples`` and compete for the best (or inform the sampler); after an edit of the
    row's space they would be mixed silently with the new space's. Each stored trial's parameters are replayed through the current space
    (enqueued on a throwaway in-memory study, so conditional parameters are asked as the
    space asks them) and its recorded distributions must equal the ones the space gives now.

    Raises:
        UserError: naming the row, the parameter and both distributions.
    """
    import warnings

    import optuna

    from .errors import UserError

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    probe = optuna.create_study()
    for stored in _completed(name, storage, pruned=True):
        probe.enqueue_trial(stored.params, skip_if_exists=False)
        trial = probe.ask()
        with warnings.catch_warnings():  # a stored value outside the edited range: reported below
            warnings.simplefilter("ignore")
            row.space(trial)
        now, then = trial.distributions, stored.distributions
        for key in sorted(set(now) | set(then)):
            if now.get(key) != then.get(key):
                raise UserError(
                    f"search row {row.name}: its Optuna storage {storage.removeprefix('sqlite:///')} holds trials of "
                    f"another search space ({key}: stored {_dist(then.get(key))}, now {_dist(now.get(key))}); "
                    f"give the edited search a new row name, or delete that storage to search anew")


def _dist(d) -> str:
    if d is None:
        return "absent"
    if hasattr(d, "low"):
        return f"{d.low:g}..{d.high:g}{' log' if getattr(d, 'log', False) else ''}"
    return repr(d)


def _space_keys(space: Callable) -> list[str]:
    """The flat keys a define-by-run space suggests (asked of a throwaway in-memory trial)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    st = optuna.create_study()
    trial = st.ask()
    space(trial)
    return list(trial.params)
