"""Shared fixtures: a tiny data tree in the real layouts (GTA5 source, Cityscapes target)."""

import pytest

import trees


@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    trees.gta5_tree(root / "gta5", n=6, w=72, h=40)
    trees.cityscapes_tree(root / "cityscapes", split="train", cities=("aachen", "bochum", "bremen"), w=64, h=32)
    trees.cityscapes_tree(root / "cityscapes", split="val", cities=("frankfurt", "lindau"), w=64, h=32)
    return root
