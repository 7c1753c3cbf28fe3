"""Shared fixtures: a tiny data tree in the real layouts (GTA5 source, Cityscapes target), and
uda-ray's cache (``UDA_RAY_CACHE``) in a temporary folder for the whole session, and a stage
store (``UDA_RAY_STORE``) per test."""

import os
import shutil

import pytest

import trees


@pytest.fixture(scope="session", autouse=True)
def uda_ray_cache(tmp_path_factory):
    """Tests never write into the real ~/.cache; one folder for the session, so what a test
    builds on first use (pretrained weights) serves the later ones too."""
    old = os.environ.get("UDA_RAY_CACHE")
    os.environ["UDA_RAY_CACHE"] = str(tmp_path_factory.mktemp("uda-ray-cache"))
    yield os.environ["UDA_RAY_CACHE"]
    if old is None:
        os.environ.pop("UDA_RAY_CACHE", None)
    else:
        os.environ["UDA_RAY_CACHE"] = old


_PASSED = pytest.StashKey[dict]()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    rep = yield
    item.stash.setdefault(_PASSED, {})[rep.when] = rep.passed
    return rep


@pytest.fixture(autouse=True)
def uda_ray_store(tmp_path_factory, monkeypatch, request):
    """Each test has its own stage store (``UDA_RAY_STORE``, outside the test's tmp_path, whose
    contents some tests check): a stage one test trained is never reused by another, and
    nothing is written into the checkout's ./runs. Like a test's tmp_path (pyproject's
    ``tmp_path_retention_policy = "failed"``), it is removed once the test has passed, so the
    suite's checkpoints never pile up on the disk (a whole run wrote about 6 GB)."""
    store = tmp_path_factory.mktemp("stage-store")
    monkeypatch.setenv("UDA_RAY_STORE", str(store))
    yield store
    if request.node.stash.get(_PASSED, {}).get("call", False):
        shutil.rmtree(store, ignore_errors=True)


@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    trees.gta5_tree(root / "gta5", n=6, w=72, h=40)
    trees.cityscapes_tree(root / "cityscapes", split="train", cities=("aachen", "bochum", "bremen"), w=64, h=32)
    trees.cityscapes_tree(root / "cityscapes", split="val", cities=("frankfurt", "lindau"), w=64, h=32)
    return root
