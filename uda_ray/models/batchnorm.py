"""BatchNorm handling as an explicit choice, since UDA results depend on it.

Modes, set with :func:`set_bn_mode` (in place, before building the optimizer):

- ``"shared"``: ordinary ``nn.BatchNorm2d``; source and target batches update the same
  running statistics.
- ``"frozen"``: the DeepLab/AdaptSegNet convention for batch size 1. Every BN becomes a
  :class:`FrozenBatchNorm2d`: always in eval mode (even after ``model.train()``), so its
  statistics never change, and its affine parameters have ``requires_grad=False``.
- ``"per_domain"``: every BN becomes a :class:`DomainBatchNorm2d` with one shared affine
  weight/bias and separate running statistics per domain ("source", "target"); choose
  which with ``with bn_domain(model, "target"): ...``. Source and target must then be
  forwarded in separate calls (a concatenated batch would mix the domains' statistics).

:func:`reestimate_bn` re-estimates the statistics on given batches (AdaBN).

Conversions keep the same ``Parameter`` objects, so an optimizer built before still
points at them, and "shared" <-> "frozen" keep the state-dict keys.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BNMode = Literal["shared", "frozen", "per_domain"]
BN_MODES: tuple[str, ...] = ("shared", "frozen", "per_domain")
DOMAINS: tuple[str, ...] = ("source", "target")


class FrozenBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` that stays in eval mode: ``train()`` is ignored.

    Unlike ``torchvision.ops.FrozenBatchNorm2d`` it keeps BatchNorm2d's class hierarchy and
    state-dict keys, so checkpoints move freely between "shared" and "frozen".
    """

    def train(self, mode: bool = True) -> FrozenBatchNorm2d:
        self.training = False
        return self


class DomainBatchNorm2d(nn.Module):
    """BatchNorm2d with shared affine parameters and running statistics per domain.

    The active domain is set by :func:`bn_domain`; forwarding with none selected raises,
    so a forgotten context cannot silently use the wrong statistics.

    Args:
        num_features: channels C.
        domains: domain names (valid identifiers); buffers are ``running_mean_<domain>``,
            ``running_var_<domain>``, ``num_batches_tracked_<domain>``.
        eps, momentum: as ``nn.BatchNorm2d`` (``momentum=None``: cumulative average).

    Shape:
        (N, C, H, W) -> (N, C, H, W)
    """

    def __init__(self, num_features: int, *, domains: Sequence[str] = DOMAINS,
                 eps: float = 1e-5, momentum: float | None = 0.1) -> None:
        super().__init__()
        if not domains or not all(isinstance(d, str) and d.isidentifier() for d in domains):
            raise ValueError(f"domains must be non-empty identifiers, got {domains!r}")
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.domains = tuple(domains)
        self.active_domain: str | None = None
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        for d in self.domains:
            self.register_buffer(f"running_mean_{d}", torch.zeros(num_features))
            self.register_buffer(f"running_var_{d}", torch.ones(num_features))
            self.register_buffer(f"num_batches_tracked_{d}", torch.tensor(0, dtype=torch.long))

    @classmethod
    def from_batchnorm(cls, bn: nn.BatchNorm2d, *, domains: Sequence[str] = DOMAINS
                       ) -> DomainBatchNorm2d:
        """Build from ``bn``: reuses its weight/bias Parameters, copies its stats to every domain."""
        if not bn.affine or not bn.track_running_stats:
            raise ValueError("per-domain BN needs affine=True and track_running_stats=True")
        new = cls(bn.num_features, domains=domains, eps=bn.eps, momentum=bn.momentum)
        new.weight, new.bias = bn.weight, bn.bias
        with torch.no_grad():
            for d in new.domains:
                new.stats(d)[0].copy_(bn.running_mean)
                new.stats(d)[1].copy_(bn.running_var)
                new.stats(d)[2].copy_(bn.num_batches_tracked)
        return new.to(bn.weight.device)

    def stats(self, domain: str) -> tuple[Tensor, Tensor, Tensor]:
        """(running_mean, running_var, num_batches_tracked) buffers of ``domain``."""
        if domain not in self.domains:
            raise ValueError(f"unknown domain {domain!r}; this layer has {self.domains}")
        return (getattr(self, f"running_mean_{domain}"), getattr(self, f"running_var_{domain}"),
                getattr(self, f"num_batches_tracked_{domain}"))

    def reset_running_stats(self, domain: str | None = None) -> None:
        """Reset the statistics of ``domain`` (all domains if None)."""
        for d in self.domains if domain is None else (domain,):
            mean, var, n = self.stats(d)
            mean.zero_()
            var.fill_(1.0)
            n.zero_()

    def forward(self, x: Tensor) -> Tensor:
        if self.active_domain is None:
            raise RuntimeError("DomainBatchNorm2d: no domain selected; forward inside "
                               "`with bn_domain(model, 'source'|'target'):`")
        mean, var, n = self.stats(self.active_domain)
        factor = 0.0
        if self.training:
            n.add_(1)
            factor = 1.0 / float(n) if self.momentum is None else self.momentum
        return F.batch_norm(x, mean, var, self.weight, self.bias, self.training, factor, self.eps)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, domains={self.domains}, eps={self.eps}, "
                f"momentum={self.momentum}, active_domain={self.active_domain}")


