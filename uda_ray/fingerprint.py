"""What a trained stage depends on besides its config and its parent: the data and the code.

A run's lineage (:mod:`uda_ray.checkpoint`) is ``H(config hash | parent | data | code)``. The
config hash covers every key that changes the trained weights; the parent is the lineage of
the ``run.init_from`` checkpoint or the hash of the pretrained weights file. The two
fingerprints here cover the rest, so that a stage is reused (:mod:`uda_ray.store`) only when
training it again would give the same model:

- **data** (:func:`data_fingerprint`): for the embedded benchmark, the fields of its
  ``synth.json`` that define the images (generator version, seed, regime and shift, image
  sizes, and the image counts, which change what a run trains on); for a real dataset, the
  list of files below the source and target folders with their sizes and modification
  times (a file replaced, added or removed changes it; an image edited in place without a
  change of size or time would not, which no dataset tool does). Computed once per
  process (a stat of every file: well under a second for Cityscapes' 25k files on a local
  disk). ``data.root`` itself is not part of the identity (the same data at
  another path, or on another node, is the same data); the folder names and splits are
  config keys.
- **code** (:func:`code_fingerprint`): the package's Python modules that take part in
  training, parsed and with docstrings removed (so an edited comment or docstring does not
  invalidate the store, an edited line of code does). The modules that only report,
  schedule or present results (:data:`NOT_TRAINING`) are left out, so a fix in the
  comparison table or the CLI does not retrain every stage. The torch version is included:
  another torch can give other numbers.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
from functools import lru_cache
from pathlib import Path

# uda_ray modules that never influence a trained model's weights (paths below uda_ray/):
# the CLI, studies' scheduling and bookkeeping, MLflow logging, tables, figures, benchmarks,
# and this store of stages.
NOT_TRAINING = frozenset({
    "cli.py", "compare.py", "figures.py", "mosaic.py", "study.py", "_tune_schedule.py", "_tune_search.py",
    "tracking.py", "bench.py", "bench_device.py", "bench_study.py", "store.py", "plan.py", "errors.py",
    "memory.py", "cache.py", "fingerprint.py", "__main__.py", "progress.py", "cli_spec.py", "verdict.py",
})

# The fields of the embedded benchmark's synth.json that define its images.
SYNTH_FIELDS = ("version", "seed", "regime", "shift", "source_size", "target_size", "n_source", "n_target", "n_val")


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return tree


def training_sources(package: Path | None = None) -> list[Path]:
    """The package's source files that the code fingerprint covers, in a fixed order."""
    root = package or Path(__file__).resolve().parent
    return sorted(p for p in root.rglob("*.py") if str(p.relative_to(root)) not in NOT_TRAINING)


@lru_cache(maxsize=None)
def code_fingerprint(package: str | None = None) -> str:
    """``code:<16 hex>`` of the training code (see the module), computed once per process."""
    import torch

    root = Path(package) if package else Path(__file__).resolve().parent
    h = hashlib.sha256(f"torch {torch.__version__}".encode())
    for p in training_sources(root):
        h.update(str(p.relative_to(root)).encode() + b"\0")
        h.update(ast.dump(_strip_docstrings(ast.parse(p.read_text(), str(p)))).encode() + b"\0")
    return "code:" + h.hexdigest()[:16]


_DATA: dict[tuple, str] = {}


def _folder(root: str, sub: str) -> Path:
    return Path(sub) if os.path.isabs(sub) else Path(root) / sub


def _walk_identity(folder: Path) -> str:
    """sha256 of the sorted (relative path, size, mtime) of every file below ``folder``."""
    rows = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for name in filenames:
            p = os.path.join(dirpath, name)
            st = os.stat(p)
            rows.append(f"{os.path.relpath(p, folder)}\t{st.st_size}\t{st.st_mtime_ns}")
    rows.sort()
    return hashlib.sha256("\n".join(rows).encode()).hexdigest()


def data_fingerprint(cfg) -> str:
    """``data:<16 hex>`` of the data a run of ``cfg`` reads (see the module).

    Raises:
        FileNotFoundError: a real dataset's folder is not here.
    """
    d = cfg.data
    root = Path(d.root).resolve()
    marker = root / "synth.json"
    if d.synth or marker.is_file():
        if marker.is_file():
            st = marker.stat()
            key = ("synth", str(marker), st.st_mtime_ns, st.st_size)
            if key not in _DATA:
                _DATA[key] = _synth_id(json.loads(marker.read_text()))
            return _DATA[key]
        # not generated yet: the benchmark first use will generate (uda_ray.engine.ensure_data)
        from .data import synth

        return _synth_id(synth._params(seed=d.synth_seed, n_source=synth.DEFAULT_N_SOURCE,
                                       n_target=synth.DEFAULT_N_TARGET, n_val=synth.DEFAULT_N_VAL,
                                       regime=d.synth_regime, shift=None))
    parts = []
    for sub in dict.fromkeys((d.source_dir, d.target_dir)):  # the same folder once
        folder = _folder(str(root), sub)
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: dataset folder not found")
        key = ("walk", str(folder))
        if key not in _DATA:  # a stat of every file: once per process
            _DATA[key] = _walk_identity(folder)
        parts.append(f"{sub}={_DATA[key]}")
    return "data:files:" + hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def _synth_id(record: dict) -> str:
    ident = {k: record.get(k) for k in SYNTH_FIELDS}
    return "data:synth:" + hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def data_fingerprint_planned(cfg) -> str:
    """:func:`data_fingerprint`, or a placeholder naming the folders where a real dataset is
    not here (``uda-ray study --plan`` on another machine than the data's)."""
    try:
        return data_fingerprint(cfg)
    except FileNotFoundError:
        return f"data:missing:{cfg.data.source_dir}|{cfg.data.target_dir}"


def stage_context(cfg) -> str:
    """What a stage of ``cfg`` depends on besides its config and parent: ``data:..|code:..``."""
    return f"{data_fingerprint(cfg)}|{code_fingerprint()}"
