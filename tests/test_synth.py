"""The embedded benchmark generator: determinism, on-disk layout, classes, regimes, errors."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from uda_ray.config import ConfigError, build_config
from uda_ray.data import DatasetError, synth
from uda_ray.data.labels import cityscapes_labelid_to_19, labelid_palette, train19_to_labelid

SMALL = dict(n_source=12, n_target=12, n_val=12)  # 12 = one cycle of featured rare classes
LUT = cityscapes_labelid_to_19()
VALID_IDS = {0, 1, 4} | {int(i) for i in train19_to_labelid()}
CS_NAME = re.compile(r"^([a-z]+)_(\d{6})_(\d{6})_leftImg8bit\.png$")


def files(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    summary = synth.generate(out, seed=0, workers=2, **SMALL)
    return out, summary


def test_same_seed_is_byte_identical_for_any_workers_and_other_seed_differs(tmp_path):
    kw = dict(n_source=3, n_target=3, n_val=2)
    synth.generate(tmp_path / "a", seed=7, workers=1, **kw)
    synth.generate(tmp_path / "b", seed=7, workers=2, **kw)
    synth.generate(tmp_path / "c", seed=8, workers=2, **kw)
    a, b, c = (files(tmp_path / k) for k in "abc")
    assert a == b
    assert a.keys() == c.keys()
    assert a["gta5/images/00001.png"] != c["gta5/images/00001.png"]
    assert a["gta5/labels/00001.png"] != c["gta5/labels/00001.png"]


def test_layout_matches_gta5_and_cityscapes(bench):
    out, summary = bench
    assert (out / "synth.json").is_file()
    imgs = sorted((out / "gta5" / "images").iterdir())
    assert [p.name for p in imgs] == [f"{i:05d}.png" for i in range(1, 13)]
    for p in imgs[:3]:
        im, lb = Image.open(p), Image.open(out / "gta5" / "labels" / p.name)
        assert im.mode == "RGB" and im.size == synth.SOURCE_SIZE
        assert lb.mode == "P" and lb.size == synth.SOURCE_SIZE
        assert lb.getpalette()[:768] == labelid_palette()
    cities = {}
    for split, n in (("train", 12), ("val", 12)):
        found = sorted((out / "cityscapes" / "leftImg8bit" / split).rglob("*.png"))
        assert len(found) == n
        for p in found:
            m = CS_NAME.match(p.name)
            assert m and m.group(1) == p.parent.name and m.group(3) == "000019"
            cities.setdefault(split, set()).add(m.group(1))
            lp = out / "cityscapes" / "gtFine" / split / p.parent.name / p.name.replace(
                "_leftImg8bit.png", "_gtFine_labelIds.png")
            im, lb = Image.open(p), Image.open(lp)
            assert im.mode == "RGB" and im.size == synth.TARGET_SIZE
            assert lb.mode == "L" and lb.size == synth.TARGET_SIZE
    assert len(cities["train"]) > 1 and len(cities["val"]) > 1
    assert not cities["train"] & cities["val"]
    assert summary["counts"] == {"source": 12, "target_train": 12, "target_val": 12}


@pytest.mark.parametrize("domain", ["source", "target_train", "target_val"])
def test_every_class_occurs_and_only_valid_label_ids(bench, domain):
    out, summary = bench
    if domain == "source":
        paths = sorted((out / "gta5" / "labels").glob("*.png"))
    else:
        split = domain.split("_")[1]
        paths = sorted((out / "cityscapes" / "gtFine" / split).rglob("*.png"))
    seen = np.zeros(256, bool)
    for p in paths:
        seen[np.unique(np.asarray(Image.open(p)))] = True
    ids = set(np.flatnonzero(seen).tolist())
    assert ids <= VALID_IDS
    assert set(LUT[sorted(ids)].tolist()) - {255} == set(range(19))
    freq = summary["class_freq"][domain]
    assert all(freq[c] > 0 for c in synth.CLASSES_19)
    assert abs(sum(freq[c] for c in synth.CLASSES_19) - 1) < 1e-3
    # realistic imbalance: stuff classes dominate, the rare things stay rare
    assert min(freq["road"], freq["building"]) > 10 * max(freq["rider"], freq["motorcycle"])


def test_ensure_benchmark_generates_only_where_there_is_none(tmp_path):
    kw = dict(seed=1, n_source=3, n_target=2, n_val=1, regime="photo")
    synth.ensure_benchmark(tmp_path, **kw)
    marker = tmp_path / "synth.json"
    first, stamp = files(tmp_path), marker.stat().st_mtime_ns
    assert synth.ensure_benchmark(tmp_path, workers=1, **kw) == tmp_path
    assert marker.stat().st_mtime_ns == stamp and files(tmp_path) == first
    # a shift equal to a named regime is that regime: used as it is
    synth.ensure_benchmark(tmp_path, **{**kw, "shift": synth.REGIMES["photo"]})
    assert marker.stat().st_mtime_ns == stamp
    # an unreadable marker still marks the user's benchmark: refused, kept
    marker.write_text("{not json")
    with pytest.raises(DatasetError, match=r"synth.json: unreadable .*kept: regenerate it with uda-ray data synth"):
        synth.ensure_benchmark(tmp_path, **kw)
    assert {k: v for k, v in files(tmp_path).items() if k != "synth.json"} == {
        k: v for k, v in first.items() if k != "synth.json"}
    # an interrupted run (partial flag, no marker) is generated again
    marker.unlink()
    (tmp_path / ".synth_partial").touch()
    synth.ensure_benchmark(tmp_path, **{**kw, "n_source": 2})
    assert marker.is_file() and json.loads(marker.read_text())["n_source"] == 2


TINY_BENCH = dict(n_source=2, n_target=2, n_val=1)  # 2 target images: one is carved out for selection


def tiny_benchmark(out: Path, **kw) -> dict:
    synth.generate(out, workers=1, **{**TINY_BENCH, **kw})
    return files(out)


def test_ensure_benchmark_uses_a_small_benchmark_as_it_is(tmp_path, capsys):
    # Generated with fewer images than the defaults on purpose: first use must not replace it.
    before = tiny_benchmark(tmp_path / "tiny")
    assert synth.ensure_benchmark(tmp_path / "tiny", progress=False) == tmp_path / "tiny"
    assert files(tmp_path / "tiny") == before
    assert "generating" not in capsys.readouterr().err


@pytest.mark.parametrize("asked, differs", [({"seed": 3}, "seed 0"), ({"regime": "photo"}, "regime 'default'")])
def test_ensure_benchmark_refuses_another_seed_or_regime_and_keeps_the_files(tmp_path, asked, differs):
    before = tiny_benchmark(tmp_path / "tiny")
    with pytest.raises(synth.BenchmarkMismatch) as info:
        synth.ensure_benchmark(tmp_path / "tiny", progress=False, workers=1, **TINY_BENCH, **asked)
    msg = str(info.value)
    assert len(msg.splitlines()) == 1 and f"{tmp_path / 'tiny'} holds the embedded benchmark generated with " \
        f"{differs}" in msg and "uda-ray data synth --out DIR" in msg, msg
    assert isinstance(info.value, DatasetError) and [d[0] for d in info.value.diffs] == list(asked)
    assert files(tmp_path / "tiny") == before


def test_train_on_a_small_benchmark_uses_it_and_refuses_another_seed_in_one_line(tmp_path, monkeypatch, capsys):
    from uda_ray.cli import main

    monkeypatch.chdir(tmp_path)
    before = tiny_benchmark(tmp_path / "tiny")
    argv = ["train", "tiny-cpu", "--method", "source_only", "--no-mlflow", "--quiet", "--set", "data.root=tiny",
            "--set", "data.select_n=1", "--set", "run.iterations=1", "--set", "run.eval_every=0",
            "--set", "run.checkpoint_every=0", "--set", "run.num_workers=0", "--set", "run.mosaic_images=0",
            "--set", "data.source_w=64", "--set", "data.source_h=32", "--set", "data.target_w=64",
            "--set", "data.target_h=32", "--set", f"run.out={tmp_path / 'runs'}"]
    assert main(argv) == 0, capsys.readouterr().err
    assert files(tmp_path / "tiny") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs", "tiny"]  # no lock beside it either
    try:
        rc = main(argv + ["--set", "data.synth_seed=3", "--set", "run.name=seed3"])
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert (f"data.root: {tmp_path / 'tiny'} holds the embedded benchmark generated with seed 0, regime 'default'; "
            "the config asks for data.synth_seed 3;") in err, err
    assert "uda-ray data synth --out DIR --seed 3 and set data.root=DIR, or set data.synth_seed=0" in err, err
    assert files(tmp_path / "tiny") == before


def test_ensure_benchmark_writes_nothing_beside_the_data_folder(tmp_path, monkeypatch):
    from uda_ray import engine
    from uda_ray.cache import cache_dir, lock_file

    monkeypatch.setenv("UDA_RAY_CACHE", str(tmp_path / "cache"))
    tiny_benchmark(tmp_path / "X" / "synth")
    engine._ensure_benchmark(build_config({"data.root": str(tmp_path / "X" / "synth"), "data.synth": True},
                                          method="source_only"))
    assert sorted(p.name for p in (tmp_path / "X").iterdir()) == ["synth"]
    assert lock_file(tmp_path / "X" / "synth").parent == cache_dir() / "locks"
    assert [p.name for p in (tmp_path / "cache" / "locks").iterdir()] == [lock_file(tmp_path / "X" / "synth").name]


@pytest.mark.parametrize("regime", sorted(synth.REGIMES))
def test_every_regime_generates(tmp_path, regime):
    s = synth.generate(tmp_path, regime=regime, n_source=1, n_target=1, n_val=1, workers=1)
    assert s["regime"] == regime and s["seconds"] >= 0
    rec = json.loads((tmp_path / "synth.json").read_text())
    assert rec["shift"] == {k: float(v) for k, v in vars(synth.REGIMES[regime]).items()}


def test_knobs_change_only_the_target_rendering():
    lab0 = synth.render(0, "target_train", 3, synth.REGIMES["none"])[1]
    img1, lab1 = synth.render(0, "target_train", 3, synth.REGIMES["photo"])
    assert np.array_equal(lab0, lab1)  # same scene: the layout knob is the same
    assert not np.array_equal(synth.render(0, "target_train", 3, synth.REGIMES["none"])[0], img1)
    src = [synth.render(0, "source", 0, synth.REGIMES[k])[0] for k in ("none", "full")]
    assert np.array_equal(*src)


def test_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="valid regimes: appearance, default, full, layout, none, photo"):
        synth.generate(tmp_path, regime="nope")
    with pytest.raises(ValueError, match="'blur'"):
        synth.Shift(blur=1.5)
    with pytest.raises(ValueError, match="'tone'"):
        synth.Shift(tone=-0.1)
    for name in ("n_source", "n_target", "n_val"):
        with pytest.raises(ValueError, match=name):
            synth.generate(tmp_path, **{name: 0})
    foreign = tmp_path / "real"
    (foreign / "gta5" / "images").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"real: refusing to write the embedded benchmark into a folder "
                                           r"that holds data it did not write \(gta5; no synth.json\)"):
        synth.generate(foreign, n_source=1, n_target=1, n_val=1)
    assert (foreign / "gta5" / "images").is_dir()  # untouched


def test_generation_refuses_a_folder_it_did_not_write_and_touches_nothing(tmp_path):
    small = dict(n_source=1, n_target=1, n_val=1, workers=1)
    for name, entries in (("other", ["notes.txt"]), ("gta5only", ["gta5/images/00001.png"]),
                          ("dataset", ["leftImg8bit/train/x.png", "gtFine/train/y.png"])):
        root = tmp_path / name
        for e in entries:
            (root / e).parent.mkdir(parents=True, exist_ok=True)
            (root / e).write_text("user data")
        before = files(root)
        with pytest.raises(DatasetError, match=rf"{root}: refusing to write the embedded benchmark"):
            synth.generate(root, **small)
        assert files(root) == before
    # its own folder (marker) is regenerated; one with the marker and anything else is refused
    own = tmp_path / "own"
    synth.generate(own, **small)
    synth.generate(own, seed=1, **small)
    (own / "mine.txt").write_text("user data")
    with pytest.raises(DatasetError, match=r"\(mine.txt\)"):
        synth.generate(own, seed=2, **small)
    assert (own / "mine.txt").read_text() == "user data" and (own / "gta5").is_dir()
    # an existing empty folder is fine
    (tmp_path / "empty").mkdir()
    synth.generate(tmp_path / "empty", **small)
    # so is one holding only the pretraining domain's folder (uda-ray pretrain run first), which
    # a regeneration keeps
    (tmp_path / "pre" / "pretrain" / "weights").mkdir(parents=True)
    (tmp_path / "pre" / "pretrain" / "weights" / "w.pt").write_text("weights")
    synth.generate(tmp_path / "pre", **small)
    synth.generate(tmp_path / "pre", seed=1, **small)
    assert (tmp_path / "pre" / "pretrain" / "weights" / "w.pt").read_text() == "weights"


def test_ensure_benchmark_says_where_it_generates(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    synth.ensure_benchmark("bench", n_source=1, n_target=1, n_val=1, workers=1)
    assert f"generating the embedded benchmark in {tmp_path / 'bench'} (first use) ..." in capsys.readouterr().err
    synth.ensure_benchmark("bench", n_source=1, n_target=1, n_val=1, workers=1)
    assert "generating" not in capsys.readouterr().err


def test_ensure_data_only_where_asked_at_an_absolute_path_and_never_into_user_data(tmp_path, monkeypatch):
    from uda_ray import engine

    monkeypatch.chdir(tmp_path)
    calls = []
    monkeypatch.setattr(synth, "ensure_benchmark", lambda root, **kw: calls.append(root))
    engine.ensure_data(build_config(method="source_only"))  # the default: data.synth=false
    engine.ensure_data(build_config({"data.root": "/data"}, method="source_only", preset="paper"))
    assert calls == [] and not (tmp_path / "data").exists()
    engine.ensure_data(build_config(method="source_only", preset="tiny-cpu"))
    assert calls == [tmp_path / "data" / "synth"]
    monkeypatch.undo()
    real = tmp_path / "real"
    (real / "GTA5" / "images").mkdir(parents=True)
    cfg = build_config({"data.root": str(real), "data.synth": True}, method="source_only")
    with pytest.raises(ConfigError, match=rf"data.root: {real}: refusing to write .*\(GTA5; no synth.json\)"):
        engine.ensure_data(cfg)
    assert sorted(p.name for p in real.iterdir()) == ["GTA5"]
    with pytest.raises(ConfigError, match=r"data.synth_regime: unknown regime 'foggy'; valid regimes"):
        engine.ensure_data(build_config({"data.root": str(tmp_path / "b"), "data.synth": True,
                                         "data.synth_regime": "foggy"}, method="source_only"))