def _convert(module: nn.Module, fn) -> None:
    """Replace every BN-like child (recursively) by ``fn(child)``."""
    for name, child in module.named_children():
        if isinstance(child, (nn.BatchNorm2d, DomainBatchNorm2d)):
            setattr(module, name, fn(child))
        else:
            _convert(child, fn)


def _copy_bn(bn: nn.BatchNorm2d, cls: type[nn.BatchNorm2d]) -> nn.BatchNorm2d:
    # Same Parameters and buffers, new class; dtype/device follow the buffers.
    new = cls(bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
              track_running_stats=bn.track_running_stats)
    if bn.affine:
        new.weight, new.bias = bn.weight, bn.bias
    if bn.track_running_stats:
        new.running_mean, new.running_var = bn.running_mean, bn.running_var
        new.num_batches_tracked = bn.num_batches_tracked
    return new


def set_bn_mode(model: nn.Module, mode: BNMode, *, domains: Sequence[str] = DOMAINS) -> nn.Module:
    """Put every ``BatchNorm2d`` of ``model`` in ``mode`` (in place); returns ``model``.

    Call before building the optimizer (frozen BN parameters drop out of
    ``param_groups``). "shared" and "frozen" convert into each other; any of them
    converts to "per_domain" (each domain starts from the current statistics). Leaving
    "per_domain" is refused: it would have to discard one domain's statistics.

    Args:
        model: any module.
        mode: "shared", "frozen" or "per_domain".
        domains: domain names for "per_domain".

    Raises:
        ValueError: unknown mode, or converting a per-domain model to another mode.
    """
    if mode not in BN_MODES:
        raise ValueError(f"unknown BN mode {mode!r}; valid: {', '.join(BN_MODES)}")
    training = model.training

    def fn(bn: nn.Module) -> nn.Module:
        if isinstance(bn, DomainBatchNorm2d):
            if mode != "per_domain" or bn.domains != tuple(domains):
                raise ValueError(f"cannot convert per-domain BN to {mode!r} "
                                 f"(domains {tuple(domains)}): one domain's statistics would be lost")
            return bn
        if mode == "frozen":
            new = bn if type(bn) is FrozenBatchNorm2d else _copy_bn(bn, FrozenBatchNorm2d)
            for p in new.parameters():
                p.requires_grad_(False)
            return new.train(False)
        if mode == "per_domain":
            new = DomainBatchNorm2d.from_batchnorm(bn, domains=domains)
        else:  # shared
            new = _copy_bn(bn, nn.BatchNorm2d) if type(bn) is not nn.BatchNorm2d else bn
        for p in new.parameters():
            p.requires_grad_(True)
        return new.train(training)

    _convert(model, fn)
    return model


