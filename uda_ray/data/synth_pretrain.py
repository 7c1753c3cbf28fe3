"""The embedded pretraining domain: the CPU-scale stand-in for ImageNet and ADE20k.

The papers start from ImageNet-pretrained backbones (the curriculum from an ADE20k
scene-parsing model). Neither can be downloaded here, so this writes a third domain,
neither the benchmark's source (game render of streets) nor its target (photo-like
streets): flat, object-centric images without perspective, horizon or street layout.

- Objects: 16 classes = 8 outline shapes (disc, triangle, square, star, cross, ring, bar,
  chevron) x 2 surface patterns (stripes, spots), each at a random position, scale and
  rotation, in two colours drawn uniformly in HSV (a palette of its own, not a class's),
  with a linear shading gradient.
- Backgrounds: multi-octave colour noise of a random hue and a random gradient, with 0-3
  clutter blobs (ellipses of random colour) that belong to no class.
- Scenes (the ADE20k stand-in): the frame is cut by 1-2 random straight lines into regions
  of 4 "stuff" classes (each its own texture: fine grain, checks, waves, smooth gradient),
  then 2-6 objects of the 16 classes and the clutter are painted on top.

On-disk layouts, as the real datasets (PNG instead of JPEG, so the bytes are exact)::

    OUT/imagenet/{train,val}/<wnid>/<wnid>_<i>.png    64x64 RGB; ImageFolder layout, wnid e0000000..
    OUT/imagenet/classes.txt                           "<wnid> <name>" per class
    OUT/ade20k/ADEChallengeData2016/images/{training,validation}/ADE_{train,val}_<i:08d>.png  128x96 RGB
    OUT/ade20k/ADEChallengeData2016/annotations/{training,validation}/ADE_{train,val}_<i:08d>.png
        mode L: 0 = "other" (ignored, as in ADE20k), 1..16 objects, 17..20 stuff
    OUT/pretrain.json                                  parameters, written LAST

Determinism: image ``i`` of a split draws from ``default_rng((seed, split, i))``, so the
output is byte-identical for the same arguments whatever ``workers`` is.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import shutil
import sys
import time
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from .io import DatasetError
from .synth import SynthArgumentError

PRETRAIN_VERSION = 1
SHAPES = ("disc", "triangle", "square", "star", "cross", "ring", "bar", "chevron")
PATTERNS = ("stripes", "spots")
OBJECT_CLASSES = tuple(f"{s}_{p}" for p in PATTERNS for s in SHAPES)  # ids 1..16 in the scenes
STUFF_CLASSES = ("grain", "checks", "waves", "smooth")  # ids 17..20 in the scenes
SCENE_CLASSES = OBJECT_CLASSES + STUFF_CLASSES
CLS_SIZE = 64  # classification images: square
SCENE_SIZE = (128, 96)  # (W, H) of the scenes
DEFAULTS = {"n_cls_train": 250, "n_cls_val": 50, "n_seg_train": 1200, "n_seg_val": 200}  # per class / per split
_SPLITS = {"cls_train": 0, "cls_val": 1, "seg_train": 2, "seg_val": 3}
# What lives in the domain's folder: its data, marker files, and the weights trained on it.
OWN_ENTRIES = ("imagenet", "ade20k", "pretrain.json", ".pretrain_partial", "weights", ".weights.lock")


def wnid(k: int) -> str:
    """The folder name of class ``k`` (ImageNet's ``n########`` style, ``e`` for embedded)."""
    return f"e{k:07d}"


# ----------------------------------------------------------------------------- drawing
def _hsv(rng, s=(0.35, 1.0), v=(0.35, 1.0)) -> np.ndarray:
    h, ss, vv = rng.uniform(0, 180), rng.uniform(*s), rng.uniform(*v)
    px = np.uint8([[[h, ss * 255, vv * 255]]])
    return cv2.cvtColor(px, cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32)


def _noise(rng, h, w, cells=(4, 9, 17)) -> np.ndarray:
    """Multi-octave value noise in [-1, 1] (bilinear-upsampled random grids)."""
    out = np.zeros((h, w), np.float32)
    for k, c in enumerate(cells):
        g = rng.standard_normal((c, c)).astype(np.float32)
        out += cv2.resize(g, (w, h), interpolation=cv2.INTER_CUBIC) / (k + 1)
    return out / max(float(np.abs(out).max()), 1e-6)


def _background(rng, h, w) -> np.ndarray:
    base, other = _hsv(rng, s=(0.1, 0.7)), _hsv(rng, s=(0.1, 0.7))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    a = rng.uniform(0, 2 * math.pi)
    ramp = (np.cos(a) * xx / w + np.sin(a) * yy / h)
    ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-6)
    img = base * (1 - ramp[..., None]) + other * ramp[..., None]
    return img + 40 * _noise(rng, h, w)[..., None] * rng.uniform(0.3, 1.0)


