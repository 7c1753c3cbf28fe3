"""What ``uda-ray``'s parser lists and takes, without importing what defines it: building the
parser and printing ``--help`` import no torch, Ray, MLflow, Optuna or pandas (a leaf module:
it imports nothing of uda_ray).

The names are copies of the registries (:data:`uda_ray.config.METHODS`,
:data:`uda_ray.config.PRESETS`, :data:`uda_ray.data.datasets.DATASETS`), which import the
methods and so torch; ``tests/test_cli_errors.py`` checks that they are the same.
"""

from __future__ import annotations

import argparse

METHOD_NAMES = ("source_only", "adabn", "adaptseg", "mat", "dast", "jal", "pww", "curriculum")
PRESET_NAMES = ("tiny-cpu", "study-cpu", "paper")
DATASET_NAMES = ("gta5", "cityscapes", "synthia", "bdd100k")


def add_study_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``uda-ray study`` (and of a study script run as ``python studies/NAME.py``)."""
    p.add_argument("--smoke-test", action="store_true", help="tiny iterations, one seed, 2 search trials")
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local cluster)")
    p.add_argument("--storage-path", default=None,
                   help="shared storage for checkpoints and Tune state (default: UDA_RAY_STORAGE or ./runs/ray)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: MLflow's, sqlite:///mlflow.db)")
    p.add_argument("--max-concurrent", type=int, default=None, help="trials at once (default: the study's)")
    p.add_argument("--out", default="runs", help="local folder for run directories and the compare table")
    p.add_argument("--variant", default=None,
                   help="run a named variant of the study, recorded as STUDY-VARIANT (e.g. shared_bn: the "
                        "random-init, shared-BatchNorm control of a table study)")
    p.add_argument("--reuse", default="exact", choices=("exact", "never"),
                   help="exact (default): a row x seed whose lineage (config, parent, data, code) is in the stage "
                        "store is taken from it instead of trained; never: train it anyway")
    p.add_argument("--store", default=None,
                   help="the stage store (default: UDA_RAY_STORE, else STORAGE_PATH/stages)")
    p.add_argument("--seeds", default=None, metavar="LIST",
                   help="the seeds of every row instead of the study's, e.g. 0-5 or 0,1,2,7: finished row x seeds "
                        "are skipped, so a finished study gets only the new seeds trained")
    p.add_argument("--add-seeds", type=int, default=0, metavar="N",
                   help="N more seeds after the study's (or --seeds'), e.g. --add-seeds 2 on seeds 0-2 adds 3 and 4")
    p.add_argument("--until-decided", action="store_true",
                   help="after the seeds ran, add seeds to the rows of the study's claims that are not decided "
                        "(their 95%% interval contains 0), a round at a time, until every claim is decided or "
                        "--max-seeds is reached; the stop rule's intervals are corrected for the repeated looks")
    p.add_argument("--max-seeds", type=int, default=6, metavar="K",
                   help="with --until-decided: at most K seeds per claim (default: %(default)s)")
    p.add_argument("--plan", action="store_true",
                   help="print what the study would do (train, reuse, skip) for every row x seed, and the totals; "
                        "runs nothing")
    return p