def get_bn_mode(model: nn.Module) -> str | None:
    """The BN mode of ``model``: one of :data:`BN_MODES`, "mixed", or None without BN."""
    kinds = set()
    for m in model.modules():
        if isinstance(m, DomainBatchNorm2d):
            kinds.add("per_domain")
        elif isinstance(m, FrozenBatchNorm2d):
            kinds.add("frozen")
        elif isinstance(m, nn.BatchNorm2d):
            kinds.add("shared")
    return None if not kinds else kinds.pop() if len(kinds) == 1 else "mixed"


@contextmanager
def bn_domain(model: nn.Module, domain: str) -> Iterator[nn.Module]:
    """Select the statistics per-domain BN uses inside the block; a no-op for other modes.

    Nests: the previous selection is restored on exit.

    Example:
        >>> with bn_domain(model, "target"):
        ...     out_t = model(x_t)
    """
    layers = [m for m in model.modules() if isinstance(m, DomainBatchNorm2d)]
    for m in layers:
        m.stats(domain)  # validates the name before anything changes
    previous = [m.active_domain for m in layers]
    for m in layers:
        m.active_domain = domain
    try:
        yield model
    finally:
        for m, d in zip(layers, previous):
            m.active_domain = d


def _images(batch: Any) -> Tensor:
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, Mapping):
        return batch["image"]
    if isinstance(batch, (tuple, list)):
        return batch[0]
    raise TypeError(f"cannot take images from a batch of type {type(batch).__name__}")


@torch.no_grad()
def reestimate_bn(model: nn.Module, batches: Iterable[Any], domain: str | None = None,
                  within: nn.Module | None = None) -> int:
    """Reset and re-estimate BN running statistics on ``batches`` (AdaBN).

    Statistics are the cumulative average over all batches (``momentum=None``), computed
    in train mode for BN layers only (other layers, e.g. dropout, stay in eval) and without
    gradients. Works in every mode, "frozen" included (this is the one deliberate way to
    change frozen statistics). Training flags and momenta are restored afterwards.

    Args:
        model: the network.
        batches: image tensors (N, 3, H, W), or tuples/lists whose first item is one, or
            dicts with key "image"; moved to the model's device.
        domain: for per-domain BN, the domain whose statistics are re-estimated (required
            there); ignored otherwise.
        within: re-estimate only the BN layers inside this submodule of ``model`` (e.g. its
            encoder); the others keep their statistics. ``model`` still runs whole.

    Returns:
        The number of batches used.

    Raises:
        ValueError: no batches, or a per-domain model without ``domain``.
    """
    layers = [m for m in (model if within is None else within).modules()
              if isinstance(m, (nn.BatchNorm2d, DomainBatchNorm2d))]
    per_domain = any(isinstance(m, DomainBatchNorm2d) for m in layers)
    if per_domain and domain is None:
        raise ValueError("per-domain BN: pass domain='source' or 'target' to reestimate_bn")
    device = next(model.parameters()).device
    batches = iter(batches)
    first = next(batches, None)
    if first is None:  # checked before the reset, so an empty loader leaves stats intact
        raise ValueError("reestimate_bn got no batches")
    flags = {m: m.training for m in model.modules()}
    momenta = {m: m.momentum for m in layers}
    n = 0
    try:
        model.eval()
        for m in layers:
            if isinstance(m, DomainBatchNorm2d):
                m.reset_running_stats(domain)
            else:
                m.reset_running_stats()
            m.momentum = None
            m.training = True  # set directly: FrozenBatchNorm2d.train() would ignore it
        with bn_domain(model, domain) if per_domain else nullcontext():
            for batch in itertools.chain([first], batches):
                model(_images(batch).to(device))
                n += 1
    finally:
        for m, flag in flags.items():
            m.training = flag
        for m, momentum in momenta.items():
            m.momentum = momentum
    return n
