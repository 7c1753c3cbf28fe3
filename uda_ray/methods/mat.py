"""MAT (Shen et al., "Regularizing Proxies with Multi-Adversarial Training for Unsupervised
Domain-Adaptive Semantic Segmentation"): multi-adversarial training, then proxy labels
chosen by the classifier's and the discriminators' confidence, then retraining on them.

The paper's stages, each a run whose checkpoint starts the next (``run.init_from``), so a
stage can be re-run without the ones before it (e.g. the p1 x p2 grid of Table 4 re-runs
only the proxy stage from one adapted checkpoint):

1. source training: ``source_only`` with ``model.arch=mat_r101`` (or ``mat_tiny``);
2. adaptation (``mat.proxy=false``): Eq. 4, the segmentation loss plus D1 on the final
   features F(x) (``mat.adv``) and D2 on the mid-level features F_l(x) (``mat.mul_adv``),
   at fixed learning rates (``mat.adapt_lr``, 1e-4 for the segmenter and the
   discriminators in the paper);
3. proxy generation + retraining (``mat.proxy=true``): the proxies of Eq. 5 from the
   ``init_from`` checkpoint's segmenter and discriminators, then supervised training on
   the target proxies only, from the initial weights (``mat.retrain_from=init``: ImageNet
   when ``model.pretrained`` is set, the paper's choice; ``adapted`` fine-tunes instead);
4. multi-scale inference (``mat.ms``): any stage, e.g. ``run.iterations=0`` evaluates the
   ``init_from`` checkpoint at several scales.

Choices where the paper is silent:
- Domain labels: the paper's discriminators say 1 for source; ours follow the package's
  convention (source 0, target 1), so the adversarial confidence of a target pixel is
  ``A = 1 - sigmoid(D(x))``, the probability of "source" (domain-invariant).
- "Normalize them to the same scale": each discriminator's logit map is upsampled
  (bilinear) to the input size and goes through its sigmoid (a probability, the same
  [0, 1] scale for both), and A is the mean over the discriminators used (D1, plus D2
  with mul_adv). A is computed and thresholded as a logit (log-sigmoids), because trained
  discriminators saturate: target pixels' source probabilities of 1e-6 must still rank.
- The loss weights are not given: lambda_adv1 = 1e-3 and lambda_adv2 = 2e-4 follow
  AdaptSegNet's main/auxiliary weights; both are searched in ``studies/mat_search.py``.
- Multi-scale inference: softmax averaged over ``mat.ms_scales`` (0.75, 1, 1.25 by
  default; the paper gives no scales), each upsampled to the 1x output size.

Across methods: ``mat.pixel_weights`` puts PWW's generation-confidence map (Tian et al.,
Eqs. 3-4: ``d = pw_d_aligned`` where the target prediction's max softmax probability
exceeds ``pw_T``, ``exp(-p*)`` elsewhere) on MAT's multi-level discriminators: the target
terms of D1 and D2, the segmenter's and the discriminators' (PWW's Eqs. 4 and 9), are
weighted per pixel by ``(d + pw_mu)``, detached. As PWW does with its output-space D, each
D's logit map (1/32) is upsampled bilinearly to the input size for the per-pixel product.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..knobs import ConfigError, knob
from ..checkpoint import load_checkpoint_file
from ..models import build_segmenter
from ..losses import GAN_KINDS, SOURCE, TARGET, full, gan_loss, seg_loss, upsample
from ..models import PooledDiscriminator
from ..models.batchnorm import bn_domain
from ..proxy import (ProxyLabelled, ProxyPolicy, TwoStageScore, adversarial_confidence_logit, generate_for_run,
                     log_softmax_at)
from .base import Method, ScheduledOptimizer, set_requires_grad


@dataclass
class MATConfig:
    adv: bool = knob(True, "adversarial training with D1 on the final features F(x) (Table 3 'Adv')")
    mul_adv: bool = knob(True, "add D2 on the mid-level features F_l(x) (Table 3 'Mul-Adv'; needs adv)")
    proxy: bool = knob(False, "this run is the proxy stage: proxies from run.init_from, retrain on them")
    ms: bool = knob(False, "multi-scale inference (Table 3 'MS')")
    lambda_seg: float = knob(1.0, "segmentation loss weight (Eq. 4)", lo=0.0)
    lambda_adv1: float = knob(1e-3, "weight of L_adv1, D1 on F(x) (Eq. 4; not given in the paper)", lo=0.0)
    lambda_adv2: float = knob(2e-4, "weight of L_adv2, D2 on F_l(x) (Eq. 4; not given in the paper)", lo=0.0)
    adapt_lr: float = knob(1e-4, "fixed learning rate of segmenter and discriminators while adapting (paper 1e-4)",
                           lo=0.0, lo_open=True)
    p1: float = knob(0.6, "portion of pixels kept by the adversarial confidence, threshold t1 (paper 0.6)",
                     lo=0.0, hi=1.0, lo_open=True)
    p2: float = knob(0.8, "class-balanced portion among pixels above t1, thresholds t2 (paper 0.8)",
                     lo=0.0, hi=1.0, lo_open=True)
    retrain_from: str = knob("init", "proxy stage starts from the initial (ImageNet) weights or the adapted model",
                             choices=("init", "adapted"))
    ms_scales: str = knob("0.75,1.0,1.25", "input scales averaged by multi-scale inference")
    gan: str = knob("vanilla", "adversarial loss: vanilla GAN (Eqs. 2-3, BCE) or least squares", choices=GAN_KINDS)
    ndf: int = knob(64, "discriminator base width (conv widths ndf, 2ndf, 4ndf, 8ndf)", lo=1)
    pixel_weights: bool = knob(False, "PWW's pixel-wise weights (d + mu) on D1's and D2's target terms (a "
                                      "cross-method row; not in MAT)")
    pw_T: float = knob(0.9, "pixel_weights: PWW's confidence threshold T (PWW paper 0.9)", lo=0.0, hi=1.0)
    pw_mu: float = knob(0.1, "pixel_weights: PWW's adaptive weight mu (PWW paper 0.1)", lo=0.0)
    pw_d_aligned: float = knob(0.01, "pixel_weights: d on pixels above T (PWW paper 0.01)", lo=0.0, hi=1.0)


# the features each discriminator judges: D1 the decoder output F(x), D2 the mid level F_l(x)
LEVELS = {"d1": "decoder", "d2": "layer3"}


class MAT(Method):
    name = "mat"
    config = MATConfig

    def __init__(self, cfg, model, ctx):
        super().__init__(cfg, model, ctx)
        p = self.p
        if "decoder" not in model.feature_channels:
            raise ConfigError(f"model.arch: MAT needs its encoder-decoder segmenter (mat_r101 or mat_tiny), "
                              f"got {cfg.model.arch!r}")
        if p.mul_adv and not p.adv:
            raise ConfigError("mat.mul_adv: needs mat.adv=true (D2 is added to D1)")
        if p.proxy and not cfg.run.init_from and cfg.run.iterations > 0:
            raise ConfigError("mat.proxy: the proxy stage needs run.init_from (the adapted checkpoint)")
        self.scales = _scales(p.ms_scales)
        self.levels = [lv for lv, on in (("d1", p.adv), ("d2", p.mul_adv)) if on]
        # input size / feature size: D1 on 1/4 features pools 3 times, D2 on 1/16 once -> 1/32
        strides = {"decoder": model.output_stride, "layer3": 16}
        self.discs = {lv: PooledDiscriminator(model.feature_channels[LEVELS[lv]],
                                              widths=(p.ndf, 2 * p.ndf, 4 * p.ndf, 8 * p.ndf),
                                              pools={4: 3, 16: 1}[strides[LEVELS[lv]]]).to(ctx.device)
                      for lv in self.levels}
        self.needs_source = not p.proxy  # the proxy stage trains on target proxies only
        # adapted discriminators: continue training them, or score the proxies with them
        self.load_from_init(self.discs, required=p.proxy and cfg.run.iterations > 0)
        if p.proxy:
            self.opt_d = None  # the discriminators only score (and travel on in the checkpoint)
        else:
            o = cfg.optim
            self.opt_g = ScheduledOptimizer(
                torch.optim.SGD(model.param_groups(p.adapt_lr, head_lr_mult=o.head_lr_mult), lr=p.adapt_lr,
                                momentum=o.momentum, weight_decay=o.weight_decay), p.adapt_lr, "const")
            params = [{"params": [q for d in self.discs.values() for q in d.parameters()], "lr_mult": 1.0}]
            self.opt_d = ScheduledOptimizer(torch.optim.Adam(params, lr=p.adapt_lr, betas=(o.d_beta1, o.d_beta2)),
                                            p.adapt_lr, "const") if self.discs else None

    def modules(self):
        return {"model": self.model, **self.discs}

    def optimizers(self):
        return {"seg": self.opt_g, **({"disc": self.opt_d} if self.opt_d is not None else {})}

    # --- stage 2: multi-adversarial training (Eqs. 1-4) ----------------------------------
    def train_step(self, src, tgt, step):
        if self.p.proxy:
            return self._proxy_step(tgt)
        model, p = self.model, self.p
        self.zero_grad()
        set_requires_grad(self.discs.values(), False)
        # 1. segmentation on source (Eq. 1)
        with bn_domain(model, "source"), self.ctx.autocast():
            out_s = model(src["image"])
        loss_seg = seg_loss(out_s.logits["main"], src["label"])
        logs = {"loss/seg_src": loss_seg.detach()}
        self.probe(logs, seg=p.lambda_seg * loss_seg)
        (p.lambda_seg * loss_seg).backward()
        feats_s = {lv: out_s.features[LEVELS[lv]].detach() for lv in self.levels}
        if not self.levels:
            self.step()
            return logs
        # 2. adversarial on target, D frozen: F makes target features look like source (Eqs. 2-3)
        lambdas = {"d1": p.lambda_adv1, "d2": p.lambda_adv2}
        with bn_domain(model, "target"), self.ctx.autocast():
            out_t = model(tgt["image"])
            weight = self._pixel_weight(out_t.logits["main"], tgt["image"].shape[-2:])
            if weight is not None:
                logs["pww/weight_mean"] = weight.mean()
            loss_adv = 0.0
            for lv in self.levels:
                adv = self._adv(self.discs[lv](out_t.features[LEVELS[lv]]), SOURCE, weight)
                loss_adv = loss_adv + lambdas[lv] * adv
                logs[f"loss/adv_tgt_{lv}"] = adv.detach()
        self.probe(logs, adv=loss_adv)
        loss_adv.backward()
        set_requires_grad(self.discs.values(), True)
        # 3. discriminators on detached features: source -> 0, target -> 1
        with self.ctx.autocast():
            for lv in self.levels:
                d = self.discs[lv]
                f_t = out_t.features[LEVELS[lv]].detach()
                loss_d = 0.5 * (gan_loss(d(feats_s[lv]), SOURCE, p.gan) + self._adv(d(f_t), TARGET, weight))
                loss_d.backward()
                logs[f"loss/disc_{lv}"] = loss_d.detach()
        self.step()
        return logs

    def _pixel_weight(self, logits_t, size):
        """PWW's (d + mu) at the input size from the target logits, detached; None when off."""
        if not self.p.pixel_weights:
            return None
        from .pww import generation_confidence, pixel_weight

        prob = F.softmax(upsample(full(logits_t.detach()), size), dim=1)
        return pixel_weight(generation_confidence(prob, self.p.pw_T, self.p.pw_d_aligned), self.p.pw_mu, None)

    def _adv(self, d_out, domain, weight):
        """One adversarial term; with pixel weights, on D's logits upsampled to the input size."""
        if weight is None:
            return gan_loss(d_out, domain, self.p.gan)
        return gan_loss(upsample(d_out, weight.shape[-2:]), domain, self.p.gan, weight=weight)

    # --- stage 3: proxies (Eq. 5) and retraining on them -----------------------------------
    def begin_phase(self, k, step, data):
        if not self.p.proxy:
            return None
        out_dir = self.ctx.run_dir / "proxies"
        # a resumed run finds its proxies on disk (else they are made again from init_from)
        generate_for_run(self.ctx, data, self._generator(), self._policy(), out_dir, step=step)
        if step == 0 and self.p.retrain_from == "init":  # a fresh start, not a resumed run
            torch.manual_seed(self.cfg.run.seed)
            init = build_segmenter(_without_init(self.cfg), torch.device("cpu"))
            self.model.load_state_dict(init.state_dict())
        return ProxyLabelled(data["target"], out_dir)

    def _policy(self) -> ProxyPolicy:
        if not self.levels:  # no discriminators: class-balanced proxies of portion p2 (p1 = 1)
            return ProxyPolicy("class_balanced", portion=self.p.p2)
        return ProxyPolicy("adversarial", portion=self.p.p1, portion2=self.p.p2)

    def _generator(self):
        """score_fn of the ``init_from`` checkpoint: its segmenter's log-probabilities log P
        and the logit of the adversarial confidence A of its discriminators (loaded in
        ``__init__``), at the input size."""
        model = copy.deepcopy(self.model)
        model.load_state_dict(load_checkpoint_file(self.cfg.run.init_from)["modules"]["model"])
        model.eval()
        discs = self.discs
        for d in discs.values():
            d.eval()

        @torch.no_grad()
        def raw(images):  # the network, once per image: outputs at their own resolution
            with bn_domain(model, "target"), self.ctx.autocast():
                out = model(images)
                return (out.logits["main"], *(d(out.features[LEVELS[lv]]) for lv, d in discs.items()))

        @torch.no_grad()
        def finish_confidence(outputs, size):
            # A = mean over D1 (and D2) of P(source) = sigmoid(-d), as a logit
            with self.ctx.autocast():
                d_logits = [upsample(d.float(), size) for d in outputs[1:]]
            return adversarial_confidence_logit(d_logits) if d_logits else None

        @torch.no_grad()
        def finish(outputs, size):
            # single-scale: multi-scale inference (mat.ms) is a post-processing of predictions
            return log_softmax_at(outputs[0], size), finish_confidence(outputs, size)

        return TwoStageScore(raw, finish, finish_confidence)

    def _proxy_step(self, tgt):
        self.zero_grad()
        with bn_domain(self.model, "target"), self.ctx.autocast():
            out = self.model(tgt["image"])
        loss = seg_loss(out.logits["main"], tgt["label"])
        loss.backward()
        self.step()
        return {"loss/seg_proxy": loss.detach()}

    # --- stage 4: multi-scale inference ---------------------------------------------------
    @torch.no_grad()
    def predict(self, images):
        if not self.p.ms:
            return super().predict(images)
        with bn_domain(self.model, "target"), self.ctx.autocast():
            probs = _ms_probs(self.model, images, self.scales)
        return torch.log(probs.clamp_min(1e-12))  # log of the averaged probabilities


def _ms_probs(model, images, scales) -> torch.Tensor:
    """Softmax averaged over input scales, at the 1x output size (float32)."""
    size = tuple(math.ceil(n / model.output_stride) for n in images.shape[-2:])  # the 1x output size
    total = 0.0
    for s in scales:
        x = images if s == 1.0 else F.interpolate(images, scale_factor=s, mode="bilinear", align_corners=True)
        total = total + torch.softmax(upsample(model(x).logits["main"].float(), size), dim=1)
    return total / len(scales)


def _scales(text: str) -> tuple[float, ...]:
    try:
        scales = tuple(float(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise ConfigError(f"mat.ms_scales: expected comma-separated numbers, got {text!r}") from None
    if not scales or any(s <= 0 for s in scales):
        raise ConfigError(f"mat.ms_scales: expected positive scales, got {text!r}")
    return scales


def _without_init(cfg):
    """The config without ``run.init_from``: builds the model at its initial weights."""
    c = copy.deepcopy(cfg)
    c.run.init_from = ""
    return c
