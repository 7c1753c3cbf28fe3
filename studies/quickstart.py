"""Quickstart: AdaptSegNet under the papers' protocol against source only and against its
lambda = 0 control trained as long, an Optuna search over its adversarial weight, and the
verdicts on three claims, on the embedded benchmark over 3 seeds.

    uda-ray study studies/quickstart.py             # 7.0 minutes on 2 idle CPU cores from a fresh clone (see "Run time")
    uda-ray study studies/quickstart.py --smoke-test

Rows (every adaptation row starts from the ``source_only`` checkpoint of its seed and runs
120 iterations of the ``adaptseg`` method: two-level, vanilla GAN):

| row | what | paper (ResNet-101, GTA5 -> Cityscapes) |
|---|---|---|
| source_only | supervised source training, 400 iterations | 36.6 (DAST Table 1) |
| adaptseg | AdaptSegNet at the paper's weights, lambda_adv 1e-3 (main output) and 2e-4 (auxiliary) | 42.4 (JAL Table 1; 41.4 single-level, DAST Table 1) |
| adaptseg_lambda0 | the control: ``adaptseg`` with lambda_adv = 0 on both outputs, trained as long (the discriminators train, the segmenter gets no adversarial gradient) | - |
| adaptseg_search | 4 Optuna trials on seed 0 over lambda_adv (main output, log-uniform 5e-4 .. 5e-2; the auxiliary tied at a fifth, the paper's ratio), selected on the selection split (``sel/mIoU``, never the reported val), the best re-run on seeds 1 and 2 (seed 0 is its trial) | - |

The paper column is AdaptSegNet's result as the DAST and JAL papers quote it; the claims carry
no paper delta (AdaptSegNet's own paper is not among the project's papers).

The claims are the lesson (``uda-ray compare quickstart`` judges them from the seed-paired
differences: holds, reverses, or not decided at 3 seeds): ``adaptseg`` over ``source_only``
is the paper's comparison, but here it mixes the adversarial term with 120 more iterations of
source training; over ``adaptseg_lambda0`` it is the adversarial term's own. With BatchNorm
frozen, target images passing through the network change nothing, so the control is source
training continued. The search asks what another weight does at this length.

Its numbers: ``uda-ray compare quickstart`` prints the table and the verdicts of the run in
the current MLflow store (no run of it is committed; the note of issue 28 quotes one).

Scale: the ``study-cpu`` preset (the table studies' scale: tiny DeepLab-style segmenter,
160x88 -> 160x80, batch 4, discriminators at ndf 16) with stages a third (source) and
two-fifteenths (adaptation) of the table studies' 1200 and 900 iterations, so that the whole
table fits in minutes on a laptop. Its numbers are not the table studies'
(``studies/README.md``): the quickstart shows the platform end to end (Ray Tune trials,
Optuna, MLflow, the stage store, the compare table and the verdicts) with the control a
claim needs.

Protocol: the papers' (``PAPER_PROTOCOL``, studies/README.md "Protocol": the encoder
pretrained on the embedded ImageNet stand-in, BatchNorm frozen at its statistics). AdaBN
is left out: under frozen BatchNorm it is no control (it collapses, studies/README.md "MAT
Table 3"). ``--variant shared_bn`` runs the earlier regime (random init, BatchNorm shared by
source and target), where every adaptation row gained from target images passing through
BatchNorm alone, recorded as ``quickstart-shared_bn``.

Run time, measured on 2 idle cores from a fresh clone with an empty cache (``git clone``, then
``UDA_RAY_CACHE=$PWD/cache UDA_RAY_STORE=$PWD/stages /usr/bin/time -v uda-ray study
studies/quickstart.py --tracking-uri sqlite:///$PWD/mlflow.db``; the install excluded): 7 min
0 s in all. First use generates the benchmark (under ``data/synth``, 22 s) and the embedded
pretraining domain (7 s), and pretrains the encoder (48 s; uda-ray's cache, README
"Pretraining"); Ray starts (8 s); the 15 trials, 2 at a time, take 5 min 22 s: 3 source-only
runs and 12 adaptation runs (3 seeds of adaptseg and of its control, 4 search trials on seed
0, the best re-run on seeds 1 and 2); the compare table and the verdicts end it. A second run in the same clone skips the first 77 s.
"""

from uda_ray.study import PAPER_PROTOCOL, SHARED_BN, Claim, Row, Study

SOURCE = {"run.iterations": 400}
ADAPT = {"run.iterations": 120}


def adaptseg_space(trial):
    """lambda_adv on the main output, log-uniform from half to 50x the paper's 1e-3: at the
    paper's weight the adversarial gradient is under 1% of the segmentation gradient and
    120 iterations barely tell it from lambda = 0, so the 4 trials (seeded TPE: 2 random,
    then 2 guided) span weights that matter at this length. The auxiliary weight keeps the
    paper's 1:5 ratio."""
    lam = trial.suggest_float("adaptseg.lambda_adv_main", 5e-4, 5e-2, log=True)
    return {"adaptseg.lambda_adv_aux": lam / 5}


CLAIMS = [
    Claim("AdaptSegNet beats source only", better="adaptseg", than="source_only",
          note=f"the paper's comparison; here also {ADAPT['run.iterations']} more training iterations"),
    Claim("AdaptSegNet beats its λ = 0 control", better="adaptseg", than="adaptseg_lambda0",
          note="control: trained as long, no adversarial gradient"),
    Claim("the searched λ_adv beats the paper's", better="adaptseg_search", than="adaptseg"),
]

STUDY = Study(
    name="quickstart",
    base={"preset": "study-cpu", **PAPER_PROTOCOL},
    rows=[
        Row("source_only", "source_only", set=SOURCE),
        Row("adaptseg", "adaptseg", init_from="source_only", set=ADAPT),
        Row("adaptseg_lambda0", "adaptseg", init_from="source_only",
            set={**ADAPT, "adaptseg.lambda_adv_main": 0.0, "adaptseg.lambda_adv_aux": 0.0}),
        Row("adaptseg_search", "adaptseg", init_from="source_only", set=ADAPT,
            space=adaptseg_space, num_samples=4),
    ],
    seeds=(0, 1, 2),
    baseline="source_only",
    max_concurrent=2,
    smoke={"run.iterations": 2},
    variants={"shared_bn": SHARED_BN},
    claims=CLAIMS,
)

if __name__ == "__main__":
    raise SystemExit(STUDY.main())
