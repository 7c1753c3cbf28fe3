"""Proxy (pseudo) labels for the target training set, shared by MAT, DAST and the curriculum.

Thresholds come from the statistics of the *whole* target set, so they are computed in
streaming passes over it with bounded memory: each pass runs the model image by image and
adds the scores it needs to fixed-size histograms (2**16 counters per class, on the
model's device), whose counts are summed over DDP ranks so that every rank reads the same
thresholds. Memory is ``classes x 2**16`` counters whatever the size of the set. The last
pass writes one label PNG per image (train ids, 255 = ignore, the train palette so that it
opens as a coloured map) beside the run.

Scores are *logits* (``log p - log(1 - p)``), not probabilities, computed from
log-probabilities and log-sigmoids, never from saturated float32 probabilities.
Confidences pile up against 0 and 1: a trained discriminator gives target pixels
source-probabilities of 1e-5 and far less (logits of -20 to -30 measured on the MAT
study), a confident classifier max-probabilities of 0.9999 and more, which float32
probabilities would round to 0 or 1 and tie, so that t1 kept every pixel whatever p1
asked for (measured: 81% kept for p1 * p2 = 0.48).

Thresholds are exact: a threshold is the k-th largest float32 score of its set, ``k =
ceil(portion * n)`` (what ``torch.topk`` or a sort gives; tested), found by a radix
select in two passes (:class:`TopSelect`): the first histograms the high 16 bits of each
score's order-preserving 32-bit key (the sign, the exponent and 7 mantissa bits: buckets
of under 1% of the value), the second, over the bucket that holds the k-th largest only,
its low 16 bits, one counter per float32 value. So a thresholded step keeps exactly its
portion, more only by exact ties of equal float32 scores (e.g. an untrained model's
near-constant confidences, or probabilities of exactly 1), which a generation warns
about; ``proxy/refocused_frac`` (A >= t1) and ``proxy/kept_frac`` are logged beside
``proxy/requested_frac``. (Equal-width histograms over logits, as before, kept up to 3.2
points more than asked on diffuse confidences at 2048 bins. Refining inside such a logit
bin is not one pass in general: the bin at 0 spans about 2**30 float32 values; the radix
digits bound every bucket to 2**16 values, so one refinement pass is always exact.)

Passes over the target set: 2 for the threshold(s) of ``global`` and ``class_balanced``
(every class's threshold in the same two passes), 4 for ``adversarial`` (t2 is taken over
the pixels with A >= t1, so t1 must be exact first: its two passes, then t2's two), then
the labelling pass (:func:`stats_passes`). The network runs once per image: a score
function in two parts (:class:`TwoStageScore`: the network's low-resolution outputs, then
the upsampling and log-softmax) has its outputs kept on local disk in their own dtype
(:class:`ScoreCache`: bf16 under autocast, float32 otherwise; for Cityscapes train at
1024x512 in bf16, about 3.5 GiB for MAT's output stride 4 and 0.9 GiB for DeepLab's 8) and every pass reads them, so the thresholds and labels are
those of running the network in every pass, bit for bit (tested).

Policies (``ProxyPolicy.kind``):

- ``global``: the top ``portion`` of all pixels by classification confidence (max softmax
  probability) keep their argmax; DAST's top-q selection.
- ``class_balanced``: CBST (Zou et al., ECCV 2018). For each class c, t_c is the
  confidence at the top ``portion`` of the pixels *predicted* as c; a pixel takes
  ``argmax_c P_c / t_c`` where that ratio is at least 1. ``max_threshold`` (a probability,
  None = no cap) caps every t_c, as BDL's release (and DAST's, built on it) does at 0.9
  (``thres[thres > 0.9] = 0.9``): on saturated predictions every pixel above the cap is
  kept, more than ``portion``.
- ``adversarial``: MAT's confidence refocusing (Shen et al., Eq. 5). t1 is the threshold
  of the top ``portion`` (p1) of the adversarial confidence A over the whole set; t2 is
  the class-balanced threshold vector of ``portion2`` (p2) computed only over pixels with
  A > t1; a pixel takes ``argmax_l P_l / t2_l`` where ``P_l > t2_l`` and ``A > t1``.

A threshold is the score of the last pixel kept, so ties at a threshold are kept (``>=``,
where Eq. 5 writes ``>``): the kept set is the requested portion (rounded up to a whole
pixel), more only by exact ties, and for class-balanced labels by the pixels that the cap
admits or that CBST's ratio admits through another class's threshold.

A score function returns, per batch of images, the log-probabilities (N, C, H, W) at the
network input size (logits upsampled bilinearly, ``align_corners=True``, then the log-
softmax: :func:`log_softmax_at`), which is also the size of the written labels, and, for
the adversarial policy, the logit of the confidence A (N, H, W).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

IGNORE = 255
POLICIES = ("global", "class_balanced", "adversarial")
DIGIT = 16  # bits of each radix-select pass: two passes of 2**16 counters cover a float32's 32 bits

# score_fn(images) -> (log-probabilities (N, C, H, W) at the input size, logit of the
# adversarial confidence (N, H, W) or None)
ScoreFn = Callable[[Tensor], tuple[Tensor, Tensor | None]]


@dataclass
class TwoStageScore:
    """A score function in two parts, so that the network runs once per image:
    ``raw(images) -> tuple of tensors`` (the network's outputs at their own, low,
    resolution) and ``finish(raw, size) -> (log-probabilities, confidence logit or None)``
    at the input size. Called as a plain score function, it is ``finish(raw(images))``."""

    raw: Callable[[Tensor], tuple[Tensor, ...]]
    finish: Callable[[tuple[Tensor, ...], tuple[int, int]], tuple[Tensor, Tensor | None]]
    # optional: the confidence logit alone (t1's passes need nothing else), as finish's
    finish_confidence: Callable[[tuple[Tensor, ...], tuple[int, int]], Tensor] | None = None

    def __call__(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        return self.finish(self.raw(images), tuple(images.shape[-2:]))


class ScoreCache:
    """The raw outputs of a :class:`TwoStageScore` for every image of a set, on local disk
    (one file, each tensor's bytes in its own dtype), read back one image at a time: memory
    stays one image's outputs whatever the size of the set."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "wb")
        self._mm: np.memmap | None = None
        # image index -> (input size, [(offset, bytes, shape, dtype) per tensor])
        self.index: dict[int, tuple[tuple[int, int], list[tuple[int, int, tuple, torch.dtype]]]] = {}
        self._offset = 0

    def put(self, i: int, size: tuple[int, int], raw: tuple[Tensor, ...]) -> None:
        entries = []
        for t in raw:
            t = t.detach().contiguous()
            data = t.cpu().view(-1).view(torch.uint8).numpy().tobytes()
            self._f.write(data)
            entries.append((self._offset, len(data), tuple(t.shape), t.dtype))
            self._offset += len(data)
        self.index[i] = (tuple(size), entries)

    def close_writing(self) -> None:
        self._f.close()
        self._mm = np.memmap(self.path, dtype=np.uint8, mode="r") if self._offset else None

    def get(self, i: int, device) -> tuple[tuple[int, int], tuple[Tensor, ...]]:
        size, entries = self.index[i]
        out = []
        for offset, n, shape, dtype in entries:
            buf = torch.from_numpy(np.array(self._mm[offset:offset + n]))  # a copy: the map is read-only
            out.append(buf.view(dtype).view(shape).to(device))
        return size, tuple(out)

    @property
    def nbytes(self) -> int:
        return self._offset

    def remove(self) -> None:
        if not self._f.closed:
            self._f.close()
        self._mm = None
        self.path.unlink(missing_ok=True)


def logit_from_log(log_p: Tensor) -> Tensor:
    """``log p - log(1 - p)`` from ``log p``, stable at both ends (float32 in, float32 out).

    Example:
        >>> logit_from_log(torch.tensor([0.5, 0.9]).log())
        tensor([0.0000, 2.1972])
    """
    lp = log_p.float().clamp(max=-1e-30)  # p = 1 exactly: the top of the range
    return lp - torch.log(-torch.expm1(lp))


def confidence(log_probs: Tensor) -> tuple[Tensor, Tensor]:
    """The classification confidence as a logit, ``logit(max_c P_c)``, and the argmax.
    Shape: (N, C, H, W) -> (N, H, W) float32, (N, H, W) int64."""
    lp_max, pred = log_probs.max(1)
    return logit_from_log(lp_max), pred


def order_key(values: Tensor) -> Tensor:
    """Float32 scores as int64 keys in ``[0, 2**32)`` that sort as the floats do (-0.0 and
    0.0 share a key): the float's bits with the sign bit flipped for positive values, all
    bits flipped for negative ones.

    Example:
        >>> key_value(order_key(torch.tensor([-1.5, 0.0, 2.0])))
        tensor([-1.5000,  0.0000,  2.0000], dtype=torch.float64)
    """
    bits = (values.float() + 0.0).contiguous().view(torch.int32).long()  # + 0.0: -0.0 -> 0.0
    return torch.where(bits >= 0, bits + 2**31, -bits - 1)


def key_value(keys: Tensor) -> Tensor:
    """The float32 values of :func:`order_key` keys, as float64."""
    bits = torch.where(keys >= 2**31, keys - 2**31, -keys - 1)
    return bits.to(torch.int32).view(torch.float32).double()


class TopSelect:
    """Per channel, the exact k-th largest of streamed float32 scores, ``k = ceil(portion *
    n)`` over the channel's n scores: a radix select on :func:`order_key` in two passes
    over the same scores, ``2**16`` counters per channel, on any device.

    Pass 1 counts the high 16 bits of each key and finds, per channel, the bucket holding
    the k-th largest and how many of the scores kept fall in it; pass 2 counts the low 16
    bits of that bucket's scores only, which pins the value. Call :meth:`add` for every
    score of a pass, then :meth:`end_pass` (which sums the counts over DDP ranks, so every
    rank reads the same thresholds), until :attr:`done`. Scores must be the same in both
    passes (the same network in eval mode); were they not, the result stays within the
    pass-1 bucket.

    Args:
        channels: independent selections (e.g. one per class).
        portion: the top portion of each channel's scores to keep.

    Example:
        >>> sel = TopSelect(1, portion=0.5)
        >>> while not sel.done:
        ...     sel.add(torch.tensor([0.05, 0.55, 0.95, 0.97]))
        ...     sel.end_pass()
        >>> sel.thresholds()  # the top half of the values are >= 0.95
        tensor([0.9500], dtype=torch.float64)
    """

    def __init__(self, channels: int = 1, *, portion: float, device: torch.device | str = "cpu"):
        self.channels, self.portion = channels, portion
        self.counts = torch.zeros(channels, 1 << DIGIT, dtype=torch.int64, device=device)
        self.high: Tensor | None = None  # per channel, the pass-1 bucket (-1: nothing to select)
        self.need: Tensor | None = None  # per channel, how many of that bucket's scores are kept
        self.keys: Tensor | None = None  # the result: the k-th largest's key (-1: select nothing)

    @property
    def done(self) -> bool:
        return self.keys is not None

    def add(self, values: Tensor, channel: Tensor | None = None) -> None:
        """Add ``values``, each to selection ``channel[i]`` (0 when None); shapes alike."""
        key = order_key(values.reshape(-1))
        ch = torch.zeros_like(key) if channel is None else channel.reshape(-1).long()
        if self.high is None:
            idx = key >> DIGIT
        else:  # pass 2: the low bits of the scores in each channel's bucket
            inside = (key >> DIGIT) == self.high.to(key.device, non_blocking=True)[ch]
            key, ch = key[inside], ch[inside]
            idx = key & ((1 << DIGIT) - 1)
        n = self.channels << DIGIT
        self.counts += torch.bincount(idx + (ch << DIGIT), minlength=n).view(self.channels, -1)

    def end_pass(self) -> None:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(self.counts)
        counts = self.counts.to("cpu", copy=True)  # (a copy: the counters are reused by pass 2)
        self.counts.zero_()
        tail = counts.flip(1).cumsum(1).flip(1)  # tail[c, b] = scores in buckets >= b
        if self.high is None:  # pass 1: k per channel (rounded first: 0.3 * 10 is 3, not 4)
            k = torch.tensor([math.ceil(round(self.portion * int(n), 6)) for n in counts.sum(1)])
            b = (tail >= k[:, None]).sum(1) - 1  # the highest bucket b with >= k scores in b and above
            above = tail.gather(1, b.clamp(min=0)[:, None])[:, 0] - counts.gather(1, b.clamp(min=0)[:, None])[:, 0]
            self.high = torch.where(k > 0, b, -1)
            self.need = k - above
            if (self.high < 0).all():
                self.keys = torch.full((self.channels,), -1, dtype=torch.int64)
            return
        d = ((tail >= self.need[:, None]).sum(1) - 1).clamp(min=0)
        self.keys = torch.where(self.high >= 0, (self.high << DIGIT) | d, -1)

    def thresholds(self) -> Tensor:
        """Per channel, the k-th largest score (float64, on the CPU); ``inf`` (select
        nothing) for an empty channel or ``portion == 0``."""
        return torch.where(self.keys >= 0, key_value(self.keys.clamp(min=0)), math.inf)


def stats_passes(policy: "ProxyPolicy") -> int:
    """Passes over the target set before the labelling pass: 2 per exact threshold step."""
    return 4 if policy.kind == "adversarial" else 2


@dataclass
class ProxyPolicy:
    """Which pixels become proxy labels (see the module docstring)."""

    kind: str = "class_balanced"
    portion: float = 0.5  # global / class_balanced: the top portion kept; adversarial: p1
    portion2: float = 1.0  # adversarial only: p2, class-balanced portion among A > t1
    max_threshold: float | None = None  # class_balanced only: cap on each t_c, a probability (None: no cap)

    def requested(self) -> float:
        """The portion of pixels the policy asks for (adversarial: about p1 * p2)."""
        return self.portion * (self.portion2 if self.kind == "adversarial" else 1.0)

    def __post_init__(self):
        if self.kind not in POLICIES:
            raise ValueError(f"proxy policy must be one of {POLICIES}, got {self.kind!r}")
        for name in ("portion", "portion2"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"proxy policy {name} must be in [0, 1], got {v}")
        if self.max_threshold is not None:
            if self.kind != "class_balanced":
                raise ValueError(f"proxy policy max_threshold applies to class_balanced only, not {self.kind!r}")
            if not 0.0 < self.max_threshold <= 1.0:
                raise ValueError(f"proxy policy max_threshold must be in (0, 1], got {self.max_threshold}")

    def threshold_cap(self) -> float:
        """``max_threshold`` as a logit (thresholds are logits): ``inf`` without a cap."""
        p = self.max_threshold
        return math.inf if p is None or p >= 1.0 else math.log(p) - math.log1p(-p)


@dataclass
class Thresholds:
    """What the histogram passes found, as logits: ``t`` (global, shape (1,)), per-class
    ``t_class`` (class_balanced: t_c; adversarial: t2), and ``t1`` (adversarial)."""

    t: Tensor | None = None
    t_class: Tensor | None = None
    t1: float | None = None


def label_map(log_probs: Tensor, conf: Tensor | None, policy: ProxyPolicy, th: Thresholds) -> Tensor:
    """Proxy labels (N, H, W) int64 with ``IGNORE``, from log-probabilities (N, C, H, W)
    and, for the adversarial policy, the logit of the confidence A (N, H, W). Pure function
    of its inputs: the equations of the policies, pinned by tests. Thresholds are logits."""
    if policy.kind == "global":
        score, pred = confidence(log_probs)
        keep = score >= th.t.to(score.device, score.dtype)
        return torch.where(keep, pred, torch.full_like(pred, IGNORE))
    # P_c / t_c in logs: log P_c - log sigmoid(t_c); t_c = inf (select nothing) gives -inf
    t_class = th.t_class.to(log_probs.device, torch.float64)
    t_c = t_class.view(1, -1, 1, 1)
    log_t = torch.where(torch.isinf(t_c) & (t_c > 0), torch.full_like(t_c, math.inf),
                        torch.nn.functional.logsigmoid(t_c))
    log_ratio = log_probs.double() - log_t
    _, pred = log_ratio.max(1)
    # Eq. 5: P_l > t2_l at l = argmax_l P_l / t2_l, and A > t1. Compared as the thresholds
    # were taken (the float32 logit of P_l against t_l, one of those logits), so that the
    # kept pixels are exactly the portion; ties at a threshold are kept (>=).
    score_l = logit_from_log(log_probs.gather(1, pred[:, None])[:, 0])
    keep = score_l.double() >= t_class[pred]
    if policy.kind == "adversarial":
        keep &= conf >= th.t1
    return torch.where(keep, pred, torch.full_like(pred, IGNORE))


def compute_thresholds(batches: Callable[[], object], score_fn: ScoreFn, policy: ProxyPolicy,
                       num_classes: int, device: torch.device,
                       confidence_fn: Callable[[object], Tensor] | None = None) -> Thresholds:
    """The exact thresholds, in :func:`stats_passes` passes over the target set: 2 for
    global / class_balanced (every class in the same passes), 4 for adversarial (t1's two,
    then t2's two over the pixels with A >= t1, which need t1 exact). ``batches()`` returns
    a fresh iterator of image batches (on device). ``confidence_fn(images)``, when given,
    gives the confidence logit alone (as ``score_fn``'s second output) for t1's passes."""
    th = Thresholds()
    if policy.kind == "adversarial":
        def adversarial(images):
            conf = confidence_fn(images) if confidence_fn is not None else score_fn(images)[1]
            if conf is None:
                raise ValueError("the adversarial proxy policy needs a confidence map from score_fn")
            return conf, None

        th.t1 = float(_top(batches, adversarial, 1, policy.portion, device)[0])

    def classification(images):
        log_probs, conf = score_fn(images)
        score, pred = confidence(log_probs)
        if policy.kind == "global":
            return score, None
        if policy.kind == "adversarial":  # only the domain-invariant region counts for t2
            sel = conf >= th.t1
            score, pred = score[sel], pred[sel]
        return score, pred

    if policy.kind == "global":
        th.t = _top(batches, classification, 1, policy.portion, device)
    else:
        t = _top(batches, classification, num_classes,
                 policy.portion if policy.kind == "class_balanced" else policy.portion2, device)
        th.t_class = t.clamp(max=policy.threshold_cap())  # the release's cap (inf: none)
    return th


def _top(batches, scores, channels: int, portion: float, device) -> Tensor:
    """The exact top-``portion`` thresholds of ``scores(images) -> (values, channel or
    None)`` over the set, per channel (:class:`TopSelect`: two passes)."""
    sel = TopSelect(channels, portion=portion, device=device)
    with torch.no_grad():
        while not sel.done:
            for images in batches():
                sel.add(*scores(images))
            sel.end_pass()
    return sel.thresholds()


@dataclass
class ProxyStats:
    """Summary of one generation, logged as ``proxy/*``."""

    images: int = 0
    pixels: int = 0
    kept: int = 0
    kept_per_class: list = field(default_factory=list)
    correct: int = 0  # kept pixels that agree with the ground truth, when the set has labels
    judged: int = 0  # kept pixels with a valid ground-truth label
    refocused: int = 0  # adversarial: pixels with A >= t1 (the p1 step)
    seconds: float = 0.0
    cache_bytes: int = 0  # the network outputs kept on disk between the passes
    peak_mem_mb: float = 0.0  # CUDA: peak allocated during the generation; CPU: the process's peak RSS
    thresholds: Thresholds | None = None

    def metrics(self, class_names: list[str] | None = None) -> dict[str, float]:
        out = {"proxy/kept_frac": self.kept / max(1, self.pixels), "proxy/seconds": self.seconds,
               **({"proxy/refocused_frac": self.refocused / max(1, self.pixels)} if self.refocused else {}),
               "proxy/images": float(self.images), "proxy/peak_mem_mb": self.peak_mem_mb,
               "proxy/cache_mb": self.cache_bytes / 2**20}
        if self.judged:
            out["proxy/precision"] = self.correct / self.judged
        th = self.thresholds  # logged as probabilities (sigmoid of the logit thresholds)
        if th is not None and th.t1 is not None:
            out["proxy/t1"] = _sigmoid(th.t1)
        if th is not None and th.t is not None:
            out["proxy/t"] = _sigmoid(float(th.t[0]))
        if class_names and self.kept:
            for name, k in zip(class_names, self.kept_per_class):
                out[f"proxy/class_frac/{name}"] = k / self.kept
        return out


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x > -700 else 0.0


def save_label_png(path: Path, label: np.ndarray, palette: np.ndarray | None = None) -> None:
    """A uint8 label map as an indexed PNG (train ids; palette for viewing), atomically."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(label.astype(np.uint8), mode="P")
    if palette is not None:
        pal = np.zeros((256, 3), dtype=np.uint8)
        pal[: len(palette)] = palette
        img.putpalette(pal.reshape(-1).tolist())
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    img.save(tmp, format="PNG")
    os.replace(tmp, path)


def proxy_path(out_dir: Path, name: str) -> Path:
    return Path(out_dir) / Path(name).with_suffix(".png")


DONE_FILE = "DONE"


def generate(dataset, score_fn: ScoreFn, policy: ProxyPolicy, out_dir: str | Path, *,
             num_classes: int, device: torch.device, to_device=None, num_workers: int = 0,
             progress: bool | None = None, rank: int = 0, world_size: int = 1,
             on_image: Callable[[dict, Tensor], None] | None = None,
             cache: str | Path | None = "auto") -> ProxyStats:
    """Proxy labels for every image of ``dataset`` (eval transform, at the network input
    size), written to ``out_dir/<image name>.png``, with a ``DONE`` file last.

    The histogram passes are sharded over DDP ranks and their counts summed; every rank
    then labels every image (so each rank's training loader finds every file), writing
    atomically. ``on_image(sample, labels)`` sees each labelled image (e.g. for a mosaic).
    Ground truth, when ``dataset`` has labels, is read only to report
    ``proxy/precision``; it never selects anything.

    ``cache``: with a :class:`TwoStageScore`, the file that keeps the network's outputs
    between the passes ("auto": ``out_dir``'s parent, ``.<out_dir name>.scores.<rank>``;
    removed at the end); None runs the network in every pass. ``stats.cache_bytes`` is its
    size.
    """
    from .data import eval_loader

    t0 = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    to_device = to_device or (lambda b: {**b, "image": b["image"].to(device)})
    out_dir = Path(out_dir)

    def batches(shard: bool = True, desc: str = "proxy stats"):
        loader = eval_loader(dataset, batch_size=1, rank=rank if shard else 0,
                             world_size=world_size if shard else 1, num_workers=num_workers)
        from tqdm import tqdm

        show = (rank == 0) if progress is None else (progress and rank == 0)
        return tqdm(loader, desc=desc, unit="img", leave=False, disable=None if show else True)

    kept: ScoreCache | None = None
    if cache is not None and isinstance(score_fn, TwoStageScore):
        path = out_dir.parent / f".{out_dir.name}.scores.{rank}" if cache == "auto" else Path(cache)
        kept = ScoreCache(path)
    try:
        return _generate(dataset, score_fn, policy, out_dir, batches, kept, num_classes=num_classes, device=device,
                         to_device=to_device, rank=rank, world_size=world_size, on_image=on_image, t0=t0)
    finally:
        if kept is not None:
            kept.remove()


def _generate(dataset, score_fn, policy, out_dir, batches, kept: "ScoreCache | None", *, num_classes, device,
              to_device, rank, world_size, on_image, t0) -> ProxyStats:
    from .data.labels import train_palette

    if kept is None:
        def labelling_scores(batch):  # the network on the batch's images
            return score_fn(to_device(batch)["image"])

        th = compute_thresholds(lambda: (to_device(b)["image"] for b in batches()), score_fn, policy,
                                num_classes, device)
    else:
        # the one network pass: every image (the labelling pass needs them all on every rank)
        with torch.no_grad():
            for batch in batches(shard=False, desc="proxy scores"):
                images = to_device(batch)["image"]
                raw = score_fn.raw(images)
                for j, i in enumerate(batch["index"].tolist()):
                    kept.put(int(i), tuple(images.shape[-2:]), tuple(t[j:j + 1] for t in raw))
        kept.close_writing()
        mine = [i for i in sorted(kept.index) if i % world_size == rank]  # this rank's shard, as eval_loader's

        def cached(keys: Tensor):
            size, raw = kept.get(int(keys.view(-1)[0]), device)
            return score_fn.finish(raw, size)

        def cached_confidence(keys: Tensor):
            size, raw = kept.get(int(keys.view(-1)[0]), device)
            return score_fn.finish_confidence(raw, size)

        th = compute_thresholds(lambda: (torch.tensor([i]) for i in mine), cached, policy, num_classes, device,
                                confidence_fn=cached_confidence if score_fn.finish_confidence else None)

        def labelling_scores(batch):  # what the one network pass kept
            return cached(batch["index"])

    stats = ProxyStats(kept_per_class=[0] * num_classes, thresholds=th, cache_bytes=kept.nbytes if kept else 0)
    counts = torch.zeros(num_classes + 1, dtype=torch.int64, device=device)
    judged = torch.zeros(2, dtype=torch.int64, device=device)
    refocused = torch.zeros((), dtype=torch.int64, device=device)
    pal = train_palette(num_classes)
    with torch.no_grad():
        for batch in batches(shard=False, desc="proxy labels"):
            log_probs, conf = labelling_scores(batch)
            lab = label_map(log_probs, conf, policy, th)
            if policy.kind == "adversarial":
                refocused += (conf >= th.t1).sum()
            counts += torch.bincount(torch.where(lab == IGNORE, num_classes, lab).reshape(-1),
                                     minlength=num_classes + 1)
            if "label" in batch:
                gt = batch["label"].to(device)
                if gt.shape[-2:] != lab.shape[-2:]:
                    gt = torch.nn.functional.interpolate(gt[:, None].float(), size=lab.shape[-2:],
                                                         mode="nearest")[:, 0].long()
                ok = (lab != IGNORE) & (gt != IGNORE)
                judged += torch.stack([(ok & (lab == gt)).sum(), ok.sum()])
            lab_np = lab.to(torch.uint8).cpu().numpy()
            for i, name in enumerate(batch["name"]):
                save_label_png(proxy_path(out_dir, name), lab_np[i], pal)
            if on_image is not None:
                on_image(batch, lab.cpu())
            stats.images += lab.shape[0]
    c = counts.cpu().tolist()
    stats.kept_per_class = c[:num_classes]
    stats.kept = sum(c[:num_classes])
    stats.pixels = sum(c)
    stats.correct, stats.judged = judged.cpu().tolist()
    stats.refocused = int(refocused)
    stats.seconds = time.perf_counter() - t0
    if device.type == "cuda":
        stats.peak_mem_mb = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        import resource

        stats.peak_mem_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # every rank wrote every label (its node's run directory may not be shared), so every
    # rank marks the set complete; on a shared folder the writes are the same file's
    done = out_dir / DONE_FILE
    tmp = done.with_name(f".{DONE_FILE}.{os.getpid()}.tmp")
    tmp.write_text(f"{stats.images} images\n")
    os.replace(tmp, done)
    return stats


def is_complete(out_dir: str | Path) -> bool:
    return (Path(out_dir) / DONE_FILE).is_file()


class ProxyLabelled(torch.utils.data.Dataset):
    """A target dataset whose labels are the proxy PNGs of ``label_dir`` (same names).

    The image is resized to the proxy's size before the dataset's (training) transform, so
    augmentations apply to image and proxy jointly. Samples are like the readers'.
    """

    def __init__(self, base, label_dir: str | Path):
        self.base, self.label_dir = base, Path(label_dir)
        self.num_classes = base.num_classes

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key):
        from PIL import Image

        from .data.datasets import i_seed
        from .data.io import read_index_png, read_rgb

        i, seed = key if isinstance(key, tuple) else (key, i_seed(key))
        name = self.base.relname(i)
        label = read_index_png(proxy_path(self.label_dir, name))
        image = read_rgb(self.base.samples[i][0])
        if image.size != (label.shape[1], label.shape[0]):
            image = image.resize((label.shape[1], label.shape[0]), Image.BICUBIC)
        image_t, label_t = self.base.transform(image, label, np.random.default_rng(seed))
        return {"image": image_t, "label": label_t, "name": name, "index": i}


def log_softmax_at(logits: Tensor, size) -> Tensor:
    """Log-softmax of logits upsampled (bilinear, align_corners=True) to ``size``, float32."""
    from .losses import upsample

    return torch.log_softmax(upsample(logits.float(), size), dim=1)


def adversarial_confidence_logit(d_logits: list[Tensor]) -> Tensor:
    """MAT's averaged adversarial confidence A as a logit, from discriminator logits
    (target = 1, so each map's source probability is ``sigmoid(-d)``):
    ``A = mean_i sigmoid(-d_i)``, ``logit(A) = log A - log(1 - A)``, computed with
    log-sigmoids so that saturated discriminators (|d| of 20 and more) keep their ranking.

    Shape: list of (N, 1, H, W) -> (N, H, W) float32.
    """
    d = torch.stack([x.float() for x in d_logits])  # (K, N, 1, H, W)
    F_ = torch.nn.functional
    log_a = torch.logsumexp(F_.logsigmoid(-d), dim=0)  # log(sum_i P_i(source)); the 1/K cancels
    log_1ma = torch.logsumexp(F_.logsigmoid(d), dim=0)
    return (log_a - log_1ma)[:, 0]


def generate_for_run(ctx, data: dict, score_fn: ScoreFn, policy: ProxyPolicy, out_dir: str | Path, *,
                     step: int, mosaic: int = 4) -> ProxyStats | None:
    """Proxy labels of a run's target training set into ``out_dir`` unless a complete set is
    already there on every rank (a resumed run; the ranks decide together, as the passes
    are collective), with ``proxy/*`` metrics and a mosaic (image | ground
    truth when the set has it | proxy) logged through the run's tracker. Returns the stats,
    or None when the labels were already on disk."""
    out_dir = Path(out_dir)
    missing = torch.tensor([0 if is_complete(out_dir) else 1], device=ctx.device)
    if ctx.world_size > 1:  # one decision for all ranks: the histogram passes are collective
        dist.all_reduce(missing, op=dist.ReduceOp.MAX)
    if not missing.item():
        return None
    cfg = ctx.cfg
    rows: list = []

    def keep(batch, lab):
        if len(rows) < mosaic and ctx.rank == 0:
            gt = batch.get("label", torch.full(lab.shape, IGNORE, dtype=torch.long))[0]
            proxy = torch.nn.functional.interpolate(lab[:1, None].float(), size=gt.shape[-2:],
                                                    mode="nearest")[0, 0].long()
            rows.append((batch["image"][0], gt, torch.where(proxy == IGNORE, cfg.data.num_classes, proxy)))

    stats = generate(data["target_eval"], score_fn, policy, out_dir, num_classes=cfg.data.num_classes,
                     device=ctx.device, to_device=ctx.to_device, num_workers=min(2, cfg.run.num_workers),
                     rank=ctx.rank, world_size=ctx.world_size, on_image=keep)
    # The thresholded steps keep their portion exactly, more only by exact ties of equal
    # scores (class-balanced labels may legitimately exceed theirs: a pixel can pass through
    # another class's ratio, or the cap). Clearly more is worth a warning: constant scores.
    frac = (stats.refocused if policy.kind == "adversarial" else stats.kept) / max(1, stats.pixels)
    if ctx.rank == 0 and policy.kind != "class_balanced" and frac > policy.portion + 0.05:
        import warnings

        step_name = "A >= t1" if policy.kind == "adversarial" else "the top portion"
        warnings.warn(f"proxy labels in {out_dir}: {step_name} kept {frac:.1%} of the pixels where the "
                      f"{policy.kind} policy asked for {policy.portion:.1%}: the scores tie at the threshold "
                      f"(near-constant confidences, e.g. an untrained model)", stacklevel=2)
    if ctx.rank == 0 and ctx.tracker is not None:
        from .data.labels import class_names
        from .mosaic import mosaic_png

        ctx.tracker.log_metrics({**stats.metrics(class_names(cfg.data.num_classes)),
                                 "proxy/requested_frac": policy.requested()}, step=step)
        if rows:
            path = mosaic_png(rows, out_dir.parent / f"{out_dir.name}_mosaic.png", norm=cfg.data.norm,
                              num_classes=cfg.data.num_classes, titles=("image", "ground truth", "proxy label"))
            ctx.tracker.log_image(path, key=f"mosaic/{out_dir.name}", step=step)
    return stats
