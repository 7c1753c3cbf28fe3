"""The shared proxy-label module: streaming thresholds, the policies' equations, files."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from uda_ray.proxy import (
    IGNORE,
    Histogram,
    ProxyLabelled,
    ProxyPolicy,
    Thresholds,
    compute_thresholds,
    generate,
    is_complete,
    label_map,
    proxy_path,
)


@pytest.mark.parametrize("portion", [0.01, 0.2, 0.5, 0.8, 1.0])
def test_histogram_threshold_is_within_one_bin_of_numpy_percentile(portion):
    g = torch.Generator().manual_seed(0)
    values = torch.rand(50_000, generator=g) ** 3  # skewed, like softmax confidences
    cls = torch.randint(0, 3, (50_000,), generator=g)
    h = Histogram(3, bins=512)
    for chunk in range(0, 50_000, 7_000):  # streamed in pieces
        h.add(values[chunk:chunk + 7_000], cls[chunk:chunk + 7_000])
    t = h.top_threshold(portion)
    for c in range(3):
        ref = np.percentile(values[cls == c].numpy(), 100 * (1 - portion))
        assert abs(float(t[c]) - ref) <= h.width, (c, float(t[c]), ref)
        kept = (values[cls == c] >= t[c]).float().mean().item()
        assert kept >= portion - 1e-9  # at least the portion is kept


def test_histogram_edge_cases():
    h = Histogram(2, bins=10)
    h.add(torch.tensor([0.55, 0.95]), torch.tensor([0, 0]))
    t = h.top_threshold(0.5)
    assert t[0].item() == pytest.approx(0.9) and math.isinf(t[1].item())  # class 1 never seen
    assert math.isinf(h.top_threshold(0.0)[0].item())  # portion 0 selects nothing


def _probs(p0):
    p0 = torch.tensor(p0, dtype=torch.float32)
    return torch.stack([p0, 1 - p0])[None, :, None, :]  # (1, 2, 1, W)


def test_mat_t1_t2_and_eq5_by_hand():
    # 4 pixels, 2 classes. A = adversarial confidence; p1 = 0.5 keeps the top half of A:
    # t1 = 0.8 (the lower edge of 0.85's bin, 10 bins), i.e. pixels 0 and 1.
    probs = _probs([0.95, 0.65, 0.75, 0.97])  # every pixel predicts class 0
    conf = torch.tensor([[[0.95, 0.85, 0.35, 0.15]]])
    for p2, t2_0, expected in [(0.5, 0.9, [0, IGNORE, IGNORE, IGNORE]), (1.0, 0.6, [0, 0, IGNORE, IGNORE])]:
        policy = ProxyPolicy("adversarial", portion=0.5, portion2=p2, bins=10)
        th = compute_thresholds(lambda: iter([None]), lambda _: (probs, conf), policy, 2, torch.device("cpu"))
        assert th.t1 == pytest.approx(0.8)
        # t2 among pixels with A >= t1 only: class 0 scores {0.95, 0.65}; class 1 never predicted
        assert th.t_class[0].item() == pytest.approx(t2_0) and math.isinf(th.t_class[1].item())
        # pixel 3 (P = 0.97, the most confident) is dropped by the adversarial confidence
        assert label_map(probs, conf, policy, th)[0, 0].tolist() == expected


def test_class_balanced_labels_take_the_argmax_of_the_ratio():
    # P = [0.5, 0.45, 0.05] with t = [0.9, 0.4, inf]: ratios [0.56, 1.125, 0] -> class 1,
    # although class 0 has the highest probability; P = [0.3, 0.3, 0.4]: ratios < 1 -> ignore.
    probs = torch.tensor([[0.5, 0.45, 0.05], [0.3, 0.3, 0.4]]).T[None, :, None, :]
    th = Thresholds(t_class=torch.tensor([0.9, 0.4, math.inf], dtype=torch.float64))
    labels = label_map(probs, None, ProxyPolicy("class_balanced"), th)
    assert labels[0, 0].tolist() == [1, IGNORE]


def test_class_balanced_thresholds_per_predicted_class():
    # class 0 predicted at 0.95, 0.85, 0.75, 0.65; class 1 at 0.55 (p1 = 1 - p0 = 0.55 when
    # p0 = 0.45). Top half per class: t_0 = 0.8, t_1 = 0.5.
    probs = _probs([0.95, 0.85, 0.75, 0.65, 0.45])
    policy = ProxyPolicy("class_balanced", portion=0.5, bins=10)
    th = compute_thresholds(lambda: iter([None]), lambda _: (probs, None), policy, 2, torch.device("cpu"))
    assert th.t_class.tolist() == pytest.approx([0.8, 0.5])
    assert label_map(probs, None, policy, th)[0, 0].tolist() == [0, 0, IGNORE, IGNORE, 1]


def test_global_top_portion():
    probs = _probs([0.95, 0.85, 0.75, 0.65, 0.45])  # confidences .95 .85 .75 .65 .55
    policy = ProxyPolicy("global", portion=0.4, bins=10)
    th = compute_thresholds(lambda: iter([None]), lambda _: (probs, None), policy, 2, torch.device("cpu"))
    assert th.t.item() == pytest.approx(0.8)  # the top 40%: 0.95 and 0.85
    assert label_map(probs, None, policy, th)[0, 0].tolist() == [0, 0, IGNORE, IGNORE, IGNORE]


def test_policy_validation():
    with pytest.raises(ValueError, match="portion2"):
        ProxyPolicy("adversarial", portion=0.5, portion2=1.5)
    with pytest.raises(ValueError, match="policy"):
        ProxyPolicy("median")


def test_generate_writes_label_pngs_that_train_reads_back(data_root, tmp_path):
    from uda_ray.engine import build_datasets
    from trees import tiny_cfg

    cfg = tiny_cfg(data_root, tmp_path, "source_only", **{"data.select_n": 1})
    data = build_datasets(cfg)
    ds = data["target_eval"]
    assert "label" in ds[0]  # labels read only to measure precision

    def score_fn(images):  # a fake model: class = column parity, confidence rising with x
        n, _, h, w = images.shape
        x = torch.linspace(0.3, 0.99, w).expand(n, h, w)
        pred = (torch.arange(w) % 2).expand(n, h, w)
        probs = torch.full((n, 19, h, w), 0.0)
        probs.scatter_(1, pred[:, None], x[:, None])
        return probs, None

    out = tmp_path / "proxies"
    stats = generate(ds, score_fn, ProxyPolicy("global", portion=0.5), out, num_classes=19,
                     device=torch.device("cpu"))
    assert is_complete(out) and stats.images == len(ds)
    assert 0.45 <= stats.kept / stats.pixels <= 0.55
    m = stats.metrics(["c"] * 19)
    assert 0 <= m["proxy/precision"] <= 1 and m["proxy/kept_frac"] == pytest.approx(stats.kept / stats.pixels)
    name = ds.relname(0)
    lab = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(proxy_path(out, name)))
    h, w = cfg.data.target_h, cfg.data.target_w
    assert lab.shape == (h, w) and set(np.unique(lab)) <= {0, 1, IGNORE}
    assert (lab[:, : w // 2] == IGNORE).all()  # the low-confidence half is ignored
    train = ProxyLabelled(data["target"], out)
    sample = train[(0, 123)]
    assert sample["label"].shape == sample["image"].shape[-2:]
    assert set(sample["label"].unique().tolist()) <= {0, 1, IGNORE}
