"""What a study (or several, in order) would do, before anything runs: ``uda-ray study NAME --plan``.

For every row x seed: **skip** (finished in this study's MLflow record with the same
lineage), **reuse** (the stage store holds its lineage, or a study earlier in the same plan
trains it), or **train** (its iterations, and the time they take at the ``perf/sec_per_iter``
measured by stored stages of the same method, architecture and sizes, where there is one).
A search row's Optuna trials are new stages (their values are not known before they are
sampled; the trials already completed in the study's Optuna storage are not counted); the
best configuration's re-run on the search's own seed is the best trial again (the same
lineage) and is reused, its other seeds train; rows that start from a search row have an
unknown parent until the search ends and are counted as training. With early stopping
(``Study.asha``) a search trial may stop before its iterations: the plan counts the most it
can train, and beside it the least: one trial per search run to its end and every other one
stopped at its grace period (ASHA's first rung; no schedule that judges a trial only after
its grace period can train less). ``asha_all`` (``uda-ray plan --asha``) asks what that least
would be if every search stopped trials early with the default ASHA (``Study.search_asha``)
where its study does not say.

Nothing is started: no Ray, no training, no pretraining. A lineage depends on the pretrained
weights' hash; where the embedded weights are not built yet, a placeholder stands for them,
so stages are still matched within the plan (never against the store). Where the data is not
generated yet, the embedded benchmark's fingerprint is the one it will be generated with.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from .checkpoint import config_hash, lineage_hash
from .config import METHODS, build_config


@dataclass
class Step:
    study: str
    row: str
    seed: int | str
    action: str          # train | reuse | skip | search
    iterations: int      # to train (0 for reuse and skip)
    lineage: str = ""
    source: str = ""     # where a reused or skipped stage comes from
    seconds: float = math.nan
    _asked: int = 0      # iterations asked for when nothing is reused
    least: int | None = None  # a search with early stopping: the fewest iterations it can train


@dataclass
class Plan:
    steps: list[Step] = field(default_factory=list)
    asha_all: bool = False   # planned with uda-ray plan --asha (a what-if)

    def total(self, key: str = "iterations", *, actions=("train", "search")) -> float:
        return sum(getattr(s, key) for s in self.steps if s.action in actions)

    def least(self) -> int:
        """The fewest iterations the plan can train: every search with early stopping at its least."""
        return sum(s.iterations if s.least is None else s.least for s in self.steps if s.action in ("train", "search"))

    @property
    def asked(self) -> int:
        """Iterations the studies ask for when every stage is trained (nothing reused or skipped)."""
        return sum(s._asked for s in self.steps)


def _start(cfg, starts: dict) -> str:
    """A root run's start identity without building anything: the weights' hash where the
    file exists, else a placeholder per weights name (matched within a plan only)."""
    from .checkpoint import SCRATCH, start_identity

    m = cfg.model
    if not m.pretrained:
        return SCRATCH
    key = (m.pretrained, m.arch)
    if key not in starts:
        try:
            if m.pretrained in ("embedded", "embedded_seg"):
                from .pretrain import pretrain_root, weights_file

                path = weights_file(pretrain_root(), m.pretrained)
                if not path.is_file():
                    raise FileNotFoundError(path)
            else:
                from .models.from_config import pretrained_path

                path = pretrained_path(cfg)
            starts[key] = start_identity(m.pretrained, path)
        except Exception:  # noqa: BLE001 - not built, not cached: a placeholder
            starts[key] = f"{m.pretrained}:unbuilt:{m.arch}"
    return starts[key]


def _finished_lineages(name: str, tracking_uri: str | None) -> dict[str, str]:
    """{lineage: run id} of the FINISHED row runs of study ``name``, read without creating a
    store or experiment (an SQLite store that does not exist has none)."""
    from . import tracking

    uri = tracking.resolve_uri(tracking_uri)
    db = tracking._sqlite_file(uri)
    if db is not None and not db.is_file():
        return {}
    client = tracking.mlflow_client(uri)
    exp = client.get_experiment_by_name(name)
    if exp is None:
        return {}
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`uda_ray.kind` = 'row' and "
                              "attributes.status = 'FINISHED'", max_results=10000)
    return {r.data.tags["lineage"]: r.info.run_id for r in runs if r.data.tags.get("lineage")}


def _rate_key(flat: dict) -> tuple:
    return (flat.get("method"), flat.get("model.arch"), flat.get("data.source_w"), flat.get("data.source_h"),
            flat.get("data.batch_size"))


def plan_studies(studies: list, *, smoke: bool = False, tracking_uri: str | None = None, store_root: str | None = None,
                 storage_path: str | None = None, reuse: str = "exact", variant: str | None = None,
                 with_mlflow: bool = True, asha_all: bool = False) -> Plan:
    """The plan of running ``studies`` one after the other (see the module)."""
    from .fingerprint import code_fingerprint, data_fingerprint_planned
    from .store import StageStore, default_root

    store = StageStore(store_root or default_root(storage_path))
    stored = {}
    rates: dict[tuple, list[float]] = {}
    for meta in store.stages():
        if meta.get("complete"):
            stored[meta["lineage"]] = meta
            if meta.get("sec_per_iter") and meta.get("config"):
                rates.setdefault(_rate_key(meta["config"]), []).append(float(meta["sec_per_iter"]))
    planned: dict[str, str] = {}   # lineage -> "study/row sSEED" trained earlier in this plan
    starts: dict = {}
    code = code_fingerprint()
    plan = Plan(asha_all=asha_all)
    for study in studies:
        study = study.variant(variant) if variant and variant in study.variants else study
        name = study.name + ("-smoke" if smoke else "")
        done = _finished_lineages(name, tracking_uri) if with_mlflow else {}
        seeds = study.seeds[:1] if smoke else study.seeds
        lineages: dict[tuple, str | None] = {}
        for stage in study.stages():
            for row in stage:
                for seed in seeds:
                    flat = study.flat(row, seed, smoke)
                    cfg = build_config(flat)
                    # a method that trains nothing (AdaBN re-estimates BatchNorm statistics) runs no
                    # iterations whatever run.iterations says, as the engine does
                    iters = int(flat["run.iterations"]) if METHODS[cfg.method].trains else 0
                    rate = rates.get(_rate_key(flat))
                    sec = (sum(rate) / len(rate)) if rate else math.nan
                    if row.space is not None and seed == seeds[0]:
                        n = 2 if smoke else row.num_samples
                        trials = n - _completed_trials(study, row, name, smoke)
                        own = study.search_asha(flat) is not None  # the study stops trials early itself
                        spec = study.search_asha(flat, default=asha_all) if trials > 0 else None
                        s = Step(name, f"{row.name} (search: {trials} trials)", seed, "search", trials * iters,
                                 seconds=trials * iters * sec)
                        if spec:
                            # one trial to its end (none if the search already has a finished one), the
                            # others stopped at the grace period
                            full = iters if trials == n else 0
                            s.least = full + (trials - (1 if full else 0)) * spec["grace_period"]
                            s.source = (f"at most: ASHA stops trials that fall behind; at least {s.least}"
                                        if own else f"in full (the study stops no trial early); "
                                                           f"with --asha at least {s.least}")
                        s._asked = n * iters
                        plan.steps.append(s)
                    if row.init_from:
                        parent = lineages.get((row.init_from, seed))
                    else:
                        parent = _start(cfg, starts)
                    if row.space is not None or parent is None:
                        lineages[(row.name, seed)] = None
                        if row.space is not None and seed == seeds[0] and reuse == "exact":
                            s = Step(name, row.name, seed, "reuse", 0, source="the search's best trial")
                        else:
                            s = Step(name, row.name, seed, "train", iters, seconds=iters * sec,
                                     source="lineage known once its parent " + (row.init_from or "") + " is chosen")
                        s._asked = iters
                        plan.steps.append(s)
                        continue
                    lin = lineage_hash(config_hash(flat), parent, f"{data_fingerprint_planned(cfg)}|{code}")
                    lineages[(row.name, seed)] = lin
                    if lin in done:
                        s = Step(name, row.name, seed, "skip", 0, lin, source=f"finished here (run {done[lin][:8]})")
                    elif reuse == "exact" and lin in stored:
                        m = stored[lin]
                        s = Step(name, row.name, seed, "reuse", 0, lin,
                                 source=f"study {m.get('study')}, {m.get('row')} s{m.get('seed')}, run "
                                        f"{str(m.get('run_id'))[:8]}")
                    elif reuse == "exact" and lin in planned:
                        s = Step(name, row.name, seed, "reuse", 0, lin, source=f"trained above by {planned[lin]}")
                    else:
                        s = Step(name, row.name, seed, "train", iters, lin, seconds=iters * sec)
                        planned.setdefault(lin, f"{name}/{row.name} s{seed}")
                    s._asked = iters
                    plan.steps.append(s)
    return plan


def _completed_trials(study, row, name: str, smoke: bool) -> int:
    """Completed trials in the study's Optuna storage (counted towards num_samples)."""
    db = Path("runs", name, "optuna.db")
    if not db.is_file():
        return 0
    try:
        import optuna

        st = optuna.load_study(study_name=f"{name}.{row.name}", storage=f"sqlite:///{db.resolve()}")
        done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
        return sum(t.state in done for t in st.trials)  # as the study counts them towards num_samples
    except Exception:  # noqa: BLE001 - no Optuna here, or no such study in the storage
        return 0


