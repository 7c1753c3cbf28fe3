"""Domain discriminators: fully convolutional, one logit per location (no sigmoid).

The output is a raw logit map; pair it with ``BCEWithLogitsLoss`` (or a least-squares
loss). Which domain is label 0 is the method's choice (AdaptSegNet: source 0, target 1).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn


class FeatureDiscriminator(nn.Module):
    """Configurable conv stack: one conv per width, LeakyReLU between, a final conv to
    ``out_channels``. No normalisation. All convs use the same kernel and stride.

    Presets from the literature:

    - DAST: ``widths=(256, 128, 64), kernel_size=3, stride=1`` (the defaults);
    - PWW: ``kernel_size=1`` (a per-pixel classifier);
    - MAT / AdaptSegNet patch discriminators: ``widths=(64, 128, 256, 512), kernel_size=4,
      stride=2`` (output at 1/32), i.e. :class:`PatchDiscriminator`.

    Args:
        in_channels: channels of the input (classes for softmax outputs, or a feature width).
        widths: output channels of the hidden convs.
        kernel_size: kernel size of every conv.
        stride: stride of every conv.
        out_channels: channels of the output (1 for a domain logit; more for e.g. a
            class-wise or multi-domain discriminator).
        negative_slope: slope of the LeakyReLU.
        padding: padding of every conv; default ``(kernel_size - 1) // 2`` (size-preserving
            for odd kernels at stride 1, exact halving for 4x4 stride 2 on even sizes).

    Shape:
        (N, in_channels, H, W) -> (N, out_channels, H', W') with H' = H at stride 1 and odd
        kernels, H' = H / stride**(len(widths)+1) for 4x4/stride-2 on divisible sizes.

    Example:
        >>> d = FeatureDiscriminator(2048, widths=(256, 128, 64))
        >>> d(torch.randn(1, 2048, 8, 12)).shape
        torch.Size([1, 1, 8, 12])
    """

    def __init__(self, in_channels: int, *, widths: Sequence[int] = (256, 128, 64),
                 kernel_size: int = 3, stride: int = 1, out_channels: int = 1,
                 negative_slope: float = 0.2, padding: int | None = None) -> None:
        super().__init__()
        padding = (kernel_size - 1) // 2 if padding is None else padding
        layers: list[nn.Module] = []
        cin = in_channels
        for w in widths:
            layers += [nn.Conv2d(cin, w, kernel_size, stride=stride, padding=padding),
                       nn.LeakyReLU(negative_slope, inplace=True)]
            cin = w
        layers.append(nn.Conv2d(cin, out_channels, kernel_size, stride=stride, padding=padding))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class PatchDiscriminator(FeatureDiscriminator):
    """AdaptSegNet's ``FCDiscriminator``: DCGAN-style, on softmax outputs.

    Five 4x4 convs with stride 2 and padding 1, widths ndf, 2ndf, 4ndf, 8ndf, 1, LeakyReLU
    0.2 between, no normalisation; each output location judges a patch of the input.

    Args:
        in_channels: number of classes (the discriminator reads ``softmax(logits)``).
        ndf: width of the first conv.

    Shape:
        (N, in_channels, H, W) -> (N, 1, H/32, W/32) for H, W divisible by 32
        (e.g. 64x128 -> 2x4).
    """

    def __init__(self, in_channels: int, *, ndf: int = 64) -> None:
        super().__init__(in_channels, widths=(ndf, ndf * 2, ndf * 4, ndf * 8), kernel_size=4,
                         stride=2, out_channels=1, negative_slope=0.2, padding=1)


class PooledDiscriminator(nn.Module):
    """MAT's patch discriminator on features: 3x3 convs each followed by a LeakyReLU, with
    stride-2 average pooling after the first ``pools`` of them, then a 3x3 conv to one
    logit per location. ``pools`` sets the output resolution, so discriminators on features
    of different strides all answer at 1/32 of the input (MAT Sec. 2.4): D1 on the
    decoder's 1/4 features uses 3 pools, D2 on the 1/16 mid-level features 1.

    Args:
        in_channels: channels of the features judged.
        widths: output channels of the hidden convs.
        pools: average poolings (each halves the resolution), after the first convs.
        negative_slope: slope of the LeakyReLU.

    Shape:
        (N, in_channels, H, W) -> (N, 1, H / 2**pools, W / 2**pools) (floor per pooling)

    Example:
        >>> PooledDiscriminator(128, pools=3)(torch.randn(1, 128, 64, 128)).shape
        torch.Size([1, 1, 8, 16])
    """

    def __init__(self, in_channels: int, *, widths: Sequence[int] = (64, 128, 256, 512), pools: int = 3,
                 negative_slope: float = 0.2) -> None:
        super().__init__()
        if not 0 <= pools <= len(widths):
            raise ValueError(f"pools must be in [0, {len(widths)}], got {pools}")
        layers: list[nn.Module] = []
        cin = in_channels
        for i, w in enumerate(widths):
            layers += [nn.Conv2d(cin, w, 3, padding=1), nn.LeakyReLU(negative_slope, inplace=True)]
            if i < pools:
                layers.append(nn.AvgPool2d(2, ceil_mode=True))
            cin = w
        layers.append(nn.Conv2d(cin, 1, 3, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
