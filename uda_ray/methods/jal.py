"""JAL + WTM (Zhang and Wang, AAAI 2020): joint adversarial learning and a weight transfer
module on top of multi-level AdaptSegNet.

Parts (paper numbering: level 1 = low-level / "aux" head Dec1, level 2 = high-level /
"main" head Dec2):

- AdaptSegNet's two-level output-space adaptation (Eq. 1-4): D1 on the low-level maps, D2 on
  the high-level maps.
- JAL (Eq. 5): D1, trained *only* on low-level maps, also judges the high-level target map
  P_t^2; the segmenter is trained to fool it (``jal``, weight ``lambda_adv_jal``).
- WTM (Eq. 6-9): per decoder a 1x1 convolution over the decoder's classifier weights,
  initialised to the identity: W_{Dec^T} = WTM * W_Dec. The transferred decoder Dec^T reads
  the same feature as Dec. A third discriminator D_wtm is trained on the low-level
  transferred maps P^{1T} (Eq. 8) and judges both P_t^{1T} and P_t^{2T} (Eq. 9; for i = 2
  this is JAL again). Evaluation reads Dec2^T (``predict``).

Steps of one iteration:
  1. segmentation on source: lambda_seg2 * L_seg(P_s^2) + lambda_seg1 * L_seg(P_s^1) (Eq. 1, 4);
  2. adversarial on target with every discriminator frozen, target maps labelled *source*:
     lambda_adv1 * D1(P_t^1) + lambda_adv2 * D2(P_t^2) (Eq. 3, 4)
     + lambda_adv_jal * D1(P_t^2) (Eq. 5, with ``jal``)
     + lambda_adv_wtm1 * D_wtm(P_t^{1T}) + lambda_adv_wtm2 * D_wtm(P_t^{2T}) (Eq. 9, 10);
  3. discriminators on detached maps, source -> 0 and target -> 1, each half-weighted:
     D1 on P^1, D2 on P^2 (Eq. 2), D_wtm on P^{1T} (Eq. 8);
  4. optimizer steps: segmenter (SGD), WTM (SGD lr 1e-4, momentum 0.9, no weight decay),
     discriminators (Adam).

Choices where the paper is silent or ambiguous:

- Weight of the JAL term. Eq. 10 lists no separate weight for Eq. 5; the term is an
  adversarial loss on the high-level output, so it takes lambda_adv^2 = 1e-3 by default
  (knob ``lambda_adv_jal``).
- What the WTM loss trains (knob ``wtm_grad``). Eq. 9 and 10 minimise L_adv_wtm over
  "G, WTM_i", i.e. the gradient also reaches the segmenter (encoder and, through
  W_{Dec^T} = WTM * W_Dec, the original decoder): ``wtm_grad=segmenter``, the default. The
  text's "the new decoder is only trained by adversarial loss" also reads as the WTM being
  the only thing L_adv_wtm trains (features and W_Dec detached): ``wtm_grad=wtm``. The
  default follows the equations, and Table 4 supports it: with ``wtm`` the WTM on Dec1 alone
  (row 5) could not change the evaluated Dec2 at all, yet the paper's row 5 differs from
  row 2 (JAL) by +1.4 mIoU on ResNet-101.
- Switching WTM off on a decoder fixes that decoder's WTM to the identity (Dec^T = Dec) and
  drops its L_adv_wtm term. D_wtm then still trains on P^{1T} = P^1 when only Dec2 carries a
  WTM (the paper's Table 4 row 4), and evaluation reads Dec2 when Dec2 carries none.
- The WTM sees a decoder's weights as an input map (C_out "images" of C_in channels,
  k x k): it is a C_in x C_in x 1 x 1 convolution (the paper: 1024 x 1024 x 1 x 1 on a
  1024 x 19 x 3 x 3 ASPP kernel), shared by the four ASPP branches of the decoder, without
  bias; the decoder's biases are kept (a bias vector is no C_in-channel map to transfer).
  The transferred weights are every conv of the head that outputs the class scores (all
  ASPP branches on DeepLab-v2 and the tiny model).
- Numerics: the WTM is stored as the identity-initialised kernel M, as in the paper, but
  applied as W + (M - I) * W in float32 outside autocast. This is the same function and the
  same gradients, and it keeps Dec^T exactly equal to Dec at initialisation under TF32
  matmuls and bf16 autocast on CUDA.
- Learning-rate schedule of the WTM optimizer: the paper schedules "the learning rate"
  with DeepLab's poly annealing without singling any optimizer out; the WTM is polynomially
  decayed like the segmenter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from ..knobs import ConfigError, knob
from ..losses import GAN_KINDS, SOURCE, TARGET, full, gan_loss, seg_loss, upsample
from ..models import PatchDiscriminator
from ..models.batchnorm import bn_domain
from .base import Method, ScheduledOptimizer, discriminator_optimizer, set_requires_grad

WTM_GRADS = ("segmenter", "wtm")
LEVELS = {1: "aux", 2: "main"}  # the paper's level i -> the segmenter's logits head


@dataclass
class JALConfig:
    jal: bool = knob(True, "joint adversarial learning: D1 also judges the high-level target map (Eq. 5)")
    wtm_dec1: bool = knob(True, "weight transfer module on the low-level decoder Dec1 (Eq. 6)")
    wtm_dec2: bool = knob(True, "weight transfer module on the high-level decoder Dec2; evaluate Dec2^T (Eq. 6)")
    lambda_seg1: float = knob(0.1, "low-level (aux) segmentation weight lambda_seg^1 (paper: 0.1)", lo=0.0)
    lambda_seg2: float = knob(1.0, "high-level (main) segmentation weight lambda_seg^2 (paper: 1.0)", lo=0.0)
    lambda_adv1: float = knob(2e-4, "low-level adversarial weight lambda_adv^1 (paper: 2e-4)", lo=0.0)
    lambda_adv2: float = knob(1e-3, "high-level adversarial weight lambda_adv^2 (paper: 1e-3)", lo=0.0)
    lambda_adv_jal: float = knob(1e-3, "weight of the joint term D1(P_t^2), Eq. 5 (paper: none given; "
                                       "lambda_adv^2 = 1e-3)", lo=0.0)
    lambda_adv_wtm1: float = knob(2e-4, "low-level WTM adversarial weight lambda_adv_wtm^1 (paper: 2e-4)", lo=0.0)
    lambda_adv_wtm2: float = knob(1e-3, "high-level WTM adversarial weight lambda_adv_wtm^2 (paper: 1e-3)", lo=0.0)
    wtm_grad: str = knob("segmenter", "what L_adv_wtm trains: the WTM and the segmenter (Eq. 9: min over "
                                      "G, WTM_i) or the WTM only", choices=WTM_GRADS)
    wtm_lr: float = knob(1e-4, "WTM SGD learning rate (paper: 1e-4)", lo=0.0, lo_open=True)
    wtm_momentum: float = knob(0.9, "WTM SGD momentum (paper: 0.9)", lo=0.0, hi=1.0)
    wtm_weight_decay: float = knob(0.0, "WTM SGD weight decay (paper: 0)", lo=0.0)
    gan: str = knob("vanilla", "adversarial loss: vanilla GAN (BCE, paper) or least squares", choices=GAN_KINDS)
    ndf: int = knob(64, "base width of D1, D2 and D_wtm (paper: 64)", lo=1)


def class_score_convs(head: nn.Module, num_classes: int) -> list[str]:
    """Parameter names of the convs of ``head`` that output the class scores (the decoder
    weights the WTM transfers): the four branches of an ASPP classifier."""
    return [f"{name}.weight" for name, m in head.named_modules()
            if isinstance(m, nn.Conv2d) and m.out_channels == num_classes]


class WeightTransfer(nn.Module):
    """The weight transfer module of one decoder (Eq. 6): ``W_{Dec^T} = WTM * W_Dec``, a 1x1
    convolution over the decoder's weights seen as an input map, initialised to the identity.

    Args:
        head: the decoder (a logits head of the segmenter); not stored.
        num_classes: classes the decoder predicts (selects its class-score convs).

    Shape:
        :meth:`transfer`: (C, C_in, k, k) -> (C, C_in, k, k), with
        ``out[o, i] = sum_j M[i, j] * w[o, j]``.
        :meth:`decode`: the head's input (N, C_in, h, w) -> logits (N, C, h, w).

    Example:
        >>> wtm = WeightTransfer(ASPPClassifier(64, 19), 19)
        >>> wtm.weight.shape
        torch.Size([64, 64, 1, 1])
    """

    def __init__(self, head: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.names = class_score_convs(head, num_classes)
        params = dict(head.named_parameters())
        widths = {params[n].shape[1] for n in self.names}
        if len(widths) != 1:
            raise ValueError(f"decoder convs {self.names} need one common input width, got {sorted(widths)}")
        (c,) = widths
        self.weight = nn.Parameter(torch.eye(c).view(c, c, 1, 1))  # identity: Dec^T = Dec at init

    def transfer(self, w: Tensor) -> Tensor:
        """Eq. 6 on one decoder weight, as ``w + (M - I) * w`` in float32 (the same function
        as ``M * w``; exact at the identity under TF32 and bf16 autocast)."""
        eye = torch.eye(self.weight.shape[0], device=w.device, dtype=self.weight.dtype).view_as(self.weight)
        with torch.autocast(device_type="cuda" if w.is_cuda else "cpu", enabled=False):  # "meta" has no autocast
            return w + F.conv2d(w, (self.weight - eye).to(w.dtype))

    def decode(self, head: nn.Module, feature: Tensor, *, detach_decoder: bool = False) -> Tensor:
        """Dec^T(feature) (Eq. 7): the head run with its class-score weights transferred.
        ``detach_decoder``: no gradient to the original decoder's parameters."""
        params = dict(head.named_parameters())
        if detach_decoder:
            params = {k: v.detach() for k, v in params.items()}
        params.update({n: self.transfer(params[n]) for n in self.names})
        return functional_call(head, params, (feature,))