def format_plan(plan: Plan, *, per_step: bool = True) -> str:
    def hms(sec: float) -> str:
        return "?" if not math.isfinite(sec) else f"{sec / 60:.0f} min" if sec >= 60 else f"{sec:.0f} s"

    lines = []
    if per_step:
        lines.append(f"{'study':<22} {'row':<34} {'seed':>4}  {'action':<6} {'iterations':>10}  {'time':>8}  "
                     f"{'lineage':<16}  from")
        for s in plan.steps:
            lines.append(f"{s.study:<22} {s.row:<34} {str(s.seed):>4}  {s.action:<6} {s.iterations:>10}  "
                         f"{hms(s.seconds) if s.action in ('train', 'search') else '':>8}  {s.lineage or '-':<16}  "
                         f"{s.source}")
    train = plan.total()
    n = {a: sum(1 for s in plan.steps if s.action == a) for a in ("train", "search", "reuse", "skip")}
    known = [s.seconds for s in plan.steps if s.action in ("train", "search") and math.isfinite(s.seconds)]
    unknown = sum(1 for s in plan.steps if s.action in ("train", "search") and not math.isfinite(s.seconds))
    lines.append(f"\ntotal: {train} iterations to train of {plan.asked} asked "
                 f"({100 * train / plan.asked:.0f}%)" if plan.asked else "\ntotal: nothing asked")
    lines.append(f"  {n['train']} row x seed runs to train, {n['search']} searches, {n['reuse']} reused, "
                 f"{n['skip']} finished already")
    if n["search"] and plan.asked:
        trials = plan.total(actions=("search",))
        stopping = [s for s in plan.steps if s.action == "search" and s.least is not None]
        lines.append(f"  search trials: {trials} of the {train} ({100 * trials / plan.asked:.1f}% of asked); "
                     f"without them {train - trials} ({100 * (train - trials) / plan.asked:.1f}%)")
        if stopping:
            least = plan.least()
            what = "as if every search stopped trials early (--asha)" if plan.asha_all else "early stopping"
            lines.append(f"  {what} ({len(stopping)} of {n['search']} searches): at least {least} "
                         f"({100 * least / plan.asked:.1f}%), one trial per search to its end and the others "
                         f"stopped at their grace period")
    if known:
        lines.append(f"  estimated time: {hms(sum(known))} one trial at a time (at the perf/sec_per_iter of stored "
                     f"stages of the same method and sizes)"
                     + (f", plus {unknown} runs of unknown speed (no such stage stored)" if unknown else ""))
    elif unknown:
        lines.append(f"  estimated time: unknown (no stored stage of these methods and sizes has a measured "
                     f"perf/sec_per_iter yet)")
    return "\n".join(lines)


