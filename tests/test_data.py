"""Readers, label maps, transforms and seeded iteration on tiny trees in the real layouts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import trees
from uda_ray.cli import main as cli
from uda_ray.data import (BDD100k, Cityscapes, DatasetError, GTA5, InfiniteSampler, JointTransform,
                          Synthia, build_dataset, train_loader)
from uda_ray.data import labels as L
from uda_ray.data.check import check_dataset
from uda_ray.data.transforms import denormalise

# DATA.md's table, typed independently of cityscapesscripts: the LUT must agree with it.
DATA_MD_LABELID_TO_TRAIN = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
                            24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}


def test_cityscapes_lut_matches_data_md():
    lut = L.cityscapes_labelid_to_19()
    for label_id in range(256):
        assert lut[label_id] == DATA_MD_LABELID_TO_TRAIN.get(label_id, 255), label_id
    inv = L.train19_to_labelid()
    assert all(inv[t] == i for i, t in DATA_MD_LABELID_TO_TRAIN.items())


def test_16_and_13_class_spaces():
    assert len(L.CLASSES_16) == 16 and not {"terrain", "truck", "train"} & set(L.CLASSES_16)
    assert len(L.CLASSES_13) == 13 and not {"wall", "fence", "pole"} & set(L.CLASSES_13)
    lut = L.to_space_lut(16)
    assert lut[9] == lut[14] == lut[16] == 255  # terrain, truck, train
    assert [int(lut[i]) for i in (0, 8, 10, 13, 15, 18)] == [0, 8, 9, 12, 13, 15]
    syn = L.synthia_to_space_lut(19)
    assert [int(syn[r]) for r in (3, 8, 1, 21, 11, 16, 0, 13, 22)] == [0, 13, 10, 3, 18, 255, 255, 255, 255]


def test_gta5_reader_maps_labelids(tmp_path):
    root = trees.gta5_tree(tmp_path / "gta5")
    ds = GTA5(root)
    assert len(ds) == 3 and ds.problems == []
    s = ds[0]
    assert s["image"].shape == (3, 22, 40) and s["image"].dtype == torch.float32
    assert s["label"].dtype == torch.int64
    assert sorted(s["label"].unique().tolist()) == [0, 1, 2, 13, 255]  # 7, 8, 11, 26, 0
    assert s["name"] == "images/00001.png"


def test_gta5_missing_label_is_counted_or_raised(tmp_path):
    root = trees.gta5_tree(tmp_path / "gta5")
    (root / "labels" / "00002.png").unlink()
    ds = GTA5(root)
    assert len(ds) == 2 and len(ds.problems) == 1
    assert "00002.png" in ds.problems[0].path and "without a label" in ds.problems[0].message
    with pytest.raises(DatasetError, match="00002.png.*without a label"):
        GTA5(root, missing_label="error")
    assert len(GTA5(root, labels=False)) == 3  # unlabelled use does not need labels


def test_cityscapes_reader_and_layout_errors(tmp_path):
    root = trees.cityscapes_tree(tmp_path / "cs", split="val")
    ds = Cityscapes(root, split="val")
    assert len(ds) == 2
    assert sorted(ds[0]["label"].unique().tolist()) == [0, 8, 10, 11, 18, 255]
    with pytest.raises(DatasetError, match=r"leftImg8bit/train: cityscapes split folder not found"):
        Cityscapes(root, split="train")
    with pytest.raises(DatasetError, match="root folder not found"):
        Cityscapes(tmp_path / "nope", split="val")
    with pytest.raises(DatasetError, match="cityscapes: split must be one of train, val, test, got 'valid'"):
        Cityscapes(root, split="valid")


def test_cityscapes_16_class_space(tmp_path):
    root = trees.cityscapes_tree(tmp_path / "cs", split="val")
    lab = Cityscapes(root, split="val", num_classes=16)[0]["label"]
    # road 0, vegetation 8, sky 10 -> 9, person 11 -> 10, bicycle 18 -> 15
    assert sorted(lab.unique().tolist()) == [0, 8, 9, 10, 15, 255]


@pytest.mark.parametrize("channels", [3, 4])
def test_synthia_16bit_multichannel_label(tmp_path, channels):
    root = trees.synthia_tree(tmp_path / "syn")
    if channels == 4:
        trees.synthia_label(root / "GT" / "LABELS" / "0000000.png",
                            trees.label_map(19, 32, [3, 8, 16, 0, 11]), channels=4)
    ds = Synthia(root)  # 16 classes by default
    assert ds.num_classes == 16
    lab = ds[0]["label"]
    # raw 3 road -> 0; 8 car -> 19-id 13 -> 16-id 12; 16 (absent class) and 0 -> 255; 11 bicycle -> 15
    assert sorted(lab.unique().tolist()) == [0, 12, 15, 255]
    assert lab.shape == (19, 32)


def test_bdd_reader_train_ids(tmp_path):
    root = trees.bdd_tree(tmp_path / "bdd")
    ds = BDD100k(root, split="val")
    assert sorted(ds[0]["label"].unique().tolist()) == [0, 13, 18, 255]
    trees.grey_label(root / "labels/sem_seg/masks/val/7d2f7975-00000000.png", trees.label_map(18, 32, [0, 19]))
    with pytest.raises(DatasetError, match=r"7d2f7975-00000000.png: label ids outside the bdd100k label map: 19"):
        ds[0]


def test_read_errors_name_the_file(tmp_path):
    root = trees.gta5_tree(tmp_path / "gta5", n=4)
    # truncated image
    p = root / "images" / "00001.png"
    p.write_bytes(p.read_bytes()[:60])
    # label of the wrong size
    trees.palette_label(root / "labels" / "00002.png", trees.label_map(10, 40, [7]))
    # unknown label ids
    trees.palette_label(root / "labels" / "00003.png", trees.label_map(22, 40, [7, 40, 200]))
    # a colour image where a labelId PNG is expected
    trees.rgb(root / "labels" / "00004.png", 40, 22)
    ds = GTA5(root)
    with pytest.raises(DatasetError, match=r"00001.png: unreadable or truncated image"):
        ds[0]
    with pytest.raises(DatasetError, match=r"00002.png: label size 40x10 does not match its image 00002.png \(40x22\)"):
        ds[1]
    with pytest.raises(DatasetError, match=r"00003.png: label ids outside the gta5 label map: 40 .*200"):
        ds[2]
    with pytest.raises(DatasetError, match=r"00004.png: expected a single-channel label PNG.*RGB"):
        ds[3]


def test_data_check_reports_every_problem(tmp_path, capsys):
    root = trees.gta5_tree(tmp_path / "gta5", n=5)
    (root / "labels" / "00005.png").unlink()
    trees.palette_label(root / "labels" / "00003.png", trees.label_map(22, 40, [7, 40]))
    report = check_dataset(GTA5(root), workers=0, progress=False)
    assert report.n_listed == 5 and report.n_ok == 3 and len(report.problems) == 2
    assert report.pixels[0] > 0 and report.classes_present == 4
    assert cli(["data", "check", str(root), "--dataset", "gta5", "--workers", "0", "--quiet"]) == 1
    out = capsys.readouterr().out
    assert "00005.png: image without a label" in out and "00003.png: label ids outside" in out
    assert "classes present: 4/19" in out and "3 read OK" in out

    clean = trees.cityscapes_tree(tmp_path / "cs", split="val")
    assert cli(["data", "check", str(clean), "--dataset", "cityscapes", "--split", "val", "--quiet",
                "--workers", "0"]) == 0
    assert "problems: none" in capsys.readouterr().out
    assert cli(["data", "check", str(tmp_path / "missing"), "--dataset", "bdd100k", "--quiet"]) == 2


def test_joint_transform_resize_and_eval_mode(tmp_path):
    image = Image.fromarray(np.full((22, 40, 3), 100, np.uint8))
    label = trees.label_map(22, 40, [0, 1, 2, 3]).astype(np.uint8)
    rng = np.random.default_rng(0)
    img, lab = JointTransform(size=(20, 10))(image, label, rng)
    assert img.shape == (3, 10, 20) and lab.shape == (10, 20)
    assert sorted(lab.unique().tolist()) == [0, 1, 2, 3]  # nearest: no new ids
    img, lab = JointTransform(size=(20, 10), resize_label=False)(image, label, rng)
    assert img.shape == (3, 10, 20) and lab.shape == (22, 40)
    for norm in ("imagenet", "caffe"):
        img, _ = JointTransform(norm=norm)(image, None, rng)
        assert torch.equal(denormalise(img, norm), torch.full((3, 22, 40), 100, dtype=torch.uint8))


def test_joint_transform_augmentation_is_a_function_of_the_seed():
    arr = np.random.default_rng(1).integers(0, 255, (30, 50, 3), dtype=np.uint8)
    image, label = Image.fromarray(arr), trees.label_map(30, 50, list(range(10))).astype(np.uint8)
    t = JointTransform(scale=(0.5, 1.5), crop=(32, 24), flip=True)
    a = [t(image, label, np.random.default_rng(s)) for s in range(6)]
    b = [t(image, label, np.random.default_rng(s)) for s in range(6)]
    for (ia, la), (ib, lb) in zip(a, b):
        assert ia.shape == (3, 24, 32) and torch.equal(ia, ib) and torch.equal(la, lb)
    assert len({la.sum().item() for _, la in a}) > 1  # seeds differ -> augmentations differ
    # crops larger than the image pad the label with ignore
    _, lab = JointTransform(crop=(64, 40))(image, label, np.random.default_rng(0))
    assert lab.shape == (40, 64) and (lab == 255).sum() == 64 * 40 - 50 * 30


def test_sampler_is_seeded_and_resumable():
    full = InfiniteSampler(7, seed=3)
    seq = [x for _, x in zip(range(30), full)]
    assert sorted(i for i, _ in seq[:7]) == list(range(7))  # each epoch is a permutation
    assert [i for i, _ in seq[:7]] != [i for i, _ in seq[7:14]]  # reshuffled per epoch
    assert seq == [x for _, x in zip(range(30), InfiniteSampler(7, seed=3))]
    resumed = [x for _, x in zip(range(18), InfiniteSampler(7, seed=3, start=12))]
    assert resumed == seq[12:]
    ranks = [[x for _, x in zip(range(15), InfiniteSampler(7, seed=3, rank=r, world_size=2))] for r in (0, 1)]
    assert ranks[0] == seq[0::2] and ranks[1] == seq[1::2]
    assert [i for i, _ in zip(range(5), InfiniteSampler(7, seed=4))] != [i for i, _ in seq[:5]]


def test_loader_batches_do_not_depend_on_worker_count(tmp_path):
    root = trees.gta5_tree(tmp_path / "gta5", n=5)
    ds = GTA5(root, transform=JointTransform(crop=(16, 16), flip=True, scale=(0.8, 1.2)))

    def batches(workers, start=0, n=4):
        it = iter(train_loader(ds, batch_size=2, seed=11, start=start, num_workers=workers))
        return [next(it) for _ in range(n)]

    a, b = batches(0), batches(2)
    for x, y in zip(a, b):
        assert x["name"] == y["name"] and torch.equal(x["image"], y["image"]) and torch.equal(x["label"], y["label"])
    tail = batches(0, start=4, n=2)  # resume after 2 steps of batch 2
    for x, y in zip(tail, a[2:]):
        assert x["name"] == y["name"] and torch.equal(x["image"], y["image"])


def test_build_dataset_rejects_unknown_name(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'gta'.*cityscapes"):
        build_dataset("gta", tmp_path)


def test_require_clean_names_the_first_problem_and_the_count(tmp_path):
    from uda_ray.data.check import require_clean

    root = trees.cityscapes_tree(tmp_path / "cs", split="val", cities=("frankfurt", "lindau", "munster"))
    assert require_clean(Cityscapes(root, split="val"), what="target val split").n_ok == 3
    labels = sorted((root / "gtFine" / "val").rglob("*.png"))
    labels[0].unlink()  # an image without its label
    trees.grey_label(labels[1], trees.label_map(8, 32, [7]))  # label of the wrong size
    with pytest.raises(DatasetError, match=r"without a label .*\(target val split: 2 problems in cityscapes 'val'; "
                                           r"`uda-ray data check .* --dataset cityscapes --split val` lists them\)"):
        require_clean(Cityscapes(root, split="val"), what="target val split")
