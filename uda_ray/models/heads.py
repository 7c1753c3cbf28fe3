"""Segmentation heads: the DeepLab-v2 ASPP classifier and the PSPNet pyramid-pooling decoder."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DEEPLAB_V2_RATES: tuple[int, ...] = (6, 12, 18, 24)


class ASPPClassifier(nn.Module):
    """DeepLab-v2 ASPP classifier: parallel 3x3 dilated convs straight to class scores, summed.

    All branches are summed. The original AdaptSegNet code returns inside its loop after
    the first two branches; that is not reproduced by default (see ``tests``), only with
    ``reference_layout``.

    Args:
        in_channels: channels of the input feature.
        num_classes: number of output classes.
        rates: dilation (= padding) of each branch; DeepLab-v2 uses 6/12/18/24.
        reference_layout: sum only the first two branches, as AdaptSegNet's released
            ``Classifier_Module.forward`` does (it returns inside its loop); the other
            branches keep their parameters (they load and checkpoint) but get no gradient.

    Shape:
        (N, in_channels, h, w) -> (N, num_classes, h, w)

    Example:
        >>> aspp = ASPPClassifier(64, 19)
        >>> aspp(torch.randn(1, 64, 9, 13)).shape
        torch.Size([1, 19, 9, 13])
    """

    def __init__(self, in_channels: int, num_classes: int, *,
                 rates: tuple[int, ...] = DEEPLAB_V2_RATES, reference_layout: bool = False) -> None:
        super().__init__()
        self.used = min(2, len(rates)) if reference_layout else len(rates)
        if not rates:
            raise ValueError("ASPPClassifier needs at least one rate")
        self.rates = tuple(int(r) for r in rates)
        self.branches = nn.ModuleList(
            nn.Conv2d(in_channels, num_classes, kernel_size=3, padding=r, dilation=r, bias=True)
            for r in self.rates)
        # The reference initialises the classifier weights N(0, 0.01) (bias left at default)
        # so that initial logits are small even on 2048-channel inputs.
        for conv in self.branches:
            nn.init.normal_(conv.weight, mean=0.0, std=0.01)

    def forward(self, x: Tensor) -> Tensor:
        out = self.branches[0](x)
        for branch in self.branches[1:self.used]:
            out = out + branch(x)
        return out


class PPMDecoder(nn.Module):
    """PSPNet decoder: pyramid pooling module, 3x3 fusion conv, dropout, 1x1 classifier.

    Each bin ``b`` average-pools the input to ``b x b``, reduces channels with a 1x1 conv,
    and is upsampled (bilinear) back to the input size; the input and all branches are
    concatenated and fused by a 3x3 conv + BN + ReLU.

    The pooled branches use a biased 1x1 conv + ReLU without BatchNorm: the 1x1 bin with
    the field's batch size of 1 would leave BN a single value per channel in train mode
    (PyTorch raises). The fusion conv keeps its BN (it sees the full spatial map).

    Args:
        in_channels: channels of the encoder feature.
        num_classes: number of output classes.
        bins: output sizes of the pooled branches (PSPNet: 1, 2, 3, 6).
        branch_channels: channels of each pooled branch; default ``in_channels // len(bins)``.
        channels: channels of the fused feature (PSPNet: 512).
        dropout: dropout probability before the classifier (PSPNet: 0.1).

    Shape:
        (N, in_channels, h, w) -> feature (N, channels, h, w), logits (N, num_classes, h, w)
    """

    def __init__(self, in_channels: int, num_classes: int, *,
                 bins: tuple[int, ...] = (1, 2, 3, 6), branch_channels: int | None = None,
                 channels: int = 512, dropout: float = 0.1) -> None:
        super().__init__()
        branch_channels = branch_channels or max(1, in_channels // len(bins))
        self.bins = tuple(bins)
        self.stages = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(b),
                          nn.Conv2d(in_channels, branch_channels, kernel_size=1, bias=True),
                          nn.ReLU(inplace=True))
            for b in self.bins)
        self.fuse = nn.Sequential(
            nn.Conv2d(in_channels + len(self.bins) * branch_channels, channels,
                      kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True))
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, kernel_size=1)
        self.out_channels = channels

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        size = x.shape[-2:]
        pyramid = [x] + [F.interpolate(stage(x), size=size, mode="bilinear", align_corners=False)
                         for stage in self.stages]
        feature = self.fuse(torch.cat(pyramid, dim=1))
        return feature, self.classifier(self.dropout(feature))