def joint_adversarial_loss(d_low: nn.Module, prob_high: Tensor, kind: str = "vanilla") -> Tensor:
    """Eq. 5: the low-level discriminator D1 judges the high-level target map; the segmenter
    is trained to make it answer *source*.

    Shape: prob_high (N, C, H, W) softmax of the high-level target output -> scalar.
    """
    return gan_loss(d_low(prob_high), SOURCE, kind)


class JAL(Method):
    name = "jal"
    config = JALConfig

    def __init__(self, cfg, model, ctx):
        super().__init__(cfg, model, ctx)
        p = self.p
        if not cfg.model.multi_level or "aux" not in model.heads:
            raise ConfigError("jal: needs a low-level decoder (model.multi_level=true and a model with an 'aux' head)")
        c = cfg.data.num_classes
        # D1 (low level) and D2 (high level) of AdaptSegNet; D_wtm when a decoder carries a WTM.
        self.discs = {lv: PatchDiscriminator(c, ndf=p.ndf).to(ctx.device) for lv in ("aux", "main")}
        self.use_wtm = p.wtm_dec1 or p.wtm_dec2
        if self.use_wtm:
            self.discs["wtm"] = PatchDiscriminator(c, ndf=p.ndf).to(ctx.device)
        # WTM_i per decoder that carries one; a decoder without one is its own transfer (Dec^T = Dec).
        self.wtms = nn.ModuleDict({LEVELS[i]: WeightTransfer(model.heads[LEVELS[i]], c)
                                   for i, on in ((1, p.wtm_dec1), (2, p.wtm_dec2)) if on}).to(ctx.device)
        self.lambda_adv = {"aux": p.lambda_adv1, "main": p.lambda_adv2}
        self.lambda_adv_wtm = {"aux": p.lambda_adv_wtm1, "main": p.lambda_adv_wtm2}
        self.opt_d = discriminator_optimizer(cfg, list(self.discs.values()))
        self.opt_wtm = None
        if len(self.wtms):
            sgd = torch.optim.SGD([{"params": list(self.wtms.parameters()), "lr_mult": 1.0}], lr=p.wtm_lr,
                                  momentum=p.wtm_momentum, weight_decay=p.wtm_weight_decay)
            self.opt_wtm = ScheduledOptimizer(sgd, p.wtm_lr, "poly")

    def modules(self):
        mods = {"model": self.model, **{f"d_{k}": d for k, d in self.discs.items()}}
        return mods | ({"wtm": self.wtms} if len(self.wtms) else {})

    def optimizers(self):
        opts = {"seg": self.opt_g, "disc": self.opt_d}
        return opts | ({"wtm": self.opt_wtm} if self.opt_wtm is not None else {})

    def transferred_logits(self, out, lv: str, *, detach: bool = False) -> Tensor:
        """Dec^T logits of head ``lv`` on the features of ``out`` (Eq. 7); the head's own
        logits when it carries no WTM. ``detach``: gradients reach the WTM only."""
        if lv not in self.wtms:
            return out.logits[lv].detach() if detach else out.logits[lv]
        feat = out.features[self.model.head_inputs[lv]]
        return self.wtms[lv].decode(self.model.heads[lv], feat.detach() if detach else feat, detach_decoder=detach)

    def train_step(self, src, tgt, step):
        self.zero_grad()
        logs, prob_s, prob_t = self.generator_step(src, tgt)
        logs.update(self.discriminator_step(prob_s, prob_t))
        self.step()
        return logs

    def _softmax(self, logits: Tensor, size) -> Tensor:
        return F.softmax(upsample(full(logits), size), dim=1)

    def generator_step(self, src, tgt):
        """Steps 1 and 2: gradients reach the segmenter and the WTMs only (the discriminators
        are frozen). Returns the logs and the detached maps the discriminators train on:
        ``aux`` (P^1), ``main`` (P^2) and, with a WTM, ``wtm`` (P^{1T})."""
        model, p = self.model, self.p
        logs = {}
        set_requires_grad(self.discs.values(), False)
        size_s, size_t = src["image"].shape[-2:], tgt["image"].shape[-2:]
        # 1. segmentation on source (Eq. 1, 4)
        with bn_domain(model, "source"), self.ctx.autocast():
            out_s = model(src["image"])
        loss_main = seg_loss(out_s.logits["main"], src["label"])
        loss_aux = seg_loss(out_s.logits["aux"], src["label"])
        loss = p.lambda_seg2 * loss_main + p.lambda_seg1 * loss_aux
        logs["loss/seg_src"] = loss_main.detach()
        logs["loss/seg_src_aux"] = loss_aux.detach()
        prob_s = {lv: self._softmax(out_s.logits[lv].detach(), size_s) for lv in ("aux", "main")}
        if self.use_wtm:  # P_s^{1T} for D_wtm (Eq. 7, 8); P_s^1 itself when Dec1 carries no WTM
            with torch.no_grad(), self.ctx.autocast():
                prob_s["wtm"] = (self._softmax(self.transferred_logits(out_s, "aux", detach=True), size_s)
                                 if "aux" in self.wtms else prob_s["aux"])
        self.probe(logs, seg=loss)
        loss.backward()

        # 2. adversarial on target, discriminators frozen: target maps labelled source (Eq. 3-5, 9, 10)
        detach_wtm = p.wtm_grad == "wtm"
        with bn_domain(model, "target"), self.ctx.autocast():
            out_t = model(tgt["image"])
            prob_t = {lv: self._softmax(out_t.logits[lv], size_t) for lv in ("aux", "main")}
            loss_adv = 0.0
            for lv in ("aux", "main"):  # Eq. 3, 4: D_i on P_t^i
                adv = gan_loss(self.discs[lv](prob_t[lv]), SOURCE, p.gan)
                loss_adv = loss_adv + self.lambda_adv[lv] * adv
                logs[f"loss/adv_tgt_{lv}"] = adv.detach()
            if p.jal:  # Eq. 5: D1 (low level) on P_t^2 (high level)
                adv = joint_adversarial_loss(self.discs["aux"], prob_t["main"], p.gan)
                loss_adv = loss_adv + p.lambda_adv_jal * adv
                logs["loss/adv_tgt_jal"] = adv.detach()
            if self.use_wtm:
                prob_t["wtm"] = (self._softmax(self.transferred_logits(out_t, "aux", detach=detach_wtm), size_t)
                                 if "aux" in self.wtms else prob_t["aux"])
                for lv in self.wtms:  # Eq. 9: D_wtm on P_t^{iT} for each decoder with a WTM
                    prob_tt = prob_t["wtm"] if lv == "aux" else self._softmax(
                        self.transferred_logits(out_t, lv, detach=detach_wtm), size_t)
                    adv = gan_loss(self.discs["wtm"](prob_tt), SOURCE, p.gan)
                    loss_adv = loss_adv + self.lambda_adv_wtm[lv] * adv
                    logs[f"loss/adv_wtm_tgt_{lv}"] = adv.detach()
        self.probe(logs, adv=loss_adv)
        loss_adv.backward()
        set_requires_grad(self.discs.values(), True)
        return logs, prob_s, {k: t.detach() for k, t in prob_t.items()}

    def discriminator_step(self, prob_s, prob_t):
        """Step 3: D1 on low-level maps only, D2 on high-level maps, D_wtm on low-level
        transferred maps (Eq. 2, 8); source -> 0, target -> 1, each half-weighted. Gradients
        reach the discriminators only."""
        logs = {}
        with self.ctx.autocast():
            for k, d in self.discs.items():
                loss_d = 0.5 * (gan_loss(d(prob_s[k]), SOURCE, self.p.gan)
                                + gan_loss(d(prob_t[k]), TARGET, self.p.gan))
                loss_d.backward()
                logs[f"loss/disc_{k}"] = loss_d.detach()
        return logs

    @torch.no_grad()
    def predict(self, images: Tensor) -> Tensor:
        """Logits of Dec2^T (the paper evaluates the transferred high-level decoder); Dec2's
        own when it carries no WTM."""
        with bn_domain(self.model, "target"), self.ctx.autocast():
            return self.transferred_logits(self.model(images), "main").float()
