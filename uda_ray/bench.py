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
from torch.utils._python_dispatch import TorchDispatchMode

from .config import Config


# --- host syncs ------------------------------------------------------------------------------
# Ops that make the host wait for the device on CUDA: a value read back (``.item()``, a
# Python ``if`` on a tensor), or an output whose size depends on the values.
SYNC_OPS = ("_local_scalar_dense", "is_nonzero", "equal", "nonzero", "masked_select", "unique", "_unique",
            "_unique2", "unique_consecutive", "unique_dim", "bincount", "repeat_interleave", "histc")
HOST_READS = ("tolist", "numpy", "cpu")  # Tensor methods that read back without an aten op on CPU


class HostSyncCounter(TorchDispatchMode):
    """Counts, while active, the operations that would synchronise host and device on CUDA,
    on any device (the CPU included, where ``torch.cuda.set_sync_debug_mode`` sees nothing):
    aten ops that read a value back or size their output by the data (:data:`SYNC_OPS`,
    ``.item()``, ``bool(t)``, ``int(t)``), indexing with a boolean mask, and the Tensor methods
    ``tolist``, ``numpy`` and ``cpu`` (patched while active).

    ``torch.optim``'s own reads are left out: its step counts live on the host (Adam's
    ``step.item()`` is a CPU read, not a device sync, unless ``capturable``).

    It cannot see syncs inside a single C++ kernel (none on CPU; on CUDA e.g. ``torch.bincount``
    or a non-pinned device-to-host copy, which ``set_sync_debug_mode`` reports on a GPU), nor
    reads of tensors made outside the block.

    Example:
        >>> with HostSyncCounter() as c:
        ...     _ = torch.ones(2).sum().item()
        >>> c.calls
        ['_local_scalar_dense']
    """

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []
        self._saved = {}

    def __enter__(self):
        for name in HOST_READS:
            orig = getattr(torch.Tensor, name)
            self._saved[name] = orig

            def patched(t, *a, _orig=orig, _name=name, **k):
                self.calls.append(f"Tensor.{_name}")
                return _orig(t, *a, **k)

            setattr(torch.Tensor, name, patched)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, orig in self._saved.items():
            setattr(torch.Tensor, name, orig)
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        found = None
        if name in SYNC_OPS:
            found = name
        elif name in ("index", "index_put", "index_put_") and any(
                isinstance(i, Tensor) and i.dtype == torch.bool for i in (args[1] or ()) if i is not None):
            found = f"{name} (boolean mask)"
        if found and not _in_optimizer():
            self.calls.append(found)
        return func(*args, **(kwargs or {}))


def _in_optimizer() -> bool:
    import os
    import sys

    marker = os.sep + os.path.join("torch", "optim") + os.sep
    f = sys._getframe(2)
    while f is not None:
        if marker in f.f_code.co_filename:
            return True
        f = f.f_back
    return False


# --- one training iteration -----------------------------------------------------------------------

def _batch(n: int, w: int, h: int, num_classes: int, device, *, channels_last: bool, g):
    img = torch.randn(n, 3, h, w, generator=g).to(device)
    if channels_last:
        img = img.contiguous(memory_format=torch.channels_last)
    label = torch.randint(0, num_classes, (n, h, w), generator=g).to(device)
    return {"image": img, "label": label}  # target labels: proxy / pseudo labels of the self-training steps


def _meta_batch(n: int, w: int, h: int):
    return {"image": torch.empty(n, 3, h, w, device="meta"), "label": torch.empty(n, h, w, dtype=torch.long,
                                                                                     device="meta")}


