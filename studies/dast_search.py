"""DAST: Optuna searches over the adversarial weights (lambda_d, lambda_c) of the
discriminator attention and over the self-training pseudo-label portion q and weight mu,
each best re-run over 3 seeds next to the paper's defaults, on the embedded benchmark.

    uda-ray study studies/dast_search.py                # 45 minutes on 2 CPU cores (measured with earlier code, no early stopping; 15 with it, after the DAST tables and cross-method, whose stages it reuses)
    uda-ray study studies/dast_search.py --smoke-test   # 2 iterations, 1 seed, 2 trials per search

Rows:

- source_only: supervised source training (1200 iterations).
- da: DA at the paper's lambda_d = lambda_c = 0.01, 900 iterations from source_only.
- da_search: 6 trials over lambda_d and lambda_c (log 1e-3 .. 1 each) on seed 0, the
  best re-run over seeds 0-2.
- dast: 3 rounds of self-training at q = 0.5, mu = 1 (the paper's), 900 iterations from da.
- st_search: 6 trials over q (0.2 .. 0.8) and mu (log 0.1 .. 10) from da, the best re-run
  over seeds 0-2.

Selection reads ``sel/mIoU`` (held-out labelled target-train images), never the reported
val split. Scale: ``study-cpu`` (see ``dast_table3.py``).

Early stopping (``asha=True``): each search's trials evaluate the selection split every 300
steps (a third of their 900) and ASHA (reduction factor 3, one per search) stops a trial that
is below the best third of its search's trials at step 300; a stopped trial is recorded
KILLED with a ``pruned`` tag, counted among the 6 and never the best. The rows' seed runs
(and the best's re-runs) are never stopped.

Protocol: the papers' (``PAPER_PROTOCOL``, studies/README.md "Protocol": the embedded
ImageNet stand-in's encoder, BatchNorm frozen at its statistics), stages 3x the earlier
tables' lengths. ``--variant shared_bn``: the earlier tables' regime as
the control (random init, shared BatchNorm), recorded as ``<study>-shared_bn``.
"""

from uda_ray.study import Claim, PAPER_PROTOCOL, Row, SHARED_BN, Study


def da_space(trial):
    """lambda_d and lambda_c from a tenth of the paper's 0.01 up to 1, where the adversarial
    terms are of the segmentation loss's order."""
    trial.suggest_float("dast.lambda_d", 1e-3, 1.0, log=True)
    trial.suggest_float("dast.lambda_c", 1e-3, 1.0, log=True)


def st_space(trial):
    trial.suggest_float("dast.q", 0.2, 0.8)
    trial.suggest_float("dast.mu", 0.1, 10.0, log=True)


DA = {"run.iterations": 900}
ST = {"run.iterations": 900, "dast.self_training": True, "dast.rounds": 3}

# The searches' picks against the paper's values (no paper number: the search is ours).
CLAIMS = [
    Claim("the searched λ_d, λ_c beat the paper's", better="da_search", than="da"),
    Claim("the searched q, μ beat the paper's", better="st_search", than="dast"),
]

STUDY = Study(
    name="dast_search",
    claims=CLAIMS,
    base={"preset": "study-cpu", **PAPER_PROTOCOL},
    rows=[
        Row("source_only", "source_only", set={"run.iterations": 1200}),
        Row("da", "dast", init_from="source_only", set=DA),
        Row("da_search", "dast", init_from="source_only", set=DA, space=da_space, num_samples=6),
        Row("dast", "dast", init_from="da", set=ST),
        Row("st_search", "dast", init_from="da", set=ST, space=st_space, num_samples=6),
    ],
    seeds=(0, 1, 2),
    baseline="source_only",
    max_concurrent=2,
    asha=True,  # search trials judged on sel/mIoU at a third of their iterations (see above)
    smoke={"run.iterations": 2},
    variants={"shared_bn": SHARED_BN},
)

if __name__ == "__main__":
    raise SystemExit(STUDY.main())
