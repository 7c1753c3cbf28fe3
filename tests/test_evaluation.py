"""Tests of uda_ray.evaluation: hand-checked cases, the DATA.md protocols, and parity with
cityscapesscripts' official pixel-level evaluation."""

from __future__ import annotations

import importlib
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from uda_ray.data.labels import (
    CLASSES_13, CLASSES_16, CLASSES_19, KEEP_13_OF_16, cityscapes_labelid_to_19,
    train19_to_labelid,
)
from uda_ray.evaluation import (
    ConfusionMatrix, _count, compute_scores, predict, protocol_scores, summarize,
    upsample_logits,
)

NAN = float("nan")


def assert_close_nan(a, b, tol=1e-12):
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    assert a.shape == b.shape
    np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
    np.testing.assert_allclose(a[~np.isnan(a)], b[~np.isnan(b)], rtol=0, atol=tol)


# ---------------------------------------------------------------------------------------
# Hand-checked tiny case: a 2x3 image, 3 classes
# ---------------------------------------------------------------------------------------
TARGET = torch.tensor([[0, 0, 1],
                       [1, 2, 255]])
PRED = torch.tensor([[0, 1, 1],
                     [2, 2, 0]])
# (gt, pred) pairs: (0,0) (0,1) (1,1) (1,2) (2,2); the last pixel is ignored.
EXPECTED = np.array([[1, 1, 0],
                     [0, 1, 1],
                     [0, 0, 1]])
# IoU: class 0: TP 1, FP 0, FN 1 -> 1/2; class 1: TP 1, FP 1, FN 1 -> 1/3;
#      class 2: TP 1, FP 1, FN 0 -> 1/2
EXPECTED_IOU = [1 / 2, 1 / 3, 1 / 2]
EXPECTED_ACC = [1 / 2, 1 / 2, 1.0]            # recall = TP / row sum


def test_hand_case_matrix_and_scores():
    cm = ConfusionMatrix(3)
    cm.update(PRED, TARGET)
    np.testing.assert_array_equal(cm.to_numpy(), EXPECTED)
    assert cm.matrix.dtype == torch.int64 and cm.total == 5
    s = compute_scores(cm, ["a", "b", "c"])
    assert_close_nan(s.iou, EXPECTED_IOU)
    assert_close_nan(s.acc, EXPECTED_ACC)
    assert s.miou == pytest.approx(4 / 9, abs=1e-15)
    assert s.macc == pytest.approx(2 / 3, abs=1e-15)
    assert s.pixel_acc == pytest.approx(3 / 5, abs=1e-15)
    assert s.n_pixels == 5


def test_batched_numpy_uint8_and_2d_agree():
    cm2 = ConfusionMatrix(3)
    cm2.update(PRED.numpy().astype(np.uint8), TARGET.numpy().astype(np.uint8))
    cm3 = ConfusionMatrix(3)
    cm3.update(torch.stack([PRED, PRED]), torch.stack([TARGET, TARGET]).to(torch.uint8))
    np.testing.assert_array_equal(cm2.to_numpy(), EXPECTED)
    np.testing.assert_array_equal(cm3.to_numpy(), 2 * EXPECTED)


def test_ignore_everything_and_reset():
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([[0, 1], [2, 0]]), torch.full((2, 2), 255))
    assert cm.total == 0
    s = compute_scores(cm, "abc")
    assert np.isnan(s.iou).all() and math.isnan(s.miou) and math.isnan(s.pixel_acc)
    cm.update(PRED, TARGET)
    cm.reset()
    assert cm.total == 0


def test_absent_class_is_nan_and_left_out_of_the_mean():
    # class 3 never in gt nor pred -> NaN; class 2 only predicted -> IoU 0 (counted).
    m = np.array([[3, 0, 1, 0],
                  [1, 2, 0, 0],
                  [0, 0, 0, 0],
                  [0, 0, 0, 0]])
    s = compute_scores(m, ["a", "b", "c", "d"])
    assert_close_nan(s.iou, [3 / 5, 2 / 3, 0.0, NAN])
    assert_close_nan(s.acc, [3 / 4, 2 / 3, NAN, NAN])
    assert s.miou == pytest.approx((3 / 5 + 2 / 3 + 0.0) / 3, abs=1e-15)
    assert s.pixel_acc == pytest.approx(5 / 7, abs=1e-15)


