"""A small Optuna search over the strategic curriculum's (Chitta et al., 2018) tunable
weights on the embedded benchmark: the decoder similarity penalty beta (Eq. 4, paper 0.01),
the loss weight of the weighted classes (paper 2) and the final source-to-target ratio
gamma (paper 0.1). 6 trials on seed 0, selected on the selection split (``sel/mIoU``, never
the reported val), then the best configuration over 3 seeds, next to the paper's defaults.

    uda-ray study studies/curriculum_search.py              # about 12 minutes on 2 CPU cores
    uda-ray study studies/curriculum_search.py --smoke-test

Rows (the ``curriculum`` method on ``tiny_ppm`` with two decoders; see
``studies/curriculum_table1.py`` for why the adaptation rows start from the source-only
checkpoint of the same seed, and for the paper's Table 1):

- ``source_only``: gamma fixed at 1, every switch off, 400 iterations from scratch (paper
  Table 1 "Source only": 24.3 mIoU on GTA5 -> Cityscapes).
- ``curriculum``: the full method at the paper's values, 300 iterations from source_only
  (paper Table 1 "+ Source hard mining": 40.7 mIoU).
- ``curriculum_search``: the full method with beta, class_weight and gamma_end searched
  (6 trials), the best re-run over the 3 seeds. The paper tuned its hyper-parameters on
  GTA5 -> Cityscapes and kept them for the other tasks; it gives no search ranges.

Expected run time: 3 source-only trials (~100 s each), 6 search trials and 6 seed runs
(~80 s each), 2 at a time: about 10-12 minutes on 2 idle cores.
"""

from uda_ray.study import Row, Study

MODEL = {"model.arch": "tiny_ppm", "model.num_decoders": 2}
OFF = {"curriculum.weighted_loss": False, "curriculum.target_easy": False, "curriculum.source_hard": False}
ADAPT = {"run.iterations": 300, "optim.lr": 1e-3, "optim.head_lr_mult": 10.0, "optim.weight_decay": 1e-4}


def curriculum_space(trial):
    """beta log-uniform over three decades around the paper's 0.01; the weighted classes'
    loss weight between 1 (no weighting) and 4 (paper 2); the final gamma between 0 (target
    only) and 0.5 (paper 0.1)."""
    trial.suggest_float("curriculum.beta", 1e-3, 1.0, log=True)
    trial.suggest_float("curriculum.class_weight", 1.0, 4.0)
    trial.suggest_float("curriculum.gamma_end", 0.0, 0.5)


STUDY = Study(
    name="curriculum_search",
    base={"preset": "study-cpu", **MODEL},
    rows=[
        Row("source_only", "curriculum",
            set={**OFF, "curriculum.gamma_start": 1.0, "curriculum.gamma_end": 1.0, "run.iterations": 400}),
        Row("curriculum", "curriculum", init_from="source_only", set=ADAPT),
        Row("curriculum_search", "curriculum", init_from="source_only", set=ADAPT,
            space=curriculum_space, num_samples=6),
    ],
    seeds=(0, 1, 2),
    baseline="curriculum",
    max_concurrent=2,
    smoke={"run.iterations": 2},
)

if __name__ == "__main__":
    raise SystemExit(STUDY.main())
