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
