"""PWW (pixel-wise weighted adversarial DA): Eqs. 3-6 on hand cases, which parameters each
of the three updates reaches, and a 2-iteration fit of every switch combination of its studies."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from trees import random_batches, tiny_cfg
from uda_ray.config import ConfigError, build_config
from uda_ray.checkpoint import load_checkpoint_file
from uda_ray.engine import Context, build_segmenter, fit
from uda_ray.losses import SOURCE, TARGET, upsample
from uda_ray.config import METHODS
from uda_ray.methods.pww import dis_logits, generation_confidence, pixel_weight, weighted_bce
from uda_ray.models import FeatureDiscriminator


def _probs(*rows):
    """(1, C, 1, W) softmax maps from per-pixel class distributions, in float64."""
    return torch.tensor(rows, dtype=torch.float64).T.reshape(1, len(rows[0]), 1, len(rows))


def test_generation_confidence_eq3_by_hand():
    # p* = 0.95, 0.9 (on the threshold: not above it), 0.6, 0.5
    prob = _probs((0.95, 0.05, 0.0), (0.9, 0.1, 0.0), (0.3, 0.6, 0.1), (0.5, 0.5, 0.0))
    d = generation_confidence(prob, T=0.9)
    assert d.shape == (1, 1, 1, 4)
    assert d.flatten().tolist() == pytest.approx([0.01, math.exp(-0.9), math.exp(-0.6), math.exp(-0.5)])
    assert d.flatten().tolist() == pytest.approx([0.01, 0.40657, 0.548812, 0.606531], abs=1e-6)
    # T = 1 ("GenMap T=1"): no pixel is protected, d = exp(-p*) everywhere
    d1 = generation_confidence(prob, T=1.0)
    assert d1.flatten().tolist() == pytest.approx([math.exp(-0.95), math.exp(-0.9), math.exp(-0.6), math.exp(-0.5)])
    # just below the p* = 0.9 pixel the threshold switches it to 0.01; d_aligned is a knob
    assert generation_confidence(prob, T=0.89, d_aligned=0.02).flatten().tolist()[:2] == pytest.approx([0.02, 0.02])


def test_refined_weight_map_eq4_eq6_by_hand():
    d = torch.tensor([0.01, 0.5]).view(1, 1, 1, 2)
    dis = torch.tensor([0.2, 0.8]).view(1, 1, 1, 2)
    assert pixel_weight(d, 0.1, None).flatten().tolist() == pytest.approx([0.11, 0.6])  # Eq. 4
    assert pixel_weight(d, 0.1, dis).flatten().tolist() == pytest.approx([0.022, 0.48])  # Eq. 6
    assert pixel_weight(None, 0.1, dis).flatten().tolist() == pytest.approx([0.2, 0.8])  # genmap off
    assert pixel_weight(None, 0.1, None) is None  # both off: the unweighted loss of Eq. 2


def test_weighted_bce_by_hand():
    logits = torch.tensor([0.0, math.log(3.0)]).view(1, 1, 1, 2)  # D = sigmoid: 1/2, 3/4
    w = torch.tensor([1.0, 0.5]).view(1, 1, 1, 2)
    # source label: -log(1 - D) = log 2, log 4; weighted mean (log 2 + 0.5 log 4) / 2 = log 2
    assert weighted_bce(logits, SOURCE, w).item() == pytest.approx(math.log(2))
    assert weighted_bce(logits, SOURCE).item() == pytest.approx((math.log(2) + math.log(4)) / 2)
    # target label: -log D = log 2, log 4/3
    assert weighted_bce(logits, TARGET, w).item() == pytest.approx((math.log(2) + 0.5 * math.log(4 / 3)) / 2)


def test_dis_map_first_conv_commutes_with_upsampling():
    torch.manual_seed(0)
    d = FeatureDiscriminator(5, widths=(4, 3, 2), kernel_size=1).double()
    feat = torch.randn(2, 5, 3, 4, dtype=torch.float64)
    out = dis_logits(d, feat, (7, 9))
    assert out.shape == (2, 1, 7, 9)
    assert torch.allclose(out, d(upsample(feat, (7, 9))), atol=1e-12)


def _pww(data_root, tmp_path, dtype=torch.float64, **kw):
    cfg = tiny_cfg(data_root, tmp_path, "pww", **kw)
    ctx = Context(cfg, torch.device("cpu"), amp=False, channels_last=False)
    torch.manual_seed(0)
    method = METHODS["pww"](cfg, build_segmenter(cfg, ctx.device).to(dtype), ctx)
    for d in method.all_discs:
        d.to(dtype)
    return (method, *random_batches(2, dtype))


def _constant(disc, value):
    """Make a discriminator output ``value`` everywhere (zero weights, last bias = value)."""
    with torch.no_grad():
        for m in disc.net:
            if isinstance(m, torch.nn.Conv2d):
                m.weight.zero_()
                m.bias.zero_()
        disc.net[-1].bias.fill_(value)


def test_weighted_adversarial_loss_values_on_a_tiny_case(data_root, tmp_path):
    # D outputs logit 0 (D = 1/2) and D^aux logit ln 3 (membership of target 3/4) everywhere;
    # T = 0 puts every pixel above the threshold: d = 0.01, weight (0.01 + 0.1) * 3/4.
    method, src, tgt = _pww(data_root, tmp_path, **{"pww.T": 0.0})
    _constant(method.discs["main"], 0.0)
    _constant(method.d_feat, math.log(3.0))
    logs, saved = method.generator_step(src, tgt)
    w = 0.11 * 0.75
    assert logs["weight/aligned_frac"].item() == 1.0
    assert logs["weight/genmap_mean"].item() == pytest.approx(0.01)
    assert logs["weight/dismap_mean"].item() == pytest.approx(0.75)
    assert logs["weight/mean"].item() == pytest.approx(w)
    assert logs["loss/adv_tgt_main"].item() == pytest.approx(w * math.log(2))  # Eq. 6, target term
    assert logs["loss/adv_feat_tgt"].item() == pytest.approx(math.log(4))  # Eq. 5, -log(1 - 3/4)
    logs = method.discriminator_step(**saved)
    assert logs["loss/disc_main"].item() == pytest.approx(math.log(2) + w * math.log(2))  # Eq. 9
    assert logs["loss/disc_feat"].item() == pytest.approx(math.log(4) + math.log(4 / 3))


def test_genmap_on_the_model_prediction(data_root, tmp_path):
    # T = 1: d = exp(-p*) of the segmenter's own target prediction at the input size
    method, src, tgt = _pww(data_root, tmp_path, **{"pww.T": 1.0, "pww.dismap": False})
    _constant(method.discs["main"], 0.0)
    with torch.no_grad():
        prob = torch.softmax(upsample(method.model(tgt["image"]).logits["main"], (32, 64)), dim=1)
    d = torch.exp(-prob.max(dim=1).values)
    logs, _ = method.generator_step(src, tgt)
    assert logs["weight/genmap_mean"].item() == pytest.approx(d.mean().item())
    assert logs["loss/adv_tgt_main"].item() == pytest.approx((d + 0.1).mean().item() * math.log(2))
    assert "loss/adv_feat_tgt" not in logs and method.d_feat is None


def _model_grads(method):
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
            for n, p in method.model.named_parameters() if p.requires_grad}


def _step2_grads(data_root, tmp_path, zero_d=False, **kw):
    """The segmenter gradient of step 2 alone: generator step with the adversarial weights
    minus without (same weights and batches; generator_step does not step the optimizers)."""
    method, src, tgt = _pww(data_root, tmp_path, dtype=torch.float32, **kw)
    if zero_d:  # D constant: the output-space term sends no gradient to the segmenter
        _constant(method.discs["main"], 0.0)
    grads = []
    for lam in (0.0, 1e-2):
        method.p = dataclasses.replace(method.p, lambda_adv=lam, lambda_adv_aux=lam)
        method.model.zero_grad(set_to_none=True)
        method.generator_step(src, tgt)
        grads.append(_model_grads(method))
    return {n: grads[1][n] - grads[0][n] for n in grads[0]}


def test_step1_and_step2_reach_the_segmenter_only(data_root, tmp_path):
    method, src, tgt = _pww(data_root, tmp_path)
    logs, saved = method.generator_step(src, tgt)
    for d in method.all_discs:
        assert all(p.grad is None for p in d.parameters())
        assert all(p.requires_grad for p in d.parameters())  # unfrozen again for step 3
    assert all(p.grad is not None and p.grad.abs().sum() > 0
               for p in method.model.parameters() if p.requires_grad)
    assert {"loss/seg_src", "loss/seg_src_aux", "loss/adv_tgt_main", "loss/adv_feat_tgt"} <= set(logs)
    assert all(not v.requires_grad for v in logs.values())
    # step 3 (Eq. 9) reaches every parameter of D and D^aux and leaves the segmenter alone
    before = _model_grads(method)
    logs = method.discriminator_step(**saved)
    assert set(logs) == {"loss/disc_main", "loss/disc_feat"}
    for d in method.all_discs:
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in d.parameters())
    assert all(torch.equal(before[n], g) for n, g in _model_grads(method).items())


def test_step2_feature_term_reaches_F_and_output_term_reaches_C(data_root, tmp_path):
    # L_aux (Eq. 5) acts on F(x_t): with D made constant, step 2 moves the backbone only.
    delta = _step2_grads(data_root, tmp_path, zero_d=True)
    assert any(g.abs().sum() > 0 for n, g in delta.items() if n.startswith("backbone."))
    assert all(g.abs().sum() == 0 for n, g in delta.items() if n.startswith("heads."))
    # L_advII (Eq. 6) acts on G = C(F): without D^aux it reaches the main classifier too.
    delta = _step2_grads(data_root, tmp_path, **{"pww.dismap": False})
    assert any(g.abs().sum() > 0 for n, g in delta.items() if n.startswith("heads.main."))
    assert any(g.abs().sum() > 0 for n, g in delta.items() if n.startswith("backbone."))
    assert all(g.abs().sum() == 0 for n, g in delta.items() if n.startswith("heads.aux."))  # single level


def test_multi_level_adapts_the_aux_head(data_root, tmp_path):
    delta = _step2_grads(data_root, tmp_path, **{"pww.dismap": False, "pww.multi_level": True})
    assert any(g.abs().sum() > 0 for n, g in delta.items() if n.startswith("heads.aux."))


def test_weight_is_detached_unless_genmap_grad(data_root, tmp_path):
    # the loss value is the same; only the gradient through d = exp(-p*) differs
    base = {"pww.T": 1.0, "pww.dismap": False}
    off = _step2_grads(data_root, tmp_path, **base)
    on = _step2_grads(data_root, tmp_path, **base, **{"pww.genmap_grad": True})
    assert any(not torch.allclose(off[n], on[n]) for n in off)


def test_config_ranges_and_checks(data_root, tmp_path):
    with pytest.raises(ConfigError, match="pww.T: must be <= 1.0"):
        build_config({"pww.T": 1.5}, method="pww")
    with pytest.raises(ConfigError, match="pww.mu: must be >= 0.0"):
        build_config({"pww.mu": -0.1}, method="pww")
    assert build_config({"preset": "study-cpu"}, method="pww").params.ndf == 16
    p = build_config({}, method="pww").params
    assert (p.T, p.mu, p.lambda_adv, p.d_aligned, p.genmap, p.dismap, p.multi_level) == (
        0.9, 0.1, 5e-4, 0.01, True, True, False)
    with pytest.raises(ConfigError, match="pww.multi_level: needs model.multi_level"):
        fit(tiny_cfg(data_root, tmp_path, "pww", **{"model.multi_level": False, "pww.multi_level": True}))


# The switch combinations of studies/pww_table3.py and studies/pww_search.py, and the extras.
SMOKE = [
    {"pww.genmap": False, "pww.dismap": False},  # DA without pixel-wise weighting
    {"pww.T": 1.0, "pww.dismap": False},  # GenMap T=1
    {"pww.T": 0.9, "pww.dismap": False},  # GenMap T=0.9
    {"pww.T": 0.9, "pww.dismap": True},  # GenMap T=0.9 + DisMap (the defaults)
    {"pww.multi_level": True, "pww.genmap_grad": True, "model.bn": "per_domain"},
]


@pytest.mark.parametrize("values", SMOKE, ids=["-".join(f"{k}={v}" for k, v in v.items()) for v in SMOKE])
def test_two_iteration_smoke(data_root, tmp_path, values):
    result = fit(tiny_cfg(data_root, tmp_path, "pww", **{"run.iterations": 2, **values}))
    assert result.step == 2 and 0.0 <= result.scores.miou <= 1.0
    assert (result.run_dir / "mosaic.png").is_file()
    modules = load_checkpoint_file(result.run_dir)["modules"]
    assert ("d_feat" in modules) == values.get("pww.dismap", True)
    assert ("d_aux" in modules) == values.get("pww.multi_level", False)


def test_mosaic_maps_are_the_two_weight_maps(data_root, tmp_path):
    method, _, tgt = _pww(data_root, tmp_path)
    maps = method.mosaic_maps(tgt["image"])
    assert set(maps) == {"genmap", "dismap"}
    for m in maps.values():
        assert m.shape == (2, 32, 64) and 0.0 <= m.min() and m.max() <= 1.0
