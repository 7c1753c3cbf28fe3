"""DAST: the attention, the weighted corrector loss, the stages and self-training rounds."""

from __future__ import annotations

import math
import shutil

import pytest
import torch

from trees import study_switches, tiny_cfg
from uda_ray.checkpoint import checkpoint_path, load_checkpoint_file
from uda_ray.engine import Context, build_segmenter, fit
from uda_ray.losses import SOURCE, gan_loss
from uda_ray.proxy import is_complete


def _method(data_root, tmp_path, **values):
    from uda_ray.methods.dast import DAST

    cfg = tiny_cfg(data_root, tmp_path, "dast", **{"dast.ndf": 8, "dast.d_width": 16, **values})
    ctx = Context(cfg, torch.device("cpu"), amp=False, channels_last=False)
    return DAST(cfg, build_segmenter(cfg, ctx.device), ctx)


def _constant(disc, value):
    last = disc.net[-1]
    torch.nn.init.zeros_(last.weight)
    torch.nn.init.constant_(last.bias, value)


def test_attention_is_residual_tanh_of_abs_discoverer(data_root, tmp_path):
    from uda_ray.methods.dast import attend

    # f = [1, -2] (2 channels, 1 pixel), D(f) = -atanh(0.5): alpha = |D| = atanh(0.5), so
    # tanh(alpha) = 0.5 and f' = f + 0.5 f = [1.5, -3].
    f = torch.tensor([1.0, -2.0]).view(1, 2, 1, 1)
    torch.testing.assert_close(attend(f, torch.full((1, 1, 1, 1), math.atanh(0.5))).flatten(), torch.tensor([1.5, -3.0]))
    m = _method(data_root, tmp_path)
    _constant(m.discoverer, -math.atanh(0.5))
    x = torch.randn(1, 3, 32, 64)
    logits, f, d_out, alpha = m.forward_target(x, attention=True)
    torch.testing.assert_close(alpha, torch.full_like(alpha, math.atanh(0.5)))
    torch.testing.assert_close(logits, m.model.heads["main"](1.5 * f))
    plain, _, _, _ = m.forward_target(x, attention=False)
    torch.testing.assert_close(plain, m.model.heads["main"](f))


def test_weighted_adversarial_loss_by_hand():
    # least squares to the source label 0: per-location (0.5)^2 and 1^2, weights 2 and 0
    d = torch.tensor([0.5, 1.0]).view(1, 1, 1, 2)
    w = torch.tensor([2.0, 0.0]).view(1, 1, 1, 2)
    assert gan_loss(d, SOURCE, "ls", weight=w).item() == pytest.approx((2 * 0.25 + 0) / 2)
    assert gan_loss(d, SOURCE, "ls").item() == pytest.approx((0.25 + 1) / 2)
    # BCE with logits to label 0 is softplus(d)
    assert gan_loss(d, SOURCE, "vanilla", weight=w).item() == pytest.approx(2 * math.log1p(math.exp(0.5)) / 2)


def test_corrector_loss_is_weighted_by_the_attention(data_root, tmp_path):
    """Doubling alpha doubles the corrector's term (C constant), as (C - 0)^2 * alpha."""
    losses = {}
    for a in (0.5, 1.0):
        torch.manual_seed(0)
        m = _method(data_root, tmp_path, **{"dast.lambda_d": 0.0})
        _constant(m.discoverer, a)
        _constant(m.corrector, 0.3)  # C(p_t) = 0.3 everywhere: (0.3 - 0)^2 = 0.09
        src = {"image": torch.randn(2, 3, 32, 64), "label": torch.zeros(2, 32, 64, dtype=torch.long)}
        tgt = {"image": torch.randn(2, 3, 32, 64)}
        losses[a] = m.train_step(src, tgt, 0)["loss/adv_tgt_corrector"].item()
    assert losses[0.5] == pytest.approx(0.09 * 0.5, rel=1e-5)
    assert losses[1.0] == pytest.approx(0.09 * 1.0, rel=1e-5)


def test_discoverer_loss_reaches_the_encoder_only(data_root, tmp_path):
    states = {}
    for lam in (0.0, 100.0):
        torch.manual_seed(0)
        r = fit(tiny_cfg(data_root, tmp_path, "dast", **{"run.iterations": 1, "run.name": f"l{lam}", "dast.ndf": 8,
                                                         "dast.d_width": 16, "dast.attention": False,
                                                         "dast.lambda_d": lam}))
        states[lam] = load_checkpoint_file(checkpoint_path(r.run_dir))["modules"]
    a, b = states[0.0], states[100.0]
    assert not torch.equal(a["model"]["backbone.conv1.weight"], b["model"]["backbone.conv1.weight"])
    assert torch.equal(a["model"]["heads.main.branches.0.weight"], b["model"]["heads.main.branches.0.weight"])
    for name in ("discoverer", "corrector"):  # the discriminators' own step ignores lambda_d
        for k in a[name]:
            assert torch.equal(a[name][k], b[name][k]), (name, k)


