"""Tests of uda_ray.models: every segmenter (and ablation switch), discriminators, BN modes,
pretrained loading. Tiny inputs only; runs on CPU."""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn
from torch.testing import assert_close

from uda_ray.models import (
    MODELS,
    TORCHVISION_FILES,
    ASPPClassifier,
    DomainBatchNorm2d,
    FeatureDiscriminator,
    FrozenBatchNorm2d,
    PatchDiscriminator,
    SegOutput,
    TinySeg,
    bn_domain,
    build_model,
    get_bn_mode,
    reestimate_bn,
    set_bn_mode,
)

REPO = Path(__file__).resolve().parents[1]
NC = 5  # classes in tests: small heads, fast

# (name, kwargs, logits keys, rounding of the output size); one entry per ablation switch.
CASES = [
    ("deeplabv2_r101", {}, {"main", "aux"}, math.ceil),
    ("deeplabv2_r101", {"multi_level": False}, {"main"}, math.ceil),
    ("deeplabv2_vgg16", {}, {"main"}, math.floor),
    ("deeplabv2_vgg16", {"fc7_kernel_size": 3}, {"main"}, math.floor),
    ("r18_ppm", {}, {"main"}, math.ceil),
    ("r18_ppm", {"num_decoders": 2}, {"main", "dec2"}, math.ceil),
    ("tiny", {}, {"main", "aux"}, math.ceil),
    ("tiny", {"multi_level": False}, {"main"}, math.ceil),
    ("tiny_ppm", {}, {"main"}, math.ceil),
    ("tiny_ppm", {"num_decoders": 2, "bins": (6, 3, 2, 1)}, {"main", "dec2"}, math.ceil),
    ("mat_r101", {}, {"main"}, math.ceil),  # encoder-decoder: output stride 4
    ("mat_tiny", {}, {"main"}, math.ceil),
]
IDS = [name + "".join(f"-{k}={v}" for k, v in kw.items()) for name, kw, _, _ in CASES]
_CACHE: dict[str, nn.Module] = {}


@pytest.fixture(params=range(len(CASES)), ids=IDS)
def case(request):
    """(model, logits keys, rounding): models are built once and shared read-only."""
    name, kw, keys, rnd = CASES[request.param]
    key = IDS[request.param]
    if key not in _CACHE:
        torch.manual_seed(0)
        _CACHE[key] = build_model(name, num_classes=NC, **kw)
    return _CACHE[key], keys, rnd


def test_every_model_is_covered():
    assert {c[0] for c in CASES} == set(MODELS)


def test_forward_keys_shapes_finite(case):
    model, keys, rnd = case
    model.eval()
    h, w = 65, 97
    with torch.no_grad():
        out = model(torch.randn(1, 3, h, w))
    assert isinstance(out, SegOutput)
    assert set(out.logits) == keys == set(model.head_inputs)
    os_ = model.output_stride
    assert os_ == (4 if model.__class__.__name__ == "MATSegmenter" else 8)
    for v in out.logits.values():  # at the feature resolution: the engine upsamples
        assert v.shape == (1, NC, rnd(h / os_), rnd(w / os_))
        assert torch.isfinite(v).all()
    assert set(out.features) == set(model.feature_channels)
    for name, f in out.features.items():
        assert f.shape[:2] == (1, model.feature_channels[name])
        assert torch.isfinite(f).all()
    # Each head's input feature exists and sits at the logits' resolution.
    for k, f in model.head_inputs.items():
        assert out.features[f].shape[-2:] == out.logits[k].shape[-2:]


def test_train_mode_batch_one(case):
    # The reference trains with one image per domain: BN in train mode must cope (PPM's 1x1 bin).
    model, keys, _ = case
    model.train()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 33, 41))
    assert set(out.logits) == keys


