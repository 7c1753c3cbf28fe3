"""The embedded pretraining domain and ``uda-ray pretrain``: determinism, layouts, the cache,
loading the encoder like ImageNet weights, frozen BatchNorm at its statistics, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from uda_ray import pretrain
from uda_ray.cli import main
from uda_ray.config import ConfigError, build_config
from uda_ray.data import DatasetError
from uda_ray.data import synth_pretrain as sp
from uda_ray.models import build_segmenter

SMALL = {"n_cls_train": 6, "n_cls_val": 2, "n_seg_train": 12, "n_seg_val": 4}
FAST = {"embedded": {"iterations": 3, "batch_size": 8}, "embedded_seg": {"iterations": 2, "batch_size": 2}}


def files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small_weights(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain")
    seg = pretrain.ensure_weights(root, "embedded_seg", progress=False, data_counts=SMALL, recipes=FAST)
    return root, pretrain.weights_file(root, "embedded"), seg


def test_domain_is_byte_identical_for_any_workers_and_in_the_real_layouts(tmp_path):
    sp.generate(tmp_path / "a", workers=1, **SMALL)
    sp.generate(tmp_path / "b", workers=2, **SMALL)
    a = files(tmp_path / "a")
    assert a == files(tmp_path / "b")
    k = len(sp.OBJECT_CLASSES)
    train = [p for p in a if p.startswith("imagenet/train/")]
    assert len(train) == SMALL["n_cls_train"] * k
    assert {p.split("/")[2] for p in train} == {sp.wnid(c) for c in range(k)}  # ImageFolder: one folder a class
    seg = "ade20k/ADEChallengeData2016/annotations/training/ADE_train_00000001.png"
    img = "ade20k/ADEChallengeData2016/images/training/ADE_train_00000001.png"
    lab = np.asarray(Image.open(tmp_path / "a" / seg))
    assert Image.open(tmp_path / "a" / img).size == sp.SCENE_SIZE and lab.shape == sp.SCENE_SIZE[::-1]
    assert lab.max() <= len(sp.SCENE_CLASSES) and len(np.unique(lab)) >= 3
    assert (tmp_path / "a" / "pretrain.json").is_file()


def test_generator_refuses_a_folder_it_did_not_write(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(DatasetError, match="mine.txt"):
        sp.generate(tmp_path, **SMALL)
    assert (tmp_path / "mine.txt").read_text() == "keep me"


def test_weights_are_cached_and_rebuilt_only_when_the_recipe_changes(small_weights):
    root, cls, seg = small_weights
    meta = pretrain.describe(seg)
    assert meta["kind"] == "embedded_seg" and meta["init"] == {"recipe": {**pretrain.RECIPES["embedded"],
                                                                          **FAST["embedded"]}}
    assert 0.0 <= meta["result"]["val_mIoU"] <= 1.0 and 0.0 <= pretrain.describe(cls)["result"]["val_top1"] <= 1.0
    stamp = seg.stat().st_mtime_ns, cls.stat().st_mtime_ns
    assert pretrain.ensure_weights(root, "embedded_seg", progress=False, data_counts=SMALL, recipes=FAST) == seg
    assert (seg.stat().st_mtime_ns, cls.stat().st_mtime_ns) == stamp  # nothing retrained
    longer = {**FAST, "embedded_seg": {**FAST["embedded_seg"], "iterations": 3}}
    pretrain.ensure_weights(root, "embedded_seg", progress=False, data_counts=SMALL, recipes=longer)
    assert seg.stat().st_mtime_ns != stamp[0] and cls.stat().st_mtime_ns == stamp[1]
    assert pretrain.describe(seg)["recipe"]["iterations"] == 3


def test_classification_pretraining_fits_the_object_classes(tmp_path):
    # 16 classes (chance 0.0625): 150 iterations fit 20 images a class (generalising takes the
    # default 250 a class: 75% val top-1 measured, README "Pretraining").
    sp.generate(tmp_path, n_cls_train=20, n_cls_val=1, n_seg_train=1, n_seg_val=1)
    state, result = pretrain.train_classification(tmp_path, **{**pretrain.RECIPES["embedded"], "iterations": 150},
                                                  progress=False, val_split="train")
    assert result["val_top1"] > 0.8, result
    assert set(state) == set(pretrain._Classifier(16).backbone.state_dict())


@pytest.mark.parametrize("arch", ["tiny", "tiny_ppm", "mat_tiny"])
def test_one_encoder_loads_into_every_small_model_with_frozen_bn_at_its_statistics(small_weights, arch):
    _, cls, _ = small_weights
    enc = torch.load(cls, weights_only=True)["state_dict"]
    cfg = build_config({"preset": "study-cpu", "model.arch": arch, "model.pretrained": str(cls), "model.bn": "frozen"},
                       method="source_only")
    model = build_segmenter(cfg, torch.device("cpu"))
    got = model.backbone.state_dict()
    assert set(got) == set(enc)
    for k, v in enc.items():
        assert torch.equal(got[k], v), k  # running statistics included: frozen BN keeps pretraining's
    bn = model.backbone.bn1
    model.train()
    assert not bn.training and not bn.weight.requires_grad


def test_embedded_is_only_for_the_small_encoder_on_the_embedded_benchmark(tmp_path):
    cfg = build_config({"preset": "study-cpu", "model.arch": "deeplabv2_r101", "model.pretrained": "embedded"},
                       method="source_only")
    with pytest.raises(ConfigError, match="model.pretrained=embedded.*tiny, tiny_ppm, mat_tiny"):
        pretrain.embedded_weights(cfg)
    cfg = build_config({"preset": "study-cpu", "data.synth": False, "data.root": str(tmp_path),
                        "model.pretrained": "embedded_seg"}, method="source_only")
    with pytest.raises(ConfigError, match="data.synth=true"):
        pretrain.embedded_weights(cfg)


def test_pretrain_cli_writes_another_recipe_elsewhere_and_refuses_it_for_the_cache(tmp_path, capsys):
    # The data of the --out folder is generated at the default counts: only one kind, 1 iteration.
    rc = main(["pretrain", "--out", str(tmp_path / "mine"), "--kind", "embedded", "--iterations", "1", "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0 and str(pretrain.weights_file(tmp_path / "mine", "embedded").resolve()) in out
    assert pretrain.describe(pretrain.weights_file(tmp_path / "mine", "embedded"))["recipe"]["iterations"] == 1
    rc = main(["pretrain", "--iterations", "5"])
    err = capsys.readouterr().err
    assert rc == 2 and "--iterations" in err and "--out" in err and len(err.strip().splitlines()) == 1
    assert str(pretrain.pretrain_root()) in err  # the cache model.pretrained=embedded loads
    # the cache's old place under a data root is refused, not silently ignored
    rc = main(["pretrain", "--data-root", str(tmp_path / "synth")])
    err = capsys.readouterr().err
    assert rc == 2 and "--data-root" in err and "UDA_RAY_CACHE" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "synth").exists()


def test_embedded_weights_live_in_the_cache_and_nothing_is_written_into_or_beside_the_benchmark(
        small_weights, tmp_path, monkeypatch):
    from uda_ray import cache, engine
    from uda_ray.data import synth

    monkeypatch.setenv("UDA_RAY_CACHE", str(tmp_path / "cache"))
    assert pretrain.pretrain_root() == (tmp_path / "cache" / "pretrain").resolve()
    # The cache as a first use with the defaults leaves it (that build takes minutes): the weights
    # file with the record of the default recipe and data, so nothing is trained here.
    _, cls, _ = small_weights
    state = torch.load(cls, weights_only=True)["state_dict"]
    want = {"kind": "embedded", "recipe": pretrain.RECIPES["embedded"], "data": sp.params(0),
            "torch": torch.__version__.split("+")[0]}
    pretrain._save(pretrain.weights_file(pretrain.pretrain_root(), "embedded"), state, want)
    root = tmp_path / "X" / "synth"
    synth.generate(root, n_source=1, n_target=2, n_val=1, workers=1)
    before = sorted(p.relative_to(tmp_path / "X") for p in (tmp_path / "X").rglob("*"))
    cfg = build_config({"preset": "study-cpu", "data.root": str(root), "model.pretrained": "embedded"},
                       method="source_only")
    engine.ensure_data(cfg)
    path = pretrain.embedded_weights(cfg)
    assert sorted(p.relative_to(tmp_path / "X") for p in (tmp_path / "X").rglob("*")) == before
    assert path == pretrain.weights_file(cache.cache_dir() / "pretrain", "embedded") and path.is_file()
    assert path.read_bytes() == pretrain.weights_file(tmp_path / "cache" / "pretrain", "embedded").read_bytes()


def test_a_study_variant_sets_every_row_and_is_recorded_under_its_own_name():
    from uda_ray.errors import UserError
    from uda_ray.study import PAPER_PROTOCOL, SHARED_BN, Row, Study

    study = Study(name="t", base={"preset": "study-cpu", **PAPER_PROTOCOL},
                  rows=[Row("a", "source_only"), Row("b", "adaptseg", init_from="a", set={"model.bn": "frozen"})],
                  variants={"shared_bn": SHARED_BN})
    assert {study.flat(r, 0)["model.pretrained"] for r in study.rows} == {"embedded"}
    control = study.variant("shared_bn")
    assert control.name == "t-shared_bn" and control.variants == {}
    for r in control.rows:  # the variant's values win over the row's own
        flat = control.flat(r, 0)
        assert (flat["model.bn"], flat["model.pretrained"]) == ("shared", "")
    assert study.variant(None) is study
    with pytest.raises(UserError, match="shared_bn"):
        study.variant("shared")


def test_a_run_records_the_fingerprint_of_the_weights_it_started_from(small_weights, data_root, tmp_path):
    import hashlib

    from trees import tiny_cfg
    from uda_ray import engine

    _, cls, _ = small_weights
    tags = {}

    class Recorder(engine.NullTracker):
        def set_tags(self, t):
            tags.update(t)

    cfg = tiny_cfg(data_root, tmp_path, "source_only", **{"run.iterations": 1, "model.pretrained": str(cls),
                                                          "model.bn": "frozen"})
    engine.fit(cfg, tracker=Recorder())
    assert tags["pretrained_sha256"] == hashlib.sha256(cls.read_bytes()).hexdigest()[:16]
    assert tags["pretrained_file"] == str(cls)