def test_as_dict_keys():
    m = np.eye(19, dtype=np.int64)
    m[6, 6] = 0                                   # traffic light absent -> NaN
    d = summarize(m, "19").as_dict()
    assert d["val/mIoU"] == 1.0 and d["val/pixel_acc"] == 1.0
    assert d["val/IoU/road"] == 1.0 and math.isnan(d["val/IoU/traffic_light"])
    assert "val/IoU/traffic_sign" in d and "val/Acc/traffic_sign" in d
    assert not any(" " in k for k in d)
    assert len([k for k in d if k.startswith("val/IoU/")]) == 19
    assert set(summarize(m, 19).as_dict("test/", per_class=False)) == {
        "test/mIoU", "test/mAcc", "test/pixel_acc"}


def test_matches_a_numpy_fast_hist_reference():
    """Cross-check with the numpy bincount formulation used by AdaptSegNet's compute_mIoU."""
    g = torch.Generator().manual_seed(0)
    n = 7
    t = torch.randint(0, n, (2, 17, 23), generator=g)
    t[torch.rand(t.shape, generator=g) < 0.2] = 255
    t[t == 5] = 4                                  # class 5 never in gt
    p = torch.randint(0, n, t.shape, generator=g)
    p[p == 6] = 0
    t[t == 6] = 0                                  # class 6 absent everywhere -> NaN
    cm = ConfusionMatrix(n)
    cm.update(p, t)
    a, b = t.numpy().ravel(), p.numpy().ravel()
    k = (a >= 0) & (a < n)
    hist = np.bincount(n * a[k] + b[k], minlength=n * n).reshape(n, n)
    np.testing.assert_array_equal(cm.to_numpy(), hist)
    with np.errstate(divide="ignore", invalid="ignore"):
        ref_iou = np.diag(hist) / (hist.sum(1) + hist.sum(0) - np.diag(hist))
    s = compute_scores(cm, [str(i) for i in range(n)])
    assert_close_nan(s.iou, ref_iou)
    assert math.isnan(s.iou[6]) and s.iou[5] == 0.0
    assert s.miou == pytest.approx(np.nanmean(ref_iou), abs=1e-15)


def test_index_add_path_equals_bincount():
    """The CUDA counting path (index_add_, no host sync) run on CPU gives bincount's counts."""
    idx = torch.randint(0, 11, (1000,), generator=torch.Generator().manual_seed(1))
    assert torch.equal(_count(idx, 13, use_bincount=False), _count(idx, 13, use_bincount=True))


# ---------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------
def test_bad_target_value_raises_with_the_value():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match=r"target .*found \{3, 254\}"):
        cm.update(torch.tensor([[0, 1, 2]]), torch.tensor([[3, 254, 255]]))
    with pytest.raises(ValueError, match=r"target .*found \{-1\}"):
        cm.update(torch.tensor([0, 1]), torch.tensor([-1, 0]))
    assert cm.total == 0                           # nothing from a rejected batch


def test_bad_pred_value_raises_even_on_ignored_pixels():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match=r"pred .*found \{3\}"):
        cm.update(torch.tensor([[0, 3]]), torch.tensor([[0, 255]]))
    with pytest.raises(ValueError, match=r"pred .*found \{-2\}"):
        cm.update(torch.tensor([[-2, 0]]), torch.tensor([[0, 1]]))


