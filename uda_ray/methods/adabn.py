"""AdaBN (Li et al., 2016): the source-only model with its BatchNorm statistics
re-estimated on target images. No training; a strong baseline that shows how much of a
UDA gain is a BatchNorm effect."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from ..knobs import ConfigError, knob
from ..models.batchnorm import reestimate_bn
from .base import Method


@dataclass
class AdaBNConfig:
    batches: int = knob(0, "target batches for the re-estimation (0 = one pass over the target train set)", lo=0)
    scope: str = knob("all", "the BatchNorm layers re-estimated: all of them (Li et al.), or the encoder's "
                      "only (the decoder keeps its trained statistics: the control for frozen BN, where "
                      "only the encoder's came from pretraining)", choices=("all", "encoder"))


class AdaBN(Method):
    name = "adabn"
    config = AdaBNConfig
    trains = False

    def __init__(self, cfg, model, ctx):
        super().__init__(cfg, model, ctx)
        if not cfg.run.init_from:
            raise ConfigError("run.init_from: adabn needs the source-only checkpoint whose BatchNorm "
                              "statistics it re-estimates")

    def prepare(self, target_batches):
        n = self.p.batches or self.ctx.target_batches_per_epoch
        images = (b["image"] for b in itertools.islice(target_batches, n))
        # Per-domain BN: re-estimate the target statistics only; otherwise the shared ones.
        domain = "target" if self.cfg.model.bn == "per_domain" else None
        within = self.model.backbone if self.p.scope == "encoder" else None
        reestimate_bn(self.model, images, domain=domain, within=within)
