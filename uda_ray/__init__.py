"""uda-ray: a Ray-distributed ablation and hyperparameter platform for unsupervised
domain-adaptive semantic segmentation.

Importing the package (and its models, data, evaluation and engine) needs torch only:
Ray, Optuna and MLflow are imported where they are used.
"""

__version__ = "0.1.0"
