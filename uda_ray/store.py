"""The stage store: every finished stage kept under its lineage, reused by any later run of it.

A stage is one trained row x seed (a source model, an adaptation from it, a search trial).
Its lineage (:mod:`uda_ray.checkpoint`, :mod:`uda_ray.fingerprint`) is a content address of
everything that fixes its weights: the config keys that change them, the parent's lineage
(or the pretrained weights' hash), the data and the training code. As a build system keys an
output by the keys of its inputs, a stage of the same lineage is the same model, so any
study, row or ``uda-ray train`` that asks for it takes the stored one instead of training
(``--reuse exact``, the default; ``--reuse never`` trains anyway).

Layout, below the store's root (a local folder, or a URI such as ``s3://bucket/path`` on a
cluster; by default ``<storage path>/stages``, beside the study's Tune storage)::

    <lineage>/checkpoint/last.pt     the stage's last checkpoint (what dependents start from)
    <lineage>/stage.json             written last: the stage is complete once it exists

``stage.json`` holds the lineage, its parent, the study, row, seed and MLflow run that
trained it (and the tracking URI), the flat config, every metric's history, the run's
``perf/sec_per_iter`` and the time it was stored and last used. Only a trial that ran to its
end is stored: a failed, killed or early-stopped one never is.

Concurrency: :meth:`StageStore.lock` holds a lock per lineage while a stage trains, so two
studies that need the same stage at once train it once (the second waits, then takes the
stored stage). On a local store it is an ``flock`` on ``<root>/.locks/<lineage>.lock``
(released by the kernel when its process dies); on an object store (which has no locks) it
is an advisory lease object with the owner's host and pid that the owner renews every 15 s
and that others honour while younger than :data:`REMOTE_LEASE_S`: a holder killed with its
node (the cluster test kills one) holds it a minute at most. Two waiters that find an
expired lease at the same moment may both take it (and both train the stage: the second
store of it is skipped).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import time
from pathlib import Path

STAGE_FILE = "stage.json"
CHECKPOINT_DIR = "checkpoint"
LOCKS = ".locks"
REMOTE_LEASE_S = 60  # a remote lock is a lease its holder renews every 15 s
REUSE_MODES = ("exact", "never")


def default_root(storage_path: str | None = None) -> str:
    """Where the stage store is (unless ``--store`` says): ``UDA_RAY_STORE`` (one store for
    every study and run of a user or cluster), else ``stages`` below the storage path
    (``--storage-path``, ``UDA_RAY_STORAGE``, or ``./runs/ray``, a study's default)."""
    if os.environ.get("UDA_RAY_STORE"):
        root = os.environ["UDA_RAY_STORE"]
    else:
        base = storage_path or os.environ.get("UDA_RAY_STORAGE") or str(Path("runs", "ray").resolve())
        root = f"{base.rstrip('/')}/stages" if "://" in base else str(Path(base).resolve() / "stages")
    return root if "://" in root else str(Path(root).resolve())


def check_reuse(mode: str) -> str:
    from .errors import UserError

    if mode not in REUSE_MODES:
        raise UserError(f"--reuse {mode}: expected one of {', '.join(REUSE_MODES)}")
    return mode


class StageStore:
    """A stage store at ``root`` (a folder, or a ``scheme://`` URI read through pyarrow)."""

    def __init__(self, root: str):
        self.root = root.rstrip("/") if "://" in root else str(Path(root).resolve())
        self.remote = "://" in self.root
        self._fs = None

    def __repr__(self) -> str:
        return f"StageStore({self.root!r})"

    # --- paths and files (os for a folder, pyarrow.fs for a URI) --------------------------
    def uri(self, *parts: str) -> str:
        return "/".join([self.root, *parts]) if self.remote else str(Path(self.root, *parts))

    def _filesystem(self):
        if self._fs is None:
            import pyarrow.fs

            self._fs, self._base = pyarrow.fs.FileSystem.from_uri(self.root)
        return self._fs

    def _fspath(self, *parts: str) -> str:
        self._filesystem()
        return "/".join([self._base, *parts])

    def _read(self, *parts: str) -> bytes | None:
        if not self.remote:
            p = Path(self.root, *parts)
            return p.read_bytes() if p.is_file() else None
        fs = self._filesystem()
        try:
            with fs.open_input_stream(self._fspath(*parts)) as f:
                return f.read()
        except (FileNotFoundError, OSError):
            return None

    def _write(self, data: bytes, *parts: str) -> None:
        if not self.remote:
            p = Path(self.root, *parts)
            p.parent.mkdir(parents=True, exist_ok=True)
            tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, p)
            return
        fs = self._filesystem()
        fs.create_dir(self._fspath(*parts[:-1]), recursive=True)
        with fs.open_output_stream(self._fspath(*parts)) as f:
            f.write(data)

    def _copy_in(self, src: str, lineage: str) -> None:
        """Copy the checkpoint folder (or file) ``src`` (a path or URI) to ``<lineage>/checkpoint``."""
        if not self.remote and "://" not in src:
            s, dst = Path(src), Path(self.root, lineage, CHECKPOINT_DIR)
            if dst.exists():
                shutil.rmtree(dst)
            dst.mkdir(parents=True)
            files = [s] if s.is_file() else [f for f in s.iterdir() if f.is_file() and not f.name.startswith(".")]
            for f in files:
                try:  # a hard link where the store and the run share a file system: no copy
                    os.link(f, dst / f.name)
                except OSError:
                    shutil.copy2(f, dst / f.name)
            return
        import pyarrow.fs

        src_fs, src_path = pyarrow.fs.FileSystem.from_uri(src if "://" in src else str(Path(src).resolve()))
        if self.remote:
            dst_fs, dst_path = self._filesystem(), self._fspath(lineage, CHECKPOINT_DIR)
        else:
            dst_fs, dst_path = pyarrow.fs.LocalFileSystem(), str(Path(self.root, lineage, CHECKPOINT_DIR))
            Path(dst_path).mkdir(parents=True, exist_ok=True)
        if src_fs.get_file_info(src_path).type == pyarrow.fs.FileType.File:
            pyarrow.fs.copy_files(src_path, f"{dst_path}/last.pt", source_filesystem=src_fs,
                                  destination_filesystem=dst_fs)
        else:
            pyarrow.fs.copy_files(src_path, dst_path, source_filesystem=src_fs, destination_filesystem=dst_fs)

    # --- stages ----------------------------------------------------------------------------
    def get(self, lineage: str) -> dict | None:
        """The complete stage of ``lineage`` (its ``stage.json``, with ``checkpoint``: the URI
        or path dependents start from), None if there is none."""
        if not lineage:
            return None
        raw = self._read(lineage, STAGE_FILE)
        if raw is None:
            return None
        try:
            meta = json.loads(raw)
        except ValueError:
            return None  # a torn write is no stage
        return {**meta, "checkpoint": self.uri(lineage, CHECKPOINT_DIR)}

    def put(self, lineage: str, checkpoint: str, meta: dict) -> dict:
        """Store a finished stage: its checkpoint (folder or file, path or URI) first, then
        ``stage.json`` (``meta`` plus the lineage and the time), which makes it complete. A
        stage already stored is kept (the same lineage is the same model; a reader may be
        copying it) and returned."""
        if (have := self.get(lineage)) is not None:
            return have
        self._copy_in(checkpoint, lineage)
        now = time.time()
        record = {**meta, "lineage": lineage, "stored": now, "last_used": now}
        self._write(json.dumps(record, indent=1, default=str).encode(), lineage, STAGE_FILE)
        return {**record, "checkpoint": self.uri(lineage, CHECKPOINT_DIR)}

    def touch(self, lineage: str, used_by: str = "") -> None:
        """Record that a stage was reused now (``last_used``, and by what)."""
        meta = self.get(lineage)
        if meta is None:
            return
        meta.pop("checkpoint", None)
        meta["last_used"] = time.time()
        if used_by:
            meta["used_by"] = sorted(set(meta.get("used_by", [])) | {used_by})
        self._write(json.dumps(meta, indent=1, default=str).encode(), lineage, STAGE_FILE)

    def lineages(self) -> list[str]:
        if not self.remote:
            root = Path(self.root)
            return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) \
                if root.is_dir() else []
        import pyarrow.fs

        fs = self._filesystem()
        infos = fs.get_file_info(pyarrow.fs.FileSelector(self._base, allow_not_found=True))
        return sorted(i.base_name for i in infos if i.type == pyarrow.fs.FileType.Directory
                      and not i.base_name.startswith("."))

    def size(self, lineage: str) -> int:
        if not self.remote:
            return sum(f.stat().st_size for f in Path(self.root, lineage).rglob("*") if f.is_file())
        import pyarrow.fs

        fs = self._filesystem()
        infos = fs.get_file_info(pyarrow.fs.FileSelector(self._fspath(lineage), recursive=True,
                                                        allow_not_found=True))
        return sum(i.size or 0 for i in infos if i.type == pyarrow.fs.FileType.File)

    def stages(self) -> list[dict]:
        """Every stage (complete or not: ``complete`` says), with its ``size`` in bytes."""
        out = []
        for lin in self.lineages():
            meta = self.get(lin) or {"lineage": lin}
            out.append({**meta, "complete": "stored" in meta, "size": self.size(lin)})
        return out

    def remove(self, lineage: str) -> None:
        if not self.remote:
            shutil.rmtree(Path(self.root, lineage), ignore_errors=True)
            return
        self._filesystem().delete_dir(self._fspath(lineage))

    # --- one trainer per lineage -----------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, lineage: str, *, wait_s: float = 24 * 3600, on_wait=None):
        """Hold the lineage's lock while its stage trains (see the module); ``on_wait`` is
        called once if another process holds it."""
        if not self.remote:
            import fcntl

            path = Path(self.root, LOCKS, f"{lineage}.lock")
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a+") as f:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    if on_wait:
                        on_wait()
                    fcntl.flock(f, fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(f, fcntl.LOCK_UN)
            return
        import threading

        me = {"host": socket.gethostname(), "pid": os.getpid()}
        deadline, waited = time.time() + wait_s, False
        while True:
            raw = self._read(LOCKS, f"{lineage}.json")
            try:
                held = json.loads(raw) if raw else None
            except ValueError:
                held = None
            if held is None or time.time() - float(held.get("time", 0)) > REMOTE_LEASE_S \
                    or (held.get("host"), held.get("pid")) == (me["host"], me["pid"]) or time.time() > deadline:
                break
            if not waited and on_wait:
                on_wait()
            waited = True
            time.sleep(5)
        stop = threading.Event()

        def take() -> None:
            with contextlib.suppress(OSError):
                self._write(json.dumps({**me, "time": time.time()}).encode(), LOCKS, f"{lineage}.json")

        def renew() -> None:  # the lease lives while this process does: a killed holder's expires
            while not stop.wait(REMOTE_LEASE_S / 4):
                take()

        take()

        renew_thread = threading.Thread(target=renew, daemon=True, name=f"stage-lease-{lineage}")
        renew_thread.start()
        try:
            yield
        finally:
            stop.set()
            renew_thread.join(timeout=30)
            with contextlib.suppress(OSError):
                self._filesystem().delete_file(self._fspath(LOCKS, f"{lineage}.json"))


def human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
