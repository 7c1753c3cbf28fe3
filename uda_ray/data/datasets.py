"""Readers for GTA5, Cityscapes, SYNTHIA-RAND-CITYSCAPES and BDD100k (10K seg) in their
real on-disk layouts (see ../shared/DATA.md), mapping raw labels to train ids.

Every reader is the same small recipe: ``discover()`` lists (image, label) file pairs,
``raw_lut`` maps raw label values to train ids of the label space, and ``valid_raw`` says
which raw values the dataset may contain. Problems found while listing (an image without a
label) are skipped and counted in ``dataset.problems`` or raised, by choice; problems found
while reading (unreadable file, size mismatch, unknown ids) raise :class:`DatasetError`
naming the file, and ``uda-ray data check`` collects all of them.

A sample is a dict: ``image`` float32 [3, H, W] (normalised), ``label`` int64 [H, W] (train
ids, 255 = ignore; absent with ``labels=False``), ``name`` (path relative to the root) and
``index``. ``dataset[i]`` uses a fixed augmentation seed; the samplers of
:mod:`uda_ray.data.loader` pass ``(i, seed)`` so augmentations depend on the sample's
position in the run, not on which worker process read it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
from torch.utils.data import Dataset

from . import labels as L
from .io import DatasetError, read_index_png, read_rgb, read_synthia_label
from .transforms import JointTransform


@dataclass(frozen=True)
class Problem:
    """One problem with one file, as reported by readers and ``uda-ray data check``."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class SegDataset(Dataset):
    """Base of the readers. Subclasses set ``name``, ``splits`` and implement ``discover``
    and the label tables.

    Args:
        root: the dataset's root folder, laid out as the real release.
        split: one of ``splits`` (the first is the default).
        num_classes: label space, 19 or 16 (SYNTHIA -> Cityscapes protocol).
        transform: joint image/label transform; default: no resize, ImageNet normalisation.
        labels: read labels (False for unlabelled target training: the labels are not
            even required to exist).
        missing_label: ``"skip"`` (count it in ``problems``; GTA5's public release lacks
            25 labels) or ``"error"``.
        check_ids: raise on raw label values that the dataset's label table does not know.
    """

    name: ClassVar[str] = ""
    splits: ClassVar[tuple[str, ...]] = ()

    def __init__(self, root: str | Path, *, split: str | None = None, num_classes: int = 19,
                 transform: JointTransform | None = None, labels: bool = True,
                 missing_label: str = "skip", check_ids: bool = True):
        self.root = Path(root)
        self.split = split or self.splits[0]
        if self.split not in self.splits:
            raise DatasetError(f"{self.name}: split must be one of {', '.join(self.splits)}, got {self.split!r}")
        if num_classes not in L.LABEL_SPACES:
            raise ValueError(f"{self.name}: num_classes must be one of {L.LABEL_SPACES}, got {num_classes}")
        if missing_label not in ("skip", "error"):
            raise ValueError(f"missing_label must be 'skip' or 'error', got {missing_label!r}")
        if not self.root.is_dir():
            raise DatasetError(f"{self.root}: {self.name} root folder not found")
        self.num_classes = num_classes
        self.transform = transform or JointTransform()
        self.with_labels = labels
        self.check_ids = check_ids
        self.problems: list[Problem] = []
        pairs = self.discover()
        if not pairs:
            raise DatasetError(f"{self.root}: no {self.name} images found for split {self.split!r} "
                               f"(expected {self.layout_hint()})")
        self.samples: list[tuple[Path, Path | None]] = []
        for image, label in pairs:
            if labels and not label.is_file():
                problem = Problem(str(image), f"image without a label (expected {label})")
                if missing_label == "error":
                    raise DatasetError(str(problem))
                self.problems.append(problem)
                continue
            self.samples.append((image, label if labels else None))
        self.raw_lut = self.make_raw_lut()
        self.valid_raw = self.make_valid_raw()

    # --- to implement per dataset -------------------------------------------------
    def discover(self) -> list[tuple[Path, Path]]:
        raise NotImplementedError

    def layout_hint(self) -> str:
        raise NotImplementedError

    def make_raw_lut(self) -> np.ndarray:
        """LUT raw label value -> train id of ``num_classes`` (255 = ignore)."""
        raise NotImplementedError

    def make_valid_raw(self) -> np.ndarray:
        """Boolean LUT: raw values this dataset may contain."""
        raise NotImplementedError

    def read_raw_label(self, path: Path) -> np.ndarray:
        return read_index_png(path)

    # --- shared ----------------------------------------------------------------------
    def _require_dir(self, path: Path, what: str) -> Path:
        if not path.is_dir():
            raise DatasetError(f"{path}: {self.name} {what} folder not found (expected {self.layout_hint()})")
        return path

    def __len__(self) -> int:
        return len(self.samples)

    def subset(self, indices, *, transform: JointTransform | None = None, labels: bool | None = None):
        """A view of some samples (same root, label map and checks), optionally with another
        transform, or without labels (``labels=False``)."""
        new = copy.copy(self)
        new.samples = [self.samples[i] for i in indices]
        if transform is not None:
            new.transform = transform
        if labels is False:
            new.samples = [(img, None) for img, _ in new.samples]
            new.with_labels = False
        return new

    def relname(self, i: int) -> str:
        return str(self.samples[i][0].relative_to(self.root))

    def load(self, i: int) -> tuple:
        """The decoded image (PIL RGB) and train-id label (uint8 array or None) of sample i,
        with every check of the readers applied."""
        image_path, label_path = self.samples[i]
        image = read_rgb(image_path)
        if label_path is None:
            return image, None
        raw = self.read_raw_label(label_path)
        if raw.shape != (image.height, image.width):
            raise DatasetError(
                f"{label_path}: label size {raw.shape[1]}x{raw.shape[0]} does not match its image "
                f"{image_path.name} ({image.width}x{image.height})")
        if self.check_ids:
            bad = ~self.valid_raw[raw]
            if bad.any():
                ids, counts = np.unique(raw[bad], return_counts=True)
                found = ", ".join(f"{v} ({c} px)" for v, c in list(zip(ids.tolist(), counts.tolist()))[:8])
                raise DatasetError(f"{label_path}: label ids outside the {self.name} label map: {found}")
        return image, self.raw_lut[raw]

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        i, seed = key if isinstance(key, tuple) else (key, i_seed(key))
        image, label = self.load(i)
        rng = np.random.default_rng(seed)
        image_t, label_t = self.transform(image, label, rng)
        sample = {"image": image_t, "name": self.relname(i), "index": i}
        if label_t is not None:
            sample["label"] = label_t
        return sample


