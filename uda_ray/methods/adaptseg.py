"""AdaptSegNet (Tsai et al., CVPR 2018): output-space adversarial adaptation, single- or
multi-level, with vanilla-GAN or least-squares losses.

Steps of one iteration, as the reference code:
  1. segmentation on source (main + lambda_seg_aux * aux);
  2. adversarial on target with the discriminators frozen: fool D into the *source*
     label on softmax(target predictions) (lambda_adv_main / lambda_adv_aux);
  3. discriminators on detached source (label 0) and target (label 1) softmax maps, each
     half-weighted.
Predictions are upsampled to the input size before the softmax and the discriminators.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from ..knobs import ConfigError, knob
from ..losses import GAN_KINDS, SOURCE, TARGET, full, gan_loss, seg_loss, upsample
from ..models import PatchDiscriminator
from ..models.batchnorm import bn_domain
from .base import Method, discriminator_optimizer, set_requires_grad


@dataclass
class AdaptSegConfig:
    multi_level: bool = knob(True, "adapt the auxiliary (layer3) output too (needs model.multi_level)")
    gan: str = knob("vanilla", "adversarial loss: vanilla GAN (BCE) or least squares", choices=GAN_KINDS)
    lambda_seg_aux: float = knob(0.1, "auxiliary segmentation loss weight (paper: 0.1)", lo=0.0)
    lambda_adv_main: float = knob(1e-3, "adversarial weight on the main output (paper: 1e-3)", lo=0.0)
    lambda_adv_aux: float = knob(2e-4, "adversarial weight on the auxiliary output (paper: 2e-4)", lo=0.0)
    ndf: int = knob(64, "discriminator base width (paper: 64)", lo=1)


class AdaptSeg(Method):
    name = "adaptseg"
    config = AdaptSegConfig

    def __init__(self, cfg, model, ctx):
        super().__init__(cfg, model, ctx)
        if self.p.multi_level and not cfg.model.multi_level:
            raise ConfigError("adaptseg.multi_level: needs model.multi_level=true (an auxiliary head)")
        c = cfg.data.num_classes
        self.levels = ["main", "aux"] if self.p.multi_level else ["main"]
        self.discs = {lv: PatchDiscriminator(c, ndf=self.p.ndf).to(ctx.device) for lv in self.levels}
        self.lambda_adv = {"main": self.p.lambda_adv_main, "aux": self.p.lambda_adv_aux}
        self.opt_d = discriminator_optimizer(cfg, list(self.discs.values()))

    def modules(self):
        return {"model": self.model, **{f"d_{lv}": d for lv, d in self.discs.items()}}

    def optimizers(self):
        return {"seg": self.opt_g, "disc": self.opt_d}

    def train_step(self, src, tgt, step):
        self.zero_grad()
        logs, prob_s, prob_t = self.generator_step(src, tgt)
        logs.update(self.discriminator_step(prob_s, prob_t))
        self.step()
        return logs

    def generator_step(self, src, tgt):
        """Steps 1 and 2: gradients reach the segmenter only (the discriminators are frozen).
        Returns the logs and the detached softmax maps the discriminators train on."""
        model, p = self.model, self.p
        logs = {}
        set_requires_grad(self.discs.values(), False)
        # 1. segmentation on source
        with bn_domain(model, "source"), self.ctx.autocast():
            out_s = model(src["image"])
        loss = seg_loss(out_s.logits["main"], src["label"])
        logs["loss/seg_src"] = loss.detach()
        if p.multi_level:
            loss_aux = seg_loss(out_s.logits["aux"], src["label"])
            loss = loss + p.lambda_seg_aux * loss_aux
            logs["loss/seg_src_aux"] = loss_aux.detach()
        self.probe(logs, seg=loss)
        loss.backward()
        size_s, size_t = src["image"].shape[-2:], tgt["image"].shape[-2:]
        prob_s = {lv: F.softmax(upsample(full(out_s.logits[lv].detach()), size_s), dim=1) for lv in self.levels}

        # 2. adversarial on target, D frozen: make target outputs look like source (label 0)
        with bn_domain(model, "target"), self.ctx.autocast():
            out_t = model(tgt["image"])
            prob_t = {lv: F.softmax(upsample(full(out_t.logits[lv]), size_t), dim=1) for lv in self.levels}
            loss_adv = 0.0
            for lv in self.levels:
                adv = gan_loss(self.discs[lv](prob_t[lv]), SOURCE, p.gan)
                loss_adv = loss_adv + self.lambda_adv[lv] * adv
                logs[f"loss/adv_tgt_{lv}"] = adv.detach()
        self.probe(logs, adv=loss_adv)
        loss_adv.backward()
        set_requires_grad(self.discs.values(), True)
        return logs, prob_s, {lv: t.detach() for lv, t in prob_t.items()}

    def discriminator_step(self, prob_s, prob_t):
        """Step 3: each discriminator on detached maps, source -> 0 and target -> 1, each
        half-weighted. Gradients reach the discriminators only."""
        logs = {}
        with self.ctx.autocast():
            for lv in self.levels:
                d = self.discs[lv]
                loss_d = 0.5 * (gan_loss(d(prob_s[lv]), SOURCE, self.p.gan)
                                + gan_loss(d(prob_t[lv]), TARGET, self.p.gan))
                loss_d.backward()
                logs[f"loss/disc_{lv}"] = loss_d.detach()
        return logs
