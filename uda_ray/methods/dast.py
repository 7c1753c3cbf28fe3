"""DAST (Yu et al., AAAI 2021): discriminator attention (a discoverer D on intermediate
features, a corrector C on outputs, attention alpha = |D(f_t)|) and self-training.

Overall loss: L_seg + lambda_d L^D_adv + lambda_c L^C_adv + mu L_p_seg (lambda_d = lambda_c
= 0.01, mu = 1), least-squares adversarial losses (LSGAN). The segmenter S = P o E is split
at the classifier head: f = E(x) is the feature the head reads (layer4 for DeepLab), P the
ASPP head.

One iteration:
  1. segmentation on source: L_seg = CE(P(f_s), y_s);
  2. target with D and C frozen: the discoverer's adversarial term (D(f_t) - 0)^2; the
     attention alpha = |D(f_t)| and f_t' = f_t + f_t * expand(tanh(alpha)); p_t = P(f_t');
     the corrector's term (C(p_t) - 0)^2 weighted per location by alpha; with
     self-training, mu CE(p_t, pseudo labels);
  3. D on detached f_s (-> 0) and f_t (-> 1); C on detached softmax(p_s) (-> 0) and
     softmax(p_t) (-> 1).

Self-training (Algorithm 1): ``dast.self_training`` runs ``dast.rounds`` rounds over the
run's iterations; at the start of each the current model labels the top ``dast.q`` portion
of the target pixels (the shared proxy module), and the round trains with the three losses
above plus mu L_p_seg. The DA-only model is the usual ``init_from`` of that run; its
discoverer and corrector are loaded from the same checkpoint and trained on (a fresh
discoverer would change the attention the DA model was trained with).

Choices where the paper is silent:
- Gradients flow through alpha into E (D frozen): the paper's tanh "to prevent the
  gradient explosion" only makes sense if they do.
- The corrector's loss is weighted by alpha itself (detached), average-pooled to C's
  output grid; only the segmenter's side of L^C is weighted (C's own loss is not).
- ``dast.test_attention``: the released code applies the attention on the target path at
  test time as well (the default here); false predicts with P(f) as on source.
- ``dast.pseudo``: the paper's "top q of pixels with higher probability" is one global
  threshold (``global``); the release, built on BDL's code, thresholds each predicted
  class at its own top q (``class_balanced``) and caps those thresholds at a probability
  of 0.9 (``thres[thres > 0.9] = 0.9``): ``dast.max_threshold`` (1 turns the cap off; it
  does nothing with ``global``). On saturated predictions the cap keeps more than q.
- The discoverer reads ``f`` before the attention; without ``dast.attention`` (Table 3's
  "+MSE+2D") D still aligns f but neither reweights f nor C's loss.

Across methods: ``dast.pseudo=adversarial`` labels each round with MAT's adversarial-
confidence proxies (Shen et al., Eq. 5; the shared proxy policy) instead of the top q:
t1 keeps the top ``dast.p1`` of the target pixels by the adversarial confidence A, t2 the
class-balanced top ``dast.p2`` among them. A is the mean "source" probability of DAST's own
discriminators, the round's corrector C (on the softmax output) and, with ``two_disc``, its
discoverer D (on f), each upsampled to the input size, as MAT averages its D1 and D2.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..knobs import ConfigError, knob
from ..losses import SOURCE, TARGET, full, gan_loss, seg_loss, upsample
from ..models import FeatureDiscriminator, PatchDiscriminator
from ..models.batchnorm import bn_domain
from ..proxy import (ProxyLabelled, ProxyPolicy, TwoStageScore, adversarial_confidence_logit, generate_for_run,
                     log_softmax_at)
from .base import Method, discriminator_optimizer, set_requires_grad


@dataclass
class DASTConfig:
    mse: bool = knob(True, "least-squares adversarial losses (Table 3 '+MSE'); false: BCE (the baseline)")
    two_disc: bool = knob(True, "the discoverer D aligns intermediate features too (Table 3 '+2D')")
    attention: bool = knob(True, "alpha = |D(f_t)| reweights f_t and the corrector's loss (Table 3 '+Atten.')")
    self_training: bool = knob(False, "rounds of self-training on top-q pseudo labels (DAST vs DA)")
    test_attention: bool = knob(True, "apply the attention on target images at test time (the released code)")
    lambda_d: float = knob(0.01, "weight of the discoverer's adversarial loss (paper 0.01)", lo=0.0)
    lambda_c: float = knob(0.01, "weight of the corrector's adversarial loss (paper 0.01)", lo=0.0)
    mu: float = knob(1.0, "weight of the pseudo-label loss (paper 1)", lo=0.0)
    q: float = knob(0.5, "portion of target pixels kept as pseudo labels (paper 0.5)", lo=0.0, hi=1.0, lo_open=True)
    rounds: int = knob(3, "self-training rounds K over the run's iterations (paper 3)", lo=1)
    pseudo: str = knob("global", "top-q over all pixels (paper text), per predicted class (release), or MAT's "
                                 "adversarial-confidence proxies (a cross-method row: dast.p1, dast.p2)",
                       choices=("global", "class_balanced", "adversarial"))
    p1: float = knob(0.6, "pseudo=adversarial: portion kept by the adversarial confidence of C and D, MAT's t1 "
                          "(MAT paper 0.6)", lo=0.0, hi=1.0, lo_open=True)
    p2: float = knob(0.8, "pseudo=adversarial: class-balanced portion among those, MAT's t2 (MAT paper 0.8)",
                     lo=0.0, hi=1.0, lo_open=True)
    max_threshold: float = knob(0.9, "class_balanced: cap on each class's threshold, a probability (release 0.9; "
                                     "1 = no cap)", lo=0.0, hi=1.0, lo_open=True)
    ndf: int = knob(64, "corrector width (paper 64: 64-128-256-512-1)", lo=1)
    d_width: int = knob(256, "discoverer width (paper 256: 256-128-64-1, 3x3, stride 1)", lo=4)


class DAST(Method):
    name = "dast"
    config = DASTConfig

    def __init__(self, cfg, model, ctx):
        super().__init__(cfg, model, ctx)
        p = self.p
        if p.attention and not p.two_disc:
            raise ConfigError("dast.attention: needs dast.two_disc=true (alpha comes from the discoverer)")
        from ..models.segmenters import Segmenter

        # S = P o E is split at the main head: the segmenter must be "backbone features ->
        # heads" (the DeepLab family and the tiny model), not an encoder-decoder
        if "main" not in getattr(model, "head_inputs", {}) or type(model).forward is not Segmenter.forward:
            raise ConfigError(f"model.arch: DAST needs a DeepLab-style segmenter whose main head reads a backbone "
                              f"feature (deeplabv2_r101, deeplabv2_vgg16, tiny), got {cfg.model.arch!r}")
        self.feature = model.head_inputs["main"]
        self.gan = "ls" if p.mse else "vanilla"
        c = cfg.data.num_classes
        self.corrector = PatchDiscriminator(c, ndf=p.ndf).to(ctx.device)
        w = p.d_width
        self.discoverer = (FeatureDiscriminator(model.feature_channels[self.feature], widths=(w, w // 2, w // 4),
                                                kernel_size=3, stride=1).to(ctx.device) if p.two_disc else None)
        self.discs = [d for d in (self.discoverer, self.corrector) if d is not None]
        # Algorithm 1: each stage continues the previous one's D and C (D'_{k+1} <- D'_k); an
        # evaluation-only run with test-time attention needs the trained discoverer.
        self.load_from_init({"corrector": self.corrector,
                             **({"discoverer": self.discoverer} if self.discoverer is not None else {})},
                            required=cfg.run.iterations == 0 and p.attention and p.test_attention)
        self.opt_d = discriminator_optimizer(cfg, self.discs)
        # the model at the start of the current self-training round: it labels the round's
        # targets, and a resumed run regenerates them from it if they are not on disk
        # (and, for MAT's adversarial-confidence proxies, the corrector that scores them)
        kept = {"discoverer": self.discoverer} if self.discoverer is not None else {}
        if p.pseudo == "adversarial":
            kept["corrector"] = self.corrector
        self.generator = (torch.nn.ModuleDict({"model": copy.deepcopy(model),
                                               **{k: copy.deepcopy(v) for k, v in kept.items()}})
                          if p.self_training else None)

    def modules(self):
        mods = {"model": self.model, "corrector": self.corrector}
        if self.discoverer is not None:
            mods["discoverer"] = self.discoverer
        if self.generator is not None:
            mods["generator"] = self.generator
        return mods

    def optimizers(self):
        return {"seg": self.opt_g, "disc": self.opt_d}

    # --- the attention ------------------------------------------------------------------
    def forward_target(self, images, *, attention: bool, model=None, discoverer=None, need_d: bool = True):
        """(logits of the main head, feature f_t, D(f_t) or None, alpha or None)."""
        model, discoverer = model or self.model, discoverer or self.discoverer
        f = model.backbone(images)[self.feature]
        d_out = discoverer(f) if discoverer is not None and (need_d or attention) else None
        alpha = d_out.abs() if attention else None
        f_in = attend(f, alpha) if attention else f
        return model.heads["main"](f_in), f, d_out, alpha

    # --- one iteration --------------------------------------------------------------------
    def train_step(self, src, tgt, step):
        model, p = self.model, self.p
        self.zero_grad()
        set_requires_grad(self.discs, False)
        logs = {}
        # 1. segmentation on source
        with bn_domain(model, "source"), self.ctx.autocast():
            feats_s = model.backbone(src["image"])
            f_s = feats_s[self.feature]
            logits_s = model.heads["main"](f_s)
        loss_seg = seg_loss(logits_s, src["label"])
        self.probe(logs, seg=loss_seg)
        loss_seg.backward()
        logs["loss/seg_src"] = loss_seg.detach()
        size_s, size_t = src["image"].shape[-2:], tgt["image"].shape[-2:]
        prob_s = F.softmax(upsample(full(logits_s.detach()), size_s), dim=1)

        # 2. target, D and C frozen: fool both into "source"; attention; pseudo labels
        with bn_domain(model, "target"), self.ctx.autocast():
            logits_t, f_t, d_t, alpha = self.forward_target(tgt["image"], attention=p.attention)
            prob_t = F.softmax(upsample(full(logits_t), size_t), dim=1)
            c_t = self.corrector(prob_t)
            loss = 0.0
            if d_t is not None:
                adv_d = gan_loss(d_t, SOURCE, self.gan)
                loss = loss + p.lambda_d * adv_d
                logs["loss/adv_tgt_discoverer"] = adv_d.detach()
            weight = F.adaptive_avg_pool2d(full(alpha.detach()), c_t.shape[-2:]) if alpha is not None else None
            adv_c = gan_loss(c_t, SOURCE, self.gan, weight=weight)
            loss = loss + p.lambda_c * adv_c
            logs["loss/adv_tgt_corrector"] = adv_c.detach()
            if alpha is not None:
                logs["attention/mean"] = alpha.detach().float().mean()
        self.probe(logs, adv=loss)
        if p.self_training:
            loss_p = seg_loss(logits_t, tgt["label"])
            self.probe(logs, pseudo=p.mu * loss_p)
            loss = loss + p.mu * loss_p
            logs["loss/seg_pseudo"] = loss_p.detach()
        loss.backward()
        set_requires_grad(self.discs, True)

        # 3. discoverer on detached features, corrector on detached outputs: source 0, target 1
        with self.ctx.autocast():
            if self.discoverer is not None:
                loss_d = (gan_loss(self.discoverer(f_s.detach()), SOURCE, self.gan)
                          + gan_loss(self.discoverer(f_t.detach()), TARGET, self.gan))
                loss_d.backward()
                logs["loss/disc_discoverer"] = loss_d.detach()
            loss_c = (gan_loss(self.corrector(prob_s), SOURCE, self.gan)
                      + gan_loss(self.corrector(prob_t.detach()), TARGET, self.gan))
            loss_c.backward()
            logs["loss/disc_corrector"] = loss_c.detach()
        self.step()
        return logs

    # --- self-training rounds ---------------------------------------------------------------
    def phases(self, iterations):
        if not self.p.self_training:
            return [0]
        k = min(self.p.rounds, iterations)
        return [r * iterations // k for r in range(k)]

    def begin_phase(self, k, step, data):
        if not self.p.self_training:
            return None
        out_dir = self.ctx.run_dir / "proxies" / f"round{k}"
        starts = self.phases(self.cfg.run.iterations)
        if step == starts[k]:  # the round starts here: its labels come from the current model
            self.generator["model"].load_state_dict(self.model.state_dict())
            for name in ("discoverer", "corrector"):
                if name in self.generator:
                    self.generator[name].load_state_dict(getattr(self, name).state_dict())
        # a resumed round finds its labels on disk, else they are made again by the generator
        stats = generate_for_run(self.ctx, data, self._score(self.generator), self.policy(), out_dir, step=step)
        if stats is not None and self.ctx.tracker is not None and self.ctx.rank == 0:
            self.ctx.tracker.log_metrics({"proxy/round": float(k)}, step=step)
        return ProxyLabelled(data["target"], out_dir)

    def policy(self) -> ProxyPolicy:
        """The pseudo-label policy: the top q, globally or per predicted class (with the
        release's cap on the class thresholds), or MAT's adversarial confidence."""
        p = self.p
        if p.pseudo == "adversarial":
            return ProxyPolicy("adversarial", portion=p.p1, portion2=p.p2)
        return ProxyPolicy(p.pseudo, portion=p.q,
                           max_threshold=p.max_threshold if p.pseudo == "class_balanced" else None)

    def _score(self, gen):
        """score_fn of the round's generator: log-probabilities as the model predicts them
        (and, for ``pseudo=adversarial``, the logit of C's and D's adversarial confidence)."""
        net, disc = gen["model"], gen["discoverer"] if "discoverer" in gen else None
        corrector = gen["corrector"] if "corrector" in gen else None

        def raw(images):  # the networks, once per image
            was = net.training
            net.eval()
            with torch.no_grad(), bn_domain(net, "target"), self.ctx.autocast():
                logits, _, d_out, _ = self.forward_target(
                    images, attention=self.p.attention and self.p.test_attention, model=net, discoverer=disc,
                    need_d=corrector is not None)
                if corrector is not None:  # C judges the softmax at the input size, as in training
                    c_out = corrector(F.softmax(upsample(full(logits), images.shape[-2:]), dim=1))
            net.train(was)
            if corrector is None:
                return (logits,)
            return (logits, c_out, *((d_out,) if d_out is not None else ()))

        def finish_confidence(outputs, size):
            # A = mean over C (and D) of P(source) = sigmoid(-d), each upsampled to the input size
            return adversarial_confidence_logit([upsample(d.float(), size) for d in outputs[1:]])

        def finish(outputs, size):
            return log_softmax_at(outputs[0], size), finish_confidence(outputs, size) if len(outputs) > 1 else None

        return TwoStageScore(raw, finish, finish_confidence if corrector is not None else None)

    # --- evaluation ---------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, images):
        with bn_domain(self.model, "target"), self.ctx.autocast():
            logits, _, _, _ = self.forward_target(images, attention=self.p.attention and self.p.test_attention,
                                                  need_d=False)
        return logits.float()

    @torch.no_grad()
    def mosaic_maps(self, images):
        if not self.p.attention:
            return {}
        with bn_domain(self.model, "target"), self.ctx.autocast():
            f = self.model.backbone(images)[self.feature]
            return {"attention": torch.tanh(self.discoverer(f).abs())[:, 0].float()}


def attend(f, alpha):
    """DAST's residual attention: f' = f + f (.) expand(tanh(alpha)), alpha = |D(f)|.
    Shapes: f (N, C, h, w), alpha (N, 1, h, w) -> (N, C, h, w)."""
    return f + f * torch.tanh(alpha)
