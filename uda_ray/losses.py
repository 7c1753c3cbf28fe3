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


def gan_loss(d_out: Tensor, domain: float, kind: str = "vanilla") -> Tensor:
    """Adversarial loss of discriminator outputs against a constant domain label.

    ``vanilla``: binary cross-entropy with logits (AdaptSegNet); ``ls``: least squares
    (mean squared error to the label, LSGAN as in DAST/ADVENT variants).

    Shape: d_out (N, 1, h, w) raw outputs -> scalar.
    """
    d_out = full(d_out)
    target = torch.full_like(d_out, domain)
    if kind == "vanilla":
        return F.binary_cross_entropy_with_logits(d_out, target)
    if kind == "ls":
        return F.mse_loss(d_out, target)
    raise ValueError(f"gan kind must be one of {GAN_KINDS}, got {kind!r}")
