"""The segmenter of a config: ``model.*`` settings, BatchNorm mode and ``run.init_from``."""

from __future__ import annotations

import torch
from torch import nn

from ..checkpoint import check_finite, load_checkpoint_file
from ..knobs import ConfigError
from .batchnorm import set_bn_mode
from .segmenters import build_model


def build_segmenter(cfg, device: torch.device) -> nn.Module:
    """The segmenter of ``cfg`` on ``device``, with the weights of ``run.init_from`` when it
    is set (a checkpoint file or run directory; one with non-finite weights is refused)."""
    m = cfg.model
    kw = {"multi_level": m.multi_level} if m.arch in ("deeplabv2_r101", "tiny") else {}
    if m.reference_layout:
        if m.arch != "deeplabv2_r101":
            raise ConfigError(f"model.reference_layout: AdaptSegNet's released layout is a deeplabv2_r101 "
                              f"(model.arch={m.arch})")
        kw["reference_layout"] = True
    if m.arch in ("r18_ppm", "tiny_ppm"):
        try:
            bins = tuple(int(b) for b in m.ppm_bins.split(","))
        except ValueError:
            bins = ()
        if not bins or min(bins) < 1:
            raise ConfigError(f"model.ppm_bins: expected comma-separated positive integers, got {m.ppm_bins!r}")
        kw = {"num_decoders": m.num_decoders, "bins": bins}
    elif m.num_decoders != 1:
        raise ConfigError(f"model.num_decoders: only r18_ppm and tiny_ppm have several decoders "
                          f"(model.arch={m.arch}); got {m.num_decoders}")
    pretrained = m.pretrained or None
    if pretrained in ("embedded", "embedded_seg"):
        from ..pretrain import embedded_weights

        pretrained = embedded_weights(cfg)  # built on first use under <data.root>/pretrain
    model = build_model(m.arch, num_classes=cfg.data.num_classes, pretrained=pretrained, **kw)
    set_bn_mode(model, m.bn)
    if cfg.run.init_from:
        state = load_checkpoint_file(cfg.run.init_from)
        check_finite(state, cfg.run.init_from)
        try:
            model.load_state_dict(state["modules"]["model"])
        except (KeyError, RuntimeError) as e:
            raise ConfigError(f"run.init_from: {cfg.run.init_from} holds no segmenter of model.arch={m.arch} "
                              f"with these settings (it was trained as {state['config'].get('model.arch')!r}): "
                              f"{str(e).splitlines()[0][:200]}") from None
    return model.to(device)
