"""Losses shared by the methods, as small functions with the paper's conventions.

Domain labels follow AdaptSegNet's code: **source = 0, target = 1** (some papers state the
opposite convention; every method here uses these constants).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .data.labels import IGNORE

SOURCE = 0.0
TARGET = 1.0
GAN_KINDS = ("vanilla", "ls")


def full(x: Tensor) -> Tensor:
    """Upcast bf16/fp16 activations to float32 for losses and softmax; float32 and float64
    pass through unchanged."""
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x


def upsample(logits: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear upsampling of (N, C, h, w) logits to ``size`` = (H, W), ``align_corners=True``
    as AdaptSegNet's ``nn.Upsample`` (the reference upsamples to the input size before both
    the segmentation loss and the discriminators)."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=True)


def seg_loss(logits: Tensor, label: Tensor) -> Tensor:
    """Pixel-wise cross-entropy of logits upsampled to the label size, ignoring 255.

    Shape: logits (N, C, h, w), label (N, H, W) int64 -> scalar (mean over labelled pixels).
    """
    return F.cross_entropy(full(upsample(logits, label.shape[-2:])), label, ignore_index=IGNORE)


def gan_loss(d_out: Tensor, domain: float, kind: str = "vanilla", weight: Tensor | None = None) -> Tensor:
    """Adversarial loss of discriminator outputs against a constant domain label.

    ``vanilla``: binary cross-entropy with logits (AdaptSegNet); ``ls``: least squares
    (squared error to the label, LSGAN as in DAST/ADVENT variants). With ``weight``, the
    per-location losses are weighted before the mean (e.g. DAST's attention, PWW's maps):
    ``mean(weight * loss)``; ``weight`` broadcasts against ``d_out`` and should be detached
    by the caller unless gradients are meant to flow through it.

    Shape: d_out (N, 1, h, w) raw outputs, weight (N, 1, h, w) or broadcastable -> scalar.
    """
    d_out = full(d_out)
    target = torch.full_like(d_out, domain)
    if kind == "vanilla":
        loss = F.binary_cross_entropy_with_logits(d_out, target, reduction="none")
    elif kind == "ls":
        loss = (d_out - target) ** 2
    else:
        raise ValueError(f"gan kind must be one of {GAN_KINDS}, got {kind!r}")
    return (loss if weight is None else loss * full(weight)).mean()
