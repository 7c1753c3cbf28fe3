"""The strategic curriculum (Chitta et al.): each equation on a hand-checkable case, the
parameters each loss reaches, and a 2-iteration fit of every switch combination of its
studies."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from trees import random_batches, tiny_cfg
from uda_ray.config import ConfigError
from uda_ray.data.labels import IGNORE
from uda_ray.engine import Context, build_segmenter, fit
from uda_ray.config import METHODS
from uda_ray.methods.curriculum import (
    PAPER_WEIGHTED_CLASSES,
    class_weights,
    decoder_similarity,
    drop_easy,
    linear_ramp,
    num_source,
    proxy_labels,
    weighted_ce,
)
from uda_ray.models.segmenters import TinyPPM

TWO = {"model.arch": "tiny_ppm", "model.num_decoders": 2}


def _method(data_root, tmp_path, dtype=torch.float32, **kw):
    cfg = tiny_cfg(data_root, tmp_path, "curriculum", **{**TWO, **kw})
    ctx = Context(cfg, torch.device("cpu"), amp=False, channels_last=False)
    return METHODS["curriculum"](cfg, build_segmenter(cfg, ctx.device).to(dtype), ctx)


def _batches(dtype=torch.float32, n=4):
    return random_batches(n, dtype)


# --- Eq. 4's similarity penalty ---------------------------------------------------------------

def _decoder(w, bias, bn_weight):
    d = nn.Sequential(nn.Conv2d(2, 1, 1), nn.BatchNorm2d(1))
    with torch.no_grad():
        d[0].weight.copy_(torch.tensor(w, dtype=torch.float32).view(1, 2, 1, 1))
        d[0].bias.fill_(bias)
        d[1].weight.fill_(bn_weight)
    return d


def test_similarity_penalty_on_hand_case():
    # w1 = (1, 0), w2 = (1, 1): dot 1, cosine 1/sqrt(2); biases and BN do not count
    d1, d2 = _decoder([1.0, 0.0], 5.0, 3.0), _decoder([1.0, 1.0], -7.0, 9.0)
    assert decoder_similarity(d1, d2, "dot").item() == pytest.approx(1.0)
    assert decoder_similarity(d1, d2, "cosine").item() == pytest.approx(1 / math.sqrt(2))
    d3 = _decoder([-1.0, -1.0], 0.0, 1.0)  # anti-aligned: signed cosine -1/sqrt(2), |.| +1/sqrt(2)
    assert decoder_similarity(d1, d3, "cosine").item() == pytest.approx(-1 / math.sqrt(2))
    assert decoder_similarity(d1, d3, "abs_cosine").item() == pytest.approx(1 / math.sqrt(2))
    # d cos / d w1 = w2/(|w1||w2|) - cos * w1/|w1|^2 = (1, 1)/sqrt(2) - (1, 0)/sqrt(2) = (0, 1/sqrt(2))
    decoder_similarity(d1, d2, "cosine").backward()
    assert d1[0].weight.grad.flatten().tolist() == pytest.approx([0.0, 1 / math.sqrt(2)])
    assert d1[0].bias.grad is None and d1[1].weight.grad is None


def test_similarity_penalty_reaches_only_decoder_filters(data_root, tmp_path):
    # beta enters Eq. 4 linearly: the gradient difference between beta = 1 and beta = 0 is
    # d sim / d theta, which is non-zero on the decoders' conv filters and zero elsewhere.
    grads = {}
    for beta in (0.0, 1.0):
        torch.manual_seed(0)
        method = _method(data_root, tmp_path, torch.float64, **{"curriculum.beta": beta})
        torch.manual_seed(1)
        method.train_step(*_batches(torch.float64), step=0)
        grads[beta] = {n: p.grad.clone() for n, p in method.model.named_parameters()}
    diff = {n: (grads[1.0][n] - grads[0.0][n]).abs().max().item() for n in grads[0.0]}
    filters = [n for n in diff if n.startswith("heads.") and n.endswith("weight") and grads[0.0][n].dim() == 4]
    assert len(filters) == 2 * (4 + 2)  # per decoder: 4 pyramid convs, the fusion conv, the classifier
    assert all(diff[n] > 0 for n in filters)
    assert all(diff[n] < 1e-12 for n in diff if n not in filters)


# --- mining masks -----------------------------------------------------------------------------

def _logits(rows):
    """(pixels x classes) -> (1, C, 1, P)."""
    return torch.tensor(rows, dtype=torch.float32).t().unsqueeze(0).unsqueeze(2)


def test_target_easy_mining_masks_disagreement():
    # 3 pixels, 2 classes. Decoder argmaxes (0, 1, 1) and (0, 0, 1): pixel 1 disagrees.
    l1 = _logits([[2.0, 0.0], [0.0, 1.0], [0.0, 2.0]])
    l2 = _logits([[1.0, 0.0], [3.0, 0.0], [0.0, 1.0]])
    proxy, agree = proxy_labels(l1, l2, easy=True)
    assert agree.flatten().tolist() == [True, False, True]
    assert proxy.flatten().tolist() == [0, IGNORE, 1]
    # naive self-training keeps every pixel: argmax of the average logits, (3, 1) -> 0 at pixel 1
    proxy, _ = proxy_labels(l1, l2, easy=False)
    assert proxy.flatten().tolist() == [0, 0, 1]
    # masked pixels send no gradient to either decoder
    l1.requires_grad_(True)
    proxy, _ = proxy_labels(l1.detach(), l2, easy=True)
    num, den = weighted_ce(l1, proxy, torch.ones(2))
    num.backward()
    g = l1.grad.abs().sum(1).flatten()
    assert g[1] == 0 and g[0] > 0 and g[2] > 0
    assert den.item() == 2


def test_source_hard_mining_drops_easy_pixels_at_the_ratio():
    label = torch.tensor([[3, 4, 5, IGNORE, 6, 7]])
    easy = torch.tensor([[True, True, False, True, False, True]])
    assert torch.equal(drop_easy(label, easy, 0.0), label)
    assert drop_easy(label, easy, 1.0).tolist() == [[IGNORE, IGNORE, 5, IGNORE, 6, IGNORE]]
    big = torch.zeros(1, 200, 200, dtype=torch.long)
    easy = torch.zeros(1, 200, 200, dtype=torch.bool)
    easy[:, :100] = True  # half the pixels easy
    out = drop_easy(big, easy, 0.25, generator=torch.Generator().manual_seed(0))
    dropped = out == IGNORE
    assert not dropped[:, 100:].any()  # hard pixels are never dropped
    assert dropped[:, :100].float().mean().item() == pytest.approx(0.25, abs=0.01)


def test_source_easy_definitions(data_root, tmp_path):
    # With the hard ratio at 1 from the start, every easy source pixel is dropped: "agree"
    # keeps where the decoders disagree; "both_correct" keeps where one of them is wrong.
    for easy in ("agree", "both_correct"):
        torch.manual_seed(0)
        method = _method(data_root, tmp_path, **{"curriculum.gamma_start": 1.0, "curriculum.gamma_end": 1.0,
                                                 "curriculum.hard_ratio_start": 1.0, "curriculum.source_easy": easy})
        src, tgt = _batches()
        method.model.eval()  # no dropout: the step's predictions are these
        with torch.no_grad():
            out = method.model(src["image"])
        p1, p2 = (nn.functional.interpolate(out.logits[k], size=(32, 64), mode="bilinear",
                                            align_corners=True).argmax(1) for k in ("main", "dec2"))
        hard = (p1 != p2) if easy == "agree" else ((p1 != src["label"]) | (p2 != src["label"]))
        logs = method.train_step(src, tgt, step=0)
        assert logs["mining/kept_src"].item() == pytest.approx(hard.float().mean().item())
        assert 0 < logs["mining/kept_src"].item() < 1


# --- schedules ----------------------------------------------------------------------------------

def test_gamma_and_hard_ratio_schedules(data_root, tmp_path):
    # 200 iterations: both move linearly over the first 100 (half) and then stay
    method = _method(data_root, tmp_path, **{"run.iterations": 200})
    assert [method.gamma(s) for s in (0, 25, 50, 100, 150)] == pytest.approx([0.9, 0.7, 0.5, 0.1, 0.1])
    assert [method.hard_ratio(s) for s in (0, 25, 50, 100, 199)] == pytest.approx([0.0, 0.25, 0.5, 1.0, 1.0])
    assert linear_ramp(7, 0, 0.9, 0.1) == pytest.approx(0.1)  # ramp_frac 0: the end value at once
    # the horizon is the lr schedule's: run.schedule_iterations when set
    method = _method(data_root, tmp_path, **{"run.iterations": 200, "run.schedule_iterations": 400})
    assert method.gamma(100) == pytest.approx(0.5)


def test_source_images_per_iteration():
    assert [num_source(g, 4, rounding="nearest") for g in (0.9, 0.5, 0.375, 0.1)] == [4, 2, 2, 0]
    draws = [num_source(0.1, 4, rounding="stochastic", seed=3, step=s) for s in range(4000)]
    assert set(draws) == {0, 1}
    assert np.mean(draws) == pytest.approx(0.4, abs=0.03)  # gamma * B on average
    assert draws == [num_source(0.1, 4, rounding="stochastic", seed=3, step=s) for s in range(4000)]  # resumable
    assert num_source(1.0, 4, rounding="stochastic") == 4 and num_source(0.0, 4, rounding="stochastic") == 0


def test_mixed_batch_takes_source_then_target_images(data_root, tmp_path):
    method = _method(data_root, tmp_path, **{"curriculum.gamma_start": 0.5, "curriculum.gamma_end": 0.5,
                                             "curriculum.mix_rounding": "nearest"})
    sizes = []
    method.model.register_forward_hook(lambda m, args, out: sizes.append(args[0].shape[0]))
    logs = method.train_step(*_batches(), step=0)
    assert sizes == [2, 2] and logs["curriculum/n_src"].item() == 2
    assert logs["loss/seg_src"].item() > 0 and logs["loss/self_tgt"].item() > 0
    sizes.clear()
    method = _method(data_root, tmp_path, **{"curriculum.gamma_start": 1.0, "curriculum.gamma_end": 1.0})
    method.model.register_forward_hook(lambda m, args, out: sizes.append(args[0].shape[0]))
    logs = method.train_step(*_batches(), step=0)
    assert sizes == [4] and logs["loss/self_tgt"].item() == 0  # source only: no target forward


# --- class weights ------------------------------------------------------------------------------

def test_class_weights():
    lam = class_weights(PAPER_WEIGHTED_CLASSES, 2.0, 19)
    assert torch.nonzero(lam == 2.0).flatten().tolist() == [3, 4, 5, 6, 7, 12]  # wall..traffic sign, rider
    assert lam.sum().item() == 19 + 6
    assert class_weights(PAPER_WEIGHTED_CLASSES, 2.0, 16).sum().item() == 16 + 6
    with pytest.raises(ConfigError, match="curriculum.weighted_classes.*'walls'"):
        class_weights("walls,rider", 2.0, 19)
    # weighted CE: two pixels with uniform 2-class logits (CE ln 2 each), labels 0 and 1, lambda (1, 2)
    num, den = weighted_ce(torch.zeros(1, 2, 1, 2), torch.tensor([[[0, 1]]]), torch.tensor([1.0, 2.0]))
    assert num.item() == pytest.approx(3 * math.log(2)) and den.item() == 3


def test_weighted_loss_switch(data_root, tmp_path):
    assert _method(data_root, tmp_path).lam.sum().item() == 25
    assert _method(data_root, tmp_path, **{"curriculum.weighted_loss": False}).lam.tolist() == [1.0] * 19
    with pytest.raises(ConfigError, match="curriculum.weighted_classes"):
        _method(data_root, tmp_path, **{"curriculum.weighted_classes": "road,lamppost"})


# --- model, evaluation, optimisation ----------------------------------------------------------

def test_predict_averages_logits_before_softmax(data_root, tmp_path):
    method = _method(data_root, tmp_path)
    method.model.eval()
    x = torch.randn(2, 3, 32, 64)
    with torch.no_grad():
        out = method.model(x)
    expected = (out.logits["main"] + out.logits["dec2"]) / 2
    assert torch.allclose(method.predict(x), expected, atol=1e-6)
    # not the average of the softmaxes
    soft = (out.logits["main"].softmax(1) + out.logits["dec2"].softmax(1)) / 2
    assert not torch.allclose(method.predict(x).softmax(1), soft, atol=1e-4)
    maps = method.mosaic_maps(x)
    agree = (out.logits["main"].argmax(1) == out.logits["dec2"].argmax(1))
    assert maps["agreement"].shape == (2, 32, 64) and set(maps["agreement"].unique().tolist()) <= {0.0, 1.0}
    assert 0 < agree.float().mean() < 1  # two random decoders: some pixels agree, some do not


def test_every_parameter_is_reached(data_root, tmp_path):
    torch.manual_seed(0)
    method = _method(data_root, tmp_path)
    torch.manual_seed(0)
    logs = method.train_step(*_batches(), step=0)
    params = [(n, p) for n, p in method.model.named_parameters() if p.requires_grad]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in params), \
        [n for n, p in params if p.grad is None or p.grad.abs().sum() == 0]
    assert {k.split("/")[0] for k in logs} == {"loss", "curriculum", "mining"}
    assert all(torch.isfinite(v) and not v.requires_grad for v in logs.values())


def test_optimiser_follows_the_paper(data_root, tmp_path):
    method = _method(data_root, tmp_path, **{"optim.lr": 1e-3, "optim.head_lr_mult": 10.0})
    so = method.opt_g
    assert so.schedule == "poly_epoch"
    lrs = {g["name"]: g["lr"] for g in so.optimizer.param_groups}
    assert lrs == pytest.approx({"backbone": 1e-3, "heads": 1e-2})  # encoder 1e-3, decoders 1e-2
    assert so.optimizer.defaults["momentum"] == 0.9


@pytest.mark.parametrize("values", [{"model.arch": "tiny", "model.num_decoders": 1},
                                    {"model.arch": "tiny_ppm", "model.num_decoders": 1},
                                    {"model.arch": "tiny_ppm", "model.num_decoders": 3}])
def test_needs_two_decoders(data_root, tmp_path, values):
    with pytest.raises(ConfigError, match="model.num_decoders.*model.arch"):
        _method(data_root, tmp_path, **values)


def test_segmenter_knobs(data_root, tmp_path):
    cfg = tiny_cfg(data_root, tmp_path, "source_only", **TWO, **{"model.ppm_bins": "6,3,2,1"})
    model = build_segmenter(cfg, torch.device("cpu"))
    assert isinstance(model, TinyPPM) and set(model.heads) == {"main", "dec2"}
    assert model.heads["dec2"].bins == (6, 3, 2, 1)
    out = model(torch.randn(1, 3, 33, 65))
    assert out.logits["dec2"].shape == (1, 19, 5, 9) and out.features["decoder2"].shape == (1, 128, 5, 9)
    with pytest.raises(ConfigError, match="model.ppm_bins"):
        build_segmenter(tiny_cfg(data_root, tmp_path, "source_only", **TWO, **{"model.ppm_bins": "6,x"}),
                        torch.device("cpu"))
    with pytest.raises(ConfigError, match="model.num_decoders"):
        build_segmenter(tiny_cfg(data_root, tmp_path, "source_only", **{"model.num_decoders": 2}),
                        torch.device("cpu"))


# --- every switch combination of the studies ---------------------------------------------------

SOURCE_ONLY = {"curriculum.gamma_start": 1.0, "curriculum.gamma_end": 1.0}
OFF = {"curriculum.weighted_loss": False, "curriculum.target_easy": False, "curriculum.source_hard": False}
STUDY_ROWS = {
    "source_only": {**SOURCE_ONLY, **OFF},
    "self_training": OFF,
    "weighted_loss": {**OFF, "curriculum.weighted_loss": True},
    "target_easy": {**OFF, "curriculum.weighted_loss": True, "curriculum.target_easy": True},
    "source_hard": {"curriculum.beta": 0.05, "curriculum.class_weight": 3.0},  # all on (and the search's knobs)
}


@pytest.mark.parametrize("row", list(STUDY_ROWS))
def test_fit_every_study_row(data_root, tmp_path, row):
    cfg = tiny_cfg(data_root, tmp_path, "curriculum", **TWO, **{"run.iterations": 2}, **STUDY_ROWS[row])
    result = fit(cfg)
    assert result.step == 2 and 0 <= result.metrics["val/mIoU"] <= 1
    mosaic = Image.open(result.run_dir / "mosaic.png")
    # image | label | prediction | agreement: 4 columns of 64 px, enlarged 3x so that their
    # titles fit, above the class legend
    assert mosaic.size[0] == 4 * 64 * 3 and mosaic.size[1] > 32 * 3
