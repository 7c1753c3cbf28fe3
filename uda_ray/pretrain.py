"""Pretrained encoders from the embedded pretraining domain (``uda-ray pretrain``).

The papers start from ImageNet weights (the curriculum from an ADE20k scene-parsing
model) and, for the DeepLab-style methods, keep BatchNorm frozen at those weights'
statistics. This trains the CPU-sized encoder the same way on the embedded stand-ins
(:mod:`uda_ray.data.synth_pretrain`), so ``model.pretrained=embedded`` (or
``embedded_seg``) starts a row as the papers do:

- ``embedded``, the ImageNet stand-in: the TinyResNet encoder, undilated (as ImageNet
  ResNets are trained; DeepLab dilates them afterwards), global average pooling and a
  linear classifier over the 16 object classes, trained from scratch with SGD and
  BatchNorm in train mode on 64x64 images (random 4-pixel-padded crops and flips).
- ``embedded_seg``, the ADE20k stand-in: a one-decoder ``tiny_ppm`` (PSPNet-style) over
  the 20 scene classes (label 0 "other" ignored, as in ADE20k), its encoder started from
  ``embedded``, as ADE20k models start from ImageNet ones.

Only the encoder is kept (``{"state_dict": encoder weights, "meta": recipe, data record
and accuracy}``) and loaded like ImageNet weights: heads, decoders and classifiers are
task-specific and start at their initialisation. One encoder serves ``tiny``, ``tiny_ppm``
and ``mat_tiny`` (the same TinyResNet widths and blocks; dilation has no weights). There is
no R18 recipe: an R18 at 64x64 costs about 15x the TinyResNet per image, which would make
the "minutes on 2 cores" of first use an hour; ``r18_ppm`` loads torchvision's real
ImageNet R18 (``model.pretrained=torchvision``) where a machine has it.

The weights and the domain they are trained on are cached in uda-ray's own cache folder
(``<cache>/pretrain/``, :func:`pretrain_root`; the cache is ``$UDA_RAY_CACHE``, else
``$XDG_CACHE_HOME/uda-ray``, else ``~/.cache/uda-ray``: :mod:`uda_ray.cache`), never in the
user's data folder. They do not depend on the benchmark (the domain has its own generator
and fixed seed), so one cache serves every ``data.root``. They are built on first use under
a lock (concurrent trials wait for one build), and rebuilt when the recipe or the data
record changes. They are deterministic for a given machine and
thread count (fixed seed 0, whatever the row's ``run.seed``: a row's seeds share one
initialisation, as every run of a paper shares the ImageNet weights).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data import synth_pretrain as sp
from .data.io import DatasetError, read_index_png, read_rgb
from .data.transforms import normalise
from .knobs import ConfigError

KINDS = ("embedded", "embedded_seg")
ARCHS = ("tiny", "tiny_ppm", "mat_tiny")  # the TinyResNet encoder at its default widths
RECIPES = {
    "embedded": {"iterations": 1200, "batch_size": 64, "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4,
                 "seed": 0},
    "embedded_seg": {"iterations": 800, "batch_size": 8, "lr": 0.01, "head_lr_mult": 10.0, "momentum": 0.9,
                     "weight_decay": 1e-4, "seed": 0},
}
PRETRAIN_DIR = "pretrain"


def pretrain_root() -> Path:
    """Where ``model.pretrained=embedded|embedded_seg`` and ``uda-ray pretrain`` keep the
    pretraining domain and the weights: ``<cache>/pretrain`` (:func:`uda_ray.cache.cache_dir`)."""
    from .cache import cache_dir

    return cache_dir() / PRETRAIN_DIR


def _normalise(x: torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W), ImageNet mean/std (``data.norm=imagenet``)."""
    return normalise(x.permute(0, 3, 1, 2).float(), "imagenet")


def _poly(lr: float, step: int, total: int) -> float:
    return lr * (1 - step / total) ** 0.9


def _bar(total: int, desc: str, progress: bool):
    if not progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="it", dynamic_ncols=True, file=sys.stderr)


