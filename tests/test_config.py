"""The typed flat config: defaults, presets, overrides and the errors that name the key."""

from __future__ import annotations

import pytest

from uda_ray.config import ConfigError, build_config, load_config, parse_overrides


def test_flat_keys_and_paper_defaults():
    cfg = build_config(method="adaptseg")
    flat = cfg.flat()
    assert flat["method"] == "adaptseg"
    assert flat["adaptseg.lambda_adv_main"] == 1e-3 and flat["adaptseg.lambda_adv_aux"] == 2e-4
    assert flat["adaptseg.lambda_seg_aux"] == 0.1
    assert flat["optim.lr"] == 2.5e-4 and flat["optim.momentum"] == 0.9 and flat["optim.weight_decay"] == 5e-4
    assert flat["optim.head_lr_mult"] == 10 and flat["optim.poly_power"] == 0.9
    assert flat["optim.d_lr"] == 1e-4 and (flat["optim.d_beta1"], flat["optim.d_beta2"]) == (0.9, 0.99)
    assert (flat["data.source_w"], flat["data.source_h"], flat["data.target_w"], flat["data.target_h"]) == \
        (1280, 720, 1024, 512)
    assert not any(k.startswith("source_only.") for k in flat)  # only the active method's section
    assert all(isinstance(v, (int, float, str, bool)) for v in flat.values())


def test_overrides_are_typed_from_strings():
    cfg = build_config(parse_overrides(["adaptseg.lambda_adv_main=0.01", "run.seed=3", "data.flip=true",
                                        "adaptseg.gan=ls"]), method="adaptseg")
    assert cfg.params.lambda_adv_main == 0.01 and cfg.run.seed == 3 and cfg.data.flip is True
    assert cfg.params.gan == "ls"


@pytest.mark.parametrize("values, message", [
    ({"run.sed": 1}, r"run.sed: unknown key; run.\* has"),
    ({"trainer.seed": 1}, r"trainer.seed: unknown section 'trainer'"),
    ({"seed": 1}, r"seed: unknown key \(keys are dotted"),
    ({"source_only.lambda_seg_aux": 1.0}, r"source_only.lambda_seg_aux: belongs to method 'source_only'"),
    ({"optim.lr": 0}, r"optim.lr: must be > 0.0, got 0"),
    ({"optim.momentum": 1.5}, r"optim.momentum: must be <= 1.0, got 1.5"),
    ({"run.iterations": "many"}, r"run.iterations: expected an integer, got 'many'"),
    ({"run.iterations": 2.5}, r"run.iterations: expected an integer, got 2.5"),
    ({"data.flip": "sometimes"}, r"data.flip: expected true or false"),
    ({"adaptseg.gan": "wgan"}, r"adaptseg.gan: must be one of \['vanilla', 'ls'\], got 'wgan'"),
    ({"model.bn": "sync"}, r"model.bn: must be one of"),
    ({"data.num_classes": 13}, r"data.num_classes: must be one of \[19, 16\]"),
    ({"data.scale_min": 1.5, "data.scale_max": 1.2}, r"data.scale_min: must be <= data.scale_max"),
    ({"data.crop_w": 64}, r"data.crop_w / data.crop_h: set both or neither"),
])
def test_bad_values_name_the_key(values, message):
    with pytest.raises(ConfigError, match=message):
        build_config(values, method="adaptseg")


def test_unknown_method_and_preset():
    with pytest.raises(ConfigError, match=r"method: unknown method 'adaptsegnet'; expected one of"):
        build_config(method="adaptsegnet")
    with pytest.raises(ConfigError, match=r"preset: unknown preset 'tiny'"):
        build_config(method="adaptseg", preset="tiny")


