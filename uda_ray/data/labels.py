"""Label spaces of the field: Cityscapes labelIds, the 19 train ids, SYNTHIA's raw ids,
and the 16- and 13-class subsets of the SYNTHIA -> Cityscapes protocol.

Cityscapes' own label table is taken from ``cityscapesscripts`` (not retyped), so the
labelId -> trainId map is the official one. GTA5 labels use the same labelIds.

A *label space* is the set of train ids a model predicts: ``19`` (GTA5/BDD -> Cityscapes)
or ``16`` (SYNTHIA -> Cityscapes; the 19 minus terrain, truck and train, renumbered
0..15 in the 19-class order, as the reference code does).
"""

from __future__ import annotations

import numpy as np

IGNORE = 255

CLASSES_19: tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
    "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car", "truck",
    "bus", "train", "motorcycle", "bicycle",
)
# 19-class train ids kept by the 16-class protocol (terrain 9, truck 14, train 16 dropped).
KEEP_16: tuple[int, ...] = tuple(i for i in range(19) if i not in (9, 14, 16))
CLASSES_16: tuple[str, ...] = tuple(CLASSES_19[i] for i in KEEP_16)
# mIoU* (13): the 16 minus wall, fence and pole, as indices into the 16-class space.
KEEP_13_OF_16: tuple[int, ...] = tuple(
    i for i, name in enumerate(CLASSES_16) if name not in ("wall", "fence", "pole"))
CLASSES_13: tuple[str, ...] = tuple(CLASSES_16[i] for i in KEEP_13_OF_16)

# SYNTHIA-RAND-CITYSCAPES raw class id (first channel of GT/LABELS) -> 19-class train id.
# Ids 0 (void), 13 (lanemarking -> ignore in the protocol), 14, 22 and anything else -> 255.
SYNTHIA_TO_19: dict[int, int] = {
    3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 1: 10, 10: 11, 17: 12,
    8: 13, 19: 15, 12: 17, 11: 18,
}

LABEL_SPACES = (19, 16)


def class_names(num_classes: int) -> tuple[str, ...]:
    """Names of the classes of a label space (19 or 16)."""
    if num_classes == 19:
        return CLASSES_19
    if num_classes == 16:
        return CLASSES_16
    raise ValueError(f"num_classes must be one of {LABEL_SPACES}, got {num_classes}")


def _cityscapes_labels():
    from cityscapesscripts.helpers.labels import labels  # the official table

    return labels


def cityscapes_labelid_to_19() -> np.ndarray:
    """A 256-entry LUT: Cityscapes labelId -> 19-class train id (255 for every other id)."""
    lut = np.full(256, IGNORE, dtype=np.uint8)
    for lab in _cityscapes_labels():
        if 0 <= lab.id < 256 and 0 <= lab.trainId < 19:
            lut[lab.id] = lab.trainId
    return lut


def train19_to_labelid() -> np.ndarray:
    """Inverse map for writing predictions as labelIds (cityscapesscripts' evaluation reads those)."""
    inv = np.zeros(19, dtype=np.uint8)
    for lab in _cityscapes_labels():
        if 0 <= lab.trainId < 19 and lab.id >= 0:
            inv[lab.trainId] = lab.id
    return inv


def labelid_palette() -> list[int]:
    """A 768-entry PIL palette indexed by labelId, with Cityscapes' colours (GTA5 label PNGs use it)."""
    pal = [0] * 768
    for lab in _cityscapes_labels():
        if 0 <= lab.id < 256:
            pal[3 * lab.id: 3 * lab.id + 3] = list(lab.color)
    return pal


def train_palette(num_classes: int = 19) -> np.ndarray:
    """(num_classes + 1, 3) uint8 colours by train id; the last row (ignore) is black."""
    colors = {lab.trainId: lab.color for lab in _cityscapes_labels() if 0 <= lab.trainId < 19}
    ids = range(19) if num_classes == 19 else KEEP_16
    return np.array([colors[i] for i in ids] + [(0, 0, 0)], dtype=np.uint8)


def to_space_lut(num_classes: int) -> np.ndarray:
    """A 256-entry LUT from 19-class train ids to the ids of ``num_classes`` (identity for 19)."""
    if num_classes not in LABEL_SPACES:
        raise ValueError(f"num_classes must be one of {LABEL_SPACES}, got {num_classes}")
    lut = np.full(256, IGNORE, dtype=np.uint8)
    ids = range(19) if num_classes == 19 else KEEP_16
    for new, old in enumerate(ids):
        lut[old] = new
    return lut


def synthia_to_space_lut(num_classes: int = 16) -> np.ndarray:
    """A 65536-entry LUT: SYNTHIA raw id (uint16) -> train id of ``num_classes``."""
    lut19 = np.full(65536, IGNORE, dtype=np.uint8)
    for raw, tid in SYNTHIA_TO_19.items():
        lut19[raw] = tid
    return to_space_lut(num_classes)[lut19]
