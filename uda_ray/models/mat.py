"""MAT's segmenter (Shen et al., "Regularizing Proxies with Multi-Adversarial Training"):
an encoder-decoder backbone F with fusion blocks and an ASPP classifier C with rates
1, 2, 4, 8 (Sec. 2.4, Figure 4).

The encoder is a plain (undilated) ResNet; the decoder fuses its stages top-down with
fusion blocks, every feature brought to 128 channels, ending at 1/4 of the input. The
paper shows the block for Res5c + Res4b22 and states the decoder's output is at 1/4; we
read that as the same block applied down to layer1 (1/32 -> 1/16 -> 1/8 -> 1/4).
"""

from __future__ import annotations

import os

import torch.nn.functional as F
from torch import Tensor, nn

from uda_ray.models.backbones import ResNetBackbone, TinyResNet
from uda_ray.models.heads import ASPPClassifier
from uda_ray.models.segmenters import Segmenter, SegOutput

MAT_RATES = (1, 2, 4, 8)


def _unit(cin: int, cout: int, k: int, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=dilation * (k // 2), dilation=dilation, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class FusionBlock(nn.Module):
    """Figure 4: the low-resolution features go through a series of units (a 1x1 conv to
    ``channels``, then a dilated 3x3 conv "to enlarge the field of view") and are upsampled
    to the high-resolution features' size; those are brought to ``channels`` by a 1x1 unit;
    the two are summed.

    Shape:
        low (N, low_channels, h, w), high (N, high_channels, H, W) -> (N, channels, H, W)
    """

    def __init__(self, low_channels: int, high_channels: int, *, channels: int = 128, dilation: int = 2):
        super().__init__()
        self.low = nn.Sequential(_unit(low_channels, channels, 1), _unit(channels, channels, 3, dilation))
        self.high = _unit(high_channels, channels, 1)

    def forward(self, low: Tensor, high: Tensor) -> Tensor:
        up = F.interpolate(self.low(low), size=high.shape[-2:], mode="bilinear", align_corners=True)
        return up + self.high(high)


class MATSegmenter(Segmenter):
    """Encoder-decoder segmenter of MAT.

    Logits "main" = C(F(x)) at 1/4 of the input. Features: the encoder's "layer1".."layer4"
    (1/4, 1/8, 1/16, 1/32) and "decoder" = F(x) (``channels`` at 1/4), which D1 judges; D2
    judges the mid-level "layer3" (Res4b22 in ResNet-101).

    Args:
        num_classes: classes predicted.
        encoder: "resnet101" (torchvision layout; ``pretrained`` loads ImageNet weights) or
            "tiny" (a small residual CNN for CPU runs).
        channels: decoder width (paper: 128).
        aspp_rates: rates of the classifier (paper: 1, 2, 4, 8).
        pretrained: None, "torchvision" or a path, loaded into the encoder.

    Shape:
        (N, 3, H, W) -> logits "main" (N, num_classes, ceil(H/4), ceil(W/4))
    """

    def __init__(self, *, num_classes: int, encoder: str = "resnet101", channels: int = 128,
                 aspp_rates: tuple[int, ...] = MAT_RATES, pretrained: str | os.PathLike | None = None):
        super().__init__()
        self.num_classes, self.output_stride = num_classes, 4
        if encoder == "resnet101":
            self.backbone = ResNetBackbone(depth=101, dilated=False)
            self.torchvision_arch = "resnet101"
        elif encoder == "tiny":
            self.backbone = TinyResNet(dilated=False)
        else:
            raise ValueError(f"encoder must be 'resnet101' or 'tiny', got {encoder!r}")
        ch = self.backbone.channels
        self.decoder = nn.ModuleList([FusionBlock(ch["layer4"], ch["layer3"], channels=channels),
                                      FusionBlock(channels, ch["layer2"], channels=channels),
                                      FusionBlock(channels, ch["layer1"], channels=channels)])
        self.feature_channels = dict(ch) | {"decoder": channels}
        self.head_inputs = {"main": "decoder"}
        self.heads = nn.ModuleDict({"main": ASPPClassifier(channels, num_classes, rates=aspp_rates)})
        self._load_pretrained(pretrained)

    def forward(self, x: Tensor) -> SegOutput:
        feats = self.backbone(x)
        f = feats["layer4"]
        for block, skip in zip(self.decoder, ("layer3", "layer2", "layer1")):
            f = block(f, feats[skip])
        feats["decoder"] = f
        return SegOutput({"main": self.heads["main"](f)}, feats)


def mat_r101(*, num_classes: int, pretrained=None, **kw) -> MATSegmenter:
    return MATSegmenter(num_classes=num_classes, encoder="resnet101", pretrained=pretrained, **kw)


def mat_tiny(*, num_classes: int, pretrained=None, **kw) -> MATSegmenter:
    return MATSegmenter(num_classes=num_classes, encoder="tiny", pretrained=pretrained, **kw)