def i_seed(i: int) -> int:
    """The augmentation seed of ``dataset[i]`` outside a sampler (fixed per index)."""
    return int(i)


def _cityscapes_valid_ids() -> np.ndarray:
    valid = np.zeros(256, dtype=bool)
    for lab in L._cityscapes_labels():
        if 0 <= lab.id < 256:
            valid[lab.id] = True
    return valid


class GTA5(SegDataset):
    """GTA5: ``images/00001.png`` and ``labels/00001.png`` (palette PNG of Cityscapes labelIds).

    The public release has 24,966 images and only 24,941 labels: missing ones are skipped
    and counted (``missing_label="skip"``), never a crash mid-run.
    """

    name = "gta5"
    splits = ("all",)

    def layout_hint(self) -> str:
        return "ROOT/images/00001.png and ROOT/labels/00001.png"

    def discover(self):
        images = self._require_dir(self.root / "images", "images")
        labels = self.root / "labels"
        if self.with_labels:
            self._require_dir(labels, "labels")
        return [(p, labels / p.name) for p in sorted(images.glob("*.png"))]

    def make_raw_lut(self):
        return L.to_space_lut(self.num_classes)[L.cityscapes_labelid_to_19()]

    def make_valid_raw(self):
        return _cityscapes_valid_ids()


