"""The prediction mosaic: image | label | prediction [| a method's extra maps], one row per
image, written as a PNG (engine evaluation and the proxy-label module)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .data.labels import train_palette


def mosaic_png(triplets, path: Path, *, norm: str, num_classes: int) -> Path:
    """image | label | prediction [| the method's extra maps, greyscale], one row per val
    image, as a PNG."""
    from PIL import Image

    from .data.transforms import denormalise

    pal = train_palette(num_classes)
    rows = []
    for img, lab, pred, *extra in triplets:
        h, w = lab.shape
        rgb = Image.fromarray(denormalise(img, norm).permute(1, 2, 0).numpy()).resize((w, h), Image.BILINEAR)
        lab_c = pal[np.where(lab.numpy() == 255, num_classes, lab.numpy())]
        pred_c = pal[pred.numpy()]
        cols = [np.asarray(rgb), lab_c, pred_c]
        for m in (extra[0] if extra else {}).values():
            grey = Image.fromarray((m.numpy() * 255).round().astype(np.uint8)).resize((w, h), Image.BILINEAR)
            cols.append(np.repeat(np.asarray(grey)[..., None], 3, axis=2))
        rows.append(np.concatenate(cols, axis=1))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(rows, axis=0)).save(path)
    return path