def test_shape_and_dtype_errors():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match=r"pred \(2, 3\) and target \(3, 2\)"):
        cm.update(torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(1, 1, 2, 3\).*\(1, 2, 3\)"):
        cm.update(torch.zeros(1, 1, 2, 3, dtype=torch.long), torch.zeros(1, 2, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        cm.update(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError):
        ConfusionMatrix(0)


def test_validate_false_defers_the_error_to_read_time():
    cm = ConfusionMatrix(3, validate=False)
    cm.update(PRED, TARGET)
    cm.update(torch.tensor([[5, 0]]), torch.tensor([[0, 7]]))   # 2 invalid pixels, no raise
    with pytest.raises(ValueError, match="2 pixel"):
        cm.matrix
    with pytest.raises(ValueError, match="validate=True"):
        compute_scores(cm, "abc")
    cm.reset()
    cm.update(PRED, TARGET)
    np.testing.assert_array_equal(cm.to_numpy(), EXPECTED)
    # per-call override
    with pytest.raises(ValueError, match="found"):
        cm.update(torch.tensor([[5]]), torch.tensor([[0]]), validate=True)


def test_score_and_protocol_errors():
    with pytest.raises(ValueError, match="class names"):
        compute_scores(np.eye(3), ["a", "b"])
    with pytest.raises(ValueError, match="square"):
        compute_scores(np.ones((2, 3)), ["a", "b"])
    with pytest.raises(ValueError, match="19x19"):
        summarize(np.eye(16), "19")
    with pytest.raises(ValueError, match="16x16"):
        summarize(np.eye(19), "16")
    with pytest.raises(ValueError, match="16x16"):
        summarize(np.eye(19), "13")
    with pytest.raises(ValueError, match="protocol"):
        summarize(np.eye(19), "18")
    with pytest.raises(ValueError):
        protocol_scores(np.eye(19), 16)
    with pytest.raises(ValueError):
        protocol_scores(np.eye(13), 13)


# ---------------------------------------------------------------------------------------
# Merge (for DDP)
# ---------------------------------------------------------------------------------------
def test_merge_equals_accumulating_everything():
    g = torch.Generator().manual_seed(2)
    t = torch.randint(0, 19, (4, 8, 8), generator=g)
    t[0, :2] = 255
    p = torch.randint(0, 19, (4, 8, 8), generator=g)
    whole = ConfusionMatrix(19)
    whole.update(p, t)
    a, b = ConfusionMatrix(19), ConfusionMatrix(19)
    a.update(p[:1], t[:1])
    b.update(p[1:], t[1:])
    a += b
    np.testing.assert_array_equal(a.to_numpy(), whole.to_numpy())
    c = ConfusionMatrix.from_numpy(a.to_numpy()).merge(b.matrix)        # raw tensor
    np.testing.assert_array_equal(c.to_numpy(), a.to_numpy() + b.to_numpy())
    with pytest.raises(ValueError):
        a.merge(ConfusionMatrix(16))
    with pytest.raises(ValueError):
        a.merge(np.zeros((16, 16), dtype=np.int64))


# ---------------------------------------------------------------------------------------
# Protocols: 16 and 13-from-16
# ---------------------------------------------------------------------------------------
def test_protocol_13_from_the_same_16_class_matrix():
    # 16-class indices: road 0, sidewalk 1, building 2, wall 3, fence 4, pole 5
    assert CLASSES_16[:6] == ("road", "sidewalk", "building", "wall", "fence", "pole")
    m = 10 * np.eye(16, dtype=np.int64)
    m[0, 1] = 10          # road predicted as sidewalk: IoU road = sidewalk = 10/20
    m[3, 4] = 10          # wall predicted as fence:    IoU wall = fence = 10/20
    m[5, 5] = 0           # pole absent: NaN
    # 16: 11 classes at 1, 4 at 0.5, pole NaN -> (11 + 2) / 15
    # 13 (no wall/fence/pole): 11 at 1, road and sidewalk at 0.5 -> 12 / 13
    s16, s13 = summarize(m, "16"), summarize(m, "13")
    assert s16.miou == pytest.approx(13 / 15, abs=1e-15)
    assert s13.miou == pytest.approx(12 / 13, abs=1e-15)
    assert s16.extra == {"mIoU13": s13.miou}
    assert s13.class_names == CLASSES_13 and len(s13.iou) == 13
    assert_close_nan(s13.iou, s16.iou[list(KEEP_13_OF_16)], tol=0)
    assert s13.pixel_acc == s16.pixel_acc == pytest.approx(150 / 170, abs=1e-15)
    assert protocol_scores(m, 16) == {"mIoU": s16.miou, "mIoU13": s13.miou}
    d = s16.as_dict()
    assert d["val/mIoU13"] == s13.miou and "val/IoU/wall" in d and "val/IoU/terrain" not in d
    # the mistake DATA.md warns about gives a different number
    assert s13.miou != pytest.approx(s16.miou * 16 / 13)


def test_protocol_19():
    m = 5 * np.eye(19, dtype=np.int64)
    m[9, 8] = 5                                   # terrain -> vegetation
    s = summarize(m, "19")
    assert s.class_names == CLASSES_19 and s.protocol == "19" and s.extra == {}
    assert s.miou == pytest.approx((17 + 1) / 19, abs=1e-15)
    assert protocol_scores(m, 19) == {"mIoU": s.miou}
    assert "mIoU" in s.format_table()


# ---------------------------------------------------------------------------------------
# Parity with cityscapesscripts' evalPixelLevelSemanticLabeling
# ---------------------------------------------------------------------------------------
def _make_cityscapes_pair(rng: np.random.Generator, h=64, w=128):
    """A gt labelId map (8x8 blocks plus per-pixel noise, with ignored ids) and a prediction
    labelId map (gt train ids, corrupted blocks and pixels, mapped back to labelIds).

    No 'train' (31) anywhere -> NaN in both; 'truck' (27) only predicted -> IoU 0;
    'bus' (28) only in gt -> IoU 0."""
    ignored = [0, 1, 3, 4, 5, 6, 9, 10, 14, 15, 16, 18, 29, 30]
    gt_ids = [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 28, 32, 33]
    pool = np.array(gt_ids * 3 + ignored)
    blocks = rng.choice(pool, size=(h // 8, w // 8))
    gt = np.kron(blocks, np.ones((8, 8), dtype=np.int64))
    noise = rng.random((h, w)) < 0.05
    gt[noise] = rng.choice(pool, size=int(noise.sum()))
    gt = gt.astype(np.uint8)

    lut = cityscapes_labelid_to_19()
    pred_train = lut[gt].astype(np.int64)
    pred_classes = [c for c in range(19) if c not in (15, 16)]       # never bus, never train
    pred_train[pred_train == 15] = 13                                 # bus predicted as car
    unl = pred_train == 255
    pred_train[unl] = rng.choice(pred_classes, size=int(unl.sum()))
    bad_blocks = np.kron(rng.random((h // 8, w // 8)) < 0.3, np.ones((8, 8), dtype=bool))
    bad_blocks |= rng.random((h, w)) < 0.1
    pred_train[bad_blocks] = rng.choice(pred_classes, size=int(bad_blocks.sum()))
    pred = train19_to_labelid()[pred_train].astype(np.uint8)
    return gt, pred


def test_parity_with_cityscapesscripts(tmp_path, monkeypatch):
    monkeypatch.setenv("CITYSCAPES_DATASET", str(tmp_path))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    ev = importlib.import_module("cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling")
    for name, value in {"quiet": True, "JSONOutput": False, "evalInstLevelScore": False,
                        "evalPixelAccuracy": False, "colorized": False,
                        "exportFile": str(tmp_path / "result.json"), "cityscapesPath": str(tmp_path),
                        "predictionPath": None, "predictionWalk": None}.items():
        monkeypatch.setattr(ev.args, name, value, raising=False)

    rng = np.random.default_rng(1234)
    lut = torch.from_numpy(cityscapes_labelid_to_19().astype(np.int64))
    inv = train19_to_labelid()
    assert len(set(inv.tolist())) == 19
    cm = ConfusionMatrix(19)
    pred_files, gt_files = [], []
    for i in range(3):
        gt, pred = _make_cityscapes_pair(rng)
        gf = tmp_path / f"frankfurt_000000_{i:06d}_gtFine_labelIds.png"
        pf = tmp_path / f"frankfurt_000000_{i:06d}_pred.png"
        Image.fromarray(gt, mode="L").save(gf)
        Image.fromarray(pred, mode="L").save(pf)
        gt_files.append(str(gf))
        pred_files.append(str(pf))
        # ours: read the same files back, labelId -> trainId
        g = lut[torch.from_numpy(np.array(Image.open(gf)).astype(np.int64))]
        p = lut[torch.from_numpy(np.array(Image.open(pf)).astype(np.int64))]
        assert (p != 255).all()
        cm.update(p, g)

    res = ev.evaluateImgLists(pred_files, gt_files, ev.args)
    ours = summarize(cm, "19")

    # the matrices themselves: their labelId matrix restricted to the 19 evaluated ids
    theirs_m = np.array(res["confMatrix"], dtype=np.int64)
    ids = [int(inv[c]) for c in range(19)]
    np.testing.assert_array_equal(cm.to_numpy(), theirs_m[np.ix_(ids, ids)])

    theirs_iou = np.array([res["classScores"][name] for name in CLASSES_19], dtype=float)
    assert_close_nan(ours.iou, theirs_iou, tol=1e-9)
    assert math.isnan(ours.iou[CLASSES_19.index("train")])
    assert ours.iou[CLASSES_19.index("truck")] == 0.0 and ours.iou[CLASSES_19.index("bus")] == 0.0
    assert abs(ours.miou - res["averageScoreClasses"]) < 1e-9
    # every other class score of theirs is NaN (ignoreInEval labels)
    others = [v for k, v in res["classScores"].items() if k not in CLASSES_19]
    assert others and all(math.isnan(v) for v in others)
    assert not (tmp_path / "result.json").exists()


# ---------------------------------------------------------------------------------------
# Upsampling and prediction
# ---------------------------------------------------------------------------------------
def test_upsample_align_corners_on_a_tiny_case():
    x = torch.tensor([[[[0.0, 1.0]]]])                                  # [1, 1, 1, 2]
    up_true = upsample_logits(x, (1, 4))
    up_false = upsample_logits(x, (1, 4), align_corners=False)
    # align_corners=True: sample at x_in = x_out * (2-1)/(4-1) -> 0, 1/3, 2/3, 1
    torch.testing.assert_close(up_true[0, 0, 0], torch.tensor([0.0, 1 / 3, 2 / 3, 1.0]))
    # align_corners=False: x_in = (x_out + .5) / 2 - .5 -> -.25 (clamped), .25, .75, 1.25 (cl.)
    torch.testing.assert_close(up_false[0, 0, 0], torch.tensor([0.0, 0.25, 0.75, 1.0]))
    # same as the reference evaluation's nn.Upsample
    ref = torch.nn.Upsample(size=(1, 4), mode="bilinear", align_corners=True)(x)
    torch.testing.assert_close(up_true, ref, rtol=0, atol=0)
    # the choice changes the argmax: channel 1 is a constant 0.3
    logits = torch.cat([x, torch.full_like(x, 0.3)], dim=1)
    assert predict(logits, (1, 4)).tolist() == [[[1, 0, 0, 0]]]
    assert predict(logits, (1, 4), align_corners=False).tolist() == [[[1, 1, 0, 0]]]
    assert upsample_logits(x, (1, 2)) is x                              # already at size


def test_predict_shape_dtype_and_chunking():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 19, 8, 16, generator=g, requires_grad=True)
    out = predict(logits, (32, 64))
    assert out.shape == (3, 32, 64) and out.dtype == torch.long and not out.requires_grad
    assert torch.equal(out, predict(logits, (32, 64), chunk_size=None))
    assert torch.equal(out, predict(logits, [32, 64], chunk_size=2))
    ref = torch.nn.functional.interpolate(logits.detach(), size=(32, 64), mode="bilinear",
                                          align_corners=True).argmax(1)
    assert torch.equal(out, ref)
    with pytest.raises(ValueError):
        predict(logits[0], (32, 64))
    with pytest.raises(ValueError):
        upsample_logits(logits, (32,))
    # predictions feed straight into the matrix
    cm = ConfusionMatrix(19)
    cm.update(out, out)
    assert summarize(cm, "19").pixel_acc == 1.0


# ---------------------------------------------------------------------------------------
# Import hygiene and CUDA
# ---------------------------------------------------------------------------------------
def test_imports_without_heavy_dependencies():
    code = ("import sys, uda_ray.evaluation; "
            "bad = [m for m in ('ray', 'mlflow', 'optuna', 'cityscapesscripts') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True,
                   cwd=str(__import__("pathlib").Path(__file__).resolve().parents[1]))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_device_update_without_host_sync(device):
    """The CUDA counting path (index_add_, validate=False) does not sync: on CUDA under
    ``set_sync_debug_mode("error")``; on the CPU the same code path (``sync_free=True``)
    under :class:`~uda_ray.bench.HostSyncCounter`, so that it is tested without a GPU."""
    from uda_ray.bench import HostSyncCounter

    dev = torch.device(device)
    g = torch.Generator().manual_seed(4)
    t = torch.randint(0, 19, (2, 64, 64), generator=g)
    t[:, :4] = 255
    p = torch.randint(0, 19, (2, 64, 64), generator=g)
    tc, pc = t.to(dev), p.to(dev)
    cm = ConfusionMatrix(19, device=dev, validate=False, sync_free=True)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        prev = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            cm.update(pc, tc)
        finally:
            torch.cuda.set_sync_debug_mode(prev)
    else:
        with HostSyncCounter() as syncs:
            cm.update(pc, tc)
        assert syncs.calls == []
    ref = ConfusionMatrix(19)
    ref.update(p, t)
    np.testing.assert_array_equal(cm.to_numpy(), ref.to_numpy())
    with pytest.raises(ValueError, match="found"):
        ConfusionMatrix(19, device=dev, sync_free=True).update(pc, tc + 1)
