"""MAT: the encoder-decoder model, the stages, the adversarial confidence and Eq. 5 proxies."""

from __future__ import annotations

import math

import pytest
import torch

from trees import study_switches, tiny_cfg
from uda_ray.checkpoint import checkpoint_path, load_checkpoint_file
from uda_ray.engine import fit
from uda_ray.models import PooledDiscriminator, build_model
from uda_ray.proxy import is_complete


def test_mat_model_shapes_and_discriminators_at_one_32nd():
    m = build_model("mat_tiny", num_classes=19)
    out = m(torch.randn(2, 3, 64, 128))
    assert out.logits["main"].shape == (2, 19, 16, 32)  # the classifier at 1/4
    assert out.features["decoder"].shape == (2, 128, 16, 32)  # F(x): 128 channels at 1/4
    assert out.features["layer3"].shape[-2:] == (4, 8)  # F_l(x) at 1/16
    assert PooledDiscriminator(128, pools=3)(out.features["decoder"]).shape == (2, 1, 2, 4)
    assert PooledDiscriminator(64, pools=1)(out.features["layer3"]).shape == (2, 1, 2, 4)
    assert [c.dilation for c in m.heads["main"].branches] == [(1, 1), (2, 2), (4, 4), (8, 8)]


def _stage(data_root, tmp_path, name, method="mat", stop_at=0, **values):
    base = {"model.arch": "mat_tiny", "run.iterations": 2, "run.name": name, "mat.ndf": 8}
    if method != "mat":
        base.pop("mat.ndf")
    return fit(tiny_cfg(data_root, tmp_path, method, **{**base, **values}), stop_at=stop_at)


