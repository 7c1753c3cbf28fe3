"""Datasets in their real on-disk layouts, joint transforms, seeded paired iteration, and the
embedded synthetic benchmark."""

from .datasets import DATASETS, BDD100k, Cityscapes, GTA5, Problem, SegDataset, Synthia, build_dataset
from .io import DatasetError
from .loader import InfiniteSampler, PairedBatches, eval_loader, train_loader
from .transforms import JointTransform

__all__ = [
    "DATASETS", "BDD100k", "Cityscapes", "GTA5", "Problem", "SegDataset", "Synthia", "build_dataset",
    "DatasetError", "InfiniteSampler", "PairedBatches", "eval_loader", "train_loader", "JointTransform",
]