ROWS = {  # Table 3 rows and the self-training variants of the studies
    "baseline": {"dast.mse": False, "dast.two_disc": False, "dast.attention": False},
    "mse": {"dast.mse": True, "dast.two_disc": False, "dast.attention": False},
    "mse_2d": {"dast.mse": True, "dast.two_disc": True, "dast.attention": False},
    "da": {},
    "da_no_test_attention": {"dast.test_attention": False},
    "dast": {"dast.self_training": True, "dast.rounds": 2},
    "dast_class": {"dast.self_training": True, "dast.rounds": 2, "dast.pseudo": "class_balanced", "dast.q": 0.4},
    "dast_mat_proxies": {"dast.self_training": True, "dast.rounds": 2, "dast.pseudo": "adversarial"},
}


@pytest.mark.parametrize("row", list(ROWS))
def test_every_study_row_trains(data_root, tmp_path, row):
    r = fit(tiny_cfg(data_root, tmp_path, "dast", **{"run.iterations": 2, "dast.ndf": 8, "dast.d_width": 16,
                                                     **ROWS[row]}))
    assert math.isfinite(r.scores.miou)
    if ROWS[row].get("dast.self_training"):
        for k in range(2):
            assert is_complete(r.run_dir / "proxies" / f"round{k}")
        assert (r.run_dir / "proxies" / "round1_mosaic.png").is_file()
    mods = load_checkpoint_file(checkpoint_path(r.run_dir))["modules"]
    assert ("discoverer" in mods) == ROWS[row].get("dast.two_disc", True)


def test_self_training_resumes_mid_round_on_another_machine(data_root, tmp_path):
    """Killed at step 1 of round 0 and resumed where the round's labels are gone: they are
    regenerated from the generator kept in the checkpoint; the end state is bit-identical."""
    values = {"run.iterations": 4, "run.checkpoint_every": 1, "dast.ndf": 8, "dast.d_width": 16,
              "dast.self_training": True, "dast.rounds": 2}
    saved = tmp_path / "step1.pt"

    def keep(path, metrics):
        if metrics["step"] == 1:
            shutil.copy(path, saved)

    whole = fit(tiny_cfg(data_root, tmp_path, "dast", **{**values, "run.name": "whole"}), on_checkpoint=keep)
    cfg = tiny_cfg(data_root, tmp_path, "dast", **{**values, "run.name": "moved"})
    moved = tmp_path / "runs" / "moved"
    checkpoint_path(moved).parent.mkdir(parents=True)
    shutil.copy(saved, checkpoint_path(moved))  # a fresh machine: the checkpoint, no proxy files
    resumed = fit(cfg)
    assert is_complete(resumed.run_dir / "proxies" / "round0")
    a = load_checkpoint_file(checkpoint_path(whole.run_dir))["modules"]["model"]
    b = load_checkpoint_file(checkpoint_path(resumed.run_dir))["modules"]["model"]
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_bad_switches_name_the_key(data_root, tmp_path):
    from uda_ray.config import ConfigError

    with pytest.raises(ConfigError, match="dast.attention"):
        _method(data_root, tmp_path, **{"dast.two_disc": False, "dast.attention": True})
    with pytest.raises(ConfigError, match="dast.q"):
        tiny_cfg(data_root, tmp_path, "dast", **{"dast.q": 0.0})
    with pytest.raises(ConfigError, match="model.arch"):  # an encoder-decoder has no P o E split at a head
        _method(data_root, tmp_path, **{"model.arch": "mat_tiny"})


def test_later_stages_continue_the_discriminators_of_init_from(data_root, tmp_path):
    """Algorithm 1: self-training starts from the DA model's D and C (its attention), and an
    evaluation-only run with test-time attention refuses a checkpoint without a discoverer."""
    from uda_ray.config import ConfigError

    common = {"dast.ndf": 8, "dast.d_width": 16}
    src = fit(tiny_cfg(data_root, tmp_path, "source_only", **{"run.iterations": 1, "run.name": "src"}))
    da = fit(tiny_cfg(data_root, tmp_path, "dast", **{**common, "run.iterations": 2, "run.name": "da",
                                                      "run.init_from": str(src.run_dir)}))
    saved = load_checkpoint_file(checkpoint_path(da.run_dir))["modules"]
    m = _method(data_root, tmp_path, **{"dast.self_training": True, "run.init_from": str(da.run_dir)})
    for name, module in (("discoverer", m.discoverer), ("corrector", m.corrector)):
        for k, v in module.state_dict().items():
            assert torch.equal(v, saved[name][k]), (name, k)
    ev = fit(tiny_cfg(data_root, tmp_path, "dast", **{**common, "run.iterations": 0, "run.name": "ev",
                                                      "dast.test_attention": False, "run.init_from": str(da.run_dir)}))
    assert math.isfinite(ev.scores.miou)
    with pytest.raises(ConfigError, match="run.init_from"):
        _method(data_root, tmp_path, **{"run.iterations": 0, "run.init_from": str(src.run_dir)})


