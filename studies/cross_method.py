"""Cross-method comparison: the best row of each of the five methods and the two baselines
side by side on the embedded benchmark, 3 seeds, each row exactly as in its own table study.

    uda-ray study studies/cross_method.py               # about 30 minutes on 2 CPU cores
    uda-ray study studies/cross_method.py --smoke-test

Each method's row is the full method of its paper, as in its table study. Where a method's
table or search study selected (on ``sel/mIoU``, never on val) a different row, that row is
here too: ``mat_ft`` (mat_table3 picks fine-tuning on the proxies) and ``dast_tuned``
(dast_search's q and mu). Every row keeps its table study's schedule, so a row here
reproduces its table's row for the same seed (the same config, data and seed):

| row | method | from | as in |
|---|---|---|---|
| source_only | supervised source training (tiny DeepLab-style), 400 iterations | - | baselines of every table |
| adaptseg | AdaptSegNet, two-level, vanilla GAN, 300 iterations | source_only | the AdaptSegNet baseline |
| jal | JAL + WTM on both decoders (Table 4 row 6), 150 iterations | source_only | jal_table4 t4_6_jal_wtm |
| pww | GenMap T = 0.9 + DisMap, 300 iterations | source_only | pww_table3 genmap_T09_dismap |
| dast_da | discriminator attention, 300 iterations | source_only | dast_table4 da |
| dast | DA + 3 rounds of self-training at q = 0.5, 300 iterations | dast_da | dast_table4 dast_q50 |
| mat_source | source training of the MAT encoder-decoder (``mat_tiny``), 400 iterations | - | mat_table3 source_only |
| mat_mul_adv | D1 + D2 adversarial training, 200 iterations at lr 1e-3 | mat_source | mat_table3 mul_adv |
| mat | proxies (p1 0.6, p2 0.8) + retraining, 400 iterations | mat_mul_adv | mat_table3 mul_adv_proxy |
| mat_ms | mat with multi-scale inference | mat | mat_table3 mul_adv_proxy_ms |
| mat_ft | the same proxies, fine-tuning the adapted model (``mat.retrain_from=adapted``) | mat_mul_adv | mat_table3 mul_adv_proxy_ft |
| dast_tuned | dast at dast_search's choice, q = 0.26, mu = 0.13 | dast_da | dast_search st_search |
| curriculum_source | the two-decoder ``tiny_ppm`` on source only, 400 iterations | - | curriculum_table1 source_only |
| curriculum | all three components, 300 iterations | curriculum_source | curriculum_table1 source_hard |

MAT and the curriculum need their own segmenters (an encoder-decoder; two PPM decoders), so
each brings its own source-only row: compare a method with the source-only row of its own
architecture, and the methods with each other through the target-val mIoU.
"""

from uda_ray.study import Row, Study

MAT = {"model.arch": "mat_tiny"}
PPM = {"model.arch": "tiny_ppm", "model.num_decoders": 2}
# dast_search's st_search pick (sel/mIoU over 6 trials on seed 0), as it chose them
DAST_TUNED = {"dast.q": 0.26185908083758713, "dast.mu": 0.13458535776884742}

STUDY = Study(
    name="cross_method",
    base={"preset": "study-cpu"},
    rows=[
        Row("source_only", "source_only", set={"run.iterations": 400}),
        Row("adaptseg", "adaptseg", init_from="source_only", set={"run.iterations": 300}),
        Row("jal", "jal", init_from="source_only", set={"run.iterations": 150, "jal.wtm_lr": 4e-3}),
        Row("pww", "pww", init_from="source_only", set={"run.iterations": 300}),
        Row("dast_da", "dast", init_from="source_only", set={"run.iterations": 300}),
        Row("dast", "dast", init_from="dast_da",
            set={"run.iterations": 300, "dast.self_training": True, "dast.rounds": 3, "dast.q": 0.5}),
        Row("mat_source", "source_only", set={**MAT, "run.iterations": 400}),
        Row("mat_mul_adv", "mat", init_from="mat_source", set={**MAT, "run.iterations": 200, "mat.adapt_lr": 1e-3}),
        Row("mat", "mat", init_from="mat_mul_adv", set={**MAT, "run.iterations": 400, "mat.proxy": True}),
        Row("mat_ms", "mat", init_from="mat", set={**MAT, "run.iterations": 0, "mat.proxy": True, "mat.ms": True}),
        Row("mat_ft", "mat", init_from="mat_mul_adv",
            set={**MAT, "run.iterations": 400, "mat.proxy": True, "mat.retrain_from": "adapted"}),
        Row("dast_tuned", "dast", init_from="dast_da",
            set={"run.iterations": 300, "dast.self_training": True, "dast.rounds": 3, **DAST_TUNED}),
        Row("curriculum_source", "curriculum",
            set={**PPM, "run.iterations": 400, "curriculum.weighted_loss": False, "curriculum.target_easy": False,
                 "curriculum.source_hard": False, "curriculum.gamma_start": 1.0, "curriculum.gamma_end": 1.0}),
        Row("curriculum", "curriculum", init_from="curriculum_source",
            set={**PPM, "run.iterations": 300, "optim.lr": 1e-3, "optim.head_lr_mult": 10.0,
                 "optim.weight_decay": 1e-4}),
    ],
    seeds=(0, 1, 2),
    baseline="source_only",
    max_concurrent=2,
    smoke={"run.iterations": 2},
)

if __name__ == "__main__":
    raise SystemExit(STUDY.main())