def step_flops(cfg: Config) -> int:
    """FLOPs of one training iteration of ``cfg``'s method, forward and backward, counted by
    ``torch.utils.flop_counter`` on the meta device (shapes only: instant at any size, and
    the same count on every machine). Matrix products and convolutions only, as the
    papers' GFLOP figures count them."""
    import copy

    from torch.utils.flop_counter import FlopCounterMode

    from .context import Context
    from .engine import build_segmenter, setup_method

    cfg = copy.deepcopy(cfg)
    cfg.run.init_from, cfg.model.pretrained, cfg.run.compile = "", "", False
    dev = torch.device("meta")
    ctx = Context(cfg, dev, amp=False, channels_last=False)
    with dev:  # no weights are initialised: shapes only
        method = setup_method(cfg, ctx, build_segmenter(cfg, dev))
    for so in method.optimizers().values():  # the update is elementwise: no FLOPs counted, no meta kernel
        so.optimizer.step = lambda *a, **k: None
    d = cfg.data
    src = _meta_batch(d.batch_size, d.source_w, d.source_h)
    tgt = _meta_batch(d.batch_size, d.target_w, d.target_h)
    with FlopCounterMode(display=False) as fc:
        method.train_step(src, tgt, 0)
    return fc.get_total_flops()


def images_per_iter(cfg: Config, method) -> int:
    """Images an iteration reads: the curriculum mixes one batch of B from both domains."""
    b = cfg.data.batch_size
    if cfg.method == "curriculum":
        return b
    return b * (int(method.needs_source) + int(method.needs_target))


