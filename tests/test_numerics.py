"""The GPU's numerics exercised on the CPU (bf16 autocast, channels_last), the parts that
must stay float32 under them, the no-host-sync hot loop, and AdaptSegNet's released
DeepLab layout (``model.reference_layout``) against a re-statement of that code."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from test_contract import CASES
from trees import random_batches, tiny_cfg
from uda_ray.bench import HostSyncCounter
from uda_ray.config import METHODS
from uda_ray.context import Context, numerics
from uda_ray.engine import build_segmenter, setup_method

TRAINING = [c for c, case in CASES.items() if METHODS[case.method].trains]


def _method(tmp_path, case: str, *, amp: bool, channels_last: bool):
    c = CASES[case]
    values = {**c.values, "run.cpu_amp": True}
    if c.method == "adaptseg":
        values["adaptseg.ndf"] = 8  # as the other methods' cases: small discriminators
    if c.method == "mat" and values.get("mat.proxy"):
        values["run.iterations"] = 0  # the proxy step itself, without an init_from checkpoint
    cfg = tiny_cfg(tmp_path, tmp_path, c.method, **values)
    ctx = Context(cfg, torch.device("cpu"), amp=amp, channels_last=channels_last, run_dir=tmp_path)
    torch.manual_seed(0)
    return setup_method(cfg, ctx, build_segmenter(cfg, ctx.device))


def _batches(channels_last: bool):
    src, tgt = random_batches(2)
    tgt["label"] = torch.randint(0, 19, (2, 32, 64), generator=torch.Generator().manual_seed(1))  # proxy labels
    if channels_last:
        for b in (src, tgt):
            b["image"] = b["image"].contiguous(memory_format=torch.channels_last)
    return src, tgt


def _trainable(method):
    return {f"{k}.{n}": p for k, m in method.modules().items() for n, p in m.named_parameters() if p.requires_grad}


def test_cpu_amp_knob_keeps_cpu_defaults(tmp_path):
    cfg = tiny_cfg(tmp_path, tmp_path, "source_only")
    assert numerics(cfg, torch.device("cpu")) == (False, False)  # as before: CPU runs are fp32
    cfg.run.cpu_amp = True
    assert numerics(cfg, torch.device("cpu")) == (True, True)
    cfg.run.amp = False
    assert numerics(cfg, torch.device("cpu")) == (False, True)


@pytest.mark.parametrize("case", TRAINING)
def test_step_under_bf16_autocast_and_channels_last_without_host_sync(tmp_path, case):
    """One step in bf16 autocast + channels_last on the CPU: finite losses, finite
    gradients on the same parameters as in fp32, and losses within 5% (+0.02) of fp32's
    from the same weights and batches.

    Neither step syncs with the host: no value read back, no Python branch on a tensor, no
    output sized by the data, in the forward, backward and optimizer steps (on CUDA each
    would stall the queue). :class:`HostSyncCounter` sees aten ops and
    ``Tensor.tolist/numpy/cpu``; a sync inside one kernel it cannot see (``bench device``
    reports those with ``torch.cuda.set_sync_debug_mode``)."""
    logs, grads = {}, {}
    for mode in ("fp32", "bf16"):
        low = mode == "bf16"
        method = _method(tmp_path / mode, case, amp=low, channels_last=low)
        src, tgt = _batches(low)
        with HostSyncCounter() as syncs:
            logs[mode] = {k: v.float() for k, v in method.train_step(src, tgt, 0).items()}
        assert syncs.calls == [], f"{case} ({mode}): host syncs in a step: {syncs.calls}"
        grads[mode] = {n: p.grad for n, p in _trainable(method).items() if p.grad is not None}
        assert grads[mode], f"{case}: no parameter received a gradient"
    assert logs["bf16"].keys() == logs["fp32"].keys()
    for k, v in logs["bf16"].items():
        assert torch.isfinite(v).all(), f"{case}: {k} = {v}"
        assert torch.allclose(v, logs["fp32"][k], rtol=0.05, atol=0.02), f"{case}: {k} {v} vs fp32 {logs['fp32'][k]}"
    assert grads["bf16"].keys() == grads["fp32"].keys()
    bad = [n for n, g in grads["bf16"].items() if not torch.isfinite(g).all()]
    assert not bad, f"{case}: non-finite gradients in {bad[:5]}"


def test_host_sync_counter_sees_reads_branches_and_masks():
    x = torch.arange(4.0)
    with HostSyncCounter() as c:
        x.sum().item()
        if x.max() > 1:
            pass
        x[x > 1].sum()
        x.tolist()
        (x * 2).sum()
    assert len(c.calls) == 4 and c.calls[2:] == ["index (boolean mask)", "Tensor.tolist"], c.calls


# --- what stays float32 under autocast ------------------------------------------------------------

def test_gan_losses_are_float32_under_autocast():
    from uda_ray.losses import gan_loss

    d = torch.randn(2, 1, 4, 8).to(torch.bfloat16)
    for kind in ("vanilla", "ls"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = gan_loss(d, 1.0, kind)
        assert loss.dtype == torch.float32
        assert torch.equal(loss, gan_loss(d.float(), 1.0, kind))  # the same fp32 computation


def test_proxy_scores_are_float32_under_autocast():
    from uda_ray.proxy import adversarial_confidence_logit, log_softmax_at

    d = [(30 * torch.randn(1, 1, 8, 16)).to(torch.bfloat16) for _ in range(2)]
    logits = (5 * torch.randn(1, 19, 4, 8)).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        conf = adversarial_confidence_logit(d)
        logp = log_softmax_at(logits, (32, 64))
    assert conf.dtype == logp.dtype == torch.float32
    assert torch.equal(conf, adversarial_confidence_logit([x.float() for x in d]))
    assert torch.equal(logp, log_softmax_at(logits.float(), (32, 64)))
    assert torch.isfinite(conf).all()  # |d| up to ~100: log-sigmoid, not log(sigmoid)


def test_wtm_identity_is_exact_under_cpu_autocast():
    from uda_ray.methods.jal import WeightTransfer
    from uda_ray.models import ASPPClassifier

    head = ASPPClassifier(64, 19)
    wtm = WeightTransfer(head, 19)
    x = torch.randn(1, 64, 9, 13).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(wtm.decode(head, x), head(x))


# --- AdaptSegNet's released layout ------------------------------------------------------------------
# A re-statement of AdaptSegNet's model/deeplab_multi.py (Caffe-style bottleneck, ceil-mode
# stem pool, a Classifier_Module whose forward returns inside its loop).

class _RefBottleneck(nn.Module):
    def __init__(self, inplanes, planes, stride=1, dilation=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=dilation, bias=False, dilation=dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = downsample

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class _RefClassifier(nn.Module):
    def __init__(self, inplanes, rates, num_classes):
        super().__init__()
        self.conv2d_list = nn.ModuleList(nn.Conv2d(inplanes, num_classes, 3, padding=r, dilation=r) for r in rates)

    def forward(self, x):
        out = self.conv2d_list[0](x)
        for i in range(len(self.conv2d_list) - 1):
            out += self.conv2d_list[i + 1](x)
            return out  # the release returns here: two of the four branches


class _RefResNetMulti(nn.Module):
    def __init__(self, num_classes=19):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)
        self.layer1 = self._make_layer(64, 3)
        self.layer2 = self._make_layer(128, 4, stride=2)
        self.layer3 = self._make_layer(256, 23, dilation=2)
        self.layer4 = self._make_layer(512, 3, dilation=4)
        self.layer5 = _RefClassifier(1024, (6, 12, 18, 24), num_classes)
        self.layer6 = _RefClassifier(2048, (6, 12, 18, 24), num_classes)

    def _make_layer(self, planes, blocks, stride=1, dilation=1):
        down = None
        if stride != 1 or self.inplanes != planes * 4 or dilation in (2, 4):
            down = nn.Sequential(nn.Conv2d(self.inplanes, planes * 4, 1, stride=stride, bias=False),
                                 nn.BatchNorm2d(planes * 4))
        layers = [_RefBottleneck(self.inplanes, planes, stride, dilation, down)]
        self.inplanes = planes * 4
        layers += [_RefBottleneck(self.inplanes, planes, dilation=dilation) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x = self.layer3(self.layer2(self.layer1(x)))
        x1 = self.layer5(x)
        x2 = self.layer6(self.layer4(x))
        return x1, x2


def _conv_shapes_and_flops(model, forward, size=(180, 320)):
    from torch.utils.flop_counter import FlopCounterMode

    shapes = []
    hooks = [m.register_forward_hook(lambda m, i, o: shapes.append((m.in_channels, m.out_channels, m.kernel_size,
                                                                    m.stride, m.dilation, tuple(o.shape))))
             for m in model.modules() if isinstance(m, nn.Conv2d)]
    x = torch.empty(1, 3, *size, device="meta")
    with FlopCounterMode(display=False) as fc:
        outs = forward(x)
        sum(o.sum() for o in outs).backward()
    for h in hooks:
        h.remove()
    return sorted(shapes), fc.get_total_flops(), [tuple(o.shape) for o in outs]


def test_reference_layout_matches_the_released_deeplab():
    from uda_ray.models import DeepLabV2ResNet101

    with torch.device("meta"):  # shapes and FLOPs only
        ref = _RefResNetMulti()
        ours = DeepLabV2ResNet101(num_classes=19, reference_layout=True)
        paper = DeepLabV2ResNet101(num_classes=19)
    r_shapes, r_flops, r_out = _conv_shapes_and_flops(ref, ref)
    o_shapes, o_flops, o_out = _conv_shapes_and_flops(
        ours, lambda x: (lambda out: (out.logits["aux"], out.logits["main"]))(ours(x)))
    assert r_out == o_out == [(1, 19, 23, 41)] * 2  # the ceil-mode pool: 23x41 at 320x180
    assert o_shapes == r_shapes
    assert o_flops == r_flops
    _, p_flops, p_out = _conv_shapes_and_flops(paper, lambda x: tuple(paper(x).logits.values()))
    assert p_out == [(1, 19, 23, 40)] * 2 and p_flops != r_flops
    # the unused branches keep their parameters (checkpoints load both ways)
    assert ours.state_dict().keys() == paper.state_dict().keys()
