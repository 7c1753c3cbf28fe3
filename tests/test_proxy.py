"""The shared proxy-label module: streaming thresholds, the policies' equations, files."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from uda_ray.proxy import (
    IGNORE,
    ProxyLabelled,
    ProxyPolicy,
    ProxyStats,
    Thresholds,
    TopSelect,
    adversarial_confidence_logit,
    compute_thresholds,
    confidence,
    generate,
    is_complete,
    label_map,
    logit_from_log,
    order_key,
    proxy_path,
)


def _kth_largest(values, portion):
    """The reference: the k-th largest value, k = ceil(portion * n), by torch.topk."""
    k = math.ceil(round(portion * len(values), 9))
    return values.topk(k).values[-1].item() if k else math.inf


@pytest.mark.parametrize("portion", [0.0, 0.01, 0.2, 0.3, 0.5, 0.8, 1.0])
def test_thresholds_are_the_exact_kth_largest_score(portion):
    g = torch.Generator().manual_seed(0)
    # logits of skewed confidences: plain, saturated near 1 and saturated near 0, diffuse
    # (within 0.05 of 0: one bin of the former 2048-bin histograms held them all)
    values = torch.cat([torch.randn(20_000, generator=g) * 3, 12 + torch.randn(15_000, generator=g),
                        -14 + torch.randn(15_000, generator=g), 0.02 * torch.randn(10_000, generator=g)])
    cls = torch.randint(0, 4, (60_000,), generator=g)
    cls[cls == 3] = 2  # class 3 never seen
    sel = TopSelect(4, portion=portion)
    passes = 0
    while not sel.done:
        for chunk in range(0, 60_000, 7_000):  # streamed in pieces
            sel.add(values[chunk:chunk + 7_000], cls[chunk:chunk + 7_000])
        sel.end_pass()
        passes += 1
    t = sel.thresholds()
    assert passes == (1 if portion == 0 else 2)
    for c in range(3):
        v = values[cls == c]
        assert t[c].item() == _kth_largest(v, portion), c
        if portion:
            assert (v >= t[c]).sum().item() == math.ceil(round(portion * len(v), 9))  # no ties here
    assert math.isinf(t[3].item())  # class 3 never seen: select nothing


def test_order_key_sorts_as_the_floats():
    x = torch.tensor([-math.inf, -3e38, -1.5, -1e-45, -0.0, 0.0, 1e-45, 1.0, 1.0000001, 3e38, math.inf])
    k = order_key(x)
    assert (k[1:] >= k[:-1]).all() and k[4] == k[5] and (k.diff() > 0).sum() == len(x) - 2
    assert k.min() >= 0 and k.max() < 2**32


def test_logit_scores_are_stable_at_saturation():
    # p = 1 - 1e-9 (a float32 probability would be 1.0) and p = 1e-12: finite logits
    lp = torch.tensor([math.log1p(-1e-9), math.log(1e-12), math.log(0.5)])
    torch.testing.assert_close(logit_from_log(lp), torch.tensor([20.723, -27.631, 0.0]), atol=2e-2, rtol=0)
    # A from two discriminators: d = 0 (P(source) 0.5) and d = ln 3 (P(source) 0.25): A = 0.375
    d = [torch.zeros(1, 1, 1, 1), torch.full((1, 1, 1, 1), math.log(3))]
    assert adversarial_confidence_logit(d).item() == pytest.approx(math.log(0.375 / 0.625), abs=1e-6)
    # saturated discriminators (d = 30, 40: source probabilities 9e-14, 4e-18) still rank
    a = adversarial_confidence_logit([torch.tensor([30.0, 40.0]).view(2, 1, 1, 1)])
    assert a[0].item() == pytest.approx(-30, abs=1e-3) and a[1].item() == pytest.approx(-40, abs=1e-3)


def test_saturated_adversarial_confidence_keeps_the_requested_portion():
    """Discriminators that win (every target pixel's source probability below 1e-5) must
    not turn p1 into "keep everything": t1 ranks them (the bug of thresholds binned as
    probabilities, where all of A fell into the lowest bin and t1 = 0)."""
    g = torch.Generator().manual_seed(0)
    n = 20_000
    log_probs = torch.log_softmax(3 * torch.randn(1, 5, 1, n, generator=g), dim=1)
    conf = (-25 + 3 * torch.randn(1, 1, n, generator=g))  # logits of A: A ~ 1e-11 (measured: -20 to -30)
    policy = ProxyPolicy("adversarial", portion=0.5, portion2=1.0)
    th = compute_thresholds(lambda: iter([None]), lambda _: (log_probs, conf), policy, 5, torch.device("cpu"))
    kept = (label_map(log_probs, conf, policy, th) != IGNORE).float().mean().item()
    assert 0.5 <= kept <= 0.51, kept
    assert ProxyStats(thresholds=th).metrics()["proxy/t1"] < 1e-8  # logged as a probability


@pytest.mark.parametrize("kind", ["global", "class_balanced", "adversarial"])
@pytest.mark.parametrize("scale", [0.5, 12.0])
def test_each_thresholded_step_keeps_exactly_its_portion(kind, scale):
    """Diffuse scores (scale 0.5: max-probabilities near 0.3, A near 0.5: logits within a
    few 0.05-wide bins, where 2048-bin histograms kept 52.6% for 50%) and saturated ones
    (scale 12): each thresholded step keeps exactly ceil(portion * n) pixels, its threshold
    the k-th largest score (torch.topk), streamed over 5 images of 10,000 pixels."""
    g = torch.Generator().manual_seed(1)
    n, m = 50_000, 10_000
    log_probs = torch.log_softmax(scale * torch.randn(1, 5, 1, n, generator=g), dim=1)
    conf = (0.3 if scale < 1 else 3) * torch.randn(1, 1, n, generator=g) - (0 if scale < 1 else 25)
    policy = ProxyPolicy(kind, portion=0.37, portion2=0.61 if kind == "adversarial" else 1.0)
    image = lambda i: (log_probs[..., i * m:(i + 1) * m], conf[..., i * m:(i + 1) * m])  # noqa: E731
    th = compute_thresholds(lambda: iter(range(n // m)), image, policy, 5, torch.device("cpu"))
    labels = torch.cat([label_map(*image(i), policy, th) for i in range(n // m)], dim=-1).flatten()
    score, pred = (x.flatten() for x in confidence(log_probs))
    a = conf.flatten()
    if kind == "global":
        assert th.t.item() == _kth_largest(score, 0.37)
        assert (labels != IGNORE).sum().item() == math.ceil(0.37 * n)  # 18,500 of 50,000
        return
    region = torch.ones(n, dtype=torch.bool)
    if kind == "adversarial":
        assert th.t1 == _kth_largest(a, 0.37)
        region = a >= th.t1
        assert region.sum().item() == math.ceil(0.37 * n)  # the p1 step
        assert ((labels != IGNORE) & ~region).sum().item() == 0
    portion = policy.portion if kind == "class_balanced" else policy.portion2
    own = 0
    for c in range(5):
        v = score[region & (pred == c)]
        assert th.t_class[c].item() == _kth_largest(v, portion), c
        assert (v >= th.t_class[c]).sum().item() == math.ceil(round(portion * len(v), 9)), c
        own += math.ceil(round(portion * len(v), 9))
    # every pixel at or above its own class's threshold is kept; CBST's ratio may also keep a
    # pixel through another class l with P_l >= t_l (t_l below 0.5 only: diffuse scores)
    kept = (labels != IGNORE).sum().item()
    assert kept == own if th.t_class.min() >= 0 else kept >= own


def _probs(x):
    """Log-probabilities of 2 classes with logit(p_0) = x: (1, 2, 1, W)."""
    x = torch.tensor(x, dtype=torch.float32)
    return torch.stack([torch.nn.functional.logsigmoid(x), torch.nn.functional.logsigmoid(-x)])[None, :, None, :]


# Hand-checked cases: a threshold is the score of the last pixel kept.

def test_mat_t1_t2_and_eq5_by_hand():
    # 4 pixels, all predicting class 0, with logit(P_0) = 3.5, 1.5, 2.5, 4.5 and logit(A) =
    # 3.5, 2.5, -1.5, -3.5. p1 = 0.5 keeps the top half of A: t1 = 2.5, i.e. pixels 0 and 1.
    log_probs = _probs([3.5, 1.5, 2.5, 4.5])
    conf = torch.tensor([[[3.5, 2.5, -1.5, -3.5]]])
    for p2, t2_0, expected in [(0.5, 3.5, [0, IGNORE, IGNORE, IGNORE]), (1.0, 1.5, [0, 0, IGNORE, IGNORE])]:
        policy = ProxyPolicy("adversarial", portion=0.5, portion2=p2)
        th = compute_thresholds(lambda: iter([None]), lambda _: (log_probs, conf), policy, 2, torch.device("cpu"))
        assert th.t1 == pytest.approx(2.5)
        # t2 among pixels with A >= t1 only: class 0 scores {3.5, 1.5}; class 1 never predicted
        assert th.t_class[0].item() == pytest.approx(t2_0) and math.isinf(th.t_class[1].item())
        # pixel 3 (the most confident) and pixel 2 are dropped by the adversarial confidence
        assert label_map(log_probs, conf, policy, th)[0, 0].tolist() == expected


def test_class_balanced_labels_take_the_argmax_of_the_ratio():
    # P = [0.5, 0.45, 0.05] with t = [0.9, 0.4, inf]: ratios [0.56, 1.125, 0] -> class 1,
    # although class 0 has the highest probability; P = [0.3, 0.3, 0.4]: ratios < 1 -> ignore.
    probs = torch.tensor([[0.5, 0.45, 0.05], [0.3, 0.3, 0.4]]).T[None, :, None, :]
    t = torch.tensor([0.9, 0.4], dtype=torch.float64)
    th = Thresholds(t_class=torch.cat([torch.log(t / (1 - t)), torch.tensor([math.inf], dtype=torch.float64)]))
    labels = label_map(probs.log(), None, ProxyPolicy("class_balanced"), th)
    assert labels[0, 0].tolist() == [1, IGNORE]


def test_class_balanced_thresholds_per_predicted_class():
    # logit(P_0) = 3.5, 2.5, 1.5, 0.5 predict class 0; pixel 4 (logit(P_0) = -0.5) predicts
    # class 1 with confidence logit 0.5. Top half per class (rounded up to whole pixels):
    # t_0 = 2.5 (2 of 4), t_1 = 0.5 (1 of 1).
    log_probs = _probs([3.5, 2.5, 1.5, 0.5, -0.5])
    policy = ProxyPolicy("class_balanced", portion=0.5)
    th = compute_thresholds(lambda: iter([None]), lambda _: (log_probs, None), policy, 2, torch.device("cpu"))
    assert th.t_class.tolist() == pytest.approx([2.5, 0.5])
    # pixel 4: P_1 = sigmoid(0.5) >= t_1 -> class 1; pixels 2, 3 below both
    assert label_map(log_probs, None, policy, th)[0, 0].tolist() == [0, 0, IGNORE, IGNORE, 1]


def test_class_balanced_threshold_cap_as_the_release():
    """BDL's and DAST's release cap class thresholds at 0.9: on saturated predictions every
    pixel above 0.9 is kept. Class 0 probabilities 0.8 .. 0.99; the top half alone is t_0 =
    0.95 (3 of 6 kept); capped at 0.9 (a logit of log 9), 0.92 is kept too (4 of 6)."""
    p = torch.tensor([0.8, 0.85, 0.92, 0.95, 0.97, 0.99])
    log_probs = _probs(torch.log(p / (1 - p)).tolist())
    expected = {None: [IGNORE, IGNORE, IGNORE, 0, 0, 0], 0.9: [IGNORE, IGNORE, 0, 0, 0, 0],
                0.99: [IGNORE, IGNORE, IGNORE, 0, 0, 0], 1.0: [IGNORE, IGNORE, IGNORE, 0, 0, 0]}
    for cap, labels in expected.items():
        policy = ProxyPolicy("class_balanced", portion=0.5, max_threshold=cap)
        th = compute_thresholds(lambda: iter([None]), lambda _: (log_probs, None), policy, 2, torch.device("cpu"))
        assert label_map(log_probs, None, policy, th)[0, 0].tolist() == labels, cap
        if cap == 0.9:
            assert th.t_class[0].item() == pytest.approx(math.log(9))
    with pytest.raises(ValueError, match="max_threshold"):
        ProxyPolicy("global", max_threshold=0.9)
    with pytest.raises(ValueError, match="max_threshold"):
        ProxyPolicy("class_balanced", max_threshold=0.0)


def test_global_top_portion():
    log_probs = _probs([3.5, 2.5, 1.5, 0.5, -0.5])  # confidence logits 3.5 2.5 1.5 0.5 0.5
    policy = ProxyPolicy("global", portion=0.4)
    th = compute_thresholds(lambda: iter([None]), lambda _: (log_probs, None), policy, 2, torch.device("cpu"))
    assert th.t.item() == pytest.approx(2.5)  # the top 40%: 3.5 and 2.5
    assert label_map(log_probs, None, policy, th)[0, 0].tolist() == [0, 0, IGNORE, IGNORE, IGNORE]


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
        return probs.log(), None

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


def test_refocused_fraction_is_counted_and_logged(data_root, tmp_path):
    """The p1 step's share (pixels with A >= t1) is measured in the labelling pass."""
    from uda_ray.engine import build_datasets
    from trees import tiny_cfg

    data = build_datasets(tiny_cfg(data_root, tmp_path, "source_only", **{"data.select_n": 1}))

    def score_fn(images):
        n, _, h, w = images.shape
        g = torch.Generator().manual_seed(0)
        return torch.log_softmax(torch.randn(n, 19, h, w, generator=g), 1), torch.randn(n, h, w, generator=g)

    stats = generate(data["target_eval"], score_fn, ProxyPolicy("adversarial", portion=0.3, portion2=0.5),
                     tmp_path / "p", num_classes=19, device=torch.device("cpu"))
    m = stats.metrics()
    assert 0.3 <= m["proxy/refocused_frac"] <= 0.31 and m["proxy/kept_frac"] <= m["proxy/refocused_frac"]


@pytest.mark.parametrize("kind", ["global", "class_balanced", "adversarial"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_network_pass_gives_the_labels_of_a_pass_per_histogram(data_root, tmp_path, kind, dtype):
    """With a two-part score the network runs once per image and its outputs (in their own
    dtype: float32, or bf16 as under CUDA autocast) are read back by every pass: the
    thresholds and every label PNG are those of rerunning the network in each pass."""
    from trees import tiny_cfg
    from uda_ray.engine import build_datasets
    from uda_ray.proxy import TwoStageScore, log_softmax_at, stats_passes

    ds = build_datasets(tiny_cfg(data_root, tmp_path, "source_only", **{"data.select_n": 1}))["target_eval"]
    torch.manual_seed(0)
    net = torch.nn.Conv2d(3, 19, 3, stride=4, padding=1)
    disc = torch.nn.Conv2d(19, 1, 3, stride=2, padding=1)
    calls = []

    @torch.no_grad()
    def raw(images):
        calls.append(images.shape[0])
        logits = net(images).to(dtype)
        return logits, disc(logits.float()).to(dtype)

    def finish(outputs, size):
        logits, d = outputs
        d = torch.nn.functional.interpolate(d.float(), size=size, mode="bilinear", align_corners=True)
        return log_softmax_at(logits, size), adversarial_confidence_logit([d])

    policy = ProxyPolicy(kind, portion=0.4, portion2=0.6)
    score = TwoStageScore(raw, finish, finish_confidence=lambda outputs, size: finish(outputs, size)[1])
    rerun = generate(ds, score, policy, tmp_path / "rerun", num_classes=19, device=torch.device("cpu"), cache=None)
    assert len(calls) == (stats_passes(policy) + 1) * len(ds)  # the network in every pass
    calls.clear()
    once = generate(ds, score, policy, tmp_path / "once", num_classes=19, device=torch.device("cpu"))
    assert len(calls) == len(ds)  # the network once per image
    assert once.cache_bytes > 0 and not list(tmp_path.glob(".once.scores.*"))  # the cache is removed
    for a, b in [(rerun.thresholds.t, once.thresholds.t), (rerun.thresholds.t_class, once.thresholds.t_class)]:
        assert (a is None and b is None) or torch.equal(a, b)
    assert rerun.thresholds.t1 == once.thresholds.t1
    assert (rerun.kept, rerun.kept_per_class, rerun.refocused) == (once.kept, once.kept_per_class, once.refocused)
    assert 0 < once.kept < once.pixels
    for png in (tmp_path / "rerun").rglob("*.png"):
        assert png.read_bytes() == (tmp_path / "once" / png.relative_to(tmp_path / "rerun")).read_bytes(), png
