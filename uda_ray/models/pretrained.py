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

from uda_ray.errors import UserError

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


class WeightsError(UserError, RuntimeError):
    """``model.pretrained`` names a file that is not weights of this backbone (unreadable, not
    a state dict of tensors, or keys or shapes that do not fit)."""


_EXPECTED = "expected a torch state dict of tensors (torch.save(model.state_dict(), FILE), loaded with " \
            "weights_only=True)"


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """Read a state dict (tensors only) from ``path``.

    Accepts a plain state dict, one wrapped under ``"state_dict"`` or ``"model"`` (common
    checkpoint layouts), with or without DataParallel's ``module.`` prefix, and a whole
    segmenter's state dict (its ``backbone.`` part is taken).

    Raises:
        WeightsError: the file is not a torch file that ``weights_only=True`` loads (a text
            file, a pickle of other objects, a truncated file), or holds something other than
            a mapping of names to tensors.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (torch.load raises UnpicklingError, EOFError, KeyError, RuntimeError...)
        why = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise WeightsError(f"model.pretrained: {path} is not readable as weights ({type(e).__name__}: {why}); "
                           f"{_EXPECTED}") from None
    if not isinstance(state, Mapping):
        raise WeightsError(f"model.pretrained: {path} holds a {type(state).__name__}; {_EXPECTED}")
    for key in ("state_dict", "model"):
        if isinstance(state.get(key), Mapping):
            state = state[key]
    if state and all(isinstance(k, str) and k.startswith("module.") for k in state):
        state = select_prefix(state, "module.")
    if any(isinstance(k, str) and k.startswith("backbone.") for k in state):
        state = select_prefix(state, "backbone.")
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad or not state:
        what = f"{bad[0]!r} is a {type(state[bad[0]]).__name__}" if bad else "it is empty"
        raise WeightsError(f"model.pretrained: {path} is not a state dict of tensors ({what}); {_EXPECTED}")
    return dict(state)
