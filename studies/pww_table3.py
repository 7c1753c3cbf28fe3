"""PWW, Table 3 (ablation, GTA5 -> Cityscapes): the pixel-wise weighting maps on top of
output-space adversarial adaptation, 3 seeds, on the embedded benchmark at ``study-cpu``.

    uda-ray study studies/pww_table3.py                 # about 42 minutes on 2 idle CPU cores (measured)
    uda-ray study studies/pww_table3.py --smoke-test    # 2 iterations, 1 seed

Rows (the paper's mIoU, DeepLab-v2 R101 + MRNet's memory module, 150k-iteration runs):

| row                 | paper row                                     | switches                      | paper mIoU |
|---------------------|-----------------------------------------------|-------------------------------|-----------:|
| source_only         | Table 1 "Source only" (the start of the rows) | supervised on source          | 36.6 |
| no_weighting        | "DA without pixel-wise weighting" (MRNet)     | genmap=false, dismap=false    | 45.5 |
| genmap_T1           | "Pixel-wise weighted DA (T = 1)"              | genmap, T=1.0, dismap=false   | 46.5 |
| genmap_T09          | "Pixel-wise weighted DA (T = 0.9)"            | genmap, T=0.9, dismap=false   | 46.8 |
| genmap_T09_dismap   | "Pixel-wise weighted DA (refined w/ DisMap)"  | genmap, T=0.9, dismap (all defaults) | 47.2 |
| adv_lambda0         | - (the control: trained as long, no adversarial gradient) | all defaults, lambda_adv = 0 | - |
| uniform_matched     | - (the control: the full method's mean weight, uniform) | genmap=false, dismap=false, lambda_adv = 1e-4 | - |

Every adaptation row starts from the source_only checkpoint of the same seed and runs 900
iterations with the paper's lambda_adv = 5e-4, mu = 0.1 and single-level output-space D
(discriminators at ndf 16, the ``study-cpu`` preset). The baseline of the Δ column is
no_weighting, as the paper's Table 3 reads. The paper's baseline is MRNet (memory
regularisation), which is not part of this platform: here the unweighted row is plain
output-space adversarial adaptation (AdaptSegNet, single level, D logits upsampled to the
input size). ``adv_lambda0`` runs the full method's schedule with lambda_adv = 0 (the
discriminators train, the segmenter gets no adversarial gradient): the gain of an
adaptation row over it is what the adversarial terms add, not the extra iterations.
``uniform_matched`` gives the unweighted loss the full method's mean pixel weight (lambda_adv
= 5e-4 x ~0.2 = 1e-4): the full method's gain over it is what placing the weight pixel by
pixel adds, beyond scaling lambda_adv down. Whether
the maps help at this scale is a finding, not a target.

Run time (measured at study-cpu, 1 thread): source-only 0.08 s/iter, unweighted and GenMap
rows ~0.17 s/iter, + DisMap ~0.3 s/iter; 15 trials with ~15-20 s Ray overhead each, 2 at a
time: at the earlier, 3x shorter stages about 2 minutes for the source-only stage and 9-10
minutes for the 12 adaptation trials; 3x that now, plus the control row.

Protocol: the papers' (``PAPER_PROTOCOL``, studies/README.md "Protocol": the embedded
ImageNet stand-in's encoder, BatchNorm frozen at its statistics), stages 3x the earlier
tables' lengths. ``--variant shared_bn``: the earlier tables' regime as
the control (random init, shared BatchNorm), recorded as ``<study>-shared_bn``.
"""

from uda_ray.study import Claim, PAPER_PROTOCOL, Row, SHARED_BN, Study

ADAPT = {"run.iterations": 900}

# The paper's claims (Table 3, MRNet), judged by `uda-ray compare` from the seeds, and two
# controls: the λ = 0 row, and the unweighted loss at the full method's mean weight.
CLAIMS = [
    Claim("unweighted DA beats source only", better="no_weighting", than="source_only", paper=8.9),
    Claim("GenMap (T = 1) beats no weighting", better="genmap_T1", than="no_weighting", paper=1.0),
    Claim("T = 0.9 beats T = 1", better="genmap_T09", than="genmap_T1", paper=0.3),
    Claim("DisMap refines GenMap", better="genmap_T09_dismap", than="genmap_T09", paper=0.4),
    Claim("the full method beats no weighting", better="genmap_T09_dismap", than="no_weighting", paper=1.7),
    Claim("the adversarial term helps", better="no_weighting", than="adv_lambda0", note="against the λ = 0 control"),
    Claim("the maps' placement beats their mean weight", better="genmap_T09_dismap", than="uniform_matched",
          note="control: the unweighted loss at the full method's mean weight"),
]

STUDY = Study(
    name="pww_table3",
    claims=CLAIMS,
    base={"preset": "study-cpu", **PAPER_PROTOCOL},
    rows=[
        Row("source_only", "source_only", set={"run.iterations": 1200}),
        Row("no_weighting", "pww", init_from="source_only",
            set={**ADAPT, "pww.genmap": False, "pww.dismap": False}),
        Row("genmap_T1", "pww", init_from="source_only",
            set={**ADAPT, "pww.genmap": True, "pww.T": 1.0, "pww.dismap": False}),
        Row("genmap_T09", "pww", init_from="source_only",
            set={**ADAPT, "pww.genmap": True, "pww.T": 0.9, "pww.dismap": False}),
        Row("genmap_T09_dismap", "pww", init_from="source_only",
            set={**ADAPT, "pww.genmap": True, "pww.T": 0.9, "pww.dismap": True}),
        Row("adv_lambda0", "pww", init_from="source_only", set={**ADAPT, "pww.lambda_adv": 0.0}),
        # Control, not in the paper: no maps, lambda_adv scaled to the full method's mean pixel
        # weight (0.18-0.21 under the papers' protocol): the same total adversarial weight,
        # spread uniformly instead of pixel-wise.
        Row("uniform_matched", "pww", init_from="source_only",
            set={**ADAPT, "pww.genmap": False, "pww.dismap": False, "pww.lambda_adv": 1e-4}),
    ],
    seeds=(0, 1, 2),
    baseline="no_weighting",
    max_concurrent=2,
    smoke={"run.iterations": 2},
    variants={"shared_bn": SHARED_BN},
)

if __name__ == "__main__":
    raise SystemExit(STUDY.main())
