"""PWW, Table 3 (ablation, GTA5 -> Cityscapes): the pixel-wise weighting maps on top of
output-space adversarial adaptation, 3 seeds, on the embedded benchmark at ``study-cpu``.

    uda-ray study studies/pww_table3.py                 # about 12 minutes on 2 CPU cores
    uda-ray study studies/pww_table3.py --smoke-test    # 2 iterations, 1 seed

Rows (the paper's mIoU, DeepLab-v2 R101 + MRNet's memory module, 150k-iteration runs):

| row                 | paper row                                     | switches                      | paper mIoU |
|---------------------|-----------------------------------------------|-------------------------------|-----------:|
| source_only         | Table 1 "Source only" (the start of the rows) | supervised on source          | 36.6 |
| no_weighting        | "DA without pixel-wise weighting" (MRNet)     | genmap=false, dismap=false    | 45.5 |
| genmap_T1           | "Pixel-wise weighted DA (T = 1)"              | genmap, T=1.0, dismap=false   | 46.5 |
| genmap_T09          | "Pixel-wise weighted DA (T = 0.9)"            | genmap, T=0.9, dismap=false   | 46.8 |
| genmap_T09_dismap   | "Pixel-wise weighted DA (refined w/ DisMap)"  | genmap, T=0.9, dismap (all defaults) | 47.2 |

Every adaptation row starts from the source_only checkpoint of the same seed and runs 300
iterations with the paper's lambda_adv = 5e-4, mu = 0.1 and single-level output-space D
(discriminators at ndf 16, the ``study-cpu`` preset). The baseline of the Δ column is
no_weighting, as the paper's Table 3 reads. The paper's baseline is MRNet (memory
regularisation), which is not part of this platform: here the unweighted row is plain
output-space adversarial adaptation (AdaptSegNet, single level, D logits upsampled to the
input size). Whether the maps help at this scale is a finding, not a target.

Run time (measured at study-cpu, 1 thread): source-only 0.08 s/iter, unweighted and GenMap
rows ~0.17 s/iter, + DisMap ~0.3 s/iter; 15 trials with ~15-20 s Ray overhead each, 2 at a
time: about 2 minutes for the source-only stage and 9-10 minutes for the 12 adaptation trials.
"""

from uda_ray.study import Row, Study

ADAPT = {"run.iterations": 300}

STUDY = Study(
    name="pww_table3",
    base={"preset": "study-cpu"},
    rows=[
        Row("source_only", "source_only", set={"run.iterations": 400}),
        Row("no_weighting", "pww", init_from="source_only",
            set={**ADAPT, "pww.genmap": False, "pww.dismap": False}),
        Row("genmap_T1", "pww", init_from="source_only",
            set={**ADAPT, "pww.genmap": True, "pww.T": 1.0, "pww.dismap": False}),
        Row("genmap_T09", "pww", init_from="source_only",
            set={**ADAPT, "pww.genmap": True, "pww.T": 0.9, "pww.dismap": False}),
        Row("genmap_T09_dismap", "pww", init_from="source_only",
            set={**ADAPT, "pww.genmap": True, "pww.T": 0.9, "pww.dismap": True}),
    ],
    seeds=(0, 1, 2),
    baseline="no_weighting",
    max_concurrent=2,
    smoke={"run.iterations": 2},
)

if __name__ == "__main__":
    raise SystemExit(STUDY.main())
