"""Writers of tiny dataset trees in the real on-disk layouts, for the reader tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from uda_ray.config import build_config
from uda_ray.data.labels import labelid_palette


def rgb(path: Path, w: int, h: int, seed: int = 0, fmt: str = "PNG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, format=fmt)
    return path


def palette_label(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(arr.astype(np.uint8), mode="P")
    im.putpalette(labelid_palette())
    im.save(path)
    return path


def grey_label(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8), mode="L").save(path)
    return path


def synthia_label(path: Path, class_ids: np.ndarray, channels: int = 3) -> Path:
    """SYNTHIA's GT/LABELS: 16-bit, class id in the first (R) channel, instance id in G.
    OpenCV writes BGR(A), so R goes to index 2."""
    import cv2

    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = class_ids.shape
    arr = np.zeros((h, w, channels), dtype=np.uint16)
    arr[:, :, 2] = class_ids
    arr[:, :, 1] = 1000 + np.arange(w, dtype=np.uint16)[None, :]  # instance ids: must be ignored
    if channels == 4:
        arr[:, :, 3] = 65535
    assert cv2.imwrite(str(path), arr)
    return path


def label_map(h: int, w: int, ids: list[int]) -> np.ndarray:
    """Vertical stripes of the given ids."""
    cols = np.array_split(np.arange(w), len(ids))
    arr = np.zeros((h, w), dtype=np.int64)
    for c, v in zip(cols, ids):
        arr[:, c] = v
    return arr


def gta5_tree(root: Path, n: int = 3, w: int = 40, h: int = 22) -> Path:
    for i in range(1, n + 1):
        rgb(root / "images" / f"{i:05d}.png", w, h, seed=i)
        palette_label(root / "labels" / f"{i:05d}.png", label_map(h, w, [7, 8, 11, 26, 0]))
    return root


def cityscapes_tree(root: Path, split: str = "val", cities=("frankfurt", "lindau"), w: int = 32,
                    h: int = 16) -> Path:
    for k, city in enumerate(cities):
        stem = f"{city}_{k:06d}_000019"
        rgb(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", w, h, seed=k)
        grey_label(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png",
                   label_map(h, w, [7, 21, 23, 24, 33, 1]))
    return root


def synthia_tree(root: Path, n: int = 2, w: int = 32, h: int = 19) -> Path:
    for i in range(n):
        rgb(root / "RGB" / f"{i:07d}.png", w, h, seed=i)
        synthia_label(root / "GT" / "LABELS" / f"{i:07d}.png", label_map(h, w, [3, 8, 16, 0, 11]))
    return root


def bdd_tree(root: Path, split: str = "val", n: int = 2, w: int = 32, h: int = 18) -> Path:
    for i in range(n):
        name = f"7d2f7975-{i:08d}"
        rgb(root / "images" / "10k" / split / f"{name}.jpg", w, h, seed=i, fmt="JPEG")
        grey_label(root / "labels" / "sem_seg" / "masks" / split / f"{name}.png",
                   label_map(h, w, [0, 13, 18, 255]))
    return root


def tiny_cfg(root, tmp_path, method="source_only", **values):
    base = {
        "data.root": str(root), "data.synth": False, "data.source_w": 64, "data.source_h": 32,
        "data.target_w": 64, "data.target_h": 32, "data.batch_size": 2, "model.arch": "tiny",
        "model.bn": "shared", "run.out": str(tmp_path / "runs"), "run.iterations": 4,
        "run.schedule_iterations": 0, "run.eval_every": 0, "run.checkpoint_every": 0, "run.log_every": 1,
        "run.num_workers": 0, "run.mosaic_images": 1, "optim.lr": 0.01, "data.select_n": 1,
    }
    base.update(values)
    return build_config(base, method=method)


def study_switches(method: str, keys: tuple[str, ...]) -> set[tuple]:
    """The switch combinations of every ``method`` row of every study script."""
    from uda_ray.study import load_study

    combos = set()
    for path in sorted((Path(__file__).resolve().parents[1] / "studies").glob("*.py")):
        study = load_study(path)
        for row in study.rows:
            if row.method == method:
                flat = study.flat(row, 0)
                combos.add(tuple(flat[k] for k in keys))
    return combos


def random_batches(n: int = 2, dtype=None):
    """A seeded source batch (images, labels of 19 classes) and target batch (images) of
    ``n`` 32x64 images, for calling a method's steps directly."""
    import torch

    g = torch.Generator().manual_seed(0)
    src = {"image": torch.randn(n, 3, 32, 64, generator=g, dtype=dtype),
           "label": torch.randint(0, 19, (n, 32, 64), generator=g)}
    tgt = {"image": torch.randn(n, 3, 32, 64, generator=g, dtype=dtype)}
    return src, tgt