def referenced_lineages(tracking_uri: str | None) -> set[str]:
    """The lineages that some study's row or search-trial run of this MLflow store holds (its
    own stage, or the parent it started from): what ``uda-ray store gc`` keeps."""
    from . import tracking

    uri = tracking.resolve_uri(tracking_uri)
    db = tracking._sqlite_file(uri)
    if db is not None and not db.is_file():
        return set()
    client = tracking.mlflow_client(uri)
    keep: set[str] = set()
    for exp in client.search_experiments(max_results=10000):
        for r in client.search_runs([exp.experiment_id], filter_string="tags.lineage != ''", max_results=50000):
            keep.add(r.data.tags["lineage"])
            if r.data.tags.get("parent_lineage"):
                keep.add(r.data.tags["parent_lineage"])
    return keep


def trained(name: str, tracking_uri: str | None) -> dict:
    """What a study's runs actually trained, read from MLflow (``uda-ray plan NAME --trained``):
    per row (a search row's trials apart), the iterations trained (each run's last logged
    training step, or the step its ``pruned`` tag names), and the runs reused from the stage
    store or stopped early. Runs that trained nothing (reused ones) count 0."""
    from . import tracking

    client = tracking.mlflow_client(tracking.resolve_uri(tracking_uri))
    exp = client.get_experiment_by_name(name)
    if exp is None:
        from .errors import UserError

        raise UserError(f"{name}: no such study in the MLflow store {tracking.resolve_uri(tracking_uri)}")
    out: dict[str, dict] = {}
    for r in client.search_runs([exp.experiment_id], filter_string="tags.`uda_ray.kind` != 'study'",
                                max_results=50000):
        t = r.data.tags
        row = (t.get("row") or t.get("search_row") or "?") + (" (search trials)" if t.get("search") == "1" else "")
        acc = out.setdefault(row, {"runs": 0, "iterations": 0, "reused": 0, "pruned": 0})
        acc["runs"] += 1
        if t.get("reused"):
            acc["reused"] += 1
            continue
        if t.get("pruned"):
            acc["pruned"] += 1
            acc["iterations"] += int(t["pruned"])
            continue
        losses = [k for k in r.data.metrics if k.startswith("loss/")]
        acc["iterations"] += max((m.step for k in losses[:1] for m in client.get_metric_history(r.info.run_id, k)),
                                 default=0)
    return out


def format_trained(name: str, rows: dict) -> str:
    lines = [f"study {name}: what its runs trained (MLflow)", f"{'row':<34} {'runs':>5} {'iterations':>10} "
             f"{'reused':>6} {'pruned':>6}"]
    for row, a in sorted(rows.items()):
        lines.append(f"{row:<34} {a['runs']:>5} {a['iterations']:>10} {a['reused']:>6} {a['pruned']:>6}")
    lines.append(f"{'total':<34} {sum(a['runs'] for a in rows.values()):>5} "
                 f"{sum(a['iterations'] for a in rows.values()):>10} {sum(a['reused'] for a in rows.values()):>6} "
                 f"{sum(a['pruned'] for a in rows.values()):>6}")
    return "\n".join(lines)
