"""Checkpoints and the run directories that hold them.

A checkpoint holds everything a run needs to resume: every module and optimizer of the
method, the step (which fixes the data position: the samplers are functions of the step),
the RNG states, the flat config it was trained with, and whether every tensor in it is
finite. It is written with :func:`torch.save` and read with ``weights_only=True`` only, so a
file can never run code when it is loaded (a downloaded checkpoint given to ``uda-ray eval``
or ``run.init_from`` included): everything in it is a tensor, a number, a string, or a
list / tuple / dict of those.

A run directory belongs to one config and one starting point. :func:`claim_run_dir` locks
it for the process that trains in it (a second process on the same run fails at once),
refuses to resume a checkpoint of another config (by :func:`config_hash`), of another
lineage (:func:`lineage_of`: started from another checkpoint or other pretrained weights) or
one that diverged, and with ``overwrite`` removes the old run's checkpoint and files first.

A run's identity is its **lineage**, as a build system keys an output by every input's key:
``lineage = H(config_hash, parent, data, code)``, where the parent is the lineage of the
``run.init_from`` checkpoint (stored in it), or for a run from scratch or from pretrained
weights, the weights' identity (``scratch``, or the SHA-256 of the weights file), and data
and code are the fingerprints of what the run reads and of the training code
(:mod:`uda_ray.fingerprint`). Editing a row of a
study therefore changes the lineage of every row downstream of it, and a run directory or
a study never takes a model trained from another parent for this one.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .knobs import ConfigError

CHECKPOINT_FILE = "last.pt"
FORMAT = "uda-ray-checkpoint/2"  # 2: loadable with weights_only=True (no numpy objects inside)
SCRATCH = "scratch"  # the parent identity of a run that starts from random weights
LOCK_FILE = ".lock"
DIVERGED_FILE = "DIVERGED"
# what a run directory holds of its run: removed by --overwrite
RUN_FILES = ("checkpoints", "proxies", DIVERGED_FILE, "config.yaml", "mosaic.png", "iou_per_class.csv",
             "mlflow_run.json")  # an overwritten run starts a new MLflow run: the old row stays the old model's
# keys that name or place a run rather than define it (a study's row x seed keeps its
# identity when its init_from checkpoint is copied elsewhere)
# Where a run lives and starts from, and diagnostics that do not change what it trains.
# run.init_from is covered by the lineage instead (the parent's identity, not its path); run.device
# says where, and ``auto`` resolves to either (a row is the same experiment on any device).
# How often a run logs, evaluates and checkpoints, and how many images its mosaic shows, change
# what is recorded along the way but not the weights (the samplers and RNG states are functions
# of the step: tests/test_engine.py pins that the weights are bit-identical). data.root is where
# the data lies; what it holds is the lineage's data fingerprint (:mod:`uda_ray.fingerprint`).
NOT_IDENTITY = ("run.init_from", "run.out", "run.name", "run.grad_probe_every", "run.device",
                "run.log_every", "run.eval_every", "run.checkpoint_every", "run.mosaic_images", "data.root")
# Loaded checkpoints of parents fetched from shared storage (s3://...) by URI: the temporary
# local copy is deleted once loaded, and the config keeps the URI (:func:`preload`).
_PRELOADED: dict[str, dict] = {}


class CheckpointError(ConfigError):
    """A file that is not a loadable uda-ray checkpoint, or a run directory that cannot be
    used as asked (another config's checkpoint, a diverged run, a run in use)."""


def config_hash(flat: dict) -> str:
    """The identity of a config: every flat key but the run's name and where it lives and
    starts from (:data:`NOT_IDENTITY`). Studies skip a row x seed that finished with the
    same hash; a run directory resumes only a checkpoint of the same hash."""
    keep = {k: v for k, v in flat.items() if k not in NOT_IDENTITY}
    return hashlib.sha1(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:12]


def lineage_hash(chash: str, parent: str, context: str) -> str:
    """The lineage of a run of config hash ``chash`` started from ``parent`` (a lineage, or
    the identity of the weights a root run starts from), trained on the data and by the
    code of ``context`` (:func:`uda_ray.fingerprint.stage_context`)."""
    return hashlib.sha1(f"{chash}|{parent}|{context}".encode()).hexdigest()[:16]


_FILE_IDS: dict[tuple, str] = {}


def file_identity(path: str | Path) -> str:
    """``sha256:<first 16 hex>`` of a file's bytes, computed once per (path, size, mtime)."""
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    if key not in _FILE_IDS:
        with open(p, "rb") as f:
            _FILE_IDS[key] = "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()[:16]
    return _FILE_IDS[key]


def parent_of_state(state: dict) -> str:
    """The lineage a checkpoint stands for as a parent. A checkpoint written before lineages
    existed stands for its config at its step (the best that can be said of it)."""
    return state.get("lineage") or f"legacy:{state.get('config_hash', '?')}@{state.get('step', '?')}"


def start_identity(pretrained: str, path: str | Path | None) -> str:
    """What a root run starts from: ``scratch``, or the identity of its pretrained weights
    (``model.pretrained`` and the file it names, :func:`uda_ray.models.from_config.start_of`)."""
    return f"{pretrained}:{file_identity(path)}" if pretrained else SCRATCH


def lineage_of(cfg, start: str | None = None) -> dict:
    """The lineage record of a run of ``cfg``: ``lineage``, ``parent_lineage``, ``parent`` (the
    ``run.init_from`` URI or path, '' for a root run) and ``parent_run_id`` (the MLflow run
    that wrote the parent checkpoint, '' when unknown). Reads the ``run.init_from``
    checkpoint (refused when not finite); a root run's parent is ``start``, its
    :func:`start_identity`."""
    if cfg.run.init_from:
        state = load_checkpoint_file(cfg.run.init_from)
        check_finite(state, cfg.run.init_from)
        parent, run_id = parent_of_state(state), str(state.get("run_id") or "")
    else:
        if start is None:
            raise ValueError("lineage_of: a run without run.init_from needs its start identity")
        parent, run_id = start, ""
    from .fingerprint import stage_context

    return {"lineage": lineage_hash(config_hash(cfg.flat()), parent, stage_context(cfg)), "parent_lineage": parent,
            "parent": str(cfg.run.init_from), "parent_run_id": run_id}


def preload(uri: str, local_dir: str | Path) -> None:
    """Load the checkpoint of ``uri`` from its fetched local copy ``local_dir``, keep it in
    memory under ``uri`` (every later :func:`load_checkpoint_file` of ``uri`` returns it) and
    delete the copy at once: a config keeps the URI, the record names it, and no temporary
    copy outlives its loading."""
    try:
        _PRELOADED[uri] = load_checkpoint_file(local_dir)
    finally:
        shutil.rmtree(local_dir, ignore_errors=True)


def release(uri: str) -> None:
    """Forget a :func:`preload`ed checkpoint (at the end of the fit that used it)."""
    _PRELOADED.pop(uri, None)


def checkpoint_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints" / CHECKPOINT_FILE


def _resolve(path: str | Path) -> Path:
    p = Path(path)
    if p.is_dir():
        p = p / CHECKPOINT_FILE if (p / CHECKPOINT_FILE).is_file() else checkpoint_path(p)
    if not p.is_file():
        raise CheckpointError(f"{path}: checkpoint not found (expected a .pt file, or a run directory "
                              f"holding checkpoints/{CHECKPOINT_FILE})")
    return p


def load_checkpoint_file(path: str | Path) -> dict:
    """A checkpoint by file or run directory (its ``checkpoints/last.pt``), loaded with
    ``weights_only=True``. Anything else (a pickle that would run code, a truncated or
    corrupt file, a ``.pt`` that is not a uda-ray checkpoint) is a :class:`CheckpointError`
    naming the file. Its ``finite`` flag is recomputed from the tensors (a flag is not
    trusted: one full pass over tensors just read is cheap next to reading them)."""
    if str(path) in _PRELOADED:
        return _PRELOADED[str(path)]
    p = _resolve(path)
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - every way a file fails to load is the same user error
        reason = str(e).strip().splitlines()
        unsafe = next((ln for ln in reason if "Unsupported global" in ln or "GLOBAL" in ln), "")
        if unsafe:
            raise CheckpointError(f"{p}: refused: not a plain uda-ray checkpoint, it asks to run code "
                                  f"({unsafe.strip()[:160]}); checkpoints load with weights_only=True") from None
        raise CheckpointError(f"{p}: not a readable checkpoint ({type(e).__name__}: "
                              f"{(reason[0] if reason else '')[:160]}); the file is truncated, corrupt or "
                              f"not a torch file") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT or not isinstance(state.get("modules"), dict):
        found = state.get("format", "no format tag") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{p}: not a uda-ray checkpoint (expected format {FORMAT!r}, found {found!r})")
    state["finite"] = all_finite(t for sd in state["modules"].values() if isinstance(sd, dict) for t in sd.values())
    return state


def all_finite(tensors) -> bool:
    """Whether every floating-point tensor is free of NaN and infinity (one host sync)."""
    flags = [torch.isfinite(t).all() for t in tensors if torch.is_tensor(t) and t.is_floating_point()]
    return bool(torch.stack(flags).all().item()) if flags else True


def _numpy_rng() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "gauss": float(gauss)}


