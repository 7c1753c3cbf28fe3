"""The segmenter of a config: ``model.*`` settings, BatchNorm mode and ``run.init_from``."""

from __future__ import annotations

import torch
from torch import nn

from ..checkpoint import check_finite, load_checkpoint_file, start_identity
from ..knobs import ConfigError
from .batchnorm import set_bn_mode
from .segmenters import build_model


# The torchvision ImageNet weights each architecture's backbone loads with model.pretrained=torchvision.
_MAT_TORCHVISION = {"mat_r101": "resnet101", "mat_tiny": None}


def pretrained_path(cfg):
    """The local weights file ``model.pretrained`` names for ``cfg`` (None for ''): the
    embedded weights (built on first use), torchvision's cached file of this backbone, or
    the file given. The one place that resolves it: the model loads this file and the run's
    lineage hashes it (:func:`uda_ray.checkpoint.start_identity`)."""
    m = cfg.model
    if not m.pretrained:
        return None
    if m.pretrained in ("embedded", "embedded_seg"):
        from ..pretrain import embedded_weights

        return embedded_weights(cfg)
    from .pretrained import resolve_pretrained
    from .segmenters import MODELS

    if m.arch in _MAT_TORCHVISION:
        arch = _MAT_TORCHVISION[m.arch]
    else:
        arch = getattr(MODELS.get(m.arch), "torchvision_arch", None)
    return resolve_pretrained(m.pretrained, arch=arch)


def start_of(cfg) -> str:
    """The identity of what a root run of ``cfg`` starts from (``scratch``, or its pretrained
    weights' hash; :func:`uda_ray.checkpoint.start_identity`)."""
    return start_identity(cfg.model.pretrained, pretrained_path(cfg))


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
        # the format of model.ppm_bins is checked when the config is built (config._cross_checks)
        kw = {"num_decoders": m.num_decoders, "bins": tuple(int(b) for b in m.ppm_bins.split(","))}
    elif m.num_decoders != 1:
        raise ConfigError(f"model.num_decoders: only r18_ppm and tiny_ppm have several decoders "
                          f"(model.arch={m.arch}); got {m.num_decoders}")
    model = build_model(m.arch, num_classes=cfg.data.num_classes, pretrained=pretrained_path(cfg), **kw)
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
