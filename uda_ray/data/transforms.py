"""Joint image/label transforms: protocol resize, optional random scale, crop and flip,
normalisation to match the backbone.

The reference code of the field resizes GTA5 to 1280x720 and Cityscapes to 1024x512 with
no augmentation; that is the default here (``scale=(1, 1)``, no crop, no flip). Randomness
comes from the ``rng`` the dataset passes in, so a sample's augmentation is a function of
its seed only (reproducible across worker counts and resumes).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from .labels import IGNORE

# torchvision ImageNet statistics (RGB, 0..1) and the caffe DeepLab mean (BGR, 0..255)
# used by AdaptSegNet's ResNet-101 weights.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CAFFE_MEAN_BGR = (104.00698793, 116.66876762, 122.67891434)
NORMALISATIONS = ("imagenet", "caffe")


class JointTransform:
    """Resize -> random scale -> random crop -> random flip -> tensor -> normalise.

    Args:
        size: (width, height) to resize to, as the protocol says (e.g. (1024, 512)); None
            keeps the native size.
        scale: (min, max) of a random rescale after the resize; (1, 1) disables it.
        crop: (width, height) of a random crop (padded with ignore where the image is
            smaller); None disables it.
        flip: random horizontal flip with probability 0.5.
        norm: ``"imagenet"`` (RGB, mean/std of torchvision weights) or ``"caffe"`` (BGR,
            0..255 minus the caffe mean; AdaptSegNet's DeepLab weights).
        resize_label: False keeps the label at its full native size while the image is
            resized: evaluation predicts at the training size and compares at full size.

    Shape: PIL image (W0, H0), label uint8 [H0, W0] -> image float32 [3, H, W],
        label int64 [H, W] (or [H0, W0] with ``resize_label=False``).
    """

    def __init__(self, *, size: tuple[int, int] | None = None, scale: tuple[float, float] = (1.0, 1.0),
                 crop: tuple[int, int] | None = None, flip: bool = False, norm: str = "imagenet",
                 resize_label: bool = True):
        if norm not in NORMALISATIONS:
            raise ValueError(f"norm must be one of {NORMALISATIONS}, got {norm!r}")
        if not (0 < scale[0] <= scale[1]):
            raise ValueError(f"scale must be (min, max) with 0 < min <= max, got {scale}")
        if not resize_label and (crop is not None or flip or scale != (1.0, 1.0)):
            raise ValueError("resize_label=False is for evaluation: no crop, flip or random scale")
        self.size, self.scale, self.crop, self.flip = size, tuple(scale), crop, flip
        self.norm, self.resize_label = norm, resize_label

    def __call__(self, image: Image.Image, label: np.ndarray | None, rng: np.random.Generator):
        lab = Image.fromarray(label) if label is not None else None
        if self.size is not None and image.size != tuple(self.size):
            image = image.resize(self.size, Image.BICUBIC)  # as the reference code
            if lab is not None and self.resize_label:
                lab = lab.resize(self.size, Image.NEAREST)
        if self.scale != (1.0, 1.0):
            s = rng.uniform(*self.scale)
            new = (max(1, round(image.width * s)), max(1, round(image.height * s)))
            image = image.resize(new, Image.BICUBIC)
            lab = lab.resize(new, Image.NEAREST) if lab is not None else None
        img = np.asarray(image, dtype=np.float32)
        lab_arr = np.asarray(lab) if lab is not None else None
        if self.crop is not None:
            img, lab_arr = _random_crop(img, lab_arr, self.crop, rng)
        if self.flip and rng.random() < 0.5:
            img = img[:, ::-1]
            lab_arr = lab_arr[:, ::-1] if lab_arr is not None else None
        image_t = normalise(torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1), self.norm)
        label_t = torch.from_numpy(lab_arr.astype(np.int64)) if lab_arr is not None else None
        return image_t, label_t


def _random_crop(img: np.ndarray, lab: np.ndarray | None, crop: tuple[int, int], rng):
    cw, ch = crop
    h, w = img.shape[:2]
    if h < ch or w < cw:  # pad the image with mid-grey and the label with ignore
        ph, pw = max(ch - h, 0), max(cw - w, 0)
        img = np.pad(img, ((0, ph), (0, pw), (0, 0)), constant_values=127.5)
        if lab is not None:
            lab = np.pad(lab, ((0, ph), (0, pw)), constant_values=IGNORE)
        h, w = img.shape[:2]
    y = int(rng.integers(0, h - ch + 1))
    x = int(rng.integers(0, w - cw + 1))
    img = img[y:y + ch, x:x + cw]
    lab = lab[y:y + ch, x:x + cw] if lab is not None else None
    return img, lab


def normalise(img: torch.Tensor, norm: str) -> torch.Tensor:
    """RGB float [3, H, W] in 0..255 -> the backbone's input convention."""
    if norm == "imagenet":
        mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1) * 255
        std = torch.tensor(IMAGENET_STD).view(3, 1, 1) * 255
        return (img - mean) / std
    bgr = img.flip(0)
    return bgr - torch.tensor(CAFFE_MEAN_BGR).view(3, 1, 1)


def denormalise(img: torch.Tensor, norm: str) -> torch.Tensor:
    """Inverse of :func:`normalise`: [..., 3, H, W] -> uint8 RGB (for mosaics)."""
    if norm == "imagenet":
        mean = torch.tensor(IMAGENET_MEAN, device=img.device).view(3, 1, 1) * 255
        std = torch.tensor(IMAGENET_STD, device=img.device).view(3, 1, 1) * 255
        rgb = img * std + mean
    else:
        rgb = (img + torch.tensor(CAFFE_MEAN_BGR, device=img.device).view(3, 1, 1)).flip(-3)
    return rgb.clamp(0, 255).round().to(torch.uint8)
