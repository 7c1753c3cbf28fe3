"""What a method needs from the engine (:class:`Context`): its own module, so that the
methods depend on it without importing the engine."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .config import Config


def numerics(cfg: Config, device: torch.device) -> tuple[bool, bool]:
    """(bf16 autocast, channels_last) of a run on ``device``: ``run.amp`` and
    ``run.channels_last`` on CUDA; on the CPU only with ``run.cpu_amp`` (bf16 convolutions
    are slow on most CPUs, so CPU runs stay fp32 and contiguous unless asked; tests and
    ``uda-ray bench step`` ask, to exercise the GPU's numerics without one)."""
    on = device.type == "cuda" or cfg.run.cpu_amp
    return cfg.run.amp and on, cfg.run.channels_last and on


@dataclass
class Context:
    """What a method needs from the engine: the device and the numeric settings."""

    cfg: Config
    device: torch.device
    amp: bool
    channels_last: bool
    rank: int = 0
    world_size: int = 1
    target_batches_per_epoch: int = 1
    run_dir: Path | None = None  # where a method writes its files (e.g. proxy labels)
    tracker: object = None  # rank 0's tracker (a NullTracker elsewhere), for a method's own reports
    lineage: dict = field(default_factory=dict)  # the run's lineage record, kept in its checkpoints (rank 0)

    def autocast(self):
        if self.amp:
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def to_device(self, batch: dict | None) -> dict | None:
        if batch is None:
            return None
        out = dict(batch)
        img = batch["image"].to(self.device, non_blocking=True)
        out["image"] = img.contiguous(memory_format=torch.channels_last) if self.channels_last else img
        if "label" in batch:
            out["label"] = batch["label"].to(self.device, non_blocking=True)
        return out