DAST_SWITCHES = ("dast.mse", "dast.two_disc", "dast.attention", "dast.self_training", "dast.test_attention",
                 "dast.pseudo")


def test_every_study_switch_combination_is_smoke_tested():
    from uda_ray.config import build_config

    tested = {tuple(build_config(v, method="dast").flat()[k] for k in DAST_SWITCHES) for v in ROWS.values()}
    missing = study_switches("dast", DAST_SWITCHES) - tested
    assert not missing, f"study rows with switches {DAST_SWITCHES} not covered by ROWS: {missing}"


def test_table3_baseline_is_adaptsegnet_at_its_output_space_weight():
    """The paper's Table 3 baseline is AdaptSegNet: the corrector alone, BCE, at AdaptSegNet's
    output-space weight 0.001; the DAST rows run at the paper's lambda_c = 0.01."""
    from pathlib import Path

    from uda_ray.study import load_study

    study = load_study(Path(__file__).resolve().parents[1] / "studies" / "dast_table3.py")
    rows = {r.name: study.flat(r, 0) for r in study.rows if r.method == "dast"}
    base = rows.pop("baseline")
    assert (base["dast.mse"], base["dast.two_disc"], base["dast.attention"]) == (False, False, False)
    assert base["dast.lambda_c"] == 0.001
    for name in ("mse", "mse_2d", "da"):
        assert rows[name]["dast.lambda_c"] == 0.01, name
    control = rows["adv_lambda0"]  # trained as long as the adaptation rows, no adversarial gradient
    assert (control["dast.lambda_c"], control["dast.lambda_d"]) == (0.0, 0.0)
    assert control["run.iterations"] == rows["da"]["run.iterations"]


def test_class_balanced_pseudo_labels_cap_thresholds_as_the_release(data_root, tmp_path):
    """dast.pseudo=class_balanced caps the class thresholds at 0.9 as the release does (a
    knob: 1 turns it off); the global policy has no cap."""
    from uda_ray.proxy import ProxyPolicy

    policies = []
    for values in ({"dast.pseudo": "class_balanced"}, {"dast.pseudo": "class_balanced", "dast.max_threshold": 1.0},
                   {"dast.pseudo": "global"}):
        m = _method(data_root, tmp_path, **{"dast.self_training": True, **values})
        policies.append(m.policy())
    assert [p.max_threshold for p in policies] == [0.9, 1.0, None]
    assert [p.threshold_cap() for p in policies] == [pytest.approx(math.log(9)), math.inf, math.inf]
    assert isinstance(policies[0], ProxyPolicy) and policies[0].kind == "class_balanced"


def test_mat_adversarial_confidence_proxies_read_the_corrector_and_the_discoverer(data_root, tmp_path):
    """dast.pseudo=adversarial (a cross-method row): A is the mean source probability of the
    round's corrector C and discoverer D; with C at logit 0 (P(target) 0.5) and D at logit
    ln 3 (0.75), A = 1 - (0.5 + 0.75) / 2 = 0.375 everywhere; the policy is MAT's Eq. 5."""
    m = _method(data_root, tmp_path, **{"dast.self_training": True, "dast.pseudo": "adversarial",
                                        "dast.p1": 0.7, "dast.p2": 0.9, "dast.attention": False})
    assert set(m.generator) == {"model", "discoverer", "corrector"}
    _constant(m.generator["corrector"], 0.0)
    _constant(m.generator["discoverer"], math.log(3))
    log_probs, conf = m._score(m.generator)(torch.randn(1, 3, 32, 64))
    assert log_probs.shape == (1, 19, 32, 64) and conf.shape == (1, 32, 64)
    torch.testing.assert_close(torch.sigmoid(conf), torch.full_like(conf, 0.375))
    policy = m.policy()
    assert (policy.kind, policy.portion, policy.portion2) == ("adversarial", 0.7, 0.9)
    plain = _method(data_root, tmp_path, **{"dast.self_training": True})
    assert "corrector" not in plain.generator and plain._score(plain.generator)(torch.randn(1, 3, 32, 64))[1] is None
