"""A small Optuna search over the strategic curriculum's (Chitta et al., 2018) tunable
weights on the embedded benchmark: the decoder similarity penalty beta (Eq. 4, paper 0.01),
the loss weight of the weighted classes (paper 2) and the final source-to-target ratio
gamma (paper 0.1). 6 trials on seed 0, selected on the selection split (``sel/mIoU``, never
the reported val), then the best configuration over 3 seeds, next to the paper's defaults.

    uda-ray study studies/curriculum_search.py              # about 23 minutes on 2 idle CPU cores (measured with earlier code; 8 after curriculum Table 1, whose stages it reuses)
    uda-ray study studies/curriculum_search.py --smoke-test

Rows (the ``curriculum`` method on ``tiny_ppm`` with two decoders, every row from the
ADE20k stand-in's encoder at the paper's rates, as in ``studies/curriculum_table1.py``,
which also gives the paper's Table 1):

- ``source_only``: gamma fixed at 1, every switch off, 900 iterations (paper Table 1
  "Source only": 24.3 mIoU on GTA5 -> Cityscapes).
- ``curriculum``: the full method at the paper's values, 900 iterations (paper Table 1
  "+ Source hard mining": 40.7 mIoU).
- ``curriculum_search``: the full method with beta, class_weight and gamma_end searched
  (6 trials), the best re-run over the 3 seeds. The paper tuned its hyper-parameters on
  GTA5 -> Cityscapes and kept them for the other tasks; it gives no search ranges.

Expected run time: 3 source-only and 3 curriculum trials, 6 search trials and 3 seed runs
of the best, ~190 s each, 2 at a time: about 25-30 minutes on 2 idle cores.
"""

from uda_ray.study import CURRICULUM_PROTOCOL, Claim, Row, SHARED_BN, Study

MODEL = {"model.arch": "tiny_ppm", "model.num_decoders": 2}
OFF = {"curriculum.weighted_loss": False, "curriculum.target_easy": False, "curriculum.source_hard": False}
ADAPT = {"run.iterations": 900, "optim.lr": 1e-3, "optim.head_lr_mult": 10.0, "optim.weight_decay": 1e-4}


def curriculum_space(trial):
    """beta log-uniform over three decades around the paper's 0.01; the weighted classes'
    loss weight between 1 (no weighting) and 4 (paper 2); the final gamma between 0 (target
    only) and 0.5 (paper 0.1)."""
    trial.suggest_float("curriculum.beta", 1e-3, 1.0, log=True)
    trial.suggest_float("curriculum.class_weight", 1.0, 4.0)
    trial.suggest_float("curriculum.gamma_end", 0.0, 0.5)


# The search's pick against the paper's values (no paper number: the search is ours).
CLAIMS = [
    Claim("the searched β, class weight, γ beat the paper's", better="curriculum_search", than="curriculum"),
]

STUDY = Study(
    name="curriculum_search",
    claims=CLAIMS,
    base={"preset": "study-cpu", **CURRICULUM_PROTOCOL, **MODEL},
    rows=[
        Row("source_only", "curriculum",
            set={**ADAPT, **OFF, "curriculum.gamma_start": 1.0, "curriculum.gamma_end": 1.0}),
        Row("curriculum", "curriculum", set=ADAPT),
        Row("curriculum_search", "curriculum", set=ADAPT,
            space=curriculum_space, num_samples=6),
    ],
    seeds=(0, 1, 2),
    baseline="curriculum",
    max_concurrent=2,
    smoke={"run.iterations": 2},
    variants={"shared_bn": SHARED_BN},
)

if __name__ == "__main__":
    raise SystemExit(STUDY.main())