# ----------------------------------------------------------------------------- data
def read_image_folder(root: Path, split: str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """An ImageFolder split (``root/split/<class>/*.png|jpg``) as uint8 (N, 64, 64, 3) images
    (resized if needed), int64 labels and the class folder names."""
    folder = root / split
    if not folder.is_dir():
        raise DatasetError(f"{folder}: classification split folder not found")
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if not classes:
        raise DatasetError(f"{folder}: no class folders")
    images, labels = [], []
    for k, c in enumerate(classes):
        for f in sorted((folder / c).iterdir()):
            if f.suffix.lower() in (".png", ".jpg", ".jpeg"):
                im = read_rgb(f)
                if im.size != (sp.CLS_SIZE, sp.CLS_SIZE):
                    im = im.resize((sp.CLS_SIZE, sp.CLS_SIZE), resample=2)
                images.append(np.asarray(im))
                labels.append(k)
    return torch.from_numpy(np.stack(images)), torch.tensor(labels), classes


def read_scenes(root: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """ADE20k layout (``images/<split>/*.png``, ``annotations/<split>/*.png``): uint8 images
    (N, H, W, 3) and int64 labels with 0 ("other") -> 255 (ignored) and k -> k - 1."""
    base = root / "ADEChallengeData2016"
    imgs = sorted((base / "images" / split).glob("*.png"))
    if not imgs:
        raise DatasetError(f"{base / 'images' / split}: no scene images")
    images, labels = [], []
    for f in imgs:
        lab = read_index_png(base / "annotations" / split / f.name)
        im = np.asarray(read_rgb(f))
        if lab.shape != im.shape[:2]:
            raise DatasetError(f"{base / 'annotations' / split / f.name}: label {lab.shape[1]}x{lab.shape[0]} does "
                               f"not match its image {im.shape[1]}x{im.shape[0]}")
        if lab.max() > len(sp.SCENE_CLASSES):
            raise DatasetError(f"{base / 'annotations' / split / f.name}: label id {lab.max()} > "
                               f"{len(sp.SCENE_CLASSES)}")
        images.append(im)
        labels.append(lab)
    lab = torch.from_numpy(np.stack(labels)).long()
    return torch.from_numpy(np.stack(images)), torch.where(lab == 0, 255, lab - 1)


# ----------------------------------------------------------------------------- training
def _train(model: nn.Module, opt, lr: float, iterations: int, step, desc: str, progress: bool) -> None:
    """The loop both recipes share: poly-decayed lr (times each group's ``lr_mult``), BatchNorm
    in train mode, ``step()`` -> loss of one batch; the model is left in eval mode."""
    bar = _bar(iterations, desc, progress)
    model.train()
    for it in range(iterations):
        for group in opt.param_groups:
            group["lr"] = _poly(lr, it, iterations) * group.get("lr_mult", 1.0)
        loss = step()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if bar is not None:
            bar.update(1)
            if it % 50 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
    if bar is not None:
        bar.close()
    model.eval()


class _Classifier(nn.Module):
    def __init__(self, num_classes: int):
        super().__init__()
        from .models.backbones import TinyResNet

        self.backbone = TinyResNet(dilated=False)
        self.fc = nn.Linear(self.backbone.channels["layer4"], num_classes)

    def forward(self, x):
        return self.fc(self.backbone(x)["layer4"].mean((2, 3)))


def train_classification(data: Path, *, iterations: int, batch_size: int, lr: float, momentum: float,
                         weight_decay: float, seed: int, progress: bool = True,
                         val_split: str = "val") -> tuple[dict, dict]:
    """Train the encoder on ``data/imagenet``; return (encoder state, meta with the top-1
    accuracy on ``val_split``)."""
    xs, ys, classes = read_image_folder(data / "imagenet", "train")
    xv, yv, _ = read_image_folder(data / "imagenet", val_split)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = _Classifier(len(classes))
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    t0 = time.perf_counter()

    def step():
        idx = torch.randint(len(xs), (batch_size,), generator=g)
        x = F.pad(_normalise(xs[idx]), (4, 4, 4, 4), mode="reflect")
        off = torch.randint(9, (batch_size, 2), generator=g).tolist()
        flip = torch.rand(batch_size, generator=g) < 0.5
        x = torch.stack([x[i, :, a:a + sp.CLS_SIZE, b:b + sp.CLS_SIZE] for i, (a, b) in enumerate(off)])
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
        return F.cross_entropy(model(x), ys[idx])

    _train(model, opt, lr, iterations, step, "pretrain embedded", progress)
    with torch.no_grad():
        pred = torch.cat([model(_normalise(xv[i:i + 256])).argmax(1) for i in range(0, len(xv), 256)])
    acc = float((pred == yv).float().mean())
    return model.backbone.state_dict(), {"val_top1": round(acc, 4), "train_images": len(xs), "val_images": len(xv),
                                         "seconds": round(time.perf_counter() - t0, 1)}


def train_segmentation(data: Path, init: dict, *, iterations: int, batch_size: int, lr: float, head_lr_mult: float,
                       momentum: float, weight_decay: float, seed: int, progress: bool = True) -> tuple[dict, dict]:
    """Train a one-decoder ``tiny_ppm`` on ``data/ade20k`` from the encoder ``init``; return
    (encoder state, meta with val mIoU and pixel accuracy)."""
    from .evaluation import ConfusionMatrix, compute_scores
    from .models.segmenters import TinyPPM

    xs, ys = read_scenes(data / "ade20k", "training")
    xv, yv = read_scenes(data / "ade20k", "validation")
    k = len(sp.SCENE_CLASSES)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = TinyPPM(num_classes=k)
    model.backbone.load_state_dict(init)
    opt = torch.optim.SGD(model.param_groups(lr, head_lr_mult=head_lr_mult), lr=lr, momentum=momentum,
                          weight_decay=weight_decay)
    t0 = time.perf_counter()

    def step():
        idx = torch.randint(len(xs), (batch_size,), generator=g)
        x, y = _normalise(xs[idx]), ys[idx]
        flip = torch.rand(batch_size, generator=g) < 0.5
        x, y = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x), torch.where(flip.view(-1, 1, 1), y.flip(2), y)
        logits = F.interpolate(model(x).logits["main"], size=y.shape[-2:], mode="bilinear", align_corners=False)
        return F.cross_entropy(logits, y, ignore_index=255)

    _train(model, opt, lr, iterations, step, "pretrain embedded_seg", progress)
    cm = ConfusionMatrix(k)
    with torch.no_grad():
        for i in range(0, len(xv), 32):
            logits = model(_normalise(xv[i:i + 32])).logits["main"]
            pred = F.interpolate(logits, size=yv.shape[-2:], mode="bilinear", align_corners=False).max(1).indices
            cm.update(pred, yv[i:i + 32])
    scores = compute_scores(cm, sp.SCENE_CLASSES)
    return model.backbone.state_dict(), {"val_mIoU": round(scores.miou, 4), "val_pixel_acc": round(scores.pixel_acc, 4),
                                         "train_images": len(xs), "val_images": len(xv),
                                         "seconds": round(time.perf_counter() - t0, 1)}


# ----------------------------------------------------------------------------- cache
def weights_file(pretrain_root: Path, kind: str) -> Path:
    return Path(pretrain_root) / "weights" / f"{kind}_tinyresnet.pt"


def _meta_of(path: Path) -> dict | None:
    try:
        return torch.load(path, map_location="cpu", weights_only=True).get("meta")
    except Exception:  # noqa: BLE001 -- a damaged cache file is rebuilt, not an error
        return None


def _save(path: Path, state: dict, meta: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save({"state_dict": state, "meta": meta}, tmp)
    os.replace(tmp, path)


def ensure_weights(pretrain_root: str | os.PathLike, kind: str, *, progress: bool = True,
                   data_counts: dict | None = None, recipes: dict | None = None) -> Path:
    """The cached encoder weights of ``kind`` under ``pretrain_root``, built (data included)
    on first use or when the recipe or data record changed, under a lock.

    ``data_counts`` and ``recipes`` override :data:`synth_pretrain.DEFAULTS` and
    :data:`RECIPES` (tests and ``uda-ray pretrain`` options; ``model.pretrained=embedded``
    always uses the defaults).
    """
    import fcntl

    if kind not in KINDS:
        raise ConfigError(f"model.pretrained: unknown embedded weights {kind!r}; valid: {', '.join(KINDS)}")
    root = Path(pretrain_root).resolve()
    recipes = {k: {**RECIPES[k], **(recipes or {}).get(k, {})} for k in KINDS}
    data_record = sp.params(0, **(data_counts or {}))
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".weights.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent trials: one builds, the others wait
        return _ensure_locked(root, kind, progress, data_counts or {}, recipes, data_record)


def _ensure_locked(root: Path, kind: str, progress: bool, data_counts: dict, recipes: dict, data_record: dict) -> Path:
    path = weights_file(root, kind)
    want = {"kind": kind, "recipe": recipes[kind], "data": data_record, "torch": torch.__version__.split("+")[0]}
    if kind == "embedded_seg":
        want["init"] = {"recipe": recipes["embedded"]}
    meta = _meta_of(path) if path.is_file() else None
    if meta is not None and {k: meta.get(k) for k in want} == want:
        return path
    sp.ensure(root, progress=progress, **data_counts)
    print(f"pretraining the embedded encoder ({kind}) into {path} ...", file=sys.stderr, flush=True)
    if kind == "embedded":
        state, result = train_classification(root, **recipes[kind], progress=progress)
    else:
        init = torch.load(_ensure_locked(root, "embedded", progress, data_counts, recipes, data_record),
                          map_location="cpu", weights_only=True)["state_dict"]
        state, result = train_segmentation(root, init, **recipes[kind], progress=progress)
    _save(path, state, {**want, "result": result, "threads": torch.get_num_threads()})
    print(f"  {kind}: {json.dumps(result)}", file=sys.stderr, flush=True)
    return path


def embedded_weights(cfg) -> Path:
    """The weights file ``model.pretrained=embedded|embedded_seg`` names for ``cfg``: the
    cache under :func:`pretrain_root` (not under ``data.root``: nothing is written into the
    user's data folder), built on first use."""
    kind, arch = cfg.model.pretrained, cfg.model.arch
    if arch not in ARCHS:
        raise ConfigError(f"model.pretrained={kind}: the embedded pretraining trains the TinyResNet encoder of "
                          f"{', '.join(ARCHS)}; model.arch={arch} takes 'torchvision' or a weights file")
    if not cfg.data.synth:
        raise ConfigError(f"model.pretrained={kind}: the embedded weights are the protocol of the embedded "
                          f"benchmark (data.synth=true); with other data pass the file `uda-ray pretrain` prints")
    from .cache import make_dir

    return ensure_weights(make_dir(pretrain_root()), kind)


def describe(path: Path) -> dict:
    """The meta record of a weights file (recipe, data record, accuracy)."""
    return _meta_of(Path(path)) or {}
