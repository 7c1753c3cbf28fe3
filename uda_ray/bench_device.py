"""``uda-ray bench device``: everything a first GPU session measures, in one call.

Needs PyTorch only (no Ray, Optuna or MLflow: a GPU box may have nothing else, and
nothing is installed). Runs every training method's iteration at the papers' sizes
(:data:`~uda_ray.bench.PAPER_CASES`) in three numerics: fp32 (TF32 off), TF32, and bf16
autocast + channels_last; then the device checks of the numerics that only a GPU can
pin (the WTM identity under TF32 and bf16, the confusion matrix's sync-free CUDA path, the
proxy scores in fp32); then ``bench proxy`` on the device. Prints one table, and exits 1
when a row or a check failed. ``--device cpu --scale 0.125`` is a dry run of the same code.
"""

from __future__ import annotations

import time

import torch

from .bench import PAPER_CASES, bench_cases, bench_proxy, format_table

# mode -> (overrides of the run, TF32 matmuls and convolutions)
MODES: dict[str, tuple[dict, bool]] = {
    "fp32": ({"run.amp": False, "run.channels_last": False}, False),
    "tf32": ({"run.amp": False, "run.channels_last": False}, True),
    "bf16+cl": ({"run.amp": True, "run.channels_last": True}, True),
}


def device_checks(device: torch.device) -> list[tuple[str, bool, str]]:
    """(check, passed, detail) for the numerics the GPU path relies on."""
    from .evaluation import ConfusionMatrix
    from .methods.jal import WeightTransfer
    from .models import ASPPClassifier
    from .proxy import adversarial_confidence_logit

    out = []
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    # WTM: Dec^T = Dec exactly at the identity, under TF32 and bf16 autocast
    head = ASPPClassifier(1024, 19).to(device)
    wtm = WeightTransfer(head, 19).to(device)
    x = torch.randn(1, 1024, 33, 65, device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        same = torch.equal(wtm.decode(head, x), head(x))
    out.append(("WTM identity at init (TF32 + bf16)", same, "bitwise equal" if same else "differs"))
    # confusion matrix: the sync-free path equals bincount, and the update does not sync
    g = torch.Generator().manual_seed(0)
    pred = torch.randint(0, 19, (2, 512, 1024), generator=g)
    gt = torch.randint(0, 19, (2, 512, 1024), generator=g)
    gt[:, :10] = 255
    ref = ConfusionMatrix(19, validate=False)
    ref.update(pred, gt)
    cm = ConfusionMatrix(19, device=device, validate=False)
    p_d, g_d = pred.to(device), gt.to(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.set_sync_debug_mode("error")
    try:
        cm.update(p_d, g_d)
        synced = ""
    except RuntimeError as e:
        synced = str(e).splitlines()[0]
    finally:
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    ok = not synced and torch.equal(cm.matrix.cpu(), ref.matrix)
    out.append(("confusion matrix update: no host sync, equals CPU", ok, synced or "equal"))
    # proxy scores: the adversarial confidence is float32 from bf16 discriminator logits
    d = (8 * torch.randn(2, 1, 1, 64, 128, device=device)).to(torch.bfloat16)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        conf = adversarial_confidence_logit(list(d))
    ok = conf.dtype == torch.float32 and bool(torch.isfinite(conf).all())
    out.append(("proxy confidence logit fp32 and finite under autocast", ok, str(conf.dtype)))
    return out


def run_device_check(*, scale: float = 1.0, warmup: int = 3, iters: int = 10, proxy_images: int = 200,
                     device: str = "auto", modes=tuple(MODES)) -> int:
    from .engine import resolve_device

    dev = resolve_device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"uda-ray bench device on {name}, torch {torch.__version__}, scale {scale}")
    t0 = time.perf_counter()
    rows = []
    flops: dict[str, int] = {}  # the same in every mode: counted once per case
    for mode in modes:
        values, tf32 = MODES[mode]
        over = {**values, "run.device": str(dev), "run.cpu_amp": True}
        rows += bench_cases("paper", PAPER_CASES, overrides=over, scale=scale, warmup=warmup, iters=iters,
                            tf32=tf32, mode=mode, flops=flops)
    checks = device_checks(dev)
    proxy = None
    if proxy_images:
        try:
            proxy = bench_proxy(images=proxy_images, width=max(8, round(1024 * scale)),
                                height=max(8, round(512 * scale)), device=str(dev))
        except Exception as e:  # noqa: BLE001
            proxy = {"error": f"{type(e).__name__}: {e}"}
    print(format_table(rows))
    for check, ok, detail in checks:
        print(f"check  {'PASS' if ok else 'FAIL'}  {check}: {detail}")
    if proxy is not None:
        print("proxy  " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in proxy.items()))
    print(f"total {time.perf_counter() - t0:.0f} s")
    failed = any("error" in r for r in rows) or not all(ok for _, ok, _ in checks) or (proxy or {}).get("error")
    return 1 if failed else 0
