"""The training engine: one iteration-based loop that every method plugs into.

The engine owns iteration, learning-rate schedules, evaluation on target val,
checkpoints and reporting; a method (``uda_ray.methods``) owns its update step. The same
:func:`fit` runs as a plain process and inside Ray Train workers: distributed state comes
from ``torch.distributed`` when it is initialised, and reporting goes through the
``tracker`` and ``on_checkpoint`` arguments.

Speed: the hot loop stays on the device. Losses are accumulated on the device and read
back only every :func:`log_interval` steps (``run.log_every``, or often enough for 20 points
on a short run; the only host sync), which is also when the non-finite guard looks at them; bf16 autocast and channels_last apply on CUDA (and on the
CPU with ``run.cpu_amp``); ``run.compile`` compiles the segmenter.
"""

from __future__ import annotations

import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from .checkpoint import (checkpoint_path, claim_run_dir, lineage_of, load_checkpoint_file, mark_diverged,
                         restore_checkpoint, save_checkpoint)
from .config import METHODS, Config, ConfigError
from .context import Context, numerics
from .errors import UserError
from .data import JointTransform, PairedBatches, build_dataset, eval_loader, train_loader
from .evaluation import ConfusionMatrix, Scores, predict, summarize
from .models import build_segmenter
from .models.from_config import start_of
from .mosaic import mosaic_png
from .progress import fit_postfix, loss_postfix


