"""MAT Table 3 (ablation of the modules) on the embedded benchmark, 3 seeds.

    uda-ray study studies/mat_table3.py                 # 27 minutes on 2 idle CPU cores (measured)
    uda-ray study studies/mat_table3.py --smoke-test

Rows, with the paper's GTA5 -> Cityscapes mIoU (ResNet-101) beside them:

| row | stage (starts from) | Adv | Mul-Adv | Proxy | MS | paper |
|---|---|---|---|---|---|---|
| source_only | source training | | | | | 38.1 |
| adv | adaptation (source_only) | x | | | | 41.5 |
| mul_adv | adaptation (source_only) | x | x | | | 42.7 |
| adv_proxy | proxies + retraining (adv) | x | | x | | 47.1 |
| mul_adv_proxy | proxies + retraining (mul_adv) | x | x | x | | 49.8 (49.6 in the text) |
| mul_adv_proxy_ms | multi-scale inference of mul_adv_proxy | x | x | x | x | 50.4 |

Controls (not in the paper's table): ``adabn`` re-estimates the source model's BatchNorm
statistics on the target (no training), ``adabn_encoder`` the encoder's only
(``adabn.scope=encoder``: under frozen BN the decoder's are the identity the model trained
with, and re-estimating them rescales its activations), ``adapt_no_adv`` runs the adaptation stage's 600
iterations without discriminators (source only, no target images), ``adv_lambda0`` the
``adv`` row with lambda_adv1 = 0 (target images through the shared BatchNorm and D1
trained, but no adversarial gradient reaches the segmenter): together they show how much
of the adaptation stage's gain is the adversarial training and how much the target
BatchNorm statistics and the extra iterations. ``mul_adv_proxy_ft`` retrains on the same
proxies from the adapted model instead of the initial weights (``mat.retrain_from=adapted``,
which the paper tried and found worse with ImageNet weights; the "initial weights" are the
embedded ImageNet stand-in's, see below; random in the ``shared_bn`` variant).

Scale: the ``study-cpu`` preset (tiny encoder-decoder ``mat_tiny`` at 160x80, batch 4),
1200 source iterations, 600 adaptation iterations, 1200 retraining iterations, proxies
with the paper's p1 = 0.6, p2 = 0.8. The paper adapts at a fixed lr of 1e-4 for 10k
iterations after 80k source iterations; 600 iterations at 1e-4 would not move the model, so
the adaptation stage here runs at ``mat.adapt_lr`` = 1e-3 (still fixed). Retraining starts
from the initial weights as in the paper: the encoder pretrained on the embedded ImageNet
stand-in, the decoder and classifier at their initialisation. With frozen BatchNorm the
decoder's BatchNorm layers, which have no pretrained statistics, are the identity.

Protocol: the papers' (``PAPER_PROTOCOL``, studies/README.md "Protocol": the embedded
ImageNet stand-in's encoder, BatchNorm frozen at its statistics), stages 3x the earlier
tables' lengths. ``--variant shared_bn``: the earlier tables' regime as
the control (random init, shared BatchNorm), recorded as ``<study>-shared_bn``.
"""

from uda_ray.study import Claim, PAPER_PROTOCOL, Row, SHARED_BN, Study

MAT = {"model.arch": "mat_tiny"}
ADAPT = {"run.iterations": 600, "mat.adapt_lr": 1e-3}
RETRAIN = {"run.iterations": 1200, "mat.proxy": True}

# The paper's claims (Table 3, ResNet-101 rows), judged by `uda-ray compare` from the seeds; the
# adversarial step is also judged against its λ = 0 control trained as long.
CLAIMS = [
    Claim("Adv beats none", better="adv", than="source_only", paper=3.4),
    Claim("Adv beats none, against its λ = 0 control", better="adv", than="adv_lambda0", paper=3.4,
          note="the paper's step against the control trained as long"),
    Claim("Mul-Adv beats Adv", better="mul_adv", than="adv", paper=1.2),
    Claim("Proxy retraining improves Adv", better="adv_proxy", than="adv", paper=5.6),
    Claim("Proxy retraining improves Mul-Adv", better="mul_adv_proxy", than="mul_adv", paper=7.1),
    Claim("Mul-Adv + Proxy beats Adv + Proxy", better="mul_adv_proxy", than="adv_proxy", paper=2.7),
    Claim("MS inference adds", better="mul_adv_proxy_ms", than="mul_adv_proxy", paper=0.6),
    Claim("retraining from the initial weights beats fine-tuning the adapted model", better="mul_adv_proxy",
          than="mul_adv_proxy_ft", note="the paper's choice, no number"),
]

STUDY = Study(
    name="mat_table3",
    claims=CLAIMS,
    base={"preset": "study-cpu", **PAPER_PROTOCOL, **MAT},
    rows=[
        Row("source_only", "source_only", set={"run.iterations": 1200}),
        Row("adv", "mat", init_from="source_only", set={**ADAPT, "mat.adv": True, "mat.mul_adv": False}),
        Row("mul_adv", "mat", init_from="source_only", set={**ADAPT, "mat.adv": True, "mat.mul_adv": True}),
        Row("adv_proxy", "mat", init_from="adv", set={**RETRAIN, "mat.adv": True, "mat.mul_adv": False}),
        Row("mul_adv_proxy", "mat", init_from="mul_adv", set={**RETRAIN, "mat.adv": True, "mat.mul_adv": True}),
        Row("mul_adv_proxy_ms", "mat", init_from="mul_adv_proxy",
            set={"mat.proxy": True, "mat.ms": True, "run.iterations": 0}),
        # Controls, not in the paper: what the adaptation stage's gain is made of, and the
        # proxies with the paper's other initialisation (fine-tuning the adapted model).
        Row("adabn", "adabn", init_from="source_only"),
        Row("adabn_encoder", "adabn", init_from="source_only", set={"adabn.scope": "encoder"}),
        Row("adapt_no_adv", "mat", init_from="source_only", set={**ADAPT, "mat.adv": False, "mat.mul_adv": False}),
        Row("adv_lambda0", "mat", init_from="source_only",
            set={**ADAPT, "mat.adv": True, "mat.mul_adv": False, "mat.lambda_adv1": 0.0}),
        Row("mul_adv_proxy_ft", "mat", init_from="mul_adv",
            set={**RETRAIN, "mat.adv": True, "mat.mul_adv": True, "mat.retrain_from": "adapted"}),
    ],
    seeds=(0, 1, 2),
    baseline="source_only",
    max_concurrent=2,
    smoke={"run.iterations": 2},
    variants={"shared_bn": SHARED_BN},
)

if __name__ == "__main__":
    raise SystemExit(STUDY.main())