@pytest.fixture(scope="module")
def source(data_root, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mat")
    return tmp, _stage(data_root, tmp, "source", "source_only")


@pytest.mark.parametrize("switches", [{"mat.adv": True, "mat.mul_adv": False},
                                      {"mat.adv": True, "mat.mul_adv": True},
                                      {"mat.adv": False, "mat.mul_adv": False}])
def test_stages_chain_from_checkpoints(data_root, source, switches):
    tmp, src = source
    tag = "-".join(f"{k[4:]}{int(v)}" for k, v in switches.items())
    adapted = _stage(data_root, tmp, f"adapt-{tag}", **switches, **{"run.init_from": str(src.run_dir)})
    state = load_checkpoint_file(checkpoint_path(adapted.run_dir))
    assert ("d1" in state["modules"]) == switches["mat.adv"]
    assert ("d2" in state["modules"]) == switches["mat.mul_adv"]
    proxied = _stage(data_root, tmp, f"proxy-{tag}", **switches,
                     **{"mat.proxy": True, "mat.p1": 0.6, "mat.p2": 0.5, "run.init_from": str(adapted.run_dir)})
    assert is_complete(proxied.run_dir / "proxies")
    assert (proxied.run_dir / "proxies_mosaic.png").is_file()
    assert math.isfinite(proxied.scores.miou)
    ms = _stage(data_root, tmp, f"ms-{tag}", **switches,
                **{"mat.proxy": True, "mat.ms": True, "run.iterations": 0, "run.init_from": str(proxied.run_dir)})
    assert checkpoint_path(ms.run_dir).is_file() and math.isfinite(ms.scores.miou)


def test_adversarial_loss_reaches_the_segmenter_and_not_the_discriminators(data_root, source):
    tmp, src = source
    runs = {lam: _stage(data_root, tmp, f"lam{lam}", **{"run.iterations": 1, "mat.lambda_adv1": lam,
                                                       "mat.lambda_adv2": lam, "run.init_from": str(src.run_dir)})
            for lam in (0.0, 10.0)}
    a, b = (load_checkpoint_file(checkpoint_path(runs[lam].run_dir))["modules"] for lam in (0.0, 10.0))
    # L_adv judges features: it moves F (encoder and decoder), not the classifier C
    for w in ("backbone.conv1.weight", "decoder.2.high.0.weight"):
        assert not torch.equal(a["model"][w], b["model"][w]), w
    assert torch.equal(a["model"]["heads.main.branches.0.weight"], b["model"]["heads.main.branches.0.weight"])
    for lv in ("d1", "d2"):  # the discriminators' step does not depend on lambda_adv
        for k in a[lv]:
            torch.testing.assert_close(a[lv][k], b[lv][k], rtol=0, atol=0)


def test_adversarial_confidence_is_the_mean_source_probability(data_root, tmp_path):
    from uda_ray.engine import Context, build_segmenter
    from uda_ray.methods.mat import MAT

    src = _stage(data_root, tmp_path, "src", "source_only")
    adapted = _stage(data_root, tmp_path, "adapt", **{"run.init_from": str(src.run_dir)})
    cfg = tiny_cfg(data_root, tmp_path, "mat", **{"model.arch": "mat_tiny", "mat.proxy": True, "mat.ndf": 8,
                                                "run.init_from": str(adapted.run_dir)})
    ctx = Context(cfg, torch.device("cpu"), amp=False, channels_last=False)
    method = MAT(cfg, build_segmenter(cfg, ctx.device), ctx)
    # D1 says logit 0 everywhere (P(target) = 0.5), D2 logit ln 3 (P(target) = 0.75):
    # A = 1 - (0.5 + 0.75) / 2 = 0.375
    for lv, logit in (("d1", 0.0), ("d2", math.log(3))):
        last = method.discs[lv].net[-1]
        torch.nn.init.zeros_(last.weight)
        torch.nn.init.constant_(last.bias, logit)
    log_probs, conf = method._generator()(torch.randn(1, 3, 32, 64))
    assert log_probs.shape == (1, 19, 32, 64) and conf.shape == (1, 32, 64)
    torch.testing.assert_close(torch.sigmoid(conf), torch.full_like(conf, 0.375))  # conf is logit(A)
    torch.testing.assert_close(log_probs.exp().sum(1), torch.ones(1, 32, 64))


def test_proxy_stage_resumes_without_regenerating_or_reinitialising(data_root, tmp_path):
    src = _stage(data_root, tmp_path, "src", "source_only")
    adapted = _stage(data_root, tmp_path, "adapt", **{"run.init_from": str(src.run_dir)})
    common = {"mat.proxy": True, "run.init_from": str(adapted.run_dir), "run.iterations": 4}
    whole = _stage(data_root, tmp_path, "whole", **common)
    _stage(data_root, tmp_path, "halves", stop_at=2, **common)  # as if killed after step 2
    stamp = (tmp_path / "runs" / "halves" / "proxies" / "DONE").stat().st_mtime_ns
    halves = _stage(data_root, tmp_path, "halves", **common)
    assert (halves.run_dir / "proxies" / "DONE").stat().st_mtime_ns == stamp  # not regenerated
    a = load_checkpoint_file(checkpoint_path(whole.run_dir))["modules"]["model"]
    b = load_checkpoint_file(checkpoint_path(halves.run_dir))["modules"]["model"]
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_bad_configs_name_the_key(data_root, tmp_path):
    from uda_ray.config import ConfigError

    with pytest.raises(ConfigError, match="model.arch"):
        fit(tiny_cfg(data_root, tmp_path, "mat", **{"run.iterations": 1}))
    with pytest.raises(ConfigError, match="mat.mul_adv"):
        _stage(data_root, tmp_path, "x", **{"mat.adv": False, "mat.mul_adv": True})
    with pytest.raises(ConfigError, match="mat.proxy"):
        _stage(data_root, tmp_path, "y", **{"mat.proxy": True})
    with pytest.raises(ConfigError, match="mat.p1"):
        tiny_cfg(data_root, tmp_path, "mat", **{"mat.p1": 1.5})


def test_every_study_switch_combination_is_smoke_tested():
    """test_stages_chain_from_checkpoints runs each (adv, mul_adv) with the adaptation,
    proxy and multi-scale stages: every MAT row of every study is one of those."""
    tested = {(adv, mul, proxy, ms) for adv, mul in ((True, False), (True, True), (False, False))
              for proxy, ms in ((False, False), (True, False), (True, True))}
    missing = study_switches("mat", ("mat.adv", "mat.mul_adv", "mat.proxy", "mat.ms")) - tested
    assert not missing, missing
    # the cross-method row's pixel weights: test_pww_pixel_weights_on_the_multi_level_discriminators_by_hand
    assert study_switches("mat", ("mat.pixel_weights", "mat.proxy")) <= {(False, False), (False, True), (True, False)}


def test_retraining_starts_from_the_initial_or_the_adapted_weights(data_root, source):
    tmp, src = source
    adapted = _stage(data_root, tmp, "adapt-rf", **{"run.init_from": str(src.run_dir)})
    a = load_checkpoint_file(checkpoint_path(adapted.run_dir))["modules"]["model"]
    common = {"mat.proxy": True, "run.iterations": 1, "optim.lr": 1e-12, "run.init_from": str(adapted.run_dir)}
    out = {}
    for how in ("init", "adapted"):
        r = _stage(data_root, tmp, f"rf-{how}", **{**common, "mat.retrain_from": how})
        out[how] = load_checkpoint_file(checkpoint_path(r.run_dir))["modules"]["model"]
    w = "backbone.conv1.weight"  # a parameter (BN buffers move with the target batches)
    torch.testing.assert_close(out["adapted"][w], a[w], rtol=0, atol=1e-8)
    assert not torch.allclose(out["init"][w], a[w], atol=1e-3)


def test_pww_pixel_weights_on_the_multi_level_discriminators_by_hand(data_root, tmp_path):
    """mat.pixel_weights (a cross-method row): with T = 0 every target pixel is "aligned",
    d = d_aligned = 0.01, so each target term is (0.01 + mu) times the unweighted one; with D
    constant (logit c) the unweighted BCE towards "source" is softplus(c) everywhere."""
    from uda_ray.engine import Context, build_segmenter
    from uda_ray.methods.mat import MAT

    logs = {}
    for on in (False, True):
        cfg = tiny_cfg(data_root, tmp_path, "mat", **{"model.arch": "mat_tiny", "mat.ndf": 8, "mat.pixel_weights": on,
                                                    "mat.pw_T": 0.0, "mat.pw_mu": 0.2})
        ctx = Context(cfg, torch.device("cpu"), amp=False, channels_last=False)
        method = MAT(cfg, build_segmenter(cfg, ctx.device), ctx)
        for lv, c in (("d1", 0.5), ("d2", -1.0)):
            last = method.discs[lv].net[-1]
            torch.nn.init.zeros_(last.weight)
            torch.nn.init.constant_(last.bias, c)
        src = {"image": torch.randn(2, 3, 32, 64), "label": torch.zeros(2, 32, 64, dtype=torch.long)}
        logs[on] = method.train_step(src, {"image": torch.randn(2, 3, 32, 64)}, 0)
    for lv, c in (("d1", 0.5), ("d2", -1.0)):
        plain = math.log1p(math.exp(c))
        assert logs[False][f"loss/adv_tgt_{lv}"].item() == pytest.approx(plain, rel=1e-5)
        assert logs[True][f"loss/adv_tgt_{lv}"].item() == pytest.approx(0.21 * plain, rel=1e-5)
    assert logs[True]["pww/weight_mean"].item() == pytest.approx(0.21)
