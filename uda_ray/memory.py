"""Will one training step fit in memory? A preflight that refuses, in one line, a run whose
image sizes cannot fit, before its first batch is read.

Without it, a batch too large for the machine fails late and badly: numpy's
``_ArrayMemoryError`` traceback from a loader, or the kernel killing the process with no
message at all once it has taken every byte (``data.crop_w=5000 data.crop_h=5000`` on a CPU).

The estimate is a *lower bound* of what a step needs, so that the check never refuses a run
that would fit; a run it lets through may still run out of memory (it leaves out the
gradients, the optimiser state, the discriminators and the method's own tensors), and then
``uda-ray`` says so in one line too (:func:`uda_ray.cli.main`).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from .errors import UserError

GiB = 2**30
PROBE_SIDES = (64, 128)  # the two probe images: multiples of 32, so every output stride divides them


class OutOfMemory(UserError, MemoryError):
    """A run whose training step cannot fit in the memory available (the message names the
    keys that size it, the estimate and what is available)."""


def saved_bytes_per_pixel(model: nn.Module, device: torch.device | str = "cpu", *,
                          context=contextlib.nullcontext) -> float:
    """Bytes that autograd keeps for backward per input pixel of one image through ``model``.

    ``model`` runs forward on a 64x64 and a 128x128 RGB image (batch 1) under
    ``torch.autograd.graph.saved_tensors_hooks``, which sees every tensor saved for the
    backward pass. Each storage is counted once (a ReLU's output that the next convolution
    saves as its input is one allocation); parameters (allocated already) and the input
    image (counted with the batch, :func:`step_bytes`) are left out. The result is the slope
    between the two sizes, so that what does not grow with the image (a PPM's pooled maps, a
    bf16 copy of the weights) drops out: scaled to a large image it never overstates.

    The model runs in eval mode (no dropout mask, no BatchNorm statistics updated: train mode
    saves as much or more) with the RNG state restored after, so training is unchanged;
    ``context()`` is entered around each forward (the run's autocast, a per-domain BatchNorm's
    domain).

    Example: ``Conv2d(3, 5, 1) -> ReLU -> Conv2d(5, 2, 1)`` keeps the ReLU's 5-channel
    float32 output, 5 x 4 = 20 bytes a pixel.
    """
    device = torch.device(device)
    skip = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def saved(side: int) -> int:
        sizes: dict[int, int] = {}
        x = torch.zeros(1, 3, side, side, device=device)

        def pack(t):
            st = t.untyped_storage()
            if st.data_ptr() not in skip and st.data_ptr() != x.untyped_storage().data_ptr():
                sizes[st.data_ptr()] = st.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), context():
            out = model(x)
        del out  # frees the graph and what it saved
        return sum(sizes.values())

    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            small, large = (saved(s) for s in PROBE_SIDES)
    finally:
        for m, mode in modes.items():
            m.training = mode
    return max(0.0, (large - small) / (PROBE_SIDES[1] ** 2 - PROBE_SIDES[0] ** 2))


def step_bytes(*, batch_size: int, pixels: int, act_per_pixel: float = 0.0, labels: bool = True) -> int:
    """A lower bound of the memory one domain's batch takes in a training step: ``batch_size``
    images of ``pixels`` pixels as float32 RGB (12 bytes a pixel), their int64 labels (8
    bytes a pixel) and the activations kept for backward (``act_per_pixel``,
    :func:`saved_bytes_per_pixel`; 0 for a batch that only goes forward).

    Example: 2 labelled images of 10x10 with 20 bytes of activations a pixel:
    ``2 * 100 * (12 + 8 + 20) = 8000`` bytes.
    """
    return int(batch_size * pixels * (12 + (8 if labels else 0) + act_per_pixel))


def available_bytes(device: torch.device) -> tuple[int, str] | None:
    """(bytes free for this process, where that number comes from) on ``device``: the CUDA
    device's free memory plus what PyTorch's allocator holds unused; on the CPU, MemAvailable
    of ``/proc/meminfo``. None where it cannot be known."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return free + cached, f"free on {device} (torch.cuda.mem_get_info)"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024, "MemAvailable in /proc/meminfo"
    except (OSError, ValueError, IndexError):
        pass
    return None