@pytest.mark.parametrize("bn_mode", ["shared", "frozen", "per_domain"])
def test_every_parameter_gets_gradient(case, bn_mode):
    model = copy.deepcopy(case[0])
    set_bn_mode(model, bn_mode)
    model.train()
    with bn_domain(model, "source"):
        out = model(torch.randn(2, 3, 64, 96))
    sum(v.sum() for v in out.logits.values()).backward()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            # Only frozen BN affine params may be excluded.
            assert bn_mode == "frozen" and isinstance(model.get_submodule(name.rsplit(".", 1)[0]),
                                                      FrozenBatchNorm2d), name
            assert p.grad is None, name
            continue
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_channels_last(case):
    model, _, _ = case
    model.eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        ref = model(x)
        out = model(x.contiguous(memory_format=torch.channels_last))
    for k in ref.logits:
        assert_close(out.logits[k], ref.logits[k], rtol=1e-3, atol=1e-4)


def test_param_groups(case):
    model, _, _ = case
    groups = model.param_groups(2.5e-4)
    assert [g["name"] for g in groups] == ["backbone", "heads"]
    assert [g["lr_mult"] for g in groups] == [1.0, 10.0]
    for g in groups:
        assert g["lr"] == pytest.approx(2.5e-4 * g["lr_mult"])
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))  # each parameter once
    assert set(ids) == {id(p) for p in model.parameters() if p.requires_grad}
    # the heads group: everything outside the (pretrainable) backbone, i.e. the heads and,
    # for MAT, its newly initialised decoder
    outside = {id(p) for p in model.parameters()} - {id(p) for p in model.backbone.parameters()}
    assert {id(p) for p in groups[1]["params"]} == outside
    assert {id(p) for p in model.heads.parameters()} <= outside
    torch.optim.SGD(groups, lr=2.5e-4, momentum=0.9)  # accepted as is


def test_param_groups_skip_frozen_bn():
    model = set_bn_mode(TinySeg(num_classes=NC), "frozen")
    ids = {id(p) for g in model.param_groups(1.0) for p in g["params"]}
    bn_ids = {id(p) for m in model.modules() if isinstance(m, nn.BatchNorm2d)
              for p in m.parameters()}
    assert bn_ids and not ids & bn_ids
    assert ids | bn_ids == {id(p) for p in model.parameters()}


# ---------------------------------------------------------------- ASPP


def test_aspp_output_is_sum_of_all_four_branches():
    torch.manual_seed(0)
    aspp = ASPPClassifier(8, NC)
    assert aspp.rates == (6, 12, 18, 24) and len(aspp.branches) == 4
    x = torch.randn(1, 8, 7, 9)
    with torch.no_grad():
        out = aspp(x)
        assert_close(out, sum(b(x) for b in aspp.branches))
        # AdaptSegNet's bug returned after two branches: zeroing any branch must matter.
        for i in range(4):
            ablated = copy.deepcopy(aspp)
            ablated.branches[i].weight.zero_()
            ablated.branches[i].bias.zero_()
            assert not torch.allclose(ablated(x), out), f"branch {i} ignored"


def test_deeplab_heads_are_four_branch_aspp():
    torch.manual_seed(0)
    model = TinySeg(num_classes=NC)
    for head in model.heads.values():
        assert isinstance(head, ASPPClassifier) and len(head.branches) == 4
        # Reference init: N(0, 0.01) weights.
        assert head.branches[0].weight.std().item() == pytest.approx(0.01, rel=0.1)


# ---------------------------------------------------------------- discriminators


def test_patch_discriminator_shape_and_layout():
    d = PatchDiscriminator(19)
    assert d(torch.randn(2, 19, 64, 128)).shape == (2, 1, 2, 4)
    convs = [m for m in d.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 128, 256, 512, 1]
    assert all(c.kernel_size == (4, 4) and c.stride == (2, 2) and c.padding == (1, 1)
               for c in convs)
    assert all(m.negative_slope == 0.2 for m in d.modules() if isinstance(m, nn.LeakyReLU))
    assert not any(isinstance(m, nn.modules.batchnorm._NormBase) for m in d.modules())
    assert [c.out_channels for c in PatchDiscriminator(19, ndf=8).modules()
            if isinstance(c, nn.Conv2d)] == [8, 16, 32, 64, 1]


