"""Segmentation networks for UDA, with one output type so every method runs on every model.

Every model returns a :class:`SegOutput`: logits per head at the feature resolution
(output stride 8; the engine upsamples to the label size) and the named intermediate
features, so a method can attach a discriminator to any level. Each model also tells
``feature_channels`` (discriminator input widths), ``output_stride``, and ``head_inputs``
(which feature each logits head reads, e.g. ``{"main": "layer4", "aux": "layer3"}``).

Input images are expected RGB, ImageNet-normalised (torchvision's weights' convention).
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

from torch import Tensor, nn

from uda_ray.models.backbones import ResNetBackbone, TinyResNet, VGGBackbone
from uda_ray.models.heads import DEEPLAB_V2_RATES, ASPPClassifier, PPMDecoder
from uda_ray.models.pretrained import WeightsError, read_state_dict, resolve_pretrained


class SegOutput(NamedTuple):
    """What every segmenter returns.

    Attributes:
        logits: per head, (N, num_classes, h, w) at the feature resolution (not upsampled).
            "main" always; "aux" for multi-level DeepLab models; "dec2", ... for extra
            decoders of :class:`ResNet18PPM`.
        features: named intermediate features, (N, feature_channels[name], h', w').
    """

    logits: dict[str, Tensor]
    features: dict[str, Tensor]


class Segmenter(nn.Module):
    """Base class: a ``backbone`` (1x lr) and ``heads`` (10x lr), plus the shared metadata.

    Subclasses set ``backbone`` (returns a dict of features), ``heads`` (an
    ``nn.ModuleDict`` keyed by logits name), ``head_inputs``, ``feature_channels``,
    ``output_stride`` and ``num_classes``.
    """

    backbone: nn.Module
    heads: nn.ModuleDict
    num_classes: int
    output_stride: int
    feature_channels: dict[str, int]
    head_inputs: dict[str, str]
    # Key of ``pretrained.TORCHVISION_FILES`` for pretrained="torchvision"; None if none exist.
    torchvision_arch: str | None = None

    def forward(self, x: Tensor) -> SegOutput:
        feats = self.backbone(x)
        logits = {name: head(feats[self.head_inputs[name]]) for name, head in self.heads.items()}
        return SegOutput(logits, feats)

    def param_groups(self, base_lr: float, *, head_lr_mult: float = 10.0) -> list[dict[str, Any]]:
        """Optimizer parameter groups: backbone at 1x ``base_lr``, heads at ``head_lr_mult``x.

        Each group carries ``"lr_mult"`` so a poly schedule can set
        ``group["lr"] = lr_now * group["lr_mult"]``, and a ``"name"``. Parameters with
        ``requires_grad=False`` (e.g. frozen BatchNorm) are left out; call after
        :func:`~uda_ray.models.batchnorm.set_bn_mode`.

        Example:
            >>> opt = torch.optim.SGD(model.param_groups(2.5e-4), lr=2.5e-4, momentum=0.9)
        """
        backbone_ids = {id(p) for p in self.backbone.parameters()}
        groups = [("backbone", 1.0, [p for p in self.backbone.parameters() if p.requires_grad]),
                  ("heads", float(head_lr_mult),
                   [p for p in self.parameters() if p.requires_grad and id(p) not in backbone_ids])]
        return [{"params": ps, "lr": base_lr * mult, "lr_mult": mult, "name": name}
                for name, mult, ps in groups if ps]

    def _load_pretrained(self, pretrained: str | os.PathLike | None) -> None:
        # Backbone only: heads are task-specific and stay at their initialisation.
        if pretrained is None:
            return
        path = resolve_pretrained(pretrained, arch=self.torchvision_arch)
        self.pretrained_file = str(path)  # which file it was, for the run's record (engine.run_tags)
        state = read_state_dict(path)  # WeightsError: not a state dict of tensors
        try:
            self.backbone.load_imagenet_state_dict(state)
        except RuntimeError as e:
            raise WeightsError(f"model.pretrained: {path} does not fit the {type(self).__name__} backbone "
                               f"({_misfit(str(e))})") from None


def _misfit(message: str) -> str:
    """``load_state_dict``'s error (every missing and unexpected key, each mis-shaped tensor
    on its own line) as counts with one example each, for a one-line message."""
    import re

    parts = []
    for line in message.splitlines()[1:]:
        m = re.match(r"\s*(Missing|Unexpected) key\(s\) in state_dict: (.*)", line)
        if m:
            keys = re.findall(r'"([^"]+)"', m.group(2))
            parts.append(f"{len(keys)} {m.group(1).lower()} keys, e.g. {keys[0]!r}" if keys else line.strip())
    sizes = [line.strip() for line in message.splitlines() if line.strip().startswith("size mismatch for ")]
    if sizes:
        parts.append(f"{len(sizes)} tensors of another shape, e.g. {sizes[0][len('size mismatch for '):][:160]}")
    return "; ".join(parts) or message.splitlines()[0][:200]


class DeepLabV2ResNet101(Segmenter):
    """DeepLab-v2 on a dilated ResNet-101 with AdaptSegNet's multi-level ASPP heads.

    torchvision ResNet-101 with layer3/layer4 dilated (output stride 8); an ASPP classifier
    (rates 6/12/18/24, all four summed) on layer4 gives "main" and, with ``multi_level``,
    a second one on layer3 (1024 ch) gives "aux".

    Note: AdaptSegNet starts from a COCO-pretrained DeepLab checkpoint with a different key
    layout; ``pretrained`` here reads torchvision-layout ResNet-101 state dicts.

    Args:
        num_classes: classes predicted (19 or 16).
        multi_level: add the "aux" head on layer3.
        aspp_rates: dilation rates of the ASPP branches.
        pretrained: None, ``"torchvision"`` (hub cache ``resnet101-63fe2227.pth``), or a path.
        reference_layout: the network of AdaptSegNet's released code (``deeplab_multi.py``),
            which every GTA5 -> Cityscapes number built on it inherits, off by default: its
            ASPP sums only the first two of its four branches, its stem max-pool rounds up,
            its strided bottleneck carries the stride on the 1x1 conv (Caffe), and the first
            blocks of layer3 / layer4 are dilated 2 / 4 (torchvision's: 1 / 2). Its
            BatchNorm in train mode is ``model.bn=shared``.

    Shape:
        (N, 3, H, W) -> logits (N, num_classes, ceil(H/8), ceil(W/8)) for "main" (and "aux");
        features "layer1" (N, 256, ceil(H/4), ceil(W/4)), "layer2"/"layer3"/"layer4"
        (N, 512/1024/2048, ceil(H/8), ceil(W/8)). With ``reference_layout`` the stem pool
        rounds up, so features can be one larger (23x41 instead of 23x40 at 320x180).
    """

    torchvision_arch = "resnet101"

    def __init__(self, *, num_classes: int, multi_level: bool = True,
                 aspp_rates: tuple[int, ...] = DEEPLAB_V2_RATES,
                 pretrained: str | os.PathLike | None = None, reference_layout: bool = False) -> None:
        super().__init__()
        self.num_classes, self.output_stride = num_classes, 8
        self.backbone = ResNetBackbone(depth=101, reference_layout=reference_layout)
        self.feature_channels = dict(self.backbone.channels)
        self.head_inputs = {"main": "layer4"} | ({"aux": "layer3"} if multi_level else {})
        self.heads = nn.ModuleDict({
            name: ASPPClassifier(self.feature_channels[f], num_classes, rates=aspp_rates,
                                 reference_layout=reference_layout)
            for name, f in self.head_inputs.items()})
        self._load_pretrained(pretrained)


class DeepLabV2VGG16(Segmenter):
    """AdaptSegNet's DeepLab VGG16: dilated VGG16 trunk, fc6/fc7 convs, ASPP on fc7 ("main").

    See :class:`~uda_ray.models.backbones.VGGBackbone`. fc6/fc7 count as backbone (1x lr),
    as in DeepLab, although they start random when loading torchvision weights.

    Args:
        num_classes: classes predicted.
        fc7_kernel_size: 1 (DeepLab-LargeFOV) or 3 (dilation 4, AdaptSegNet's code).
        aspp_rates: dilation rates of the ASPP branches.
        pretrained: None, ``"torchvision"`` (hub cache ``vgg16-397923af.pth``; only its
            ``features.`` are used), or a path.

    Shape:
        (N, 3, H, W) -> logits "main" (N, num_classes, floor(H/8), floor(W/8));
        features "conv3" (N, 256, floor(H/4), floor(W/4)), "conv4"/"conv5" (N, 512, ...),
        "fc7" (N, 1024, floor(H/8), floor(W/8)).
    """

    torchvision_arch = "vgg16"

    def __init__(self, *, num_classes: int, fc7_kernel_size: int = 1,
                 aspp_rates: tuple[int, ...] = DEEPLAB_V2_RATES,
                 pretrained: str | os.PathLike | None = None) -> None:
        super().__init__()
        self.num_classes, self.output_stride = num_classes, 8
        self.backbone = VGGBackbone(fc7_kernel_size=fc7_kernel_size)
        self.feature_channels = dict(self.backbone.channels)
        self.head_inputs = {"main": "fc7"}
        self.heads = nn.ModuleDict({"main": ASPPClassifier(1024, num_classes, rates=aspp_rates)})
        self._load_pretrained(pretrained)


class _PPMSegmenter(Segmenter):
    """Shared by the PPM segmenters: ``num_decoders`` PSPNet decoders on the encoder's
    layer4, logits "main", "dec2", ... and fused features "decoder", "decoder2", ...."""

    def _build_decoders(self, in_channels: int, num_classes: int, *, num_decoders: int,
                        bins: tuple[int, ...], channels: int, dropout: float) -> None:
        if num_decoders < 1:
            raise ValueError(f"num_decoders must be >= 1, got {num_decoders}")
        names = ["main"] + [f"dec{k}" for k in range(2, num_decoders + 1)]
        # logits key -> feature key of that decoder's fused feature.
        self._decoder_features = {n: ("decoder" if n == "main" else f"decoder{n[3:]}") for n in names}
        self.head_inputs = {n: "layer4" for n in names}
        self.heads = nn.ModuleDict({
            n: PPMDecoder(in_channels, num_classes, bins=bins, channels=channels, dropout=dropout)
            for n in names})
        self.feature_channels = dict(self.backbone.channels) | {
            f: channels for f in self._decoder_features.values()}

    def forward(self, x: Tensor) -> SegOutput:
        feats = self.backbone(x)
        logits = {}
        for name, decoder in self.heads.items():
            feats[self._decoder_features[name]], logits[name] = decoder(feats["layer4"])
        return SegOutput(logits, feats)


class ResNet18PPM(_PPMSegmenter):
    """Dilated ResNet-18 encoder (output stride 8) with one or more PSPNet PPM decoders.

    With ``num_decoders=k`` the decoders share the encoder and differ only by their
    initialisation (the curriculum paper uses two). Keys:

    - logits: "main" (decoder 1), "dec2", ..., f"dec{k}";
    - features: "layer1".."layer4" (encoder), "decoder" (decoder 1's fused feature before
      dropout/classifier), "decoder2", ..., f"decoder{k}".

    Args:
        num_classes: classes predicted.
        num_decoders: number of decoders on the shared encoder (>= 1).
        bins: pyramid pooling bins.
        decoder_channels: channels of each decoder's fused feature (PSPNet: 512).
        dropout: dropout before each classifier.
        pretrained: None, ``"torchvision"`` (hub cache ``resnet18-f37072fd.pth``), or a path.

    Shape:
        (N, 3, H, W) -> logits (N, num_classes, ceil(H/8), ceil(W/8)) per decoder;
        features "layer1" (N, 64, ceil(H/4), ceil(W/4)), "layer2".."layer4"
        (N, 128/256/512, ceil(H/8), ceil(W/8)), "decoder*" (N, decoder_channels, ...).
    """

    torchvision_arch = "resnet18"

    def __init__(self, *, num_classes: int, num_decoders: int = 1,
                 bins: tuple[int, ...] = (1, 2, 3, 6), decoder_channels: int = 512,
                 dropout: float = 0.1, pretrained: str | os.PathLike | None = None) -> None:
        super().__init__()
        self.num_classes, self.output_stride = num_classes, 8
        self.backbone = ResNetBackbone(depth=18)
        self._build_decoders(512, num_classes, num_decoders=num_decoders, bins=bins, channels=decoder_channels,
                             dropout=dropout)
        self._load_pretrained(pretrained)


class TinySeg(Segmenter):
    """Small residual CNN preset that trains on a CPU in minutes at 256x128.

    Same interface and feature names as :class:`DeepLabV2ResNet101` (layer1..layer4,
    output stride 8, ASPP "main" on layer4, "aux" on layer3), so every method runs on it.
    About 0.8M parameters at 19 classes with the defaults.

    Args:
        num_classes: classes predicted.
        widths: channels of layer1..layer4.
        blocks: residual blocks per stage.
        multi_level: add the "aux" head on layer3.
        aspp_rates: dilation rates of the ASPP branches.
        pretrained: None or a path to a state dict of a TinySeg (backbone or whole model).

    Shape:
        (N, 3, H, W) -> logits (N, num_classes, ceil(H/8), ceil(W/8)) for "main" (and "aux");
        features "layer1" (N, widths[0], ceil(H/4), ceil(W/4)), "layer2".."layer4"
        (N, widths[k], ceil(H/8), ceil(W/8)).
    """

    torchvision_arch = None

    def __init__(self, *, num_classes: int, widths: tuple[int, int, int, int] = (16, 32, 64, 128),
                 blocks: tuple[int, int, int, int] = (2, 2, 2, 2), multi_level: bool = True,
                 aspp_rates: tuple[int, ...] = DEEPLAB_V2_RATES,
                 pretrained: str | os.PathLike | None = None) -> None:
        super().__init__()
        self.num_classes, self.output_stride = num_classes, 8
        self.backbone = TinyResNet(widths=widths, blocks=blocks)
        self.feature_channels = dict(self.backbone.channels)
        self.head_inputs = {"main": "layer4"} | ({"aux": "layer3"} if multi_level else {})
        self.heads = nn.ModuleDict({
            name: ASPPClassifier(self.feature_channels[f], num_classes, rates=aspp_rates)
            for name, f in self.head_inputs.items()})
        self._load_pretrained(pretrained)


class TinyPPM(_PPMSegmenter):
    """The CPU-sized :class:`ResNet18PPM`: the :class:`TinySeg` encoder (TinyResNet, output
    stride 8, dilated layer3/layer4) with one or more PSPNet PPM decoders on layer4.

    Same logits and feature names as :class:`ResNet18PPM` ("main", "dec2", ...;
    "decoder", "decoder2", ...), so the curriculum's branch ensemble runs on it unchanged.
    The fused decoder width defaults to the encoder's layer4 width (ResNet18PPM: 512 on
    512), which keeps the decoders as light relative to the encoder as in the paper.

    Args:
        num_classes: classes predicted.
        num_decoders: number of decoders on the shared encoder (>= 1).
        bins: pyramid pooling bins.
        widths: channels of layer1..layer4 of the encoder.
        blocks: residual blocks per stage.
        decoder_channels: channels of each decoder's fused feature (default: ``widths[3]``).
        dropout: dropout before each classifier.
        pretrained: None or a path to a state dict of a TinyResNet backbone.

    Shape:
        (N, 3, H, W) -> logits (N, num_classes, ceil(H/8), ceil(W/8)) per decoder;
        features "layer1" (N, widths[0], ceil(H/4), ceil(W/4)), "layer2".."layer4"
        (N, widths[k], ceil(H/8), ceil(W/8)), "decoder*" (N, decoder_channels, ...).

    Example:
        >>> m = TinyPPM(num_classes=19, num_decoders=2)
        >>> sorted(m(torch.randn(1, 3, 64, 96)).logits)
        ['dec2', 'main']
    """

    torchvision_arch = None

    def __init__(self, *, num_classes: int, num_decoders: int = 1,
                 bins: tuple[int, ...] = (1, 2, 3, 6),
                 widths: tuple[int, int, int, int] = (16, 32, 64, 128),
                 blocks: tuple[int, int, int, int] = (2, 2, 2, 2), decoder_channels: int | None = None,
                 dropout: float = 0.1, pretrained: str | os.PathLike | None = None) -> None:
        super().__init__()
        self.num_classes, self.output_stride = num_classes, 8
        self.backbone = TinyResNet(widths=widths, blocks=blocks)
        self._build_decoders(widths[3], num_classes, num_decoders=num_decoders, bins=bins,
                             channels=decoder_channels or widths[3], dropout=dropout)
        self._load_pretrained(pretrained)


MODELS: dict[str, type[Segmenter]] = {
    "deeplabv2_r101": DeepLabV2ResNet101,
    "deeplabv2_vgg16": DeepLabV2VGG16,
    "r18_ppm": ResNet18PPM,
    "tiny": TinySeg,
    "tiny_ppm": TinyPPM,
}


def build_model(name: str, *, num_classes: int, pretrained: str | os.PathLike | None = None,
                **kw: Any) -> Segmenter:
    """Build a segmenter by name (see :data:`MODELS`); ``kw`` go to its constructor.

    Args:
        name: "deeplabv2_r101", "deeplabv2_vgg16", "r18_ppm", "tiny" or "tiny_ppm".
        num_classes: classes predicted.
        pretrained: None, ``"torchvision"`` or a local path; loaded into the backbone only.

    Raises:
        ValueError: unknown ``name``.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODELS)}")
    return MODELS[name](num_classes=num_classes, pretrained=pretrained, **kw)
