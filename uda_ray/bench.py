"""``uda-ray bench step``: time training iterations on random data at a preset's sizes;
``uda-ray bench proxy``: time a proxy-label generation over a synthetic score volume.

A benchmark, not a test: it prints seconds per iteration, images per second, peak memory
and the achieved TFLOP/s (FLOPs of one iteration counted by ``torch.utils.flop_counter``,
forward and backward, divided by the measured time). Imports torch only.
"""

from __future__ import annotations

import resource
import time

import torch
from torch import Tensor

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
    from .config import METHODS
    from .engine import Context, build_segmenter, resolve_device

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


class ScoreVolume(torch.utils.data.Dataset):
    """A synthetic target set for :func:`bench_proxy`: sample ``i`` is only its index (the
    "image"); :func:`volume_scores` turns indices into that image's class scores and
    adversarial confidence, the same on every pass."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return {"image": torch.tensor([i]), "name": f"{i:05d}"}


def volume_scores(num_classes: int, width: int, height: int, device, *, stride: int = 8):
    """score_fn of a :class:`ScoreVolume`: per image, seeded logits at 1/``stride`` of
    ``width x height`` (as a segmenter's), upsampled bilinearly and log-softmaxed at full
    size as the real passes do (:func:`uda_ray.proxy.log_softmax_at`), and a smooth map of
    discriminator logits turned into MAT's confidence logit."""
    from .proxy import adversarial_confidence_logit, log_softmax_at

    h, w = -(-height // stride), -(-width // stride)

    def score(index: Tensor):
        log_probs, confs = [], []
        for i in index.view(-1).tolist():
            g = torch.Generator().manual_seed(int(i))
            logits = (3 * torch.randn(1, num_classes, h, w, generator=g)).to(device)
            d = (4 * torch.randn(1, 1, h, w, generator=g)).to(device)
            log_probs.append(log_softmax_at(logits, (height, width)))
            d = torch.nn.functional.interpolate(d, size=(height, width), mode="bilinear", align_corners=True)
            confs.append(adversarial_confidence_logit([d]))
        return torch.cat(log_probs), torch.cat(confs)

    return score


def bench_proxy(*, images: int, width: int, height: int, num_classes: int = 19, kind: str = "adversarial",
                portion: float = 0.6, portion2: float = 0.8, out_dir: str | None = None,
                device: str = "auto") -> dict:
    """Time one proxy-label generation (the histogram passes and the labelling pass that
    writes one PNG per image) over a synthetic score volume of ``images x classes x height
    x width``, and the cost of producing the synthetic scores alone (one pass), so that the
    proxy module's own cost is the difference. Peak memory: the process's peak RSS on the
    CPU, the peak allocated memory on CUDA."""
    import tempfile

    from .engine import resolve_device
    from .proxy import ProxyPolicy, generate, stats_passes

    dev = resolve_device(device)
    policy = ProxyPolicy(kind, portion=portion, portion2=portion2)
    score = volume_scores(num_classes, width, height, dev)
    ds = ScoreVolume(images)
    to_device = lambda b: b  # noqa: E731  (indices stay on the host; scores are made on dev)
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(images):
            score(torch.tensor([i]))
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t_scores = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        stats = generate(ds, score, policy, out_dir or tmp, num_classes=num_classes, device=dev,
                         to_device=to_device, progress=True)
    passes = stats_passes(policy) + 1  # the threshold passes and the labelling pass
    return {"device": str(torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"),
            "policy": kind, "images": images, "size": f"{width}x{height}", "classes": num_classes,
            "passes": passes, "seconds_total": stats.seconds, "seconds_synthetic_scores_per_pass": t_scores,
            "seconds_proxy_module": stats.seconds - passes * t_scores,
            "kept_frac": stats.kept / max(1, stats.pixels),
            ("peak_gpu_mem_MiB" if dev.type == "cuda" else "peak_rss_MiB"): stats.peak_mem_mb}