class NonFiniteLoss(UserError, RuntimeError):
    """A loss became NaN or infinite: the run stops rather than train on garbage (and is
    marked diverged); the user lowers the learning rate or the loss weights."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"run.device: {name!r} requested but CUDA is not available")
    return torch.device(name)


def compile_segmenter(model: torch.nn.Module) -> torch.nn.Module:
    """``run.compile``: compile each part of the segmenter in place (``nn.Module.compile``,
    state-dict keys unchanged): the backbone, each head and each decoder block, so that the
    methods that call ``model.backbone`` and ``model.heads[...]`` directly (DAST, JAL's
    transferred decoders) run compiled code too. A deep copy (a method's frozen generator)
    is an uncompiled module."""
    for child in model.children():
        parts = child.children() if isinstance(child, (torch.nn.ModuleDict, torch.nn.ModuleList)) else [child]
        for m in parts:
            m.compile()
    return model


def setup_method(cfg: Config, ctx: Context, model: torch.nn.Module):
    """The method of ``cfg`` on ``model`` with the context's memory format and, with
    ``run.compile``, the segmenter compiled (after the method is built: copies it makes of
    the model stay eager)."""
    if ctx.channels_last:
        model = model.to(memory_format=torch.channels_last)
    method = METHODS[cfg.method](cfg, model, ctx)
    if cfg.run.compile:
        compile_segmenter(model)
    return method


def dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _dir(cfg: Config, which: str) -> Path:
    d = Path(getattr(cfg.data, f"{which}_dir"))
    return d if d.is_absolute() else Path(cfg.data.root) / d


def ensure_data(cfg: Config) -> None:
    """Generate the embedded benchmark on first use when the config asks for it (``data.synth``,
    set by the tiny-cpu and study-cpu presets only), at ``data.root`` made absolute. A benchmark
    already there is the user's data: it is used as it is whatever its image counts, and refused
    (one line naming what differs) when its seed, regime, version or image sizes are not the
    config's, never regenerated. A folder there that holds anything the generator did not write
    is refused, never written into. Then the embedded pretrained weights ``model.pretrained``
    names, if it names them (in uda-ray's cache, :mod:`uda_ray.cache`). Nothing is written
    beside the data folder: the lock of concurrent trials is in the cache too."""
    if not cfg.data.synth:
        return
    _ensure_benchmark(cfg)
    if cfg.model.pretrained in ("embedded", "embedded_seg"):
        from .pretrain import embedded_weights

        embedded_weights(cfg)


# How a field of synth.json is set in the config, for the one-line refusal of a benchmark
# generated otherwise (the others are the generator's own: another uda-ray version wrote it).
_SYNTH_KEYS = {"seed": ("data.synth_seed", "--seed"), "regime": ("data.synth_regime", "--regime")}


def _mismatch_message(e, cfg: Config) -> str:
    have = e.have
    was = [f"seed {have.get('seed')!r}", f"regime {have.get('regime')!r}"]
    asked, flags, back = [], [], []
    for field, h, w in e.diffs:
        if field in _SYNTH_KEYS:
            key, flag = _SYNTH_KEYS[field]
            asked.append(f"{key} {w!r}")
            flags.append(f"{flag} {w}")
            back.append(f"{key}={h}")
        elif field != "shift":  # a regime's shift is said by its name
            if field not in ("seed", "regime"):
                was.append(f"{field} {h!r}")
            asked.append(f"{field} {w!r} (this uda-ray's generator)")
    if not asked:  # the same named regime with another shift: an older calibration of it
        was.append(f"shift {have.get('shift')!r}")
        asked.append(f"regime {cfg.data.synth_regime!r} as this uda-ray defines it")
    use = f", or set {' '.join(back)} to use this one" if back and len(back) == len(asked) else ""
    return (f"data.root: {e.out} holds the embedded benchmark generated with {', '.join(was)}; the config asks "
            f"for {', '.join(asked)}; it is kept as it is: generate the other one elsewhere with uda-ray data "
            f"synth --out DIR{''.join(' ' + f for f in flags)} and set data.root=DIR{use}")


def _ensure_benchmark(cfg: Config) -> None:
    import fcntl

    from .cache import lock_file
    from .data import synth
    from .data.io import DatasetError

    root = Path(cfg.data.root).resolve()
    # Concurrent trials on one machine: one generates, the others wait for it. The lock is in
    # uda-ray's cache, keyed by the root's path: nothing is written beside the user's folder.
    with open(lock_file(root), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            synth.ensure_benchmark(root, seed=cfg.data.synth_seed, regime=cfg.data.synth_regime)
        except synth.SynthArgumentError as e:
            raise ConfigError(f"data.synth_regime: {e}") from None
        except synth.BenchmarkMismatch as e:
            raise ConfigError(_mismatch_message(e, cfg)) from None
        except DatasetError as e:
            raise ConfigError(f"data.root: {e} (data.synth is true: set data.synth=false to use the data "
                              "there)") from None


def carve(n: int, k: int, seed: int) -> tuple[list[int], list[int]]:
    """Split indices 0..n-1 into a seeded random subset of size k and the rest (both sorted)."""
    if k >= n:
        raise ConfigError(f"cannot carve {k} of {n} images: keep at least one for training")
    perm = np.random.default_rng(seed).permutation(n)
    return sorted(perm[:k].tolist()), sorted(perm[k:].tolist())


def build_datasets(cfg: Config) -> dict:
    """The datasets of a config: ``source`` (labelled), ``target`` (unlabelled target train),
    ``target_eval`` (the same images at the eval size, for proxy-label passes), ``val`` (the
    reported split) and, when configured, ``sel`` and ``src_val``.

    Honest selection: ``sel`` is ``data.select_n`` labelled images drawn (seeded) from the
    target *training* split and removed from the unlabelled adaptation set, so choosing a
    snapshot or a trial never looks at ``val``, the split that is reported. ``src_val`` is
    held out of the source set for the label-free ``src/mIoU`` criterion.
    """
    d = cfg.data
    aug = dict(scale=(d.scale_min, d.scale_max), flip=d.flip, norm=d.norm,
               crop=(d.crop_w, d.crop_h) if d.crop_w else None)
    src_eval_t = JointTransform(size=(d.source_w, d.source_h), norm=d.norm, resize_label=False)
    tgt_eval_t = JointTransform(size=(d.target_w, d.target_h), norm=d.norm, resize_label=False)
    out = {}
    src = build_dataset(d.source, _dir(cfg, "source"), split=d.source_split, num_classes=d.num_classes,
                        transform=JointTransform(size=(d.source_w, d.source_h), **aug))
    if d.source_val_n:
        held, rest = carve(len(src), d.source_val_n, d.select_seed + 1)
        out["src_val"] = src.subset(held, transform=src_eval_t)
        src = src.subset(rest)
    out["source"] = src
    tgt = build_dataset(d.target, _dir(cfg, "target"), split=d.target_split, num_classes=d.num_classes,
                        labels=bool(d.select_n), transform=JointTransform(size=(d.target_w, d.target_h), **aug))
    if d.select_n:
        sel, rest = carve(len(tgt), d.select_n, d.select_seed)
        out["sel"] = tgt.subset(sel, transform=tgt_eval_t)
        # the adaptation images at the eval size (proxy-label passes); their labels, when
        # read, only measure proxy precision
        out["target_eval"] = tgt.subset(rest, transform=tgt_eval_t)
        tgt = tgt.subset(rest, labels=False)
    else:
        out["target_eval"] = tgt.subset(range(len(tgt)), transform=tgt_eval_t)
    out["target"] = tgt
    out["val"] = build_val_dataset(cfg)
    return out


def build_val_dataset(cfg: Config):
    """The reported split (``data.val_split`` of the target) at the evaluation size: all that
    ``uda-ray eval`` reads, so evaluating needs neither the source nor the target train split."""
    d = cfg.data
    return build_dataset(d.target, _dir(cfg, "target"), split=d.val_split, num_classes=d.num_classes,
                         transform=JointTransform(size=(d.target_w, d.target_h), norm=d.norm, resize_label=False))


def poly_lr(base: float, step: int, horizon: int, power: float) -> float:
    return base * (1 - min(step, horizon) / horizon) ** power if horizon > 0 else base


# --- evaluation -------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(method, dataset, ctx: Context, *, max_images: int = 0, mosaic: int = 0,
             progress: bool = False, entropy: bool = False,
             label: str | None = None) -> tuple[Scores, list, float | None]:
    """Scores on a labelled split: predict at the training size, upsample the logits to the
    label's full size, accumulate one confusion matrix (summed over DDP ranks). Streams one
    image at a time in bounded memory.

    Returns the scores, up to ``mosaic`` (image, label, prediction, extra maps) rows, and with
    ``entropy`` the mean normalised prediction entropy (a label-free criterion: it reads
    the softmax, never the labels). ``label``: the progress bar's name of the split (``val``,
    ``sel``, ``src``; default: the dataset's split, e.g. ``train`` for the selection images,
    which are carved out of the target's train split).
    """
    model = method.model
    was_training = model.training
    model.eval()
    cm = ConfusionMatrix(dataset.num_classes, device=ctx.device, validate=False)
    ent = torch.zeros(2, dtype=torch.float64, device=ctx.device)  # sum, pixels
    loader = eval_loader(dataset, batch_size=1, rank=ctx.rank, world_size=ctx.world_size,
                         num_workers=min(2, ctx.cfg.run.num_workers))
    triplets = []
    it = loader
    if progress:
        from tqdm import tqdm

        it = tqdm(loader, desc=f"eval {label or getattr(dataset, 'split', '')}".rstrip(), leave=False, unit="img",
                  total=min(len(loader), max_images) if max_images else len(loader), dynamic_ncols=True)
    for i, batch in enumerate(it):
        if max_images and i * ctx.world_size + ctx.rank >= max_images:
            break
        b = ctx.to_device(batch)
        logits = method.predict(b["image"])
        if entropy:
            logp = torch.log_softmax(logits.float(), dim=1)
            h = -(logp.exp() * logp).sum(1) / math.log(logits.shape[1])
            ent += torch.stack([h.sum().double(), torch.tensor(h.numel(), dtype=torch.float64, device=h.device)])
        pred = predict(logits, b["label"].shape[-2:], chunk_size=None)
        cm.update(pred, b["label"])
        if len(triplets) < mosaic:
            maps = {k: v[0].float().clamp(0, 1).cpu() for k, v in method.mosaic_maps(b["image"]).items()}
            triplets.append((batch["image"][0], batch["label"][0], pred[0].cpu(), maps))
    matrix = cm.matrix
    if ctx.world_size > 1:
        dist.all_reduce(matrix)
        dist.all_reduce(ent)
    model.train(was_training)
    mean_entropy = (ent[0] / ent[1]).item() if entropy and ent[1] > 0 else None
    return summarize(matrix, str(dataset.num_classes)), triplets, mean_entropy


def evaluate_all(method, data: dict, ctx: Context, *, mosaic: int = 0,
                 progress: bool = False) -> tuple[dict, Scores, list]:
    """Every evaluation of a checkpoint, by prefix: ``val/`` (the reported split, per class),
    ``sel/`` (the selection split, what studies choose on), ``tgt/entropy`` (label-free, on
    the selection images) and ``src/`` (label-free w.r.t. the target: held-out source).
    ``progress``: a bar per split (on rank 0)."""
    run = ctx.cfg.run
    bar = progress and ctx.rank == 0
    if ctx.world_size > 1:
        sync_buffers(method, ctx.world_size)
    scores, triplets, _ = evaluate(method, data["val"], ctx, max_images=run.max_val_images, mosaic=mosaic,
                                   progress=bar, label="val")
    metrics = scores.as_dict("val/")
    if "sel" in data:
        sel, _, ent = evaluate(method, data["sel"], ctx, entropy=True, progress=bar, label="sel")
        metrics.update(sel.as_dict("sel/", per_class=False))
        metrics["tgt/entropy"] = ent
    if "src_val" in data:
        src, _, _ = evaluate(method, data["src_val"], ctx, progress=bar, label="src")
        metrics.update(src.as_dict("src/", per_class=False))
    return metrics, scores, triplets


# --- multi-worker (DDP) -----------------------------------------------------------------------
# Methods own their steps and call several backward passes and optimizers per iteration
# (segmenter and discriminators), so instead of wrapping modules in DDP the engine averages
# gradients in a step pre-hook on every optimizer: the methods run unchanged on one process
# or many, and every optimizer's parameters stay identical across ranks.

def _average_grads(params: list, world: int) -> None:
    for p in params:
        if p.grad is None:  # keep the flattened layout identical on every rank
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    flat /= world
    for g, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
        g.copy_(synced)


def distribute(method, world: int) -> None:
    """Make a method's optimizers average gradients over the ranks before each step, and
    start every rank from rank 0's weights."""
    for so in method.optimizers().values():
        params = [p for g in so.optimizer.param_groups for p in g["params"]]
        so.optimizer.register_step_pre_hook(lambda opt, args, kwargs, ps=params: _average_grads(ps, world))
    for m in method.modules().values():
        for t in [*m.parameters(), *m.buffers()]:
            dist.broadcast(t.data, src=0)


def sync_buffers(method, world: int) -> None:
    """Average BatchNorm running statistics over ranks (each rank saw its own batches)."""
    for m in method.modules().values():
        for name, buf in m.named_buffers():
            if buf.is_floating_point():
                dist.all_reduce(buf.data)
                buf.data /= world


# --- the loop ---------------------------------------------------------------------------------

@dataclass
class RunResult:
    run_dir: Path
    step: int
    scores: Scores | None
    metrics: dict = field(default_factory=dict)
    seconds: float = 0.0
    phases: dict = field(default_factory=dict)  # seconds by phase (see :class:`Phases`)


class Phases:
    """Wall seconds of a fit by phase, logged as ``perf/<phase>_s`` at its end, so that a
    study can account for its time (``uda-ray bench study``): ``setup`` (device, data,
    model, restore), ``prepare`` (a method's pass before training, e.g. AdaBN's statistics),
    ``proxy`` (proxy-label generation and other work at phase starts), ``train`` (the
    training steps alone), ``eval``, ``checkpoint`` (saving and reporting it) and
    ``reports`` (per-class table, mosaic). ``fit_start_unix`` / ``fit_end_unix`` place the
    fit in a trial's wall time."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.start_unix = time.time()

    def add(self, name: str, t0: float) -> float:
        """Add the time since ``t0`` (a ``perf_counter``) to ``name``; returns now."""
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - t0
        return now

    def metrics(self) -> dict[str, float]:
        return {**{f"perf/{k}_s": v for k, v in self.seconds.items()},
                "perf/fit_start_unix": self.start_unix, "perf/fit_end_unix": time.time()}


class NullTracker:
    """Tracking that records nothing (the engine's default outside the CLI)."""

    def log_params(self, params: dict) -> None: ...
    def set_tags(self, tags: dict) -> None: ...
    def log_metrics(self, metrics: dict, step: int) -> None: ...
    def log_artifact(self, path: Path, subdir: str | None = None) -> None: ...
    def log_image(self, path: Path, key: str, step: int) -> None: ...
    def finish(self, status: str = "FINISHED") -> None: ...


def fit(cfg: Config, *, run_dir: str | Path | None = None, tracker=None, progress: bool = False,
        on_checkpoint: Callable[[Path, dict], None] | None = None, resume_from: dict | None = None,
        overwrite: bool = False, stop_at: int = 0) -> RunResult:
    """Train (or, for methods that do not train, prepare) and evaluate one config.

    Args:
        cfg: the validated config.
        run_dir: where checkpoints and artifacts go (default ``run.out/<run name>``); an
            existing ``checkpoints/last.pt`` there is resumed if it is of the same lineage
            (:func:`~uda_ray.checkpoint.lineage_of`, recorded in every checkpoint and as the
            tracker's ``lineage``, ``parent_lineage`` and ``parent_run_id`` tags).
        tracker: receives params, tags, metrics and artifacts (rank 0 only); or a callable
            ``tracker(run_dir) -> tracker``, called on rank 0 only once ``run_dir`` is claimed,
            so that a refused run dir (another config, in use, diverged) opens no tracker run
            and never touches the run that owns it.
        on_checkpoint: called with (checkpoint path, metrics) after each checkpoint (Ray
            Train reports through it).
        resume_from: a loaded checkpoint to resume instead of ``run_dir``'s.
        overwrite: remove an earlier run's checkpoint and files from ``run_dir`` first.
        stop_at: stop after this step with a checkpoint, as a killed run would (0 = run to
            the end): a time-boxed job, or a test that resumes the same config. The result
            then has no scores.

    Raises:
        CheckpointError: ``run_dir`` is in use by another process, holds a checkpoint of
            another config or another lineage (started from another checkpoint or other
            weights), or holds a run that diverged (:func:`~uda_ray.checkpoint.claim_run_dir`).
        NonFiniteLoss: a loss became NaN or infinite; ``run_dir`` is then marked diverged
            and is never resumed.
    """
    rank, _ = dist_info()
    run_dir = Path(run_dir or Path(cfg.run.out) / cfg.run_name)
    lock, lineage = None, {}
    if rank == 0:  # the one process that writes the run directory owns it
        # (the embedded weights a root run hashes are built here on first use)
        lineage = lineage_of(cfg, start=None if cfg.run.init_from else start_of(cfg))
        lock, resume_from = claim_run_dir(run_dir, cfg, overwrite=overwrite, resume_state=resume_from,
                                          lineage=lineage)
    try:
        if tracker is not None and not hasattr(tracker, "log_params"):  # a factory
            tracker = tracker(run_dir) if rank == 0 else None
        return _fit(cfg, run_dir, tracker, progress, on_checkpoint, resume_from, stop_at, lineage)
    except NonFiniteLoss as e:
        if rank == 0:
            mark_diverged(run_dir, str(e))
        raise
    finally:
        if lock is not None:
            lock.release()


def _fit(cfg: Config, run_dir: Path, tracker, progress: bool, on_checkpoint, resume_from: dict | None,
         stop_at: int, lineage: dict) -> RunResult:
    t_start = time.perf_counter()
    phases = Phases()
    rank, world = dist_info()
    device = resolve_device(cfg.run.device)
    is_cuda = device.type == "cuda"
    if is_cuda:
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    tracker = tracker if (tracker is not None and rank == 0) else NullTracker()
    if rank == 0:
        (run_dir / "config.yaml").write_text(cfg.to_yaml())

    seed_everything(cfg.run.seed)
    if rank == 0:
        ensure_data(cfg)
    if world > 1:
        dist.barrier()
    data = build_datasets(cfg)
    if rank == 0:  # the val split is read only at evaluation: find its damage before training
        from .data.check import require_clean

        require_clean(data["val"], what="target val split", workers=cfg.run.num_workers)
    amp, channels_last = numerics(cfg, device)
    ctx = Context(cfg, device, amp=amp, channels_last=channels_last, rank=rank, world_size=world,
                  target_batches_per_epoch=max(1, len(data["target"]) // (cfg.data.batch_size * world)),
                  run_dir=run_dir, tracker=tracker)
    # the lineage every checkpoint of this run records, with the MLflow run that wrote it
    ctx.lineage = {**lineage, "run_id": getattr(tracker, "run_id", "") or ""} if rank == 0 else {}
    method = setup_method(cfg, ctx, build_segmenter(cfg, device))
    if rank == 0:  # a step that cannot fit is refused in one line, before a batch is read
        from .memory import check_step_memory

        check_step_memory(cfg, method, ctx)

    start = 0
    state = resume_from
    if state is None and checkpoint_path(run_dir).is_file():
        state = load_checkpoint_file(checkpoint_path(run_dir))
    if state is not None:
        start = restore_checkpoint(state, method)
    if world > 1:
        distribute(method, world)

    tracker.log_params(cfg.flat())
    tracker.set_tags({**run_tags(cfg, method, data), **{k: v for k, v in lineage.items() if k != "parent" and v},
                      # a run that went on from a checkpoint (a restarted trial, a killed node): from where
                      **({"resumed_from_step": str(start)} if start and method.trains else {})})

    iters = cfg.run.iterations if method.trains else 0
    horizon = cfg.run.schedule_iterations or cfg.run.iterations
    bs, nw = cfg.data.batch_size, cfg.run.num_workers
    pin = is_cuda

    def tgt_loader(start_pos):
        return train_loader(data["target"], batch_size=bs, seed=cfg.run.seed * 2 + 1, start=start_pos,
                            rank=rank, world_size=world, num_workers=nw, pin_memory=pin)

    t = phases.add("setup", t_start)
    if start == 0 or not method.trains:
        method.prepare(map(ctx.to_device, tgt_loader(0)))
    phases.add("prepare", t)

    metrics: dict = {}
    scores = None
    halt = min(iters, stop_at) if stop_at else iters
    if iters > start:
        bar = None
        if progress and rank == 0:
            from tqdm import tqdm

            bar = tqdm(total=iters, initial=start, desc=cfg.run_name, unit="it", dynamic_ncols=True)
        # Phases (e.g. rounds of self-training on regenerated proxy labels): each phase gets
        # fresh loaders at the same sampler positions, so batches depend on the step only.
        bounds = sorted({b for b in method.phases(iters) if 0 <= b < iters} | {0}) + [iters]
        for k, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
            if start >= b:
                continue
            if a >= halt:
                break
            s = max(start, a)
            t = time.perf_counter()
            tgt_set = method.begin_phase(k, s, data) or data["target"]
            phases.add("proxy", t)
            pairs = PairedBatches(
                train_loader(data["source"], batch_size=bs, seed=cfg.run.seed * 2, start=s * bs * world,
                             rank=rank, world_size=world, num_workers=nw, pin_memory=pin)
                if method.needs_source else None,
                train_loader(tgt_set, batch_size=bs, seed=cfg.run.seed * 2 + 1, start=s * bs * world,
                             rank=rank, world_size=world, num_workers=nw, pin_memory=pin)
                if method.needs_target else None)
            scores, metrics = _loop(cfg, method, ctx, pairs, data, s, min(b, halt), iters, horizon, run_dir,
                                    tracker, bar, on_checkpoint, phases)
        if bar is not None:
            bar.close()
        if halt < iters:  # stopped early on request: resumable, not evaluated
            return RunResult(run_dir, halt, None, {}, time.perf_counter() - t_start, phases.seconds)
    if scores is None:  # nothing trained here (a method that does not train, or a finished run)
        t = time.perf_counter()
        metrics, scores, triplets = evaluate_all(method, data, ctx, mosaic=cfg.run.mosaic_images, progress=progress)
        tracker.log_metrics(metrics, step=max(iters, start))
        t = phases.add("eval", t)
        _final_reports(cfg, method, scores, triplets, run_dir, tracker, step=max(iters, start))
        t = phases.add("reports", t)
        path = checkpoint_path(run_dir)
        if not method.trains or iters == 0:  # e.g. AdaBN, or evaluating an init_from checkpoint
            if rank == 0:
                save_checkpoint(path, method, 0, cfg, extra={"metrics": metrics}, lineage=ctx.lineage)
            if on_checkpoint is not None:
                on_checkpoint(path, {"step": 0, **metrics})
        elif on_checkpoint is not None:
            # a run resumed after its last step (its process was stopped before it was recorded
            # as finished): its final checkpoint is reported again, so that a continued row
            # records its checkpoint as any other and its dependents can start from it
            on_checkpoint(path, {"step": start, **metrics})
        phases.add("checkpoint", t)
    seconds = time.perf_counter() - t_start
    # for overhead accounting (uda-ray bench study)
    tracker.log_metrics({"perf/fit_seconds": seconds, **phases.metrics()}, step=max(iters, start))
    return RunResult(run_dir, max(iters, start), scores, metrics, seconds, phases.seconds)


def scheduled_lr(so, step: int, horizon: int, power: float, batches_per_epoch: int) -> float:
    """The learning rate of a :class:`~uda_ray.methods.ScheduledOptimizer` at ``step``."""
    if so.schedule == "poly":
        return poly_lr(so.base_lr, step, horizon, power)
    if so.schedule == "poly_epoch":
        epochs = max(1, math.ceil(horizon / batches_per_epoch))
        return poly_lr(so.base_lr, step // batches_per_epoch, epochs, power)
    if so.schedule == "const":
        return so.base_lr
    raise ValueError(f"unknown learning-rate schedule {so.schedule!r}; expected poly, poly_epoch or const")


def log_interval(run) -> int:
    """Steps between loss logs: ``run.log_every``, but at least 20 points over the run, so that
    a short run (a study's, a smoke test's) still draws loss curves. A host sync each time:
    long runs keep ``run.log_every``."""
    return max(1, min(run.log_every, run.iterations // 20))


def _loop(cfg, method, ctx, pairs, data, start, stop, iters, horizon, run_dir, tracker, bar, on_checkpoint,
          phases: Phases):
    """Steps ``start`` .. ``stop - 1`` of a run of ``iters`` steps (one phase). The logged
    ``perf/sec_per_iter`` counts training steps only: evaluation and checkpoints are timed
    apart (``phases``)."""
    run = cfg.run
    every = log_interval(run)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}  # per key: grad/* probes appear on some steps only
    count = 0
    probe_every = run.grad_probe_every
    scores, metrics = None, {}
    t_log = t_phase = time.perf_counter()
    train_s = 0.0  # training time since the last log
    for step in range(start, stop):
        for so in method.optimizers().values():
            lr = scheduled_lr(so, step, horizon, cfg.optim.poly_power, ctx.target_batches_per_epoch)
            for g in so.optimizer.param_groups:
                g["lr"] = lr * g.get("lr_mult", 1.0)
        src, tgt = next(pairs)
        method.probing = bool(probe_every) and (step + 1) % probe_every == 0
        logs = method.train_step(ctx.to_device(src), ctx.to_device(tgt), step)
        for k, v in logs.items():
            sums[k] = sums[k] + v if k in sums else v.clone()
            counts[k] = counts.get(k, 0) + 1
        count += 1
        done = step + 1
        if bar is not None:
            bar.update(1)
        if done % every == 0 or done == stop:
            means = {k: (v / counts[k]).item() for k, v in sums.items()}  # the one host sync
            bad = [k for k, v in means.items() if not math.isfinite(v) and not k.startswith("grad/")]
            if bad:
                raise NonFiniteLoss(
                    f"{', '.join(bad)} became non-finite between steps {done - count + 1} and {done} of "
                    f"{cfg.run_name} ({means}); the run is marked diverged and is not resumed. Lower the "
                    f"learning rate or the loss weights, or check the data, and start anew.")
            means["perf/sec_per_iter"] = (train_s + time.perf_counter() - t_log) / count
            if "seg" in method.optimizers():
                means["lr/seg"] = method.optimizers()["seg"].optimizer.param_groups[0]["lr"]
            tracker.log_metrics(means, step=done)
            if bar is not None:
                bar.set_postfix_str(loss_postfix(means, bar.ncols, cfg.run_name, iters), refresh=False)
            sums, counts, count, train_s, t_log = {}, {}, 0, 0.0, time.perf_counter()
        last = done == iters
        do_eval = last or (run.eval_every and done % run.eval_every == 0)
        do_ckpt = last or done == stop or (run.checkpoint_every and done % run.checkpoint_every == 0)
        if do_eval or do_ckpt:  # the steps so far are training time; what follows is not
            now = time.perf_counter()
            train_s += now - t_log
            t = phases.add("train", t_phase)
        if do_eval:
            if bar is not None and last:
                bar.set_description(f"{cfg.run_name} (evaluating)", refresh=False)
                bar.set_postfix_str(fit_postfix(bar.postfix or "", bar.ncols, bar.desc, iters), refresh=True)
            metrics, scores, triplets = evaluate_all(method, data, ctx, mosaic=run.mosaic_images if last else 0,
                                                     progress=bar is not None)
            tracker.log_metrics(metrics, step=done)
            t = phases.add("eval", t)
            if last:
                _final_reports(cfg, method, scores, triplets, run_dir, tracker, step=done)
                t = phases.add("reports", t)
            if bar is not None:
                bar.unpause()  # evaluation time is not training time: out of the bar's rate too
        if do_ckpt:
            if ctx.world_size > 1 and not do_eval:
                sync_buffers(method, ctx.world_size)
            if ctx.rank == 0:
                path = save_checkpoint(checkpoint_path(run_dir), method, done, cfg, extra={"metrics": metrics},
                                       lineage=ctx.lineage)
            else:
                path = checkpoint_path(run_dir)
            if on_checkpoint is not None:
                on_checkpoint(path, {"step": done, **(metrics if do_eval else {})})
            t = phases.add("checkpoint", t)
        if do_eval or do_ckpt:
            t_log = t_phase = t
    return scores, metrics


def _final_reports(cfg, method, scores, triplets, run_dir, tracker, step: int) -> None:
    if method.ctx.rank != 0:
        return
    table = run_dir / "iou_per_class.csv"  # in per cent, as MLflow and the tables
    with open(table, "w") as f:
        f.write("class,IoU %,Acc %\n")
        for name, iou, acc in zip(scores.class_names, scores.iou, scores.acc):
            f.write(f"{name},{100 * iou:.4f},{100 * acc:.4f}\n")
        f.write(f"mIoU,{100 * scores.miou:.4f},{100 * scores.macc:.4f}\n")
    tracker.log_artifact(table)
    tracker.log_artifact(run_dir / "config.yaml")
    if triplets:  # an image series: MLflow shows the mosaics of several runs side by side
        tracker.log_image(mosaic_png(triplets, run_dir / "mosaic.png", norm=cfg.data.norm,
                                     num_classes=cfg.data.num_classes), key="mosaic/val", step=step)


def run_tags(cfg: Config, method, data) -> dict[str, str]:
    from . import __version__

    tags = {"method": cfg.method, "seed": str(cfg.run.seed), "bn": cfg.model.bn,
            "dataset": f"{cfg.data.source}->{cfg.data.target}", "data_root": str(cfg.data.root),
            "uda_ray_version": __version__}
    from .tracking import git_commit  # (no MLflow import)

    if commit := git_commit():  # MLflow's standard tag: the UI's Version column
        tags["mlflow.source.git.commit"] = commit
    tags.update({f"switch.{k}": str(v) for k, v in method.switches().items()})
    if path := getattr(method.model, "pretrained_file", ""):
        # the weights a row started from, by content: model.pretrained names them ("embedded",
        # "torchvision"), the fingerprint says which bytes they were on this machine
        import hashlib

        with open(path, "rb") as f:
            tags["pretrained_sha256"] = hashlib.file_digest(f, "sha256").hexdigest()[:16]
        tags["pretrained_file"] = path
    return tags

