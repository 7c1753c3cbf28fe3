"""What a method is: a small module that owns its update step and composes shared parts.

The engine owns iteration, learning-rate schedules, evaluation, checkpoints and reporting;
a method builds its discriminators and optimizers and writes its step out as the paper's
steps. Methods do not inherit from each other.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor, nn

from ..models.batchnorm import bn_domain

if TYPE_CHECKING:
    from ..config import Config
    from ..context import Context


@dataclass
class ScheduledOptimizer:
    """An optimizer and how the engine schedules it: ``poly`` decays every param group's
    ``lr = base_lr * lr_mult * (1 - step / horizon) ** power``; ``poly_epoch`` applies the
    same decay once per epoch of the target set (``epoch = step // batches_per_epoch`` over
    ``ceil(horizon / batches_per_epoch)`` epochs); ``const`` keeps it."""

    optimizer: torch.optim.Optimizer
    base_lr: float
    schedule: str = "poly"  # "poly" (per iteration), "poly_epoch" (per target epoch) or "const"


def set_requires_grad(modules, flag: bool) -> None:
    for m in modules:
        for p in m.parameters():
            p.requires_grad_(flag)


def segmenter_optimizer(cfg: "Config", model: nn.Module) -> ScheduledOptimizer:
    """SGD with the reference defaults; classifier heads at ``optim.head_lr_mult`` x lr."""
    o = cfg.optim
    opt = torch.optim.SGD(model.param_groups(o.lr, head_lr_mult=o.head_lr_mult), lr=o.lr,
                          momentum=o.momentum, weight_decay=o.weight_decay)
    return ScheduledOptimizer(opt, o.lr, "poly")


def discriminator_optimizer(cfg: "Config", modules: list[nn.Module]) -> ScheduledOptimizer:
    """Adam with the reference defaults (lr 1e-4, betas (0.9, 0.99)), poly-decayed as the
    reference code does."""
    o = cfg.optim
    params = [{"params": [p for m in modules for p in m.parameters()], "lr_mult": 1.0}]
    return ScheduledOptimizer(torch.optim.Adam(params, lr=o.d_lr, betas=(o.d_beta1, o.d_beta2)), o.d_lr)


class Method:
    """Base of the methods: holds the config, the segmenter and the engine context.

    Subclasses set ``name`` and implement :meth:`train_step`; they may override
    :meth:`prepare` (work before the first step), :meth:`predict` (what evaluation reads)
    and extend :meth:`modules` / :meth:`optimizers` with their discriminators.
    """

    name: ClassVar[str] = ""
    config: ClassVar[type]  # the method's config section: a dataclass of knob fields
    needs_target: ClassVar[bool] = True  # reads unlabelled target batches while training
    needs_source: ClassVar[bool] = True  # reads labelled source batches while training
    trains: ClassVar[bool] = True  # False: no optimisation steps (e.g. AdaBN)
    probing: bool = False  # set by the engine on the steps it probes (run.grad_probe_every)

    def __init__(self, cfg: "Config", model: nn.Module, ctx: "Context"):
        self.cfg, self.model, self.ctx = cfg, model, ctx
        self.p = cfg.params  # the method's own config section
        self.opt_g = segmenter_optimizer(cfg, model) if self.trains else None

    def load_from_init(self, modules: dict[str, nn.Module], *, required: bool) -> list[str]:
        """Load ``modules`` (checkpoint name -> module, e.g. discriminators) from the
        ``run.init_from`` checkpoint where it holds them, so a later stage continues an
        earlier one's discriminators. Returns the names loaded; with ``required``, a missing
        one is an error naming the checkpoint and the module."""
        if not self.cfg.run.init_from or not modules:
            return []
        from ..checkpoint import load_checkpoint_file
        from ..knobs import ConfigError

        path = self.cfg.run.init_from
        state = load_checkpoint_file(path)["modules"]
        missing = [k for k in modules if k not in state]
        if required and missing:
            raise ConfigError(f"run.init_from: {path} has no {missing} (needed by {self.name} with these switches; "
                              f"start from a checkpoint of a stage that trained them)")
        for k, m in modules.items():
            if k in state:
                m.load_state_dict(state[k])
        return [k for k in modules if k in state]

    def probe(self, logs: dict, **terms: Tensor) -> None:
        """On probe steps, the norm of each loss term's gradient over the segmenter's trained
        parameters, as weighted in the loss, logged as ``grad/<name>``, and its ratio to the
        ``seg`` term probed before it in the step as ``grad/<name>_over_seg``: how much each
        component pulls against the supervised loss. Call before the term's backward. A
        diagnostic: ``autograd.grad`` leaves ``.grad`` alone, so training is bit-identical
        with or without it (tested); it costs one extra backward per term on probe steps."""
        if not self.probing:
            return
        params = [p for p in self.model.parameters() if p.requires_grad]
        for name, term in terms.items():
            if not isinstance(term, Tensor) or not term.requires_grad:
                continue  # e.g. a sum over no terms
            grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
            sq = [g.float().pow(2).sum() for g in grads if g is not None]
            norm = torch.stack(sq).sum().sqrt() if sq else term.new_zeros((), dtype=torch.float32)
            logs[f"grad/{name}"] = norm.detach()
            if name != "seg" and "grad/seg" in logs:
                logs[f"grad/{name}_over_seg"] = (norm / logs["grad/seg"].clamp_min(1e-12)).detach()

    def modules(self) -> dict[str, nn.Module]:
        """Everything a checkpoint holds, by name (the segmenter is ``model``)."""
        return {"model": self.model}

    def optimizers(self) -> dict[str, ScheduledOptimizer]:
        return {"seg": self.opt_g} if self.opt_g is not None else {}

    def zero_grad(self) -> None:
        """Clear the gradients of every optimizer of the method."""
        for so in self.optimizers().values():
            so.optimizer.zero_grad(set_to_none=True)

    def step(self) -> None:
        """One step of every optimizer, after the iteration's backward passes."""
        for so in self.optimizers().values():
            so.optimizer.step()

    def switches(self) -> dict[str, bool]:
        """The ablation switches of this row: the boolean knobs of the method's section."""
        return {f"{self.name}.{f.name}": getattr(self.p, f.name) for f in fields(self.p)
                if isinstance(getattr(self.p, f.name), bool)}

    def prepare(self, target_batches) -> None:
        """Called once before training (or, for methods that do not train, instead of it)
        with an iterator of target batches."""

    def phases(self, iterations: int) -> list[int]:
        """Steps at which a phase of training begins (``[0]``: one phase). At each start the
        engine calls :meth:`begin_phase` and rebuilds the data loaders, e.g. for rounds of
        self-training on regenerated proxy labels."""
        return [0]

    def begin_phase(self, k: int, step: int, data: dict):
        """Called before phase ``k`` trains, at ``step`` (the phase's first step, or the
        resumed step inside it: it must then rebuild the same phase state). Returns the
        dataset of target training batches for this phase, or None for ``data["target"]``."""
        return None

    def mosaic_maps(self, images: Tensor) -> dict[str, Tensor]:
        """Extra per-pixel maps shown next to the prediction in ``mosaic.png``: name ->
        (N, h, w) floats in [0, 1] at any resolution (e.g. an attention or agreement map)."""
        return {}

    def train_step(self, src: dict, tgt: dict | None, step: int) -> dict[str, Tensor]:
        """One iteration: forward, backward and every optimizer step. Returns detached
        scalar losses keyed ``loss/...`` (kept on the device: no host sync here)."""
        raise NotImplementedError

    @torch.no_grad()
    def predict(self, images: Tensor) -> Tensor:
        """Main logits (N, C, h, w) of target images, for evaluation."""
        with bn_domain(self.model, "target"), self.ctx.autocast():
            return self.model(images).logits["main"].float()
