"""Segmenters, discriminators and BatchNorm handling for UDA semantic segmentation.

Imports torch/torchvision only; never downloads weights.
"""

from uda_ray.models.batchnorm import (
    BN_MODES,
    DOMAINS,
    DomainBatchNorm2d,
    FrozenBatchNorm2d,
    bn_domain,
    get_bn_mode,
    reestimate_bn,
    set_bn_mode,
)
from uda_ray.models.discriminators import FeatureDiscriminator, PatchDiscriminator, PooledDiscriminator
from uda_ray.models.heads import ASPPClassifier, PPMDecoder
from uda_ray.models.pretrained import TORCHVISION_FILES
from uda_ray.models.segmenters import (
    MODELS,
    DeepLabV2ResNet101,
    DeepLabV2VGG16,
    ResNet18PPM,
    Segmenter,
    SegOutput,
    TinySeg,
    build_model,
)
from uda_ray.models.mat import MATSegmenter, mat_r101, mat_tiny
from uda_ray.models.from_config import build_segmenter

MODELS["mat_r101"] = mat_r101  # type: ignore[assignment]
MODELS["mat_tiny"] = mat_tiny  # type: ignore[assignment]

__all__ = [
    "ASPPClassifier", "BN_MODES", "DOMAINS", "DeepLabV2ResNet101", "DeepLabV2VGG16",
    "DomainBatchNorm2d", "FeatureDiscriminator", "FrozenBatchNorm2d", "MATSegmenter", "MODELS",
    "PPMDecoder", "PatchDiscriminator", "PooledDiscriminator", "ResNet18PPM", "SegOutput", "Segmenter",
    "TORCHVISION_FILES", "TinySeg", "bn_domain", "build_model", "build_segmenter", "get_bn_mode",
    "reestimate_bn", "set_bn_mode",
]
