"""Dilated backbones (output stride 8) that return a dict of named stage features.

Module names follow torchvision's (``conv1``, ``bn1``, ``layer1`` .. ``layer4``,
``features.<i>``) so that torchvision's ImageNet state dicts load strictly, minus the
classification layers. Nothing here downloads weights: see ``pretrained.py``.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn
from torchvision.models import resnet18, resnet101

from uda_ray.models.pretrained import select_prefix


def _set_dilation(conv: nn.Conv2d, dilation: int) -> None:
    # 3x3 convs: padding = dilation keeps the spatial size.
    conv.dilation = (dilation, dilation)
    conv.padding = (dilation, dilation)


def _dilate_basic_layer(layer: nn.Sequential, *, dilation: int, previous: int) -> None:
    """Turn a stride-2 torchvision BasicBlock stage into a stride-1 dilated one.

    torchvision refuses ``replace_stride_with_dilation`` for BasicBlock, so this applies the
    same scheme it uses for Bottleneck: the first block keeps the previous dilation in its
    (formerly strided) conv, the remaining convs use the new one.
    """
    for i, block in enumerate(layer):
        if i == 0:
            block.conv1.stride = (1, 1)
            _set_dilation(block.conv1, previous)
            if block.downsample is not None:
                block.downsample[0].stride = (1, 1)
            block.stride = 1
        else:
            _set_dilation(block.conv1, dilation)
        _set_dilation(block.conv2, dilation)


class ResNetBackbone(nn.Module):
    """Torchvision ResNet-18/101 trunk without avgpool/fc, layer3/layer4 dilated (stride 8).

    Args:
        depth: 18 or 101.
        dilated: False keeps the plain strided ResNet (output stride 32: layer3 at 1/16,
            layer4 at 1/32), the encoder of encoder-decoder models (MAT).
        reference_layout: the ResNet of AdaptSegNet's released DeepLab code (depth 101):
            the stem max-pool rounds up (``ceil_mode=True``: 23x41 instead of 23x40
            features at 320x180), a strided bottleneck puts its stride on the first
            1x1 conv instead of the 3x3 (Caffe style), and the first block of layer3 /
            layer4 is dilated 2 / 4 like the rest of its stage (torchvision: 1 / 2, the
            previous stage's). Same parameters, so the same state dicts load.

    Shape:
        (N, 3, H, W) -> {"layer1": (N, C1, ceil(H/4), ceil(W/4)),
        "layer2".."layer4": (N, Ck, ceil(H/8), ceil(W/8))}, channels in ``self.channels``.
    """

    def __init__(self, *, depth: int, dilated: bool = True, reference_layout: bool = False) -> None:
        super().__init__()
        if depth == 101:
            # weights=None: never download; pretrained weights are loaded from a local file.
            net = resnet101(weights=None, replace_stride_with_dilation=[False, dilated, dilated])
            self.channels = {"layer1": 256, "layer2": 512, "layer3": 1024, "layer4": 2048}
        elif depth == 18:
            net = resnet18(weights=None)
            if dilated:
                _dilate_basic_layer(net.layer3, dilation=2, previous=1)
                _dilate_basic_layer(net.layer4, dilation=4, previous=2)
            self.channels = {"layer1": 64, "layer2": 128, "layer3": 256, "layer4": 512}
        else:
            raise ValueError(f"depth must be 18 or 101, got {depth}")
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            net.layer1, net.layer2, net.layer3, net.layer4)
        if reference_layout:
            if depth != 101:
                raise ValueError("reference_layout is AdaptSegNet's ResNet-101; depth must be 101")
            self.maxpool.ceil_mode = True
            for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
                for block in layer:
                    if block.conv2.stride != (1, 1):  # Caffe: the stride moves to the 1x1 conv
                        block.conv1.stride, block.conv2.stride = block.conv2.stride, (1, 1)
            if dilated:  # the first block of a dilated stage is dilated as the others (torchvision:
                for layer in (self.layer3, self.layer4):  # the previous stage's dilation)
                    _set_dilation(layer[0].conv2, layer[1].conv2.dilation[0])

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        feats = {}
        for name in ("layer1", "layer2", "layer3", "layer4"):
            x = getattr(self, name)(x)
            feats[name] = x
        return feats

    def load_imagenet_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Load a torchvision ResNet state dict strictly, ignoring its ``fc.`` classifier."""
        self.load_state_dict({k: v for k, v in state.items() if not k.startswith("fc.")})


# torchvision's VGG16 layout ("D"): ints are conv widths, "M" a 2x2 max-pool.
_VGG16_CFG: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
                                     512, 512, 512, "M", 512, 512, 512, "M")
# Indices in ``features`` (torchvision numbering) of pool4/pool5 and the conv5 convs.
_VGG_POOL4, _VGG_POOL5, _VGG_CONV5 = 23, 30, (24, 26, 28)
# Indices of the ReLUs after conv3_3, conv4_3, conv5_3, exposed as features.
_VGG_TAPS = {15: "conv3", 22: "conv4", 29: "conv5"}


