"""Reading images and label maps with errors that name the file and what was expected."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import UserError


class DatasetError(UserError):
    """A dataset problem a user can act on: the message names the file or folder."""


def read_rgb(path: Path) -> Image.Image:
    """An RGB image, fully decoded (so a truncated file fails here, not mid-batch)."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except FileNotFoundError:
        raise DatasetError(f"{path}: image file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DatasetError(f"{path}: unreadable or truncated image ({e})") from None


def read_index_png(path: Path) -> np.ndarray:
    """An 8-bit single-channel label PNG (mode 'L' or palette 'P') as its raw indices.

    GTA5 labels are palette PNGs whose indices are labelIds; Cityscapes' ``*_labelIds.png``
    and BDD100k's masks are plain 8-bit grey. An RGB colour image (e.g. ``*_color.png``
    passed by mistake) is rejected rather than silently converted.
    """
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode not in ("L", "P", "I;16", "I"):
                raise DatasetError(
                    f"{path}: expected a single-channel label PNG (mode L or P), got mode {im.mode}")
            arr = np.asarray(im)
    except FileNotFoundError:
        raise DatasetError(f"{path}: label file not found") from None
    except DatasetError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DatasetError(f"{path}: unreadable or truncated label ({e})") from None
    if arr.dtype != np.uint8:
        if arr.max(initial=0) > 255:
            raise DatasetError(f"{path}: label values up to {arr.max()} do not fit 8 bits")
        arr = arr.astype(np.uint8)
    return arr


def read_synthia_label(path: Path) -> np.ndarray:
    """SYNTHIA-RAND-CITYSCAPES ``GT/LABELS/*.png``: 16-bit multi-channel, class id in the
    first (R) channel. PIL cannot read these; OpenCV returns channels in BGR(A) order, so
    the class id is channel index 2 (the last of BGR)."""
    import cv2  # imported here: only SYNTHIA needs it

    if not Path(path).is_file():
        raise DatasetError(f"{path}: label file not found")
    arr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise DatasetError(f"{path}: unreadable or truncated SYNTHIA label (OpenCV could not decode it)")
    if arr.ndim == 3:
        if arr.shape[2] < 3:
            raise DatasetError(f"{path}: expected a 3- or 4-channel SYNTHIA label, got {arr.shape[2]} channels")
        arr = arr[:, :, 2]
    return np.ascontiguousarray(arr.astype(np.uint16, copy=False))