def _shape_mask(rng, shape: str, h: int, w: int, cx: float, cy: float, r: float) -> np.ndarray:
    """A filled 0/1 mask of ``shape`` centred at (cx, cy) with radius ``r`` (pixels)."""
    m = np.zeros((h, w), np.uint8)
    rot = rng.uniform(0, 2 * math.pi)

    def poly(pts):
        pts = np.asarray(pts, np.float32)
        c, s = math.cos(rot), math.sin(rot)
        xy = np.stack([cx + c * pts[:, 0] - s * pts[:, 1], cy + s * pts[:, 0] + c * pts[:, 1]], 1)
        cv2.fillPoly(m, [np.round(xy * 16).astype(np.int32)], 1, lineType=cv2.LINE_8, shift=4)

    def ngon(n, rad, phase=0.0):
        return [(rad * math.cos(phase + 2 * math.pi * k / n), rad * math.sin(phase + 2 * math.pi * k / n))
                for k in range(n)]

    if shape == "disc":
        cv2.circle(m, (round(cx), round(cy)), max(round(r), 1), 1, -1)
    elif shape == "ring":
        cv2.circle(m, (round(cx), round(cy)), max(round(r), 2), 1, -1)
        cv2.circle(m, (round(cx), round(cy)), max(round(r * 0.55), 1), 0, -1)
    elif shape == "triangle":
        poly(ngon(3, r * 1.15))
    elif shape == "square":
        poly(ngon(4, r * 1.05, math.pi / 4))
    elif shape == "star":
        poly([(r * (1.15 if k % 2 == 0 else 0.45) * math.cos(math.pi * k / 5),
               r * (1.15 if k % 2 == 0 else 0.45) * math.sin(math.pi * k / 5)) for k in range(10)])
    elif shape == "cross":
        t = r * 0.33
        poly([(-r, -t), (r, -t), (r, t), (-r, t)])
        poly([(-t, -r), (t, -r), (t, r), (-t, r)])
    elif shape == "bar":
        poly([(-r * 1.2, -r * 0.3), (r * 1.2, -r * 0.3), (r * 1.2, r * 0.3), (-r * 1.2, r * 0.3)])
    elif shape == "chevron":
        poly([(-r, -r * 0.8), (0, 0), (r, -r * 0.8), (r, -r * 0.2), (0, r * 0.6), (-r, -r * 0.2)])
    else:
        raise ValueError(shape)
    return m


def _pattern(rng, pattern: str, h: int, w: int) -> np.ndarray:
    """The two-colour surface of an object, (h, w, 3) float32."""
    c1, c2 = _hsv(rng), _hsv(rng)
    while float(np.abs(c1 - c2).sum()) < 120:  # the pattern stays visible
        c2 = _hsv(rng)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if pattern == "stripes":
        a, period = rng.uniform(0, math.pi), rng.uniform(3.0, 6.0)
        t = (np.sin(2 * math.pi * (np.cos(a) * xx + np.sin(a) * yy) / period) > 0).astype(np.float32)
    else:  # spots on a lattice of random pitch and offset
        pitch = rng.uniform(4.0, 7.0)
        ox, oy = rng.uniform(0, pitch, 2)
        dx = (xx + ox) % pitch - pitch / 2
        dy = (yy + oy) % pitch - pitch / 2
        t = (dx * dx + dy * dy < (pitch * 0.3) ** 2).astype(np.float32)
    return c1 * (1 - t[..., None]) + c2 * t[..., None]


def _stuff(rng, kind: str, h: int, w: int) -> np.ndarray:
    """The texture of a stuff class, (h, w, 3) float32, in colours drawn per image."""
    c1, c2 = _hsv(rng, s=(0.1, 0.8)), _hsv(rng, s=(0.1, 0.8))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind == "grain":
        t = np.clip(0.5 + 0.5 * rng.standard_normal((h, w)).astype(np.float32), 0, 1)
    elif kind == "checks":
        p = rng.uniform(5, 10)
        t = ((np.floor(xx / p) + np.floor(yy / p)) % 2).astype(np.float32)
    elif kind == "waves":
        p, a = rng.uniform(8, 16), rng.uniform(0, math.pi)
        t = 0.5 + 0.5 * np.sin(2 * math.pi * (np.cos(a) * xx + np.sin(a) * yy + 3 * np.sin(yy / 5)) / p)
    else:  # smooth: a gentle gradient
        t = np.clip(xx / w * rng.uniform(-1, 1) + yy / h * rng.uniform(-1, 1) + 0.5, 0, 1)
    return c1 * (1 - t[..., None]) + c2 * t[..., None]