class VGGBackbone(nn.Module):
    """AdaptSegNet's DeepLab VGG16 trunk: pool4/pool5 removed, conv5 dilated 2, fc6/fc7 as convs.

    ``features`` keeps torchvision's indices (removed pools become ``nn.Identity``) so a
    torchvision ``vgg16`` state dict loads into it. fc6 is a 3x3 conv (dilation 4, 1024 ch);
    fc7 is 1x1 (1024 ch) as in DeepLab-LargeFOV, or 3x3 dilation 4 as in the AdaptSegNet
    code with ``fc7_kernel_size=3``. fc6/fc7 are randomly initialised: torchvision's fully
    connected weights (4096-wide, 7x7 input) do not fit them.

    Args:
        fc7_kernel_size: 1 (DeepLab-LargeFOV) or 3 (AdaptSegNet's ``deeplab_vgg.py``).

    Shape:
        (N, 3, H, W) -> {"conv3": (N, 256, floor(H/4), floor(W/4)),
        "conv4", "conv5": (N, 512, floor(H/8), floor(W/8)), "fc7": (N, 1024, floor(H/8), floor(W/8))}
        (the max-pools floor, unlike the ResNets' strided convs, which round up).
    """

    def __init__(self, *, fc7_kernel_size: int = 1) -> None:
        super().__init__()
        if fc7_kernel_size not in (1, 3):
            raise ValueError(f"fc7_kernel_size must be 1 or 3, got {fc7_kernel_size}")
        layers: list[nn.Module] = []
        cin = 3
        for v in _VGG16_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(cin, int(v), kernel_size=3, padding=1), nn.ReLU(inplace=True)]
                cin = int(v)
        # Output stride 8: drop pool4/pool5 and dilate conv5 to keep its receptive field.
        layers[_VGG_POOL4] = nn.Identity()
        layers[_VGG_POOL5] = nn.Identity()
        for i in _VGG_CONV5:
            _set_dilation(layers[i], 2)
        self.features = nn.Sequential(*layers)
        self.fc6 = nn.Conv2d(512, 1024, kernel_size=3, padding=4, dilation=4)
        d7 = 4 if fc7_kernel_size == 3 else 1  # a 1x1 conv needs no dilation or padding
        self.fc7 = nn.Conv2d(1024, 1024, kernel_size=fc7_kernel_size,
                             padding=d7 if fc7_kernel_size == 3 else 0, dilation=d7)
        self.relu = nn.ReLU(inplace=True)
        # torchvision's VGG initialisation, used when no pretrained weights are loaded.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
        self.channels = {"conv3": 256, "conv4": 512, "conv5": 512, "fc7": 1024}

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        feats = {}
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in _VGG_TAPS:
                feats[_VGG_TAPS[i]] = x
        feats["fc7"] = self.relu(self.fc7(self.relu(self.fc6(x))))
        return feats

    def load_imagenet_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Load the ``features.`` part of a torchvision VGG16 state dict strictly."""
        self.features.load_state_dict(select_prefix(state, "features."))


class _BasicBlock(nn.Module):
    """ResNet basic block with stride and dilation (torchvision's refuses dilation > 1)."""

    def __init__(self, cin: int, cout: int, *, stride: int = 1, dilation: int = 1,
                 first_dilation: int | None = None) -> None:
        super().__init__()
        d1 = first_dilation or dilation
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=d1, dilation=d1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class TinyResNet(nn.Module):
    """Small residual CNN with the ResNets' stage names, output stride 8, for CPU runs.

    Stem: 3x3 stride-2 conv. layer1, layer2: stride 2. layer3, layer4: stride 1 with
    dilation 2 and 4 (the dilated-ResNet scheme, so heads see the same geometry).

    Args:
        widths: channels of layer1..layer4.
        blocks: basic blocks per stage.
        dilated: False makes layer3/layer4 strided instead (output stride 32), as the
            encoder of encoder-decoder models (MAT).

    Shape:
        (N, 3, H, W) -> {"layer1": (N, widths[0], ceil(H/4), ceil(W/4)),
        "layer2".."layer4": (N, widths[k], ceil(H/8), ceil(W/8))} (dilated; else layer3 at
        1/16 and layer4 at 1/32)
    """

    def __init__(self, *, widths: tuple[int, int, int, int] = (16, 32, 64, 128),
                 blocks: tuple[int, int, int, int] = (2, 2, 2, 2), dilated: bool = True) -> None:
        super().__init__()
        if len(widths) != 4 or len(blocks) != 4:
            raise ValueError("widths and blocks need one entry per stage (4)")
        self.conv1 = nn.Conv2d(3, widths[0], 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        strides, dilations = ((2, 2, 1, 1), (1, 1, 2, 4)) if dilated else ((2, 2, 2, 2), (1, 1, 1, 1))
        cin, prev_d = widths[0], 1
        for k in range(4):
            stage = [_BasicBlock(cin, widths[k], stride=strides[k], dilation=dilations[k],
                                 first_dilation=prev_d)]
            stage += [_BasicBlock(widths[k], widths[k], dilation=dilations[k])
                      for _ in range(blocks[k] - 1)]
            setattr(self, f"layer{k + 1}", nn.Sequential(*stage))
            cin, prev_d = widths[k], dilations[k]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        self.channels = {f"layer{k + 1}": widths[k] for k in range(4)}

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        x = self.relu(self.bn1(self.conv1(x)))
        feats = {}
        for name in ("layer1", "layer2", "layer3", "layer4"):
            x = getattr(self, name)(x)
            feats[name] = x
        return feats

    def load_imagenet_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Load a TinyResNet state dict strictly (there are no public ImageNet weights)."""
        self.load_state_dict(dict(state))