@pytest.mark.parametrize("kw, in_hw, out_shape", [
    ({}, (16, 16), (2, 1, 16, 16)),  # DAST: 3x3 stride 1, 256-128-64-1
    ({"kernel_size": 1, "widths": (64, 32)}, (9, 13), (2, 1, 9, 13)),  # PWW: 1x1 convs
    ({"kernel_size": 4, "stride": 2, "widths": (64, 128, 256, 512)}, (64, 128), (2, 1, 2, 4)),
    ({"out_channels": 3, "widths": (16,)}, (8, 8), (2, 3, 8, 8)),
])
def test_feature_discriminator_shapes(kw, in_hw, out_shape):
    d = FeatureDiscriminator(32, **kw)
    assert d(torch.randn(2, 32, *in_hw)).shape == out_shape


def test_feature_discriminator_default_layout():
    convs = [m for m in FeatureDiscriminator(32).modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [256, 128, 64, 1]
    assert all(c.kernel_size == (3, 3) and c.stride == (1, 1) for c in convs)


# ---------------------------------------------------------------- BatchNorm modes


def _bn_stats(model):
    return {k: v.clone() for k, v in model.state_dict().items()
            if "running" in k or "num_batches" in k}


def test_frozen_bn_keeps_stats_and_params_in_train_mode():
    torch.manual_seed(0)
    model = TinySeg(num_classes=NC)
    weight = model.backbone.bn1.weight
    set_bn_mode(model, "frozen")
    assert get_bn_mode(model) == "frozen"
    assert model.backbone.bn1.weight is weight  # an existing optimizer stays valid
    model.train()
    assert model.training
    bns = [m for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]
    assert bns and all(not m.training for m in bns)
    assert all(not p.requires_grad for m in bns for p in m.parameters())
    before = _bn_stats(model)
    x = torch.randn(2, 3, 32, 48) * 3 + 1
    with torch.no_grad():
        out_train = model(x).logits["main"]
    assert all(torch.equal(before[k], v) for k, v in _bn_stats(model).items())
    model.eval()
    with torch.no_grad():
        assert_close(model(x).logits["main"], out_train)
    # Back to shared: trainable and updating again, same state-dict keys.
    set_bn_mode(model, "shared")
    model.train()
    assert get_bn_mode(model) == "shared" and model.backbone.bn1.training
    assert model.backbone.bn1.weight.requires_grad
    with torch.no_grad():
        model(x)
    assert not torch.equal(model.backbone.bn1.running_mean, before["backbone.bn1.running_mean"])


def test_domain_bn_matches_batchnorm():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(4)
    nn.init.uniform_(bn.weight)
    dbn = DomainBatchNorm2d.from_batchnorm(copy.deepcopy(bn))
    x = torch.randn(3, 4, 5, 6) * 2 + 1
    with bn_domain(dbn, "target"):
        assert_close(dbn(x), bn(x))
        assert_close(dbn.stats("target")[0], bn.running_mean)
        assert_close(dbn.stats("source")[0], torch.zeros(4))  # the other domain untouched
        bn.eval(), dbn.eval()
        assert_close(dbn(x), bn(x))


def test_per_domain_bn():
    torch.manual_seed(0)
    model = set_bn_mode(TinySeg(num_classes=NC), "per_domain")
    assert get_bn_mode(model) == "per_domain"
    bn = model.backbone.bn1
    assert isinstance(bn, DomainBatchNorm2d)
    assert [n for n, _ in bn.named_parameters()] == ["weight", "bias"]  # shared affine
    model.train()
    with pytest.raises(RuntimeError, match="bn_domain"):
        model(torch.randn(2, 3, 32, 48))  # no domain selected: refuse, don't guess
    with torch.no_grad():
        for _ in range(3):
            with bn_domain(model, "source"):
                model(torch.randn(2, 3, 32, 48))
            with bn_domain(model, "target"):
                model(torch.randn(2, 3, 32, 48) * 3 + 2)
    (src_mean, src_var, src_n), (tgt_mean, tgt_var, tgt_n) = bn.stats("source"), bn.stats("target")
    assert src_n.item() == tgt_n.item() == 3
    assert (tgt_mean - src_mean).abs().max() > 0.1
    assert (tgt_var - src_var).abs().max() > 0.1

    model.eval()
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        with bn_domain(model, "source"):
            out_src = model(x).logits["main"]
            with bn_domain(model, "target"):  # nests and restores
                out_tgt = model(x).logits["main"]
            assert bn.active_domain == "source"
    assert bn.active_domain is None
    assert not torch.allclose(out_src, out_tgt)

    # state_dict round-trips into a fresh per-domain model.
    torch.manual_seed(1)
    other = set_bn_mode(TinySeg(num_classes=NC), "per_domain").eval()
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        for domain, ref in (("source", out_src), ("target", out_tgt)):
            with bn_domain(other, domain):
                assert_close(other(x).logits["main"], ref)

    with pytest.raises(ValueError):
        with bn_domain(model, "tgt"):
            pass
    with pytest.raises(ValueError):
        set_bn_mode(model, "shared")  # would drop one domain's statistics
    with pytest.raises(ValueError):
        set_bn_mode(model, "sync")


def test_bn_domain_is_noop_without_per_domain_bn():
    torch.manual_seed(0)
    model = TinySeg(num_classes=NC).eval()
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        ref = model(x).logits["main"]
        with bn_domain(model, "target"):
            assert_close(model(x).logits["main"], ref)


def test_reestimate_bn_matches_data_statistics():
    torch.manual_seed(0)
    model = TinySeg(num_classes=NC).train()
    batches = [torch.randn(2, 3, 32, 48) * 2 + 1 for _ in range(3)]
    seen = []
    hook = model.backbone.conv1.register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    assert reestimate_bn(model, batches) == 3
    hook.remove()
    bn = model.backbone.bn1
    # Cumulative average (momentum=None) of the per-batch mean / unbiased variance.
    assert_close(bn.running_mean, torch.stack([o.mean((0, 2, 3)) for o in seen]).mean(0))
    assert_close(bn.running_var, torch.stack([o.var((0, 2, 3)) for o in seen]).mean(0))
    everything = torch.cat(seen)  # equal batch sizes: the mean is the data mean
    assert_close(bn.running_mean, everything.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    assert_close(bn.running_var, everything.var((0, 2, 3)), rtol=0.1, atol=1e-3)
    assert bn.num_batches_tracked.item() == 3
    assert bn.momentum == 0.1 and model.training  # restored
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError):
        reestimate_bn(model, [])
    assert bn.num_batches_tracked.item() == 3  # an empty loader leaves stats intact


def test_reestimate_bn_per_domain_and_frozen():
    torch.manual_seed(0)
    batches = [(torch.randn(2, 3, 32, 48) * 3 + 2, None) for _ in range(2)]  # (image, label)
    model = set_bn_mode(TinySeg(num_classes=NC), "per_domain")
    source_before = model.backbone.bn1.stats("source")[0].clone()
    with pytest.raises(ValueError, match="domain"):
        reestimate_bn(model, batches)
    reestimate_bn(model, batches, domain="target")
    assert torch.equal(model.backbone.bn1.stats("source")[0], source_before)
    assert model.backbone.bn1.stats("target")[2].item() == 2

    model = set_bn_mode(TinySeg(num_classes=NC), "frozen").train()
    before = model.backbone.bn1.running_mean.clone()
    reestimate_bn(model, [{"image": b[0]} for b in batches])
    assert not torch.equal(model.backbone.bn1.running_mean, before)
    assert not model.backbone.bn1.training  # still frozen afterwards


# ---------------------------------------------------------------- pretrained weights


def _backbone_matches(backbone, state, prefix=""):
    own = backbone.state_dict()
    keys = [k for k in state if k.startswith(prefix)]
    assert keys
    return all(torch.equal(own[k[len(prefix):]], state[k]) for k in keys)


def test_pretrained_resnet18_from_local_file_and_torchvision_cache(tmp_path, monkeypatch):
    torch.manual_seed(0)
    state = torchvision.models.resnet18(weights=None).state_dict()
    path = tmp_path / "r18.pth"
    torch.save(state, path)
    model = build_model("r18_ppm", num_classes=NC, pretrained=str(path))
    assert _backbone_matches(model.backbone, {k: v for k, v in state.items()
                                              if not k.startswith("fc.")})

    # "torchvision": the standard file name in torch.hub's cache; never a download.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # an earlier torch.hub.set_dir would win over TORCH_HOME
    assert Path(torch.hub.get_dir()) == tmp_path / "torch" / "hub"
    with pytest.raises(FileNotFoundError, match=TORCHVISION_FILES["resnet18"]):
        build_model("r18_ppm", num_classes=NC, pretrained="torchvision")
    cached = Path(torch.hub.get_dir()) / "checkpoints" / "resnet18-f37072fd.pth"
    cached.parent.mkdir(parents=True)
    torch.save(state, cached)
    model = build_model("r18_ppm", num_classes=NC, pretrained="torchvision")
    assert torch.equal(model.backbone.conv1.weight, state["conv1.weight"])


def test_pretrained_vgg16_uses_features_only(tmp_path):
    torch.manual_seed(0)
    # A torchvision vgg16 state dict; the 400 MB classifier is replaced by a small stand-in.
    state = {"features." + k: v for k, v in
             torchvision.models.vgg16(weights=None).features.state_dict().items()}
    state["classifier.0.weight"] = torch.zeros(4, 4)
    path = tmp_path / "vgg16.pth"
    torch.save(state, path)
    model = build_model("deeplabv2_vgg16", num_classes=NC, pretrained=path)
    assert _backbone_matches(model.backbone, {k: v for k, v in state.items()
                                              if k.startswith("features.")})


def test_pretrained_errors(tmp_path):
    missing = tmp_path / "nowhere" / "resnet101.pth"
    with pytest.raises(FileNotFoundError, match="nowhere") as err:
        build_model("deeplabv2_r101", num_classes=NC, pretrained=missing)
    assert "download" in str(err.value)  # says how to get it
    with pytest.raises(ValueError, match="torchvision has no"):
        build_model("tiny", num_classes=NC, pretrained="torchvision")
    torch.save(TinySeg(num_classes=NC).state_dict(), tmp_path / "tiny.pth")
    with pytest.raises(RuntimeError, match="does not fit"):
        build_model("r18_ppm", num_classes=NC, pretrained=tmp_path / "tiny.pth")


def test_pretrained_tiny_from_whole_model_checkpoint(tmp_path):
    torch.manual_seed(0)
    src = TinySeg(num_classes=NC)
    torch.save({"state_dict": src.state_dict()}, tmp_path / "ckpt.pth")
    model = build_model("tiny", num_classes=NC, pretrained=tmp_path / "ckpt.pth")
    assert _backbone_matches(model.backbone, src.state_dict(), prefix="backbone.")


def test_build_model_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="deeplabv2_r101.*deeplabv2_vgg16.*r18_ppm.*tiny"):
        build_model("deeplabv3", num_classes=NC)


def test_imports_only_torch():
    code = ("import sys, uda_ray.models; "
            "bad = [m for m in ('ray', 'optuna', 'mlflow') if m in sys.modules]; "
            "assert not bad, bad")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env=env)


def test_torchvision_resnet_layouts_load_strictly():
    # The backbones keep torchvision's module names, so real ImageNet files fit (minus fc).
    from uda_ray.models.backbones import ResNetBackbone
    for depth, builder in ((101, torchvision.models.resnet101), (18, torchvision.models.resnet18)):
        ResNetBackbone(depth=depth).load_imagenet_state_dict(builder(weights=None).state_dict())