def sizes(cfg) -> str:
    """The keys that size a step's memory, with their values (for an out-of-memory message)."""
    d = cfg.data
    parts = [f"data.source_w x data.source_h = {d.source_w}x{d.source_h}",
             f"data.target_w x data.target_h = {d.target_w}x{d.target_h}"]
    if d.crop_w:
        parts.append(f"data.crop_w x data.crop_h = {d.crop_w}x{d.crop_h}")
    if d.scale_max != 1:
        parts.append(f"data.scale_max = {d.scale_max:g}")
    return ", ".join(parts + [f"data.batch_size = {d.batch_size}"])


def check_step_memory(cfg, method, ctx) -> None:
    """Refuse a run whose training step cannot fit (:class:`OutOfMemory`), before its first
    batch is read.

    The step's lower bound (:func:`step_bytes`) is, for each domain the method reads (the
    labelled source, the unlabelled target), one batch of ``data.batch_size`` images at the
    size that reaches the model: the crop (``data.crop_w x data.crop_h``) if set, else the
    resized image at ``data.scale_max`` (a run draws scales up to it); plus, for a method that
    trains, the activations one forward keeps for backward on the batch it trains on
    (:func:`saved_bytes_per_pixel` scaled to its pixels; the source batch where the method
    reads one, as every such method trains on it, else the target). Only one forward is
    counted: a method that runs several (both domains, a discriminator) needs more. With
    ``run.compile`` the activations are not probed (compiling for a probe would cost more
    than the check), leaving the batches alone. Reading one image takes a float32 array at its
    resized size before any crop (12 bytes a pixel) in host memory: checked too (on a CPU
    run against the same memory as the step, which needs it after the image is freed).
    """
    d, device = cfg.data, ctx.device
    domains = []  # (name, width, height, labelled)
    if method.needs_source:
        domains.append(("source", d.source_w, d.source_h, True))
    if method.needs_target or not method.trains:
        domains.append(("target", d.target_w, d.target_h, False))
    if not domains:
        return
    act = 0.0
    if method.trains and cfg.run.iterations > 0 and not cfg.run.compile:
        from .models.batchnorm import bn_domain

        def context():  # as the step runs it: the run's autocast, the trained domain's BatchNorm
            stack = contextlib.ExitStack()
            stack.enter_context(ctx.autocast())
            stack.enter_context(bn_domain(method.model, domains[0][0]))
            return stack

        act = saved_bytes_per_pixel(method.model, device, context=context)
    need = 0
    image = (0, "")  # the largest image read (host bytes, its keys)
    for k, (name, w, h, labelled) in enumerate(domains):
        rw, rh = max(1, round(w * d.scale_max)), max(1, round(h * d.scale_max))
        scale = f" at data.scale_max = {d.scale_max:g}" if d.scale_max != 1 else ""
        image = max(image, (12 * rw * rh, f"data.{name}_w x data.{name}_h = {w}x{h}{scale}"))
        pixels = d.crop_w * d.crop_h if d.crop_w else rw * rh
        need += step_bytes(batch_size=d.batch_size, pixels=pixels, labels=labelled,
                           act_per_pixel=act if k == 0 else 0.0)
    if d.crop_w:
        keys = f"data.crop_w x data.crop_h = {d.crop_w}x{d.crop_h}"
    else:
        keys = ", ".join(f"data.{n}_w x data.{n}_h = {w}x{h}" for n, w, h, _ in domains)
        keys += f", data.scale_max = {d.scale_max:g}" if d.scale_max != 1 else ""
    what = "the batches and the activations kept for backward" if act else "the batches"
    checks = [(need, f"{keys}, data.batch_size = {d.batch_size}: one training step needs at least", what, device)]
    checks.append((image[0], f"{image[1]}: reading one image at that size needs at least",
                   "a float32 array of its pixels", torch.device("cpu")))
    if device.type == "cpu":  # one memory: the larger of the two
        checks = [max(checks, key=lambda c: c[0])]
    for need, head, what, where in checks:
        free = available_bytes(where)
        if free is not None and need > free[0]:
            raise OutOfMemory(f"{head} {need / GiB:.1f} GiB ({what}), but {free[0] / GiB:.1f} GiB of memory is "
                              f"available ({free[1]}); lower the image or crop size or data.batch_size")
