"""Source only: supervised training on the labelled source domain (the lower bound every
UDA table starts from). With a target-domain dataset as ``data.source`` the same method
trains the target oracle."""

from __future__ import annotations

from dataclasses import dataclass

from ..knobs import knob
from ..losses import seg_loss
from ..models.batchnorm import bn_domain
from .base import Method


@dataclass
class SourceOnlyConfig:
    lambda_seg_aux: float = knob(0.1, "weight of the auxiliary head's segmentation loss (AdaptSegNet: 0.1)", lo=0.0)


class SourceOnly(Method):
    name = "source_only"
    config = SourceOnlyConfig
    needs_target = False

    def train_step(self, src, tgt, step):
        model, opt = self.model, self.opt_g.optimizer
        opt.zero_grad(set_to_none=True)
        with bn_domain(model, "source"), self.ctx.autocast():
            out = model(src["image"])
        loss_main = seg_loss(out.logits["main"], src["label"])
        loss = loss_main
        logs = {"loss/seg_src": loss_main.detach()}
        if "aux" in out.logits and self.p.lambda_seg_aux > 0:
            loss_aux = seg_loss(out.logits["aux"], src["label"])
            loss = loss + self.p.lambda_seg_aux * loss_aux
            logs["loss/seg_src_aux"] = loss_aux.detach()
        loss.backward()
        opt.step()
        return logs
