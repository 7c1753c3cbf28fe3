"""PWW: pixel-wise weighted adversarial adaptation (Tian, Qu and Payeur, 2020).

Output-space adversarial adaptation (AdaptSegNet) whose target term is weighted per pixel:

- the generation-confidence map d (Eq. 3): ``d_aligned`` (0.01) where the max softmax
  probability p* of the target prediction exceeds ``T``, ``exp(-p*)`` elsewhere, so that
  well-aligned (confident) pixels are protected from over-adaptation;
- weighted adversarial loss (Eq. 4): the target term of the output-space loss times
  ``(d + mu)``;
- refined by the discrimination confidence (Eq. 6): ``(d + mu) * D^aux(F(x_t))``, where the
  auxiliary discriminator D^aux (three 1x1 convs with LeakyReLU and a 1x1 classifier) is
  trained on the segmenter's final features (Eq. 5) and F is trained to fool it (Eq. 8).

Steps of one iteration (the paper's three alternating updates; gradients are accumulated,
then the segmenter and both discriminators step once, as AdaptSegNet's code does):
  1. segmenter on labelled source, Eq. 7: ``L_seg`` (main + ``lambda_seg_aux`` * aux head);
  2. generator on target, Eq. 8, with D and D^aux frozen: fool D with the weighted target
     term of Eq. 6 and fool D^aux with the target term of Eq. 5, both times ``lambda_adv``;
  3. discriminators, Eq. 9, on detached maps: D on source (label 0, unweighted) and target
     (label 1, weighted by the same map), D^aux on source / target features (0 / 1).

Choices where the paper is silent or ambiguous:

- Domain labels: source 0, target 1 (Eq. 2, and :mod:`uda_ray.losses`). D^aux outputs a
  logit; the map of Eq. 6 is ``sigmoid(D^aux(F(x_t)))``, the "membership of the target
  domain" in [0, 1] (Sec. 4.2): pixels whose features look like target weigh more.
- The generator "maximises" Eqs. 5 and 6 in the non-saturating form of AdaptSegNet's and
  CLAN's code: BCE towards the *source* label on target outputs, with the same weights.
- Both maps are weights, not objectives: they are detached, so no gradient flows through
  p* (the generator could otherwise lower its loss by becoming over-confident) nor through
  D^aux's map. ``genmap_grad=true`` lets the gradient through d (CLAN's code does not
  detach its own map in the generator step). In step 3 the map is a constant of D's loss:
  D^aux learns from Eq. 5 only.
- d is computed online from the current segmenter's target prediction (the abstract: the
  maps "do not introduce additional computations"), not from a frozen source-only copy.
- Switches: ``genmap=false`` drops ``(d + mu)`` (factor 1); ``dismap=false`` drops D^aux
  entirely (no Eq. 5 training, factor 1). Both off is the unweighted baseline of Table 3
  ("DA without pixel-wise weighting"); ``T=1`` is "GenMap T=1" (no pixel can exceed it).
- Sizes: softmax maps and features are upsampled to the input size before D and D^aux
  (Sec. 5.2). D's patch logits (1/32) are upsampled bilinearly to the input size, as in
  CLAN's code which PWW follows, so that the weighted loss is a per-pixel product there.
  D^aux's first 1x1 conv runs at the feature resolution and its output is upsampled: a 1x1
  conv commutes exactly with bilinear upsampling (whose weights sum to 1), so this equals
  upsampling the features first at a fraction of the memory (2048 -> 4*ndf channels).
- Losses are means over pixels (AdaptSegNet's ``BCEWithLogitsLoss``), not normalised by the
  weights; D's loss is the sum of its source and target terms (Eq. 9, no halving).
- Widths: D is AdaptSegNet's ``(ndf, 2ndf, 4ndf, 8ndf)`` 4x4/2 stack; D^aux's widths are
  not given, here ``(4ndf, 2ndf, ndf)`` (DAST's 256/128/64 at ndf=64).
- Levels: one D on the main output (Sec. 4.3, Fig. 3). ``multi_level=true`` adds
  AdaptSegNet's second D on the auxiliary head, weighted by the same per-pixel map.
- D^aux reads the feature the main classifier reads (``model.head_inputs["main"]``, the
  "final feature layer").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..knobs import ConfigError, knob
from ..losses import SOURCE, TARGET, full, seg_loss, upsample
from ..models import FeatureDiscriminator, PatchDiscriminator
from ..models.batchnorm import bn_domain
from .base import Method, discriminator_optimizer, set_requires_grad


@dataclass
class PWWConfig:
    genmap: bool = knob(True, "weight the target adversarial term by (d + mu), Eqs. 3-4 (paper: on)")
    T: float = knob(0.9, "confidence threshold of Eq. 3: d = d_aligned where p* > T (paper: 0.9; 1.0 = GenMap T=1)",
                    lo=0.0, hi=1.0)
    d_aligned: float = knob(0.01, "d on well-aligned pixels, p* > T, Eq. 3 (paper: 0.01)", lo=0.0, hi=1.0)
    mu: float = knob(0.1, "adaptive weight mu added to d, Eq. 4 (paper: 0.1)", lo=0.0)
    dismap: bool = knob(True, "auxiliary feature discriminator D^aux (Eq. 5) refining the map, Eq. 6 (paper: on)")
    lambda_adv: float = knob(5e-4, "lambda_adv of Eq. 8, on L_advII and L_aux (paper: 5e-4)", lo=0.0)
    genmap_grad: bool = knob(False, "let the generator's gradient flow through d (paper: a weight, detached)")
    ndf: int = knob(64, "discriminator width: D (ndf..8ndf, 4x4/2), D^aux (4ndf, 2ndf, ndf, 1x1) (AdaptSegNet: 64)",
                    lo=1)
    multi_level: bool = knob(False, "also adapt the aux head's output with a second weighted D (paper: main only)")
    lambda_adv_aux: float = knob(1e-4, "adversarial weight of the aux output with multi_level (AdaptSegNet 1:5 ratio)",
                                 lo=0.0)
    lambda_seg_aux: float = knob(0.1, "source segmentation weight of the aux head, if any (AdaptSegNet: 0.1)", lo=0.0)


def generation_confidence(prob: Tensor, T: float, d_aligned: float = 0.01) -> Tensor:
    """The generation-confidence map d of Eq. 3.

    ``d = d_aligned`` where ``p* = max_l prob > T``, else ``exp(-p*)``.

    Shape: prob (N, C, H, W) softmax -> (N, 1, H, W).

    Example:
        >>> generation_confidence(torch.tensor([0.95, 0.05]).view(1, 2, 1, 1), 0.9)
        tensor([[[[0.0100]]]])
    """
    p_star = prob.max(dim=1, keepdim=True).values
    return torch.where(p_star > T, torch.full_like(p_star, d_aligned), torch.exp(-p_star))


def pixel_weight(d: Tensor | None, mu: float, dis: Tensor | None) -> Tensor | None:
    """The per-pixel weight of the target term: ``(d + mu)`` (Eq. 4) times the
    discrimination confidence ``dis = D^aux(F(x_t))`` in [0, 1] (Eq. 6). A missing factor is
    1; None when both are missing (the unweighted loss of Eq. 2).

    Shape: (N, 1, H, W) each -> (N, 1, H, W).
    """
    w = None if d is None else d + mu
    if dis is not None:
        w = dis if w is None else w * dis
    return w


def weighted_bce(d_logits: Tensor, domain: float, weight: Tensor | None = None) -> Tensor:
    """Mean over pixels of ``weight * BCE(sigmoid(d_logits), domain)`` (Eqs. 4-6), in float32.

    Shape: d_logits (N, 1, H, W), weight (N, 1, H, W) or None -> scalar.
    """
    d_logits = full(d_logits)
    target = torch.full_like(d_logits, domain)
    if weight is None:
        return F.binary_cross_entropy_with_logits(d_logits, target)
    # an explicit product: the weight may carry a gradient (genmap_grad), which BCE's own
    # ``weight`` argument does not allow
    return (full(weight) * F.binary_cross_entropy_with_logits(d_logits, target, reduction="none")).mean()


def dis_logits(d_aux: FeatureDiscriminator, feat: Tensor, size: tuple[int, int]) -> Tensor:
    """D^aux on features upsampled to ``size``: the first 1x1 conv runs at the feature
    resolution, then its output is upsampled (exactly equal, see the module docstring).

    Shape: feat (N, C_f, h, w) -> (N, 1, *size) logits.
    """
    first, rest = d_aux.net[0], d_aux.net[1:]
    return rest(upsample(first(feat), size))


class PWW(Method):
    name = "pww"
    config = PWWConfig

    def __init__(self, cfg, model, ctx):
        super().__init__(cfg, model, ctx)
        p = self.p
        if p.multi_level and not cfg.model.multi_level:
            raise ConfigError("pww.multi_level: needs model.multi_level=true (an auxiliary head)")
        c = cfg.data.num_classes
        self.levels = ["main", "aux"] if p.multi_level else ["main"]
        self.discs = {lv: PatchDiscriminator(c, ndf=p.ndf).to(ctx.device) for lv in self.levels}
        self.feat_name = model.head_inputs["main"]
        self.d_feat = None
        if p.dismap:
            self.d_feat = FeatureDiscriminator(model.feature_channels[self.feat_name],
                                               widths=(4 * p.ndf, 2 * p.ndf, p.ndf), kernel_size=1,
                                               negative_slope=0.2).to(ctx.device)
        self.all_discs = list(self.discs.values()) + ([self.d_feat] if self.d_feat is not None else [])
        self.opt_d = discriminator_optimizer(cfg, self.all_discs)

    def modules(self):
        mods = {"model": self.model, **{f"d_{lv}": d for lv, d in self.discs.items()}}
        if self.d_feat is not None:
            mods["d_feat"] = self.d_feat
        return mods

    def optimizers(self):
        return {"seg": self.opt_g, "disc": self.opt_d}

    def train_step(self, src, tgt, step):
        self.zero_grad()
        logs, saved = self.generator_step(src, tgt)
        logs.update(self.discriminator_step(**saved))
        self.step()
        return logs

    def weight_map(self, prob_t_main: Tensor, dis_logit_t: Tensor | None) -> tuple[Tensor | None, dict]:
        """Eqs. 3, 4 and 6 on the target's main softmax (at the input size) and D^aux's
        logits; returns the weight (None: unweighted) and its statistics for the logs."""
        p, stats = self.p, {}
        d = None
        if p.genmap:
            d = generation_confidence(prob_t_main if p.genmap_grad else prob_t_main.detach(), p.T, p.d_aligned)
            stats["weight/genmap_mean"] = d.detach().mean()
            stats["weight/aligned_frac"] = (prob_t_main.detach().max(dim=1).values > p.T).float().mean()
        dis = None
        if dis_logit_t is not None:
            dis = torch.sigmoid(full(dis_logit_t)).detach()  # membership of the target domain (Sec. 4.2)
            stats["weight/dismap_mean"] = dis.mean()
        w = pixel_weight(d, p.mu, dis)
        if w is not None:
            stats["weight/mean"] = w.detach().mean()
        return w, stats

    def generator_step(self, src, tgt):
        """Steps 1 and 2: gradients reach the segmenter only (D and D^aux are frozen).
        Returns the logs and what step 3 trains on (detached)."""
        model, p = self.model, self.p
        lambda_adv = {"main": p.lambda_adv, "aux": p.lambda_adv_aux}  # Eq. 8 (aux: multi_level only)
        logs = {}
        set_requires_grad(self.all_discs, False)
        # 1. segmenter on labelled source (Eq. 7)
        with bn_domain(model, "source"), self.ctx.autocast():
            out_s = model(src["image"])
        loss = seg_loss(out_s.logits["main"], src["label"])
        logs["loss/seg_src"] = loss.detach()
        if "aux" in out_s.logits and p.lambda_seg_aux > 0:
            loss_aux = seg_loss(out_s.logits["aux"], src["label"])
            loss = loss + p.lambda_seg_aux * loss_aux
            logs["loss/seg_src_aux"] = loss_aux.detach()
        self.probe(logs, seg=loss)
        loss.backward()
        size_s, size_t = src["image"].shape[-2:], tgt["image"].shape[-2:]
        prob_s = {lv: F.softmax(upsample(full(out_s.logits[lv].detach()), size_s), dim=1) for lv in self.levels}
        feat_s = out_s.features[self.feat_name].detach() if self.d_feat is not None else None

        # 2. generator on target (Eq. 8), D and D^aux frozen: make target softmax maps and
        #    features look like source (label 0), the output-space term weighted per pixel.
        with bn_domain(model, "target"), self.ctx.autocast():
            out_t = model(tgt["image"])
            prob_t = {lv: F.softmax(upsample(full(out_t.logits[lv]), size_t), dim=1) for lv in self.levels}
            loss_adv = 0.0
            dis_logit_t = None
            if self.d_feat is not None:
                dis_logit_t = dis_logits(self.d_feat, out_t.features[self.feat_name], size_t)
                adv_feat = weighted_bce(dis_logit_t, SOURCE)  # target term of Eq. 5
                loss_adv = loss_adv + p.lambda_adv * adv_feat
                logs["loss/adv_feat_tgt"] = adv_feat.detach()
            w, stats = self.weight_map(prob_t["main"], dis_logit_t)  # Eqs. 3, 4, 6
            logs.update(stats)
            for lv in self.levels:
                adv = weighted_bce(upsample(self.discs[lv](prob_t[lv]), size_t), SOURCE, w)  # Eq. 6 target term
                loss_adv = loss_adv + lambda_adv[lv] * adv
                logs[f"loss/adv_tgt_{lv}"] = adv.detach()
        self.probe(logs, adv=loss_adv)
        loss_adv.backward()
        set_requires_grad(self.all_discs, True)
        feat_t = out_t.features[self.feat_name].detach() if self.d_feat is not None else None
        saved = {"prob_s": prob_s, "prob_t": {lv: t.detach() for lv, t in prob_t.items()},
                 "weight": None if w is None else w.detach(), "feat_s": feat_s, "feat_t": feat_t}
        return logs, saved

    def discriminator_step(self, prob_s, prob_t, weight, feat_s, feat_t):
        """Step 3 (Eq. 9): D on detached softmax maps, source -> 0 (unweighted) and target
        -> 1 (weighted by the map of step 2); D^aux on detached features, source -> 0 and
        target -> 1 (Eq. 5). Gradients reach the discriminators only."""
        logs = {}
        with self.ctx.autocast():
            loss_d = 0.0
            for lv in self.levels:
                d = self.discs[lv]
                term = (weighted_bce(upsample(d(prob_s[lv]), prob_s[lv].shape[-2:]), SOURCE)
                        + weighted_bce(upsample(d(prob_t[lv]), prob_t[lv].shape[-2:]), TARGET, weight))
                loss_d = loss_d + term
                logs[f"loss/disc_{lv}"] = term.detach()
            if self.d_feat is not None:
                term = (weighted_bce(dis_logits(self.d_feat, feat_s, prob_s["main"].shape[-2:]), SOURCE)
                        + weighted_bce(dis_logits(self.d_feat, feat_t, prob_t["main"].shape[-2:]), TARGET))
                loss_d = loss_d + term
                logs["loss/disc_feat"] = term.detach()
        loss_d.backward()
        return logs

    @torch.no_grad()
    def mosaic_maps(self, images: Tensor) -> dict[str, Tensor]:
        """The maps of Fig. 2 on validation images: d (genmap) and D^aux's (dismap)."""
        maps = {}
        with bn_domain(self.model, "target"), self.ctx.autocast():
            out = self.model(images)
            size = images.shape[-2:]
            if self.p.genmap:
                prob = F.softmax(upsample(full(out.logits["main"]), size), dim=1)
                maps["genmap"] = generation_confidence(prob, self.p.T, self.p.d_aligned)[:, 0]
            if self.d_feat is not None:
                maps["dismap"] = torch.sigmoid(full(dis_logits(self.d_feat, out.features[self.feat_name], size)))[:, 0]
        return maps
