"""Locating and reading pretrained backbone weights from local files. Never downloads.

``pretrained`` is either a path to a ``.pth`` state dict, or ``"torchvision"``: the file
torchvision would have cached, ``torch.hub.get_dir()/checkpoints/<standard name>``.
Training machines often have no internet, and a silent download inside a Tune trial is
both slow and irreproducible, so a missing file is an error that says how to get it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

# torchvision's standard IMAGENET1K_V1 file names (the name includes a hash prefix).
TORCHVISION_FILES: dict[str, str] = {
    "resnet101": "resnet101-63fe2227.pth",
    "resnet18": "resnet18-f37072fd.pth",
    "vgg16": "vgg16-397923af.pth",
}
# The torchvision builder for each file, for the "how to get it" message.
_TORCHVISION_BUILDERS = {"resnet101": "resnet101", "resnet18": "resnet18", "vgg16": "vgg16"}


def resolve_pretrained(pretrained: str | os.PathLike, *, arch: str | None) -> Path:
    """Return the local path of the weights named by ``pretrained``; raise if it is missing.

    Args:
        pretrained: a file path, or ``"torchvision"`` for torchvision's hub cache.
        arch: key of :data:`TORCHVISION_FILES` for this backbone, or None if torchvision
            has no weights for it.

    Raises:
        ConfigError: ``"torchvision"`` for a backbone torchvision has no weights for (a
            ValueError).
        FileNotFoundError: the file does not exist (the message names the path and how to
            obtain it).
    """
    if str(pretrained) == "torchvision":
        if arch is None:
            from uda_ray.knobs import ConfigError

            raise ConfigError("model.pretrained: torchvision has no ImageNet weights for this backbone (only for "
                              "the ResNet-101, ResNet-18 and VGG16 ones); set it to a local state dict file or ''")
        path = Path(torch.hub.get_dir()) / "checkpoints" / TORCHVISION_FILES[arch]
    else:
        path = Path(pretrained).expanduser()
    if not path.is_file():
        how = ("pass pretrained=<path> to a state dict saved with torch.save(model.state_dict())")
        if arch is not None:
            how = (f"on a machine with internet run `python -c \"import torchvision; "
                   f"torchvision.models.{_TORCHVISION_BUILDERS[arch]}(weights='IMAGENET1K_V1')\"` "
                   f"and copy {TORCHVISION_FILES[arch]} from its torch.hub checkpoints folder to "
                   f"{Path(torch.hub.get_dir()) / 'checkpoints'} (or set TORCH_HOME), or {how}")
        raise FileNotFoundError(f"pretrained weights not found: {path}. "
                                f"Nothing is downloaded here; to get them, {how}.")
    return path


def select_prefix(state: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """Keys of ``state`` that start with ``prefix``, with the prefix removed."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """Read a state dict (tensors only) from ``path``.

    Accepts a plain state dict, one wrapped under ``"state_dict"`` or ``"model"`` (common
    checkpoint layouts), with or without DataParallel's ``module.`` prefix, and a whole
    segmenter's state dict (its ``backbone.`` part is taken).
    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state.get(key), Mapping):
            state = state[key]
    if state and all(k.startswith("module.") for k in state):
        state = select_prefix(state, "module.")
    if any(k.startswith("backbone.") for k in state):
        state = select_prefix(state, "backbone.")
    return dict(state)
