"""Strategic curriculum of proxy labels (Chitta, Feng and Hebert, 2018): self-training on
mixed source/target batches with a two-decoder ensemble that sorts pixels into easy
(the decoders agree) and hard (they disagree).

The model is a shared encoder with two PPM decoders (``model.arch`` r18_ppm, the paper's
dilated ResNet-18, or tiny_ppm on a CPU, with ``model.num_decoders=2``). Steps of one
iteration:

  1. mix the batch: of the B images of the iteration, ``n_s`` come from the engine's
     source batch and ``B - n_s`` from its target batch, with ``n_s / B`` the
     source-to-target ratio gamma (linear 0.9 -> 0.1 over the first half of training,
     Sec. 4.2);
  2. source part: both decoders on the labelled source images; with ``source_hard``,
     randomly drop (ignore) the easy pixels at the hard ratio (linear 0 -> 1 over the
     first half, Sec. 4.3);
  3. target part: proxy labels from the network's own (detached) average prediction; with
     ``target_easy``, drop the pixels where the decoders disagree;
  4. Eq. 4: the cross-entropy of each decoder over the retained pixels F of both parts
     (class-weighted with ``weighted_loss``), summed over the two decoders, plus
     ``beta`` times the similarity of the decoders' flattened filters; one SGD step.

Evaluation averages the two decoders' logits before the softmax (Sec. 3.2); the agreement
map of the decoders is drawn next to the prediction in ``mosaic.png``.

Choices where the paper is silent or ambiguous (each a knob where people could differ):

- Mixing (``mix_rounding``): the engine hands over a full source and a full target batch
  of B images each; the first ``n_s`` source images and the first ``B - n_s`` target
  images form the iteration's batch. ``n_s`` is gamma * B rounded *stochastically*
  (floor, plus one with probability of the fraction, drawn from a generator seeded by
  (run.seed, step), so a resumed run draws the same): over iterations the ratio is then
  gamma exactly. Nearest rounding ("nearest") at B = 4 would give 0 source images for
  the whole second half (gamma = 0.1 -> 0.4 -> 0), where the paper keeps 10% source.
  The source and target parts are forwarded separately (their image sizes may differ,
  and per-domain BatchNorm needs separate calls), so shared BN sees per-part statistics.
- Proxy labels are taken online from the same forward pass (train mode) as the loss:
  the argmax of the average of the two decoders' logits, detached (Fig. 2: "the network's
  predictions on the easy pixels are used as targets"). Where the decoders agree this is
  their common argmax. Agreement and proxy labels are computed at the input size, after
  the bilinear upsampling the loss uses.
- Normalisation of Eq. 4: each decoder's term is the class-weighted mean over the
  retained pixels of the whole mixed batch (sum of lambda_y * CE over F divided by the sum
  of lambda_y over F), which is what PyTorch's weighted cross-entropy with an ignore index
  gives on the concatenated batch; dropped pixels are ignored, not counted as zeros.
- Similarity penalty (``similarity``): Sec. 3.2 calls it the *cosine similarity* of the
  filters, Eq. 4 writes ``beta * w1^T w2``. Default: w1 and w2 are each decoder's conv
  filters (every Conv2d weight; biases and BatchNorm affine excluded), flattened and
  concatenated, and the penalty is their cosine, signed (no absolute value in Eq. 4), so
  it pushes the decoders towards opposite filters. "abs_cosine" penalises
  anti-alignment too; "dot" is Eq. 4 literally (unnormalised, scales with the weights).
- Source hard mining drops "pixels where the decoders agree" (Sec. 4.3), whatever the
  label; Sec. 3.3 describes the kept hard pixels as those where a decoder errs, which is
  ``source_easy=both_correct`` (easy = both decoders right).
- Schedules (gamma, hard ratio) move linearly per iteration over ``ramp_frac`` of the
  run's schedule horizon (``run.schedule_iterations`` or ``run.iterations``; the paper:
  10 of 20 epochs) and then stay. The learning rate decays with the engine's
  ``poly_epoch`` schedule (Eq. 5, once per target epoch). The paper's optimiser is SGD,
  momentum 0.9, weight decay 1e-4, lr 1e-3 for the encoder and 1e-2 for the decoders:
  ``optim.lr=1e-3``, ``optim.head_lr_mult=10``, ``optim.weight_decay=1e-4``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..knobs import ConfigError, knob
from ..data.labels import IGNORE, class_names
from ..losses import full, upsample
from ..models.batchnorm import bn_domain
from .base import Method

DECODERS = ("main", "dec2")  # logits keys of the two PPM decoders (r18_ppm / tiny_ppm)
PAPER_WEIGHTED_CLASSES = "wall,fence,pole,traffic light,traffic sign,rider"
SIMILARITIES = ("cosine", "abs_cosine", "dot")


@dataclass
class CurriculumConfig:
    weighted_loss: bool = knob(True, "class-weighted loss: curriculum.weighted_classes at class_weight (paper: on)")
    target_easy: bool = knob(True, "target easy mining: drop target pixels where the decoders disagree (paper: on)")
    source_hard: bool = knob(True, "source hard mining: drop easy source pixels at the hard ratio (paper: on)")
    beta: float = knob(0.01, "decoder similarity penalty weight beta, Eq. 4 (paper: 0.01)", lo=0.0)
    similarity: str = knob("cosine", "penalty on the flattened decoder filters w1, w2 (paper text: cosine)",
                           choices=SIMILARITIES)
    weighted_classes: str = knob(PAPER_WEIGHTED_CLASSES, "comma-separated class names whose loss weight is "
                                 "class_weight (paper: wall, fence, pole, traffic light, traffic sign, rider)")
    class_weight: float = knob(2.0, "loss weight lambda of the weighted classes, others 1 (paper: 2)", lo=0.0)
    gamma_start: float = knob(0.9, "source-to-target ratio gamma at the start (paper: 0.9)", lo=0.0, hi=1.0)
    gamma_end: float = knob(0.1, "gamma at the end of the ramp, then kept (paper: 0.1)", lo=0.0, hi=1.0)
    hard_ratio_start: float = knob(0.0, "share of easy source pixels dropped at the start (paper: 0)", lo=0.0, hi=1.0)
    hard_ratio_end: float = knob(1.0, "share dropped at the end of the ramp, then kept (paper: 1)", lo=0.0, hi=1.0)
    ramp_frac: float = knob(0.5, "fraction of the schedule horizon over which gamma and the hard ratio move "
                                 "linearly (paper: 10 of 20 epochs)", lo=0.0, hi=1.0)
    mix_rounding: str = knob("stochastic", "images from the source: gamma*B rounded stochastically (the ratio "
                                           "is gamma on average) or to the nearest", choices=("stochastic", "nearest"))
    source_easy: str = knob("agree", "easy source pixels for hard mining: the decoders agree (Sec. 4.3) or "
                                     "both are correct (Sec. 3.3)", choices=("agree", "both_correct"))


# --- the paper's pieces, as small functions ---------------------------------------------------

def class_weights(names_csv: str, weight: float, num_classes: int) -> Tensor:
    """The loss weighting vector lambda (Sec. 3.3): ``weight`` for the named classes, 1
    for the others.

    Raises:
        ConfigError: a name that is not a class of the label space (naming the knob).

    Example:
        >>> class_weights("wall,rider", 2.0, 19)[[2, 3, 12]].tolist()
        [1.0, 2.0, 2.0]
    """
    names = class_names(num_classes)
    chosen = [n.strip() for n in names_csv.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in names]
    if unknown:
        raise ConfigError(f"curriculum.weighted_classes: {unknown} are not classes of the {num_classes}-class "
                          f"label space {list(names)}")
    lam = torch.ones(num_classes)
    lam[[names.index(n) for n in chosen]] = weight
    return lam


def decoder_filters(decoder: nn.Module) -> Tensor:
    """w: every Conv2d filter of a decoder, flattened and concatenated (Sec. 3.2)."""
    return torch.cat([m.weight.flatten() for m in decoder.modules() if isinstance(m, nn.Conv2d)])


def decoder_similarity(dec1: nn.Module, dec2: nn.Module, kind: str = "cosine") -> Tensor:
    """The decoder similarity penalty of Eq. 4 without beta, in float32: ``cosine`` is
    w1^T w2 / (|w1| |w2|), ``abs_cosine`` its absolute value, ``dot`` w1^T w2."""
    w1, w2 = full(decoder_filters(dec1)), full(decoder_filters(dec2))
    dot = torch.dot(w1, w2)
    if kind == "dot":
        return dot
    cos = dot / (w1.norm() * w2.norm()).clamp_min(1e-12)
    if kind == "cosine":
        return cos
    if kind == "abs_cosine":
        return cos.abs()
    raise ValueError(f"similarity must be one of {SIMILARITIES}, got {kind!r}")


def proxy_labels(logits1: Tensor, logits2: Tensor, *, easy: bool) -> tuple[Tensor, Tensor]:
    """Self-training targets from the two decoders: the argmax of their average logits;
    with ``easy`` (target easy mining), IGNORE where their argmaxes disagree.

    Shape: logits (N, C, H, W) -> proxy labels (N, H, W) int64, agreement (N, H, W) bool.
    """
    agree = logits1.argmax(1) == logits2.argmax(1)
    proxy = (logits1 + logits2).argmax(1)
    if easy:
        proxy = proxy.masked_fill(~agree, IGNORE)
    return proxy, agree


def drop_easy(label: Tensor, easy: Tensor, ratio: float, *, generator: torch.Generator | None = None) -> Tensor:
    """Source hard mining: each easy pixel is dropped (set to IGNORE) with probability
    ``ratio``; hard pixels are kept.

    Shape: label (N, H, W) int64, easy (N, H, W) bool -> label (N, H, W).
    """
    if ratio <= 0:
        return label
    u = torch.rand(label.shape, device=label.device, generator=generator)
    return label.masked_fill(easy & (u < ratio), IGNORE)


def linear_ramp(step: int, ramp_steps: float, start: float, end: float) -> float:
    """``start`` -> ``end`` linearly over ``ramp_steps`` steps, then ``end`` (gamma and the
    hard-mining ratio, Sec. 4.2-4.3)."""
    t = min(step / ramp_steps, 1.0) if ramp_steps > 0 else 1.0
    return start + (end - start) * t


def num_source(gamma: float, batch: int, *, rounding: str, seed: int = 0, step: int = 0) -> int:
    """Images of the iteration's batch taken from the source: gamma * B rounded to the
    nearest (halves up) or stochastically with a generator seeded by (seed, step)."""
    x = gamma * batch
    if rounding == "nearest":
        return min(batch, int(math.floor(x + 0.5)))
    frac = x - math.floor(x)
    up = np.random.default_rng((seed, step)).random() < frac
    return min(batch, int(math.floor(x)) + int(up))


def weighted_ce(logits: Tensor, label: Tensor, lam: Tensor) -> tuple[Tensor, Tensor]:
    """Sum over the kept pixels (label != IGNORE) of lambda_y * CE, and the sum of their
    lambda_y (the normaliser). float32.

    Shape: logits (N, C, H, W) at the label size, label (N, H, W), lam (C,) -> two scalars.
    """
    ce = F.cross_entropy(full(logits), label, ignore_index=IGNORE, reduction="none")
    kept = label != IGNORE
    w = lam[label.masked_fill(~kept, 0)] * kept
    return (w * ce).sum(), w.sum()


# --- the method ---------------------------------------------------------------------------------

class Curriculum(Method):
    name = "curriculum"
    config = CurriculumConfig

    def __init__(self, cfg, model, ctx):
        super().__init__(cfg, model, ctx)
        heads = getattr(model, "heads", {})
        if set(heads.keys()) != set(DECODERS):
            raise ConfigError(
                f"model.num_decoders: curriculum needs a shared encoder with two decoders: model.arch r18_ppm or "
                f"tiny_ppm with model.num_decoders=2 (got model.arch={cfg.model.arch}, "
                f"model.num_decoders={cfg.model.num_decoders})")
        p = self.p
        lam = class_weights(p.weighted_classes, p.class_weight, cfg.data.num_classes)
        self.lam = (lam if p.weighted_loss else torch.ones_like(lam)).to(ctx.device)
        self.ramp_steps = p.ramp_frac * (cfg.run.schedule_iterations or cfg.run.iterations)
        self.opt_g.schedule = "poly_epoch"  # Eq. 5: poly decay once per epoch

    def gamma(self, step: int) -> float:
        return linear_ramp(step, self.ramp_steps, self.p.gamma_start, self.p.gamma_end)

    def hard_ratio(self, step: int) -> float:
        return linear_ramp(step, self.ramp_steps, self.p.hard_ratio_start, self.p.hard_ratio_end)

    def train_step(self, src, tgt, step):
        model, p = self.model, self.p
        self.zero_grad()
        # 1. mix the batch: n_s source images, B - n_s target images
        batch = src["image"].shape[0]
        gamma = self.gamma(step)
        n_s = num_source(gamma, batch, rounding=p.mix_rounding, seed=self.cfg.run.seed, step=step)
        n_t = batch - n_s
        dev = self.ctx.device
        zero = torch.zeros((), device=dev)
        # filled on the device (torch.full), not copied from the host: a pageable host-to-device
        # copy waits for the queue on CUDA
        logs = {"curriculum/gamma": torch.full((), gamma, device=dev),
                "curriculum/n_src": torch.full((), float(n_s), device=dev),
                "curriculum/hard_ratio": torch.full((), self.hard_ratio(step) if p.source_hard else 0.0, device=dev)}
        parts = {}  # domain -> (logits of each decoder at the label size, labels with F's pixels kept)

        # 2. source part; source hard mining drops easy pixels at the hard ratio
        if n_s:
            label = src["label"][:n_s]
            with bn_domain(model, "source"), self.ctx.autocast():
                out = model(src["image"][:n_s])
            logits = [full(upsample(out.logits[k], label.shape[-2:])) for k in DECODERS]
            pred = [lg.detach().argmax(1) for lg in logits]
            labelled = label != IGNORE
            agree = pred[0] == pred[1]
            easy = agree if p.source_easy == "agree" else (pred[0] == label) & (pred[1] == label)
            if p.source_hard:
                label = drop_easy(label, easy, self.hard_ratio(step))
            parts["src"] = (logits, label)
            n_lab = labelled.sum().clamp_min(1)
            logs["mining/agree_src"] = (agree & labelled).sum() / n_lab
            logs["mining/kept_src"] = (label != IGNORE).sum() / n_lab

        # 3. target part: proxy labels from the network's own average prediction;
        #    target easy mining drops the pixels where the decoders disagree
        if n_t:
            images = tgt["image"][:n_t]
            with bn_domain(model, "target"), self.ctx.autocast():
                out = model(images)
            logits = [full(upsample(out.logits[k], images.shape[-2:])) for k in DECODERS]
            proxy, agree = proxy_labels(logits[0].detach(), logits[1].detach(), easy=p.target_easy)
            parts["tgt"] = (logits, proxy)
            logs["mining/agree_tgt"] = agree.float().mean()
            logs["mining/kept_tgt"] = (proxy != IGNORE).float().mean()

        # 4. Eq. 4: sum over the decoders of the weighted CE over F (both parts), + beta * sim
        sums = {d: [weighted_ce(lg, lab, self.lam) for lg in logits] for d, (logits, lab) in parts.items()}
        norm = sum(s[0][1] for s in sums.values()).clamp_min(1e-6)  # sum of lambda_y over F
        loss_seg = sum(sum(num for num, _ in s) for s in sums.values()) / norm
        sim = decoder_similarity(model.heads[DECODERS[0]], model.heads[DECODERS[1]], p.similarity)
        loss = loss_seg + p.beta * sim
        loss.backward()
        self.step()
        for d, key in (("src", "loss/seg_src"), ("tgt", "loss/self_tgt")):  # per decoder, mean over its part
            s = sums.get(d)
            logs[key] = (0.5 * (s[0][0] + s[1][0]) / s[0][1].clamp_min(1e-6)).detach() if s else zero
        # 0 on iterations without images of that domain (every logged key is present every
        # step), so a logging window's mean counts them as 0 and reads low when gamma is
        # small: at gamma 0.1 with B = 4, 60% of iterations have no source image
        logs.setdefault("mining/agree_src", zero)
        logs.setdefault("mining/kept_src", zero)
        logs.setdefault("mining/agree_tgt", zero)
        logs.setdefault("mining/kept_tgt", zero)
        logs["loss/sim"] = sim.detach()
        logs["loss/total"] = loss.detach()
        return logs

    def _decoder_logits(self, images: Tensor) -> list[Tensor]:
        with bn_domain(self.model, "target"), self.ctx.autocast():
            out = self.model(images)
        return [full(out.logits[k]) for k in DECODERS]

    @torch.no_grad()
    def predict(self, images: Tensor) -> Tensor:
        """The decoders' logits averaged before the softmax (Sec. 3.2)."""
        l1, l2 = self._decoder_logits(images)
        return 0.5 * (l1 + l2)

    @torch.no_grad()
    def mosaic_maps(self, images: Tensor) -> dict[str, Tensor]:
        """The agreement map of the decoders (white: easy, black: hard), at the input size."""
        l1, l2 = (upsample(lg, images.shape[-2:]) for lg in self._decoder_logits(images))
        return {"agreement": (l1.argmax(1) == l2.argmax(1)).float()}
