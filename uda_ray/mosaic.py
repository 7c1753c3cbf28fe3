"""The prediction mosaic: image | label | prediction [| a method's extra maps], one row per
image, written as a PNG (engine evaluation and the proxy-label module), with a title above
each column and a legend of the class colours below, so that the PNG reads on its own (in
MLflow's image view, in a paper's supplement). The MLflow tracker heads it with the run's name,
the step and the mIoU of that evaluation (:func:`add_title`, called by
:meth:`uda_ray.tracking.MlflowTracker.log_image`: the engine itself does not know the run's name)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .data.labels import class_names, train_palette

TITLES = ("image", "ground truth", "prediction")
_PAD = 4  # pixels around text


def mosaic_png(triplets, path: Path, *, norm: str, num_classes: int, titles: tuple[str, ...] = TITLES) -> Path:
    """image | label | prediction [| the method's extra maps, greyscale], one row per val
    image, as a PNG: ``titles`` name the first three columns, an extra map is titled by its
    name; the class colours (and black: ignored) are listed below the rows."""
    from PIL import Image

    from .data.transforms import denormalise

    pal = train_palette(num_classes)
    rows, names = [], list(titles)
    for img, lab, pred, *extra in triplets:
        h, w = lab.shape
        rgb = Image.fromarray(denormalise(img, norm).permute(1, 2, 0).numpy()).resize((w, h), Image.BILINEAR)
        lab_c = pal[np.where(lab.numpy() == 255, num_classes, lab.numpy())]
        pred_c = pal[pred.numpy()]
        cols = [np.asarray(rgb), lab_c, pred_c]
        for m in (extra[0] if extra else {}).values():
            grey = Image.fromarray((m.numpy() * 255).round().astype(np.uint8)).resize((w, h), Image.BILINEAR)
            cols.append(np.repeat(np.asarray(grey)[..., None], 3, axis=2))
        if not rows and extra:
            names += list(extra[0])
        rows.append(np.concatenate(cols, axis=1))
    grid = np.concatenate(rows, axis=0)
    col_w = grid.shape[1] // max(1, len(names))
    if col_w < 160:  # small images (a smoke test's): enlarged, so that the titles fit their columns
        k = -(-160 // col_w)
        grid, col_w = grid.repeat(k, axis=0).repeat(k, axis=1), col_w * k
    out = _annotate(grid, names, col_w, pal, class_names(num_classes))
    path.parent.mkdir(parents=True, exist_ok=True)
    out.save(path)
    return path


def add_title(path: Path, title: str) -> Path:
    """Head the PNG at ``path`` with a strip that says ``title`` (cut with "..." to the image's
    width), in place; returns ``path``."""
    from PIL import Image, ImageDraw

    with Image.open(path) as im:
        image = im.convert("RGB")
    size = int(np.clip(image.width / 40, 10, 16))
    font = _font(size)
    line = size + 2 * _PAD
    canvas = Image.new("RGB", (image.width, line + image.height), "white")
    canvas.paste(image, (0, line))
    draw = ImageDraw.Draw(canvas)
    text = title
    while len(text) > 1 and draw.textlength(text, font=font) > image.width - 2 * _PAD:
        text = text[:-4] + "..."
    draw.text((_PAD, _PAD), text, fill="black", font=font)
    canvas.save(path)
    return path


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # a scalable font (Pillow >= 10.1 with FreeType)
    except TypeError:
        return ImageFont.load_default()


def _annotate(grid: np.ndarray, titles: list[str], col_w: int, pal: np.ndarray, classes) -> "Image.Image":
    """``grid`` with a title strip above each column and a colour legend below."""
    from PIL import Image, ImageDraw

    width = grid.shape[1]
    size = int(np.clip(col_w / 12, 10, 16))
    font = _font(size)
    line = size + 2 * _PAD
    # Legend entries: a swatch and the class name, packed left to right, wrapped at the width.
    entries = [*zip(classes, pal[:len(classes)]), ("ignored", pal[-1])]
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    items, x, y = [], _PAD, 0
    for name, color in entries:
        w = size + _PAD + int(scratch.textlength(name, font=font)) + 3 * _PAD
        if x + w > width and x > _PAD:
            x, y = _PAD, y + line
        items.append((x, y, name, color))
        x += w
    legend_h = y + line + _PAD
    canvas = Image.new("RGB", (width, line + grid.shape[0] + legend_h), "white")
    canvas.paste(Image.fromarray(grid), (0, line))
    draw = ImageDraw.Draw(canvas)
    for k, title in enumerate(titles):
        tw = draw.textlength(title, font=font)
        draw.text((k * col_w + max(_PAD, (col_w - tw) / 2), _PAD), title, fill="black", font=font)
    top = line + grid.shape[0] + _PAD
    for x, y, name, color in items:
        y0 = top + y + _PAD
        draw.rectangle([x, y0, x + size, y0 + size], fill=tuple(int(c) for c in color), outline="black")
        draw.text((x + size + _PAD, y0), name, fill="black", font=font)
    return canvas