def bench_step(cfg: Config, *, warmup: int = 5, iters: int = 20, tf32: bool = True, flops: bool = True) -> dict:
    """Seconds per iteration of ``cfg``'s method on random data at the config's sizes, with
    the config's numerics (``run.amp`` / ``run.channels_last`` on CUDA, on the CPU with
    ``run.cpu_amp``; ``run.compile``), images per second, peak memory, the FLOPs of one
    iteration (:func:`step_flops`), the achieved TFLOP/s, and the host syncs of one
    iteration (:class:`HostSyncCounter`)."""
    from .config import METHODS
    from .context import Context, numerics
    from .engine import build_segmenter, resolve_device, setup_method

    device = resolve_device(cfg.run.device)
    is_cuda = device.type == "cuda"
    if is_cuda:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
    if not METHODS[cfg.method].trains:
        raise ValueError(f"{cfg.method} does not train: nothing to time")
    torch.manual_seed(0)
    d = cfg.data
    amp, channels_last = numerics(cfg, device)
    ctx = Context(cfg, device, amp=amp, channels_last=channels_last)
    cfg.run.init_from, cfg.model.pretrained = "", ""  # random weights: the timing does not depend on them
    from .models import reestimate_bn

    g = torch.Generator().manual_seed(0)
    src = _batch(d.batch_size, d.source_w, d.source_h, d.num_classes, device, channels_last=ctx.channels_last, g=g)
    tgt = _batch(d.batch_size, d.target_w, d.target_h, d.num_classes, device, channels_last=ctx.channels_last, g=g)
    t_build = time.perf_counter()
    model = build_segmenter(cfg, device)
    # Random weights under frozen BatchNorm (the paper preset) overflow to NaN within 101
    # layers: the statistics of one random batch stand in for ImageNet's (the cost of an
    # iteration does not depend on the weights). Before compiling: one graph, not two.
    reestimate_bn(model, [src], domain="source" if cfg.model.bn == "per_domain" else None)
    method = setup_method(cfg, ctx, model)
    t_build = time.perf_counter() - t_build

    def sync():
        if is_cuda:
            torch.cuda.synchronize(device)

    # A constant lr, 1/1000 of the base: random weights on random data diverge to NaN within
    # ten steps at the training lr; an update costs the same whatever its size.
    for so in method.optimizers().values():
        for grp in so.optimizer.param_groups:
            grp["lr"] = 1e-3 * so.base_lr * grp.get("lr_mult", 1.0)
    t_warm = time.perf_counter()
    for i in range(warmup):
        method.train_step(src, tgt, i)
    sync()
    t_warm = time.perf_counter() - t_warm
    import warnings

    with HostSyncCounter() as syncs, warnings.catch_warnings(record=True) as cuda_syncs:
        warnings.simplefilter("always")
        if is_cuda:  # what the CUDA runtime itself sees as synchronising, kernels included
            torch.cuda.set_sync_debug_mode("warn")
        try:
            method.train_step(src, tgt, warmup)
        finally:
            if is_cuda:
                torch.cuda.set_sync_debug_mode("default")
    sync()
    cuda_syncs = [w for w in cuda_syncs if "synchroniz" in str(w.message)]
    if is_cuda:
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for i in range(iters):
        logs = method.train_step(src, tgt, warmup + 1 + i)
    sync()
    dt = (time.perf_counter() - t0) / max(1, iters)
    for v in logs.values():
        if not torch.isfinite(v).all():
            raise RuntimeError(f"non-finite loss in the benchmark: {logs}")
    n = step_flops(cfg) if flops else 0
    imgs = images_per_iter(cfg, method)
    peak = (torch.cuda.max_memory_allocated(device) / 2**30 if is_cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    return {"device": str(torch.cuda.get_device_name(device) if is_cuda else "cpu"),
            "sec_per_iter": dt, "images_per_sec": imgs / dt,
            ("peak_gpu_mem_GiB" if is_cuda else "peak_rss_GiB"): peak,
            "TFLOP_per_iter": n / 1e12, "achieved_TFLOP_per_s": n / 1e12 / dt,
            "host_syncs_per_iter": len(syncs.calls) + len(cuda_syncs), "sync_ops": ",".join(sorted(set(syncs.calls))),
            "amp_bf16": ctx.amp, "channels_last": ctx.channels_last, "tf32": bool(is_cuda and tf32),
            "compile": cfg.run.compile, "sec_build": t_build, "sec_warmup": t_warm}


# --- every method at the papers' architectures ---------------------------------------------------

# (row, method, settings): each training method's iteration at its paper's architecture, in
# each stage that trains. DeepLab-v2 ResNet-101 unless set; discriminators at the papers' widths.
PAPER_CASES: tuple[tuple[str, str, dict], ...] = (
    ("source_only", "source_only", {}),
    ("adaptseg", "adaptseg", {}),
    ("mat (adapt)", "mat", {"model.arch": "mat_r101"}),
    ("mat (proxy)", "mat", {"model.arch": "mat_r101", "mat.proxy": True, "run.iterations": 0}),
    ("dast (DA)", "dast", {}),
    ("dast (self-train)", "dast", {"dast.self_training": True}),
    ("jal", "jal", {}),
    ("pww", "pww", {}),
    ("curriculum", "curriculum", {"model.arch": "r18_ppm", "model.num_decoders": 2, "model.ppm_bins": "6,3,2,1"}),
)
REFERENCE_ROW = "adaptseg"  # FLOPs and time are stated relative to AdaptSegNet's iteration


def scaled(values: dict, preset: str, scale: float) -> dict:
    """The preset's image sizes times ``scale`` (rounded to multiples of 2), over ``values``."""
    from .config import PRESETS

    if scale == 1.0:
        return values
    out = dict(values)
    for k in ("data.source_w", "data.source_h", "data.target_w", "data.target_h"):
        base = int(values.get(k, PRESETS[preset].get(k, 0)) or 0)
        if base and k not in values:
            out[k] = max(8, 2 * round(base * scale / 2))
    return out


def case_config(preset: str, method: str, settings: dict, overrides: dict, scale: float = 1.0) -> Config:
    from .config import build_config

    values = scaled({**settings, **overrides}, preset, scale)
    return build_config(values, preset=preset, method=method)


def bench_cases(preset: str, cases, *, overrides: dict | None = None, scale: float = 1.0, warmup: int = 2,
                iters: int = 5, rounds: int = 1, tf32: bool = True, mode: str = "", progress=print,
                flops: dict | None = None) -> list[dict]:
    """:func:`bench_step` over ``cases`` ((row, method, settings) as :data:`PAPER_CASES`),
    ``rounds`` times with the cases interleaved, keeping each case's fastest round: on a
    shared machine, others' load slows some rounds, and the interleaving spreads it over
    every case, so that the ratios to AdaptSegNet's row compare like with like. A case
    that fails (e.g. out of memory) gives a row with its error, and the others run.
    ``flops``: row -> FLOPs already counted (shared by calls at the same sizes)."""
    best: dict[str, dict] = {}
    flops = {} if flops is None else flops
    for k in range(rounds):
        for row, method, settings in cases:
            r = {"row": row, "mode": mode}
            if "error" in best.get(row, {}):
                continue
            try:
                cfg = case_config(preset, method, settings, overrides or {}, scale)
                d = cfg.data
                r.update(model=cfg.model.arch,
                         sizes=f"{d.source_w}x{d.source_h}+{d.target_w}x{d.target_h} b{d.batch_size}")
                r.update(bench_step(cfg, warmup=warmup, iters=iters, tf32=tf32, flops=row not in flops))
                flops.setdefault(row, round(r["TFLOP_per_iter"] * 1e12))
                n = flops[row] / 1e12
                r.update(TFLOP_per_iter=n, achieved_TFLOP_per_s=n / r["sec_per_iter"])
            except Exception as e:  # noqa: BLE001  (one call measures everything: report and go on)
                r["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
            if progress:
                progress(f"  {mode + ' ' if mode else ''}{row}{f' (round {k + 1})' if rounds > 1 else ''}: "
                         + (r.get("error") or f"{r['sec_per_iter']:.3g} s/iter"))
            if row not in best or "error" in r or r["sec_per_iter"] < best[row]["sec_per_iter"]:
                best[row] = r
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    rows = [best[row] for row, _, _ in cases]
    ref = {r["mode"]: r for r in rows if r["row"] == REFERENCE_ROW and "error" not in r}
    for r in rows:
        a = ref.get(r["mode"])
        if a is not None and "error" not in r:
            r["flops_vs_adaptseg"] = r["TFLOP_per_iter"] / a["TFLOP_per_iter"] if a["TFLOP_per_iter"] else float("nan")
            r["time_vs_adaptseg"] = r["sec_per_iter"] / a["sec_per_iter"]
    return rows


def format_table(rows: list[dict]) -> str:
    """One text table of :func:`bench_cases` rows."""
    cols = [("mode", "mode", "{}"), ("row", "method", "{}"), ("model", "model", "{}"), ("sizes", "sizes", "{}"),
            ("sec_per_iter", "s/iter", "{:.3f}"), ("images_per_sec", "img/s", "{:.2f}"),
            ("peak", "peak GiB", "{:.2f}"), ("TFLOP_per_iter", "GFLOP/iter", "{:.0f}"),
            ("achieved_TFLOP_per_s", "TFLOP/s", "{:.3f}"), ("flops_vs_adaptseg", "FLOPs/AdaptSeg", "{:.2f}"),
            ("time_vs_adaptseg", "time/AdaptSeg", "{:.2f}"), ("host_syncs_per_iter", "syncs/iter", "{}")]
    if not any(r.get("mode") for r in rows):
        cols = cols[1:]
    lines = []
    for r in rows:
        r = dict(r)
        r["peak"] = r.get("peak_gpu_mem_GiB", r.get("peak_rss_GiB"))
        if "TFLOP_per_iter" in r:
            r["TFLOP_per_iter"] = r["TFLOP_per_iter"] * 1e3  # shown in GFLOP
        cells = []
        for key, _, fmt in cols:
            v = r.get(key)
            cells.append("-" if v is None else fmt.format(v))
        if "error" in r:
            cells[-1] = r["error"]
        lines.append(cells)
    return text_table([h for _, h, _ in cols], lines)


def text_table(head: list[str], lines: list[list[str]], *, numbers_right: bool = False) -> str:
    """Columns of text cells under a header and a rule; with ``numbers_right`` every column
    but the first is right-aligned."""
    widths = [max(len(h), *(len(c[i]) for c in lines)) if lines else len(h) for i, h in enumerate(head)]

    def line(cells):
        return "  ".join(c.rjust(w) if numbers_right and i else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(c) for c in lines])


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


def bench_proxy_model(*, preset: str = "study-cpu", images: int = 50, overrides: dict | None = None,
                      kind: str = "adversarial", device: str = "auto", rounds: int = 1) -> dict:
    """MAT's proxy-label generation with a real model over the first ``images`` target-train
    images of the config's data, against one evaluation pass and one forward pass over the
    same images (the target of issue 12: generation <= 1.2x an evaluation pass, evaluation
    <= 1.5x a forward pass). Generation is timed with the network run once per image (its
    outputs kept on disk, the default) and, for the before/after, rerun in every pass.
    Each case's fastest of ``rounds`` (interleaved) is kept.

    The model is MAT's adversarial stage freshly initialised (random weights: the cost does
    not depend on them), saved and loaded as the proxy stage's ``init_from``, as a study does.
    """
    import math
    import tempfile
    from pathlib import Path

    from .checkpoint import save_checkpoint
    from .config import load_config
    from .context import numerics
    from .engine import (Context, build_datasets, build_segmenter, ensure_data, evaluate, resolve_device,
                         setup_method)
    from .proxy import ProxyPolicy, generate, stats_passes

    dev = resolve_device(device)
    values = {"run.device": str(dev), "model.arch": "mat_tiny" if preset != "paper" else "mat_r101",
              **(overrides or {})}
    with tempfile.TemporaryDirectory() as tmp:
        adv = load_config(None, {**values, "run.out": tmp}, preset=preset, method="mat")
        ensure_data(adv)
        amp, cl = numerics(adv, dev)
        ctx = Context(adv, dev, amp=amp, channels_last=cl, run_dir=Path(tmp))
        torch.manual_seed(0)
        stage = setup_method(adv, ctx, build_segmenter(adv, dev))
        init = save_checkpoint(Path(tmp) / "adv" / "last.pt", stage, 0, adv)
        cfg = load_config(None, {**values, "run.out": tmp, "mat.proxy": True, "run.init_from": str(init)},
                          preset=preset, method="mat")
        method = setup_method(cfg, Context(cfg, dev, amp=amp, channels_last=cl, run_dir=Path(tmp)),
                              build_segmenter(cfg, dev))
        data = build_datasets(cfg)
        n = min(images, len(data["target_eval"]))
        subset = torch.utils.data.Subset(data["target_eval"], range(n))
        score = method._generator()
        policy = ProxyPolicy(kind, portion=cfg.params.p1 if kind == "adversarial" else cfg.params.p2,
                             portion2=cfg.params.p2)
        to_device = method.ctx.to_device

        def sync():
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)

        def forward_pass():
            with torch.no_grad():
                for i in range(n):
                    method.predict(subset[i]["image"][None].to(dev))
            sync()

        subset.num_classes = cfg.data.num_classes  # the same images, evaluated as a labelled split

        def eval_pass():
            evaluate(method, subset, method.ctx)
            sync()

        stats = {}

        def gen(cache):
            def run():
                with tempfile.TemporaryDirectory() as out:
                    stats[cache] = generate(subset, score, policy, Path(out) / "p", num_classes=cfg.data.num_classes,
                                            device=dev, to_device=to_device, progress=False,
                                            cache="auto" if cache else None)
                sync()
            return run

        cases = {"forward pass": forward_pass, "evaluation pass": eval_pass, "generation, network once": gen(True),
                 "generation, network every pass": gen(False)}
        best = {k: math.inf for k in cases}
        method.model.eval()
        for _ in range(max(1, rounds)):
            for k, fn in cases.items():
                t0 = time.perf_counter()
                fn()
                best[k] = min(best[k], time.perf_counter() - t0)
    h, w = cfg.data.target_h, cfg.data.target_w
    per_image = stats[True].cache_bytes / max(1, n)
    cityscapes = per_image * 2975 * (1024 * 512) / (w * h)
    return {"device": str(torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"),
            "policy": kind, "images": n, "size": f"{w}x{h}", "arch": cfg.model.arch,
            "passes": stats_passes(policy) + 1, **{f"seconds: {k}": v for k, v in best.items()},
            "evaluation / forward": best["evaluation pass"] / best["forward pass"],
            "generation (once) / evaluation": best["generation, network once"] / best["evaluation pass"],
            "generation (every pass) / evaluation": best["generation, network every pass"] / best["evaluation pass"],
            "cache MiB": stats[True].cache_bytes / 2**20,
            "cache GiB at Cityscapes train (2975 x 1024x512, same dtype)": cityscapes / 2**30,
            "same thresholds both ways": _same_thresholds(stats[True].thresholds, stats[False].thresholds)}


def _same_thresholds(a, b) -> bool:
    eq = lambda x, y: (x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))  # noqa
    return eq(a.t, b.t) and eq(a.t_class, b.t_class) and a.t1 == b.t1