def _set_numpy_rng(s: dict) -> None:
    np.random.set_state((s["kind"], s["keys"].numpy().astype(np.uint32), s["pos"], s["has_gauss"], s["gauss"]))


def _plain(obj):
    """Metrics and extras as plain Python numbers (numpy scalars need no code to load)."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def save_checkpoint(path: Path, method, step: int, cfg, extra: dict | None = None,
                    lineage: dict | None = None) -> Path:
    """Write a checkpoint of ``method`` at ``step``: to a temporary file of this process,
    then renamed, so a kill mid-write leaves the previous checkpoint intact (and the next
    run in the directory removes the temporary file, :func:`claim_run_dir`). A failed write
    (a full disk) removes its temporary file and is a :class:`CheckpointError` naming the
    file and the reason. ``lineage``: the run's :func:`lineage_of` record, plus ``run_id``
    (its MLflow run), kept in the checkpoint so that a run started from it knows its parent."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    modules = {k: m.state_dict() for k, m in method.modules().items()}
    state = {
        "format": FORMAT,
        "step": int(step),
        "config": cfg.flat(),
        "config_hash": config_hash(cfg.flat()),
        **{k: str(v) for k, v in (lineage or {}).items()},
        "finite": all_finite(t for sd in modules.values() for t in sd.values()),
        "modules": modules,
        "optimizers": {k: o.optimizer.state_dict() for k, o in method.optimizers().items()},
        "rng": {"torch": torch.get_rng_state(), "numpy": _numpy_rng(), "python": list(random.getstate()),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
        "extra": _plain(extra or {}),
    }
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        # through a Python file, so that a failed write's OSError ("No space left on device")
        # reaches the message (torch.save to a path reports only its own position check)
        with open(tmp, "wb") as f:
            torch.save(state, f)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        tmp.unlink(missing_ok=True)
        reason = str(e).splitlines()[0] if str(e).strip() else type(e).__name__
        cause = e.__cause__ or e.__context__
        if isinstance(cause, OSError) and cause.strerror:
            reason = cause.strerror
        raise CheckpointError(f"{path}: the checkpoint of step {step} could not be written ({reason[:200]}); "
                              f"the previous checkpoint, if any, is intact: free space and resume") from None
    return path


def restore_checkpoint(state: dict, method) -> int:
    """Load every module, optimizer and RNG state of ``state`` into ``method``; the step."""
    for k, m in method.modules().items():
        m.load_state_dict(state["modules"][k])
    for k, o in method.optimizers().items():
        o.optimizer.load_state_dict(state["optimizers"][k])
    rng = state["rng"]
    torch.set_rng_state(rng["torch"])
    _set_numpy_rng(rng["numpy"])
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return int(state["step"])


def check_finite(state: dict, path) -> None:
    """A checkpoint whose weights hold NaN or infinity is never resumed or started from."""
    if not state.get("finite", True):
        raise CheckpointError(f"{path}: the checkpoint holds non-finite weights (NaN or inf at step "
                              f"{state.get('step')}): it cannot be resumed or started from")


# --- run directories -------------------------------------------------------------------------

def _config_diff(old: dict, new: dict, limit: int = 4) -> str:
    keys = sorted(k for k in set(old) | set(new) if k not in NOT_IDENTITY and old.get(k) != new.get(k))
    if old.get("method") != new.get("method"):  # the method's own keys differ with it: name the method
        keys = ["method"] + [k for k in keys if k.split(".")[0] in ("run", "data", "model", "optim")]
    shown = ", ".join(f"{k} {old.get(k, '(none)')!r} -> {new.get(k, '(none)')!r}" for k in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


@dataclass
class RunLock:
    """An exclusive lock held by this process (:func:`owner_lock`): a run directory while a
    process trains in it, a study while one process runs it."""

    path: Path
    fd: int

    def release(self) -> None:
        if self.fd >= 0:
            import fcntl

            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


class LockHeld(Exception):
    """Another process holds the lock; ``holder`` is what it wrote ("pid N on HOST")."""

    def __init__(self, holder: str):
        super().__init__(holder)
        self.holder = holder


def owner_lock(path: Path) -> RunLock:
    """An exclusive lock on ``path`` for this process, which writes "pid N on HOST" in it, or
    :class:`LockHeld` at once naming the process that holds it. The lock is the kernel's
    (``flock``): it goes away with its process, ``kill -9`` too."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise LockHeld(holder) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
    return RunLock(path, fd)


def lock_run_dir(run_dir: Path) -> RunLock:
    """Lock ``run_dir`` for this process (:func:`owner_lock`), or fail at once naming the
    process that holds it."""
    try:
        return owner_lock(run_dir / LOCK_FILE)
    except LockHeld as e:
        raise CheckpointError(f"{run_dir}: the run is in use by {e.holder}; wait for it to end, or give this "
                              f"run another run.name") from None


def claim_run_dir(run_dir: str | Path, cfg, *, overwrite: bool = False, resume_state: dict | None = None,
                  lock: bool = True, lineage: dict | None = None) -> tuple[RunLock | None, dict | None]:
    """Take ``run_dir`` for a run of ``cfg``: lock it, then return the checkpoint state to
    resume (``resume_state`` when given, else the directory's own, else None).

    Refused with a :class:`CheckpointError` that says what to do: a checkpoint of another
    config (resume with the same config, or start anew under another ``run.name`` or with
    ``overwrite``), of another ``lineage`` (the run's :func:`lineage_of`: the directory's run
    started from another checkpoint or other weights; the message names both parents), a run
    that diverged or whose checkpoint is not finite. ``overwrite`` removes the old run's
    checkpoint and files (:data:`RUN_FILES`) before starting. Temporary files of checkpoint
    writes that a killed process left behind are removed (the lock says no one writes them).
    """
    run_dir = Path(run_dir)
    held = lock_run_dir(run_dir) if lock else None
    try:
        for tmp in checkpoint_path(run_dir).parent.glob(f"{CHECKPOINT_FILE}.*.tmp"):
            tmp.unlink(missing_ok=True)
        if overwrite:
            for name in RUN_FILES:
                p = run_dir / name
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.exists():
                    p.unlink()
        how = (f"start anew under another run.name, or with --overwrite (removes {run_dir}'s checkpoint)")
        diverged = run_dir / DIVERGED_FILE
        if diverged.is_file():
            raise CheckpointError(f"{run_dir}: this run diverged ({diverged.read_text().strip()[:200]}); a "
                                  f"diverged run is not resumed: {how}")
        state = resume_state
        path = checkpoint_path(run_dir)
        if state is None and path.is_file():
            state = load_checkpoint_file(path)
        if state is not None:
            check_finite(state, path)
            new = cfg.flat()
            if config_hash(state["config"]) != config_hash(new):
                raise CheckpointError(
                    f"{run_dir}: holds a checkpoint of another config ({_config_diff(state['config'], new)}); "
                    f"resume it with the same config (uda-ray train {run_dir}), or {how}")
            old = state.get("lineage")
            if lineage is not None and old and old != lineage["lineage"]:
                def start(parent, lin):
                    return f"{parent} (parent lineage {lin})" if parent else f"{lin}"

                raise CheckpointError(
                    f"{run_dir}: holds a run started from {start(state.get('parent', ''), state.get('parent_lineage'))}, "
                    f"not from {start(lineage['parent'], lineage['parent_lineage'])}; a run directory continues "
                    f"only the run it holds: {how}")
        return held, state
    except BaseException:
        if held is not None:
            held.release()
        raise


def mark_diverged(run_dir: str | Path, message: str) -> None:
    """Record that the run in ``run_dir`` diverged: it is never resumed."""
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    (Path(run_dir) / DIVERGED_FILE).write_text(message.strip() + "\n")