def _paint_object(rng, img, lab, cls: int, cx, cy, r) -> None:
    """Paint object class ``cls`` (0-based) into ``img``; write ``cls + 1`` into ``lab`` if given."""
    h, w = img.shape[:2]
    m = _shape_mask(rng, SHAPES[cls % len(SHAPES)], h, w, cx, cy, r).astype(bool)
    if not m.any():
        return
    surf = _pattern(rng, PATTERNS[cls // len(SHAPES)], h, w)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    a = rng.uniform(0, 2 * math.pi)
    shade = 1 + 0.25 * ((np.cos(a) * (xx - cx) + np.sin(a) * (yy - cy)) / max(r, 1))
    img[m] = (surf * np.clip(shade, 0.6, 1.4)[..., None])[m]
    if lab is not None:
        lab[m] = cls + 1


def _clutter(rng, img, lab, n: int, scale: float) -> None:
    h, w = img.shape[:2]
    for _ in range(n):
        m = np.zeros((h, w), np.uint8)
        cv2.ellipse(m, (int(rng.uniform(0, w)), int(rng.uniform(0, h))),
                    (int(rng.uniform(2, scale)), int(rng.uniform(2, scale))), rng.uniform(0, 180), 0, 360, 1, -1)
        m = m.astype(bool)
        img[m] = _hsv(rng) + 25 * rng.standard_normal((int(m.sum()), 1)).astype(np.float32)
        if lab is not None:
            lab[m] = 0


def _finish(rng, img) -> np.ndarray:
    if rng.random() < 0.5:
        img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.3, 0.9))
    img = img + rng.uniform(0, 6) * rng.standard_normal(img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def render_classification(seed: int, split: str, index: int) -> tuple[np.ndarray, int]:
    """Image ``index`` of a classification split: (64x64x3 uint8, class 0..15). Classes
    cycle with the index, so every class has the same count."""
    rng = np.random.default_rng((seed, _SPLITS[split], index))
    cls = index % len(OBJECT_CLASSES)
    s = CLS_SIZE
    img = _background(rng, s, s)
    _clutter(rng, img, None, int(rng.integers(0, 4)), s * 0.15)
    r = rng.uniform(0.22, 0.38) * s
    _paint_object(rng, img, None, cls, rng.uniform(r * 0.8, s - r * 0.8), rng.uniform(r * 0.8, s - r * 0.8), r)
    return _finish(rng, img), cls


def render_scene(seed: int, split: str, index: int) -> tuple[np.ndarray, np.ndarray]:
    """Scene ``index`` of a segmentation split: (96x128x3 uint8, 96x128 uint8 ids 0..20)."""
    rng = np.random.default_rng((seed, _SPLITS[split], index))
    w, h = SCENE_SIZE
    img = np.zeros((h, w, 3), np.float32)
    lab = np.zeros((h, w), np.uint8)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    region = np.zeros((h, w), np.int64)
    for k in range(int(rng.integers(1, 3))):  # 1-2 straight cuts: 2-4 regions
        a, off = rng.uniform(0, 2 * math.pi), rng.uniform(-0.3, 0.3)
        region += (2 ** k) * ((np.cos(a) * (xx / w - 0.5) + np.sin(a) * (yy / h - 0.5)) > off)
    for reg in np.unique(region):
        kind = int(rng.integers(0, len(STUFF_CLASSES)))
        m = region == reg
        img[m] = _stuff(rng, STUFF_CLASSES[kind], h, w)[m]
        lab[m] = len(OBJECT_CLASSES) + 1 + kind
    _clutter(rng, img, lab, int(rng.integers(0, 4)), 10)
    for _ in range(int(rng.integers(2, 7))):
        r = rng.uniform(7, 22)
        _paint_object(rng, img, lab, int(rng.integers(0, len(OBJECT_CLASSES))),
                      rng.uniform(0, w), rng.uniform(0, h), r)
    return _finish(rng, img), lab


# ----------------------------------------------------------------------------- writing
def _cls_path(out: Path, split: str, index: int, cls: int) -> Path:
    return out / "imagenet" / split.split("_")[1] / wnid(cls) / f"{wnid(cls)}_{index:06d}.png"


def _seg_paths(out: Path, split: str, index: int) -> tuple[Path, Path]:
    folder, tag = ("training", "train") if split == "seg_train" else ("validation", "val")
    root = out / "ade20k" / "ADEChallengeData2016"
    name = f"ADE_{tag}_{index + 1:08d}.png"
    return root / "images" / folder / name, root / "annotations" / folder / name


_JOB: dict = {}


def _init(job):
    cv2.setNumThreads(0)
    _JOB.clear()
    _JOB.update(job)


def _work(task):
    split, index = task
    out, seed = _JOB["out"], _JOB["seed"]
    if split.startswith("cls"):
        img, cls = render_classification(seed, split, index)
        Image.fromarray(img).save(_cls_path(out, split, index, cls), compress_level=1)
    else:
        img, lab = render_scene(seed, split, index)
        ip, lp = _seg_paths(out, split, index)
        Image.fromarray(img).save(ip, compress_level=1)
        Image.fromarray(lab, mode="L").save(lp, compress_level=1)
    return split


def params(seed: int = 0, **counts) -> dict:
    """The record ``pretrain.json`` keeps for these arguments (validated)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise SynthArgumentError(f"seed must be an integer >= 0, got {seed!r}")
    unknown = set(counts) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"unknown arguments: {sorted(unknown)}")
    n = {**DEFAULTS, **counts}
    for k, v in n.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise SynthArgumentError(f"{k} must be an integer >= 1, got {v!r}")
    return {"version": PRETRAIN_VERSION, "seed": seed, **n, "classes": list(OBJECT_CLASSES),
            "scene_classes": ["other", *SCENE_CLASSES]}


def _check_own(out: Path) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise DatasetError(f"{out}: exists and is not a folder; the pretraining domain needs a new or empty folder")
    entries = sorted(p.name for p in out.iterdir())
    foreign = [e for e in entries if e not in OWN_ENTRIES]
    marked = (out / "pretrain.json").is_file() or (out / ".pretrain_partial").is_file()
    if foreign or ({"imagenet", "ade20k"} & set(entries) and not marked):
        raise DatasetError(f"{out}: refusing to write the pretraining domain into a folder that holds data it did "
                           f"not write ({', '.join(foreign or entries)}); give it a new or empty folder")


def generate(out, *, seed: int = 0, workers: int = 2, progress: bool = False, **counts) -> dict:
    """Write the pretraining domain under ``out`` (layout in the module docstring).

    A previous one there is replaced; a folder holding anything else is refused
    (:class:`DatasetError`) and left untouched. Returns the parameters and ``seconds``.
    """
    record = params(seed, **counts)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise SynthArgumentError(f"workers must be an integer >= 1, got {workers!r}")
    t0 = time.perf_counter()
    out = Path(out)
    _check_own(out)
    for p in (out / "imagenet", out / "ade20k"):
        shutil.rmtree(p, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pretrain.json").unlink(missing_ok=True)
    (out / ".pretrain_partial").touch()
    k = len(OBJECT_CLASSES)
    tasks = ([("cls_train", i) for i in range(record["n_cls_train"] * k)]
             + [("cls_val", i) for i in range(record["n_cls_val"] * k)]
             + [("seg_train", i) for i in range(record["n_seg_train"])]
             + [("seg_val", i) for i in range(record["n_seg_val"])])
    for split in ("cls_train", "cls_val"):
        for c in range(k):
            _cls_path(out, split, 0, c).parent.mkdir(parents=True, exist_ok=True)
    for split in ("seg_train", "seg_val"):
        for p in _seg_paths(out, split, 0):
            p.parent.mkdir(parents=True, exist_ok=True)
    (out / "imagenet" / "classes.txt").write_text("".join(f"{wnid(c)} {n}\n" for c, n in enumerate(OBJECT_CLASSES)))
    job = {"out": out, "seed": seed}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(tasks), desc="pretrain data", unit="img", dynamic_ncols=True, file=sys.stderr)
    if workers == 1:
        threads = cv2.getNumThreads()
        try:
            _init(job)
            for _ in map(_work, tasks):
                bar is not None and bar.update(1)
        finally:
            cv2.setNumThreads(threads)
            _JOB.clear()
    else:
        with mp.get_context("fork").Pool(workers, _init, (job,)) as pool:
            for _ in pool.imap_unordered(_work, tasks, chunksize=32):
                bar is not None and bar.update(1)
    if bar is not None:
        bar.close()
    (out / "pretrain.json").write_text(json.dumps(record, indent=1))  # last: the "complete" marker
    (out / ".pretrain_partial").unlink(missing_ok=True)
    return {**record, "out": str(out), "seconds": round(time.perf_counter() - t0, 2)}


def ensure(out, *, seed: int = 0, workers: int = 2, progress: bool = True, **counts) -> Path:
    """Generate the domain unless ``out/pretrain.json`` records the same parameters."""
    out = Path(out)
    want = params(seed, **counts)
    marker = out / "pretrain.json"
    if marker.is_file():
        try:
            if json.loads(marker.read_text()) == want:
                return out
        except (OSError, ValueError):
            pass
    print(f"generating the embedded pretraining domain in {out.resolve()} ...", file=sys.stderr, flush=True)
    generate(out, seed=seed, workers=workers, progress=progress, **counts)
    return out