def test_yaml_nested_or_flat_with_preset(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("preset: tiny-cpu\nmethod: adaptseg\nrun:\n  seed: 7\nadaptseg.gan: ls\n")
    cfg = load_config(p, {"run.iterations": "10"})
    assert cfg.model.arch == "tiny" and cfg.run.seed == 7 and cfg.params.gan == "ls"
    assert cfg.run.iterations == 10  # override beats file beats preset
    assert load_config(p).run.iterations == 1000
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    # a config round-trips through its own YAML
    again = tmp_path / "again.yaml"
    again.write_text(cfg.to_yaml())
    assert load_config(again).flat() == cfg.flat()


@pytest.mark.parametrize("key, value", [
    ("optim.momentum", ".nan"), ("optim.lr", ".nan"), ("optim.lr", ".inf"), ("optim.lr", "-.inf"),
    ("optim.weight_decay", ".NaN"), ("optim.lr", float("nan")), ("optim.lr", float("inf")),
])
def test_nan_and_infinity_are_refused(key, value):
    # NaN compares false with every bound, so it used to pass the range checks (momentum=.nan
    # trained to NaN weights); from --set, a YAML file or a Tune/Optuna sample alike
    with pytest.raises(ConfigError, match=rf"{key}: expected a finite number, got"):
        build_config({key: value}, method="source_only")


@pytest.mark.parametrize("key, value", [("run.iterations", ".inf"), ("run.iterations", float("nan")),
                                        ("run.seed", "-.inf")])
def test_nan_and_infinity_are_not_integers(key, value):
    with pytest.raises(ConfigError, match=rf"{key}: expected an integer, got"):
        build_config({key: value}, method="source_only")


@pytest.mark.parametrize("text, expected", [("1e-3", 1e-3), ("1E-3", 1e-3), ("+1e-3", 1e-3), ("1e3", 1e3),
                                            (".5e-2", 0.005), ("2.5E-4", 2.5e-4)])
def test_scientific_notation_for_floats(tmp_path, text, expected):
    # PyYAML reads 1e-3 as a string (YAML 1.1 wants 1.0e-3): both --set and YAML files take it
    assert build_config(parse_overrides([f"optim.lr={text}"]), method="source_only").optim.lr == expected
    p = tmp_path / "c.yaml"
    p.write_text(f"method: source_only\noptim:\n  lr: {text}\n")
    assert load_config(p).optim.lr == expected


def test_scientific_notation_for_ints_only_when_exact(tmp_path):
    assert build_config(parse_overrides(["run.iterations=1e3"]), method="source_only").run.iterations == 1000
    p = tmp_path / "c.yaml"
    p.write_text("method: source_only\nrun.iterations: 2E4\n")
    assert load_config(p).run.iterations == 20000
    for text in ("1.5e0", "1e-3", "1e400"):
        with pytest.raises(ConfigError, match=rf"run.iterations: expected an integer, got '{text}'"):
            build_config(parse_overrides([f"run.iterations={text}"]), method="source_only")
    # a str knob keeps the text
    assert build_config(parse_overrides(["run.name=1e-3"]), method="source_only").run.name == "1e-3"


@pytest.mark.parametrize("device, ok", [("auto", True), ("cpu", True), ("cuda", True), ("cuda:1", True),
                                        ("tpu", False), ("cuda:", False), ("cuda:x", False), ("gpu", False)])
def test_run_device_is_validated(device, ok):
    if ok:
        assert build_config({"run.device": device}, method="source_only").run.device == device
    else:
        with pytest.raises(ConfigError, match=r"run.device: must be one of \['auto', 'cpu', 'cuda', "
                                              rf"'cuda:<index>'\], got '{device}'"):
            build_config({"run.device": device}, method="source_only")


def test_yaml_errors_name_the_file_and_line(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("method: source_only\nrun:\n  seed: 1\n   iterations: 3\n")
    with pytest.raises(ConfigError, match=r"c.yaml: line 4, column 14: invalid YAML: mapping values"):
        load_config(p)
    p.write_bytes(b"method: source_only\n# caf\xe9\n")
    with pytest.raises(ConfigError, match=r"c.yaml: not UTF-8 text \(byte 0xe9 at offset 25\)"):
        load_config(p)


def test_only_the_small_presets_generate_the_benchmark():
    # the paper preset and the defaults point at the user's data: nothing is generated there
    assert build_config(method="source_only").data.synth is False
    assert build_config(method="source_only", preset="paper").data.synth is False
    assert build_config(method="source_only", preset="tiny-cpu").data.synth is True
    assert build_config(method="source_only", preset="study-cpu").data.synth is True
