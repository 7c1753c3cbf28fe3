"""Quickstart: source-only, AdaBN and AdaptSegNet on the embedded benchmark over 3 seeds, and
a small Optuna search over AdaptSegNet's lambda_adv and discriminator learning rate.

    uda-ray study studies/quickstart.py            # about 6 minutes on 2 CPU cores (fresh clone)
    uda-ray study studies/quickstart.py --smoke-test

Short runs at small sizes so that the whole table fits in minutes on a laptop: it shows the
platform end to end (Ray Tune trials, Optuna, MLflow, the compare table),
not converged numbers. ``studies/baselines.py`` runs the same rows at the ``tiny-cpu``
preset's full length.
"""

from uda_ray.study import Row, Study


def adaptseg_space(trial):
    """lambda_adv (main output) and the discriminator learning rate, log-uniform around the
    paper's 1e-3 and 1e-4; the auxiliary weight keeps the paper's 1:5 ratio."""
    lam = trial.suggest_float("adaptseg.lambda_adv_main", 1e-4, 1e-2, log=True)
    trial.suggest_float("optim.d_lr", 1e-5, 1e-3, log=True)
    return {"adaptseg.lambda_adv_aux": lam / 5}


STUDY = Study(
    name="quickstart",
    base={
        "preset": "tiny-cpu",
        "data.source_w": 160, "data.source_h": 88, "data.target_w": 160, "data.target_h": 80,
        "run.iterations": 200, "run.eval_every": 0, "run.checkpoint_every": 0, "run.log_every": 50,
        "run.num_workers": 0, "data.select_n": 50, "run.max_val_images": 0,
    },
    rows=[
        Row("source_only", "source_only"),
        # AdaBN and AdaptSegNet start from the source-only checkpoint of the same seed.
        Row("adabn", "adabn", init_from="source_only"),
        Row("adaptseg", "adaptseg", init_from="source_only", set={"run.iterations": 60}),
        Row("adaptseg_search", "adaptseg", init_from="source_only", set={"run.iterations": 60},
            space=adaptseg_space, num_samples=3),
    ],
    seeds=(0, 1, 2),
    baseline="source_only",
    max_concurrent=2,
    smoke={"run.iterations": 2},
)

if __name__ == "__main__":
    raise SystemExit(STUDY.main())
