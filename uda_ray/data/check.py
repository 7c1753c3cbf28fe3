"""``uda-ray data check``: read every sample of a dataset the way training would, and report
counts, the class histogram and every problem found (not just the first)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from . import labels as L
from .datasets import Problem, SegDataset
from .io import DatasetError


@dataclass
class CheckReport:
    dataset: str
    root: str
    split: str
    num_classes: int
    n_listed: int = 0
    n_ok: int = 0
    pixels: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    ignored_pixels: int = 0
    sizes: dict = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)

    @property
    def classes_present(self) -> int:
        return int((self.pixels > 0).sum())

    def format(self, *, max_problems: int = 50) -> str:
        names = L.class_names(self.num_classes)
        total = int(self.pixels.sum()) + self.ignored_pixels
        lines = [
            f"{self.dataset} ({self.split}) at {self.root}",
            f"  samples: {self.n_listed} listed, {self.n_ok} read OK, {len(self.problems)} problem(s)",
            "  image sizes: " + ", ".join(f"{w}x{h} ({n})" for (w, h), n in sorted(self.sizes.items())),
            f"  classes present: {self.classes_present}/{self.num_classes}",
            f"  {'id':>3} {'class':<14} {'pixels':>12} {'share':>7}",
        ]
        for i, name in enumerate(names):
            share = 100.0 * self.pixels[i] / total if total else 0.0
            lines.append(f"  {i:>3} {name:<14} {int(self.pixels[i]):>12} {share:>6.2f}%")
        share = 100.0 * self.ignored_pixels / total if total else 0.0
        lines.append(f"  {255:>3} {'(ignore)':<14} {self.ignored_pixels:>12} {share:>6.2f}%")
        if self.problems:
            lines.append("  problems:")
            lines += [f"    {p}" for p in self.problems[:max_problems]]
            if len(self.problems) > max_problems:
                lines.append(f"    ... and {len(self.problems) - max_problems} more")
        else:
            lines.append("  problems: none")
        return "\n".join(lines)


class _CheckOne(Dataset):
    """Reads one sample with every check; returns its histogram or its problem."""

    def __init__(self, ds: SegDataset):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        try:
            image, label = self.ds.load(i)
        except DatasetError as e:
            return {"problem": str(e)}
        hist = np.bincount(label.ravel(), minlength=256) if label is not None else np.zeros(256, np.int64)
        return {"hist": hist, "size": image.size}


def check_dataset(ds: SegDataset, *, workers: int = 2, progress: bool = True) -> CheckReport:
    report = CheckReport(ds.name, str(ds.root), ds.split, ds.num_classes, n_listed=len(ds) + len(ds.problems),
                         problems=list(ds.problems))
    hist = np.zeros(256, dtype=np.int64)
    loader = DataLoader(_CheckOne(ds), batch_size=None, num_workers=workers)
    it = loader
    if progress:
        from tqdm import tqdm

        it = tqdm(loader, total=len(ds), desc=f"checking {ds.name}", unit="img")
    for i, item in enumerate(it):
        if "problem" in item:
            msg = item["problem"]
            path, _, rest = msg.partition(": ")
            report.problems.append(Problem(path, rest))
            continue
        h = item["hist"]
        hist += h.numpy() if isinstance(h, torch.Tensor) else h
        size = tuple(int(v) for v in item["size"])
        report.sizes[size] = report.sizes.get(size, 0) + 1
        report.n_ok += 1
    report.pixels = hist[: ds.num_classes].copy()
    report.ignored_pixels = int(hist[255])
    return report


def require_clean(ds: SegDataset, *, what: str, workers: int = 0) -> CheckReport:
    """Check every sample of ``ds`` as :func:`check_dataset` does; raise :class:`DatasetError`
    naming the first problem and the count, so that damage in a split read only later (the
    target val split, after training) stops a run before it starts."""
    report = check_dataset(ds, workers=workers, progress=False)
    if report.problems:
        n = len(report.problems)
        raise DatasetError(f"{report.problems[0]} ({what}: {n} problem{'s' if n > 1 else ''} in {ds.name} "
                           f"{ds.split!r}; `uda-ray data check {ds.root} --dataset {ds.name} --split {ds.split}` "
                           "lists them)")
    return report
