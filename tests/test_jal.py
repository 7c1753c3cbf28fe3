"""JAL + WTM: the equations on hand-checkable cases, where each loss's gradient goes, and a
2-iteration fit of every switch combination of studies/jal_table4.py."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from trees import random_batches, tiny_cfg
from uda_ray.checkpoint import load_checkpoint_file
from uda_ray.engine import Context, build_segmenter, fit
from uda_ray.losses import SOURCE, TARGET, gan_loss, upsample
from uda_ray.config import METHODS
from uda_ray.methods.jal import WeightTransfer, joint_adversarial_loss
from uda_ray.study import load_study

STUDIES = Path(__file__).resolve().parents[1] / "studies"

# Every loss weight off; a test turns on the one it looks at.
ZERO = {"jal.lambda_seg1": 0.0, "jal.lambda_seg2": 0.0, "jal.lambda_adv1": 0.0, "jal.lambda_adv2": 0.0,
        "jal.lambda_adv_jal": 0.0, "jal.lambda_adv_wtm1": 0.0, "jal.lambda_adv_wtm2": 0.0}


def _jal(data_root, tmp_path, **kw):
    torch.manual_seed(0)
    cfg = tiny_cfg(data_root, tmp_path, "jal", **kw)
    ctx = Context(cfg, torch.device("cpu"), amp=False, channels_last=False)
    method = METHODS["jal"](cfg, build_segmenter(cfg, ctx.device), ctx)
    return (method, *random_batches(2))


def _reached(params) -> bool:
    """Whether any of ``params`` got a non-zero gradient."""
    return any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


def _groups(method):
    m = method.model
    return {"backbone": list(m.backbone.parameters()), "head_main": list(m.heads["main"].parameters()),
            "head_aux": list(m.heads["aux"].parameters()), "wtm": list(method.wtms.parameters()),
            **{f"d_{k}": list(d.parameters()) for k, d in method.discs.items()}}


def _reach(method, src, tgt) -> set[str]:
    method.generator_step(src, tgt)
    return {k for k, ps in _groups(method).items() if _reached(ps)}


# --- equations on hand cases ---------------------------------------------------------------

def test_wtm_is_a_1x1_convolution_over_decoder_weights():
    # Eq. 6 by hand: C_in = 2, M = [[1, 1], [0, 2]]; one class, 1x1 kernel w = (a, b) = (3, 5)
    # -> W^T[i] = sum_j M[i, j] w[j] = (3 + 5, 2 * 5) = (8, 10).
    head = nn.Sequential(nn.Conv2d(2, 1, 1))
    wtm = WeightTransfer(head, num_classes=1)
    assert torch.equal(wtm.weight.view(2, 2), torch.eye(2))
    with torch.no_grad():
        wtm.weight.copy_(torch.tensor([[1.0, 1.0], [0.0, 2.0]]).view(2, 2, 1, 1))
    w = torch.tensor([3.0, 5.0]).view(1, 2, 1, 1)
    assert wtm.transfer(w).flatten().tolist() == [8.0, 10.0]


def test_wtm_identity_at_initialisation_exactly(data_root, tmp_path):
    method, _, tgt = _jal(data_root, tmp_path)
    with torch.no_grad():
        out = method.model(tgt["image"])
        for lv in ("aux", "main"):
            assert torch.equal(method.transferred_logits(out, lv), out.logits[lv])
        assert torch.equal(method.predict(tgt["image"]), out.logits["main"])
    # a WTM shared by the four ASPP branches, C_in x C_in x 1 x 1
    assert method.wtms["main"].names == [f"branches.{k}.weight" for k in range(4)]
    c_in = method.model.feature_channels["layer4"]
    assert method.wtms["main"].weight.shape == (c_in, c_in, 1, 1)


def test_predict_reads_the_transferred_decoder(data_root, tmp_path):
    method, _, tgt = _jal(data_root, tmp_path)
    with torch.no_grad():
        method.wtms["main"].weight.mul_(2.0)  # Dec2^T = 2 x Dec2's weights (biases kept)
        out = method.model(tgt["image"])
        head = method.model.heads["main"]
        bias = sum(b.bias for b in head.branches).view(1, -1, 1, 1)
        expected = 2 * (out.logits["main"] - bias) + bias
        assert torch.allclose(method.predict(tgt["image"]), expected, atol=1e-5)
        assert not torch.allclose(method.predict(tgt["image"]), out.logits["main"], atol=1e-3)


def test_joint_adversarial_loss_by_hand():
    # Eq. 5: -mean log D1_source(P_t^2); with source = label 0 of a logit z that is BCE(z, 0)
    # = log(1 + e^z). D1 is a 1x1 conv z = ln(3) * p_0: pixels with p = (1, 0) and (0, 1)
    # give z = ln 3 and 0 -> (log 4 + log 2) / 2.
    d1 = nn.Conv2d(2, 1, 1, bias=False)
    with torch.no_grad():
        d1.weight.copy_(torch.tensor([math.log(3.0), 0.0]).view(1, 2, 1, 1))
    prob = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).T.reshape(1, 2, 1, 2)
    assert joint_adversarial_loss(d1, prob).item() == pytest.approx((math.log(4) + math.log(2)) / 2)


def test_joint_term_is_d1_on_the_main_target_map(data_root, tmp_path):
    method, src, tgt = _jal(data_root, tmp_path)
    seen = []
    method.discs["aux"].register_forward_hook(lambda m, i, o: seen.append((i[0].detach(), o.detach())))
    logs, _, _ = method.generator_step(src, tgt)
    with torch.no_grad():
        out = method.model(tgt["image"])
    p_main = torch.softmax(upsample(out.logits["main"], (32, 64)), dim=1)
    # D1's forwards in the generator step: P_t^1 (Eq. 3), then P_t^2 (Eq. 5)
    assert len(seen) == 2 and torch.allclose(seen[1][0], p_main, atol=1e-6)
    z = seen[1][1]
    assert logs["loss/adv_tgt_jal"].item() == pytest.approx(torch.nn.functional.softplus(z).mean().item(), rel=1e-6)


def test_discriminators_train_on_their_own_levels(data_root, tmp_path):
    method, src, tgt = _jal(data_root, tmp_path)
    _, prob_s, prob_t = method.generator_step(src, tgt)
    with torch.no_grad():
        out_s, out_t = method.model(src["image"]), method.model(tgt["image"])
    # D_wtm's maps are the low-level transferred ones (Eq. 8); equal to P^1 at initialisation
    assert torch.allclose(prob_t["wtm"], torch.softmax(upsample(method.transferred_logits(out_t, "aux"), (32, 64)), 1))
    assert torch.allclose(prob_s["wtm"], torch.softmax(upsample(method.transferred_logits(out_s, "aux"), (32, 64)), 1))
    gen_grads = [p.grad.clone() for p in [*method.model.parameters(), *method.wtms.parameters()]]
    logs = method.discriminator_step(prob_s, prob_t)
    for k, d in method.discs.items():  # Eq. 2, 8: half-weighted, source 0 / target 1
        with torch.no_grad():
            expected = 0.5 * (gan_loss(d(prob_s[k]), SOURCE) + gan_loss(d(prob_t[k]), TARGET))
        assert logs[f"loss/disc_{k}"].item() == pytest.approx(expected.item())
        assert _reached(d.parameters())
    # the discriminator step reaches no generator parameter (segmenter, WTMs)
    after = [p.grad for p in [*method.model.parameters(), *method.wtms.parameters()]]
    assert all(torch.equal(a, b) for a, b in zip(gen_grads, after))


# --- which parameters each loss reaches ----------------------------------------------------

@pytest.mark.parametrize("wtm_grad", ["segmenter", "wtm"])
def test_wtm_loss_reach(data_root, tmp_path, wtm_grad):
    method, src, tgt = _jal(data_root, tmp_path, **{**ZERO, "jal.lambda_adv_wtm1": 1.0, "jal.lambda_adv_wtm2": 1.0,
                                                          "jal.wtm_grad": wtm_grad})
    reached = _reach(method, src, tgt)
    if wtm_grad == "wtm":  # the WTM parameters only
        assert reached == {"wtm"}
    else:  # Eq. 9: min over G and WTM_i; never a discriminator
        assert reached == {"wtm", "backbone", "head_main", "head_aux"}


def test_each_wtm_term_reaches_its_own_wtm(data_root, tmp_path):
    for lv, key in (("aux", "jal.lambda_adv_wtm1"), ("main", "jal.lambda_adv_wtm2")):
        method, src, tgt = _jal(data_root, tmp_path, **{**ZERO, key: 1.0, "jal.wtm_grad": "wtm"})
        method.generator_step(src, tgt)
        assert {k for k, w in method.wtms.items() if _reached(w.parameters())} == {lv}


def test_joint_term_reach(data_root, tmp_path):
    # Eq. 5 trains the encoder and the high-level decoder, not D1 (frozen), not the low-level
    # decoder, not the WTMs.
    method, src, tgt = _jal(data_root, tmp_path, **{**ZERO, "jal.lambda_adv_jal": 1.0})
    assert _reach(method, src, tgt) == {"backbone", "head_main"}
    assert all(p.requires_grad for p in method.discs["aux"].parameters())  # unfrozen for step 3


def test_segmentation_and_adaptsegnet_terms_never_reach_the_wtm(data_root, tmp_path):
    kw = {**ZERO, "jal.lambda_seg1": 0.1, "jal.lambda_seg2": 1.0, "jal.lambda_adv1": 1.0, "jal.lambda_adv2": 1.0,
          "jal.lambda_adv_jal": 1.0}
    method, src, tgt = _jal(data_root, tmp_path, **kw)
    assert _reach(method, src, tgt) == {"backbone", "head_main", "head_aux"}


def test_switches_build_the_parts(data_root, tmp_path):
    method, _, _ = _jal(data_root, tmp_path, **{"jal.wtm_dec1": False, "jal.wtm_dec2": False})
    assert set(method.discs) == {"aux", "main"} and not len(method.wtms)
    assert set(method.optimizers()) == {"seg", "disc"} and "wtm" not in method.modules()
    method, _, _ = _jal(data_root, tmp_path, **{"jal.wtm_dec1": False})
    assert set(method.discs) == {"aux", "main", "wtm"} and set(method.wtms) == {"main"}
    wtm = method.optimizers()["wtm"].optimizer
    assert wtm.defaults["lr"] == 1e-4 and wtm.defaults["momentum"] == 0.9 and wtm.defaults["weight_decay"] == 0.0
    assert method.modules()["wtm"] is method.wtms
    seg_ids = {id(p) for g in method.opt_g.optimizer.param_groups for p in g["params"]}
    assert not seg_ids & {id(p) for p in method.wtms.parameters()}


# --- a 2-iteration fit of every switch combination of the study -----------------------------

def _study_combos() -> list[tuple[bool, bool, bool]]:
    """(jal, wtm_dec1, wtm_dec2) of every jal row of the two studies."""
    combos = set()
    for name in ("jal_table4.py", "jal_search.py"):
        study = load_study(STUDIES / name)
        for row in study.rows:
            if row.method == "jal":
                flat = study.flat(row, 0)
                combos.add((flat["jal.jal"], flat["jal.wtm_dec1"], flat["jal.wtm_dec2"]))
    return sorted(combos)


COMBOS = _study_combos()


def test_table4_rows_are_the_reconstructed_switches():
    assert COMBOS == sorted([(False, False, False), (True, False, False), (False, True, True),
                             (True, False, True), (True, True, False), (True, True, True)])


# wtm_grad only matters with a WTM: both values for the rows that carry one
GRAD_COMBOS = [(*c, g) for c in COMBOS for g in (("segmenter", "wtm") if c[1] or c[2] else ("segmenter",))]


@pytest.mark.parametrize("jal,wtm1,wtm2,wtm_grad", GRAD_COMBOS)
def test_fit_every_switch_combination(data_root, tmp_path, jal, wtm1, wtm2, wtm_grad):
    cfg = tiny_cfg(data_root, tmp_path, "jal", **{"run.iterations": 2, "jal.jal": jal, "jal.wtm_dec1": wtm1,
                                                  "jal.wtm_dec2": wtm2, "jal.wtm_grad": wtm_grad, "jal.ndf": 8,
                                                  "jal.wtm_lr": 0.1})
    result = fit(cfg)
    assert math.isfinite(result.scores.miou)
    state = load_checkpoint_file(result.run_dir)
    assert ("wtm" in state["modules"]) == (wtm1 or wtm2) and ("wtm" in state["optimizers"]) == (wtm1 or wtm2)
    for lv, on in (("aux", wtm1), ("main", wtm2)):
        key = f"{lv}.weight"
        if on:  # the WTM was trained (left the identity) and is checkpointed
            w = state["modules"]["wtm"][key]
            assert not torch.equal(w, torch.eye(w.shape[0]).view_as(w))
        else:
            assert key not in state["modules"].get("wtm", {})


def test_search_spaces_keep_the_papers_ratios_and_their_bounds():
    """Both spaces of jal_search tie each low-level weight to a fifth of its high-level one;
    the near space stays at or below 3x the paper's 1e-3, the wide one reaches 1."""
    import optuna

    study = load_study(STUDIES / "jal_search.py")
    spaces = {row.name: row.space for row in study.rows if row.space is not None}
    assert set(spaces) == {"jal_search", "jal_search_near"}
    for name, hi in (("jal_search", 1.0), ("jal_search_near", 3e-3)):
        for corner in (1e-4, hi):
            params = {"jal.lambda_adv2": corner, "jal.lambda_adv_jal": corner, "jal.lambda_adv_wtm2": corner}
            tied = spaces[name](optuna.trial.FixedTrial(params))
            assert tied == {"jal.lambda_adv1": pytest.approx(corner / 5), "jal.lambda_adv_wtm1": pytest.approx(corner / 5)}
        search = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
        for _ in range(200):
            trial = search.ask()
            spaces[name](trial)
            assert all(1e-4 <= v <= hi for v in trial.params.values()), (name, trial.params)
        assert max(max(t.params.values()) for t in search.trials) > hi / 3  # reaches near its top