class Cityscapes(SegDataset):
    """Cityscapes: ``leftImg8bit/{train,val}/<city>/<name>_leftImg8bit.png`` with
    ``gtFine/{train,val}/<city>/<name>_gtFine_labelIds.png``."""

    name = "cityscapes"
    splits = ("train", "val", "test")

    def layout_hint(self) -> str:
        return (f"ROOT/leftImg8bit/{self.split}/<city>/<name>_leftImg8bit.png and "
                f"ROOT/gtFine/{self.split}/<city>/<name>_gtFine_labelIds.png")

    def discover(self):
        images = self._require_dir(self.root / "leftImg8bit" / self.split, "split")
        gt = self.root / "gtFine" / self.split
        if self.with_labels:
            self._require_dir(gt, "label split")
        pairs = []
        for p in sorted(images.glob("*/*_leftImg8bit.png")):
            stem = p.name[: -len("_leftImg8bit.png")]
            pairs.append((p, gt / p.parent.name / f"{stem}_gtFine_labelIds.png"))
        return pairs

    def make_raw_lut(self):
        return L.to_space_lut(self.num_classes)[L.cityscapes_labelid_to_19()]

    def make_valid_raw(self):
        return _cityscapes_valid_ids()


class Synthia(SegDataset):
    """SYNTHIA-RAND-CITYSCAPES: ``RGB/0000000.png`` with ``GT/LABELS/0000000.png``, a 16-bit
    multi-channel PNG whose first channel is the class id (read with OpenCV). Default
    label space: 16 classes (the SYNTHIA -> Cityscapes protocol)."""

    name = "synthia"
    splits = ("all",)

    def __init__(self, root, *, num_classes: int = 16, **kw):
        super().__init__(root, num_classes=num_classes, **kw)

    def layout_hint(self) -> str:
        return "ROOT/RGB/0000000.png and ROOT/GT/LABELS/0000000.png (16-bit)"

    def discover(self):
        images = self._require_dir(self.root / "RGB", "RGB")
        labels = self.root / "GT" / "LABELS"
        if self.with_labels:
            self._require_dir(labels, "GT/LABELS")
        return [(p, labels / p.name) for p in sorted(images.glob("*.png"))]

    def read_raw_label(self, path):
        return read_synthia_label(path)

    def make_raw_lut(self):
        return L.synthia_to_space_lut(self.num_classes)

    def make_valid_raw(self):
        valid = np.zeros(65536, dtype=bool)
        valid[:23] = True  # SYNTHIA's class table: 0 void .. 22 (see DATA.md)
        return valid


class BDD100k(SegDataset):
    """BDD100k 10K segmentation: ``images/10k/{train,val}/*.jpg`` with
    ``labels/sem_seg/masks/{train,val}/*.png`` holding train ids already (255 = ignore)."""

    name = "bdd100k"
    splits = ("train", "val")

    def layout_hint(self) -> str:
        return (f"ROOT/images/10k/{self.split}/<name>.jpg and "
                f"ROOT/labels/sem_seg/masks/{self.split}/<name>.png")

    def discover(self):
        images = self._require_dir(self.root / "images" / "10k" / self.split, "split")
        masks = self.root / "labels" / "sem_seg" / "masks" / self.split
        if self.with_labels:
            self._require_dir(masks, "label split")
        return [(p, masks / f"{p.stem}.png") for p in sorted(images.glob("*.jpg"))]

    def make_raw_lut(self):
        lut19 = np.full(256, L.IGNORE, dtype=np.uint8)
        lut19[:19] = np.arange(19)
        return L.to_space_lut(self.num_classes)[lut19]

    def make_valid_raw(self):
        valid = np.zeros(256, dtype=bool)
        valid[:19] = True
        valid[L.IGNORE] = True
        return valid


DATASETS: dict[str, type[SegDataset]] = {
    cls.name: cls for cls in (GTA5, Cityscapes, Synthia, BDD100k)
}


def build_dataset(name: str, root: str | Path, **kw) -> SegDataset:
    """A reader by name (``gta5``, ``cityscapes``, ``synthia``, ``bdd100k``)."""
    try:
        cls = DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(DATASETS)}") from None
    return cls(root, **kw)

