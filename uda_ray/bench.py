"""``uda-ray bench step``: time training iterations on random data at a preset's sizes.

A benchmark, not a test: it prints seconds per iteration, images per second, peak memory
and the achieved TFLOP/s (FLOPs of one iteration counted by ``torch.utils.flop_counter``,
forward and backward, divided by the measured time). Imports torch only.
"""

from __future__ import annotations

import resource
import time

import torch

from .config import Config


def _batch(n: int, w: int, h: int, num_classes: int, device, *, labels: bool, channels_last: bool, g):
    img = torch.randn(n, 3, h, w, generator=g).to(device)
    if channels_last:
        img = img.contiguous(memory_format=torch.channels_last)
    out = {"image": img}
    if labels:
        out["label"] = torch.randint(0, num_classes, (n, h, w), generator=g).to(device)
    return out


def bench_step(cfg: Config, *, warmup: int = 5, iters: int = 20) -> dict:
    from .engine import Context, build_segmenter, resolve_device
    from .methods import METHODS

    device = resolve_device(cfg.run.device)
    is_cuda = device.type == "cuda"
    if is_cuda:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(0)
    d = cfg.data
    ctx = Context(cfg, device, amp=cfg.run.amp and is_cuda, channels_last=cfg.run.channels_last and is_cuda)
    cfg.run.init_from = ""
    model = build_segmenter(cfg, device)
    if ctx.channels_last:
        model = model.to(memory_format=torch.channels_last)
    method = METHODS[cfg.method](cfg, model, ctx)
    if not method.trains:
        raise ValueError(f"{cfg.method} does not train: nothing to time")
    g = torch.Generator().manual_seed(0)
    src = _batch(d.batch_size, d.source_w, d.source_h, d.num_classes, device, labels=True,
                 channels_last=ctx.channels_last, g=g)
    tgt = _batch(d.batch_size, d.target_w, d.target_h, d.num_classes, device, labels=False,
                 channels_last=ctx.channels_last, g=g)

    def sync():
        if is_cuda:
            torch.cuda.synchronize(device)

    for so in method.optimizers().values():  # a small constant lr: random data, no schedule
        for grp in so.optimizer.param_groups:
            grp["lr"] = so.base_lr * grp.get("lr_mult", 1.0)
    for i in range(warmup):
        method.train_step(src, tgt, i)
    sync()
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        method.train_step(src, tgt, warmup)
    flops = fc.get_total_flops()
    sync()
    if is_cuda:
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for i in range(iters):
        logs = method.train_step(src, tgt, warmup + 1 + i)
    sync()
    dt = (time.perf_counter() - t0) / iters
    for v in logs.values():
        if not torch.isfinite(v).all():
            raise RuntimeError(f"non-finite loss in the benchmark: {logs}")
    imgs = d.batch_size * (2 if method.needs_target else 1)
    peak = (torch.cuda.max_memory_allocated(device) / 2**30 if is_cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    return {"device": str(torch.cuda.get_device_name(device) if is_cuda else "cpu"),
            "sec_per_iter": dt, "images_per_sec": imgs / dt,
            ("peak_gpu_mem_GiB" if is_cuda else "peak_rss_GiB"): peak,
            "TFLOP_per_iter": flops / 1e12, "achieved_TFLOP_per_s": flops / 1e12 / dt,
            "amp_bf16": ctx.amp, "channels_last": ctx.channels_last}
