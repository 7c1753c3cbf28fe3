"""Bad input on the command line: one line on stderr naming the file or key, exit status 2, no
traceback (``uda-ray --debug`` shows it instead)."""

from __future__ import annotations

import pytest

import trees
from uda_ray.cli import main

# A 2-iteration CPU run on a tiny tree (no MLflow, no progress bar).
TINY = ["--method", "source_only", "--no-mlflow", "--quiet", "--set", "data.synth=false", "--set", "data.select_n=1",
        "--set", "run.iterations=2", "--set", "run.eval_every=0", "--set", "run.checkpoint_every=0",
        "--set", "run.num_workers=0", "--set", "data.source_w=64", "--set", "data.source_h=32",
        "--set", "data.target_w=64", "--set", "data.target_h=32", "--set", "run.mosaic_images=0"]


def run(capsys, *argv) -> tuple[int, str]:
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:  # argparse
        rc = e.code
    return rc, capsys.readouterr().err


def one_line(rc: int, err: str, *needles: str) -> str:
    assert rc == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def tree(root):
    trees.gta5_tree(root / "gta5", n=4, w=72, h=40)
    trees.cityscapes_tree(root / "cityscapes", split="train", cities=("aachen", "bochum", "bremen"), w=64, h=32)
    trees.cityscapes_tree(root / "cityscapes", split="val", cities=("frankfurt", "lindau"), w=64, h=32)
    return root


def train(capsys, tmp_path, *more):
    return run(capsys, "train", "tiny-cpu", *TINY, "--set", f"run.out={tmp_path / 'runs'}", *more)


def test_yaml_syntax_error_names_the_file_and_line(tmp_path, capsys):
    p = tmp_path / "bad.yaml"
    p.write_text("method: source_only\nrun:\n  seed: 1\n   iterations: 3\n")
    one_line(*run(capsys, "train", p, "--no-mlflow"), f"{p}: line 4, column 14: invalid YAML")


def test_non_utf8_yaml(tmp_path, capsys):
    p = tmp_path / "latin1.yaml"
    p.write_bytes(b"method: source_only\n# caf\xe9\n")
    one_line(*run(capsys, "train", p, "--no-mlflow"), f"{p}: not UTF-8 text")


def test_nan_override(tmp_path, capsys):
    one_line(*train(capsys, tmp_path, "--set", "optim.momentum=.nan"), "optim.momentum: expected a finite number")


def test_unknown_split(tmp_path, capsys):
    root = trees.cityscapes_tree(tmp_path / "cs", split="val")
    one_line(*run(capsys, "data", "check", root, "--dataset", "cityscapes", "--split", "tesst"),
             "split must be one of train, val, test, got 'tesst'")


@pytest.mark.parametrize("argv", [
    ("data", "check", ".", "--dataset", "gta5", "--workers", "-1"),
    ("data", "check", ".", "--dataset", "gta5", "--max-problems", "-3"),
    ("data", "synth", "--workers", "-1"),
    ("data", "synth", "--workers", "0"),
    ("data", "synth", "--n-val", "-5"),
    ("eval", "x.pt", "--max-images", "-1"),
    ("bench", "proxy", "--images", "-2"),
])
def test_negative_counts(capsys, argv):
    line = one_line(*run(capsys, *argv), f"argument {argv[-2]}: expected an integer >=", repr(argv[-1]))
    assert line.startswith("uda-ray ")


def test_unknown_device(tmp_path, capsys):
    one_line(*train(capsys, tmp_path, "--set", "run.device=tpu"), "run.device: must be one of", "'tpu'")


def test_torchvision_weights_for_a_backbone_without_them(tmp_path, capsys):
    root = tree(tmp_path / "data")
    one_line(*train(capsys, tmp_path, "--set", f"data.root={root}", "--set", "model.pretrained=torchvision"),
             "model.pretrained: torchvision has no ImageNet weights")


def test_unknown_study_in_compare(tmp_path, capsys):
    one_line(*run(capsys, "compare", "nosuchstudy", "--tracking-uri", f"sqlite:///{tmp_path / 'none.db'}",
                  "--out", tmp_path), "unknown study 'nosuchstudy'")


def test_study_command_on_a_file_that_is_not_a_study(tmp_path, capsys):
    p = tmp_path / "README.md"
    p.write_text("# studies\n")
    one_line(*run(capsys, "study", p), f"{p}: not a study script")
    p = tmp_path / "plain.py"
    p.write_text("X = 1\n")
    one_line(*run(capsys, "study", p), f"{p}: not a study script")


def test_unknown_regime_lists_the_regimes(tmp_path, capsys):
    one_line(*run(capsys, "data", "synth", "--out", tmp_path / "s", "--regime", "foggy"),
             "unknown regime 'foggy'; valid regimes: appearance, default, full, layout, none, photo")
    assert not (tmp_path / "s").exists()


def test_damage_found_in_a_loader_worker_reads_as_the_dataset_error(tmp_path, capsys):
    root = tree(tmp_path / "data")
    img = root / "gta5" / "images" / "00002.png"
    img.write_bytes(img.read_bytes()[:60])
    line = one_line(*train(capsys, tmp_path, "--set", f"data.root={root}", "--set", "run.num_workers=1"),
                    f"{img}: unreadable or truncated image")
    assert "DataLoader worker" not in line


def test_val_split_damage_is_found_before_training(tmp_path, capsys):
    root = tree(tmp_path / "data")
    label = next((root / "cityscapes" / "gtFine" / "val").rglob("*_labelIds.png"))
    trees.grey_label(label, trees.label_map(32, 64, [7, 200]))  # 200: not a Cityscapes labelId
    one_line(*train(capsys, tmp_path, "--set", f"data.root={root}", "--set", "run.name=valcheck"),
             f"{label}: label ids outside the cityscapes label map: 200", "target val split: 1 problem")
    assert not (tmp_path / "runs" / "valcheck" / "checkpoints").exists()  # nothing was trained


def test_debug_shows_the_traceback(tmp_path, capsys):
    p = tmp_path / "latin1.yaml"
    p.write_bytes(b"method: source_only\n# caf\xe9\n")
    from uda_ray.config import ConfigError

    with pytest.raises(ConfigError, match="not UTF-8"):
        main(["--debug", "train", str(p), "--no-mlflow"])


def _options(parser, path=()):
    """(command path, option) of every option of every sub-command."""
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _options(sub, (*path, name))
        elif not isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            yield path, action


def test_every_option_has_help_and_the_help_is_accurate(capsys):
    from uda_ray.cli import build_parser
    from uda_ray.config import METHODS, PRESETS

    missing = [f"{' '.join(p)} {a.option_strings or a.dest}" for p, a in _options(build_parser()) if not a.help]
    assert not missing, missing
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert all(p in text for p in PRESETS) and all(m in text for m in METHODS)
    assert "required when CONFIG is a preset" in text and "default: source_only" not in text


@pytest.mark.parametrize("argv, needles", [
    (("train", "tiny-cpx", "--no-mlflow"), ("tiny-cpx: neither a config file", "did you mean 'tiny-cpu'")),
    (("train", "tiny-cpu", "--method", "adaptsegg", "--no-mlflow"), ("unknown method 'adaptsegg'",
                                                                     "did you mean 'adaptseg'")),
    (("train", "tiny-cpu", "--method", "adaptseg", "--set", "optim.lrr=1", "--no-mlflow"),
     ("optim.lrr: unknown key", "did you mean 'optim.lr'")),
    (("config", "tiny-cp"), ("unknown preset 'tiny-cp'", "did you mean 'tiny-cpu'")),
    (("config", "--method", "sourceonly"), ("unknown method 'sourceonly'", "did you mean 'source_only'")),
    (("study", "quickstrat"), ("quickstrat: no study script", "did you mean 'quickstart'")),
    (("study", "studies/quikstart.py"), ("no study script", "did you mean 'quickstart'")),
])
def test_did_you_mean(capsys, argv, needles):
    one_line(*run(capsys, *argv), *needles)


def test_study_takes_a_bare_name_as_compare_does():
    from uda_ray.study import find_study, load_study

    path = find_study("quickstart")
    assert path.name == "quickstart.py" and load_study(path).name == "quickstart"
    assert find_study(path) == path


def test_config_lists_every_key_with_type_value_range_and_help(capsys):
    from uda_ray.config import build_config

    assert main(["config", "study-cpu", "--method", "adaptseg"]) == 0
    lines = capsys.readouterr().out.splitlines()
    keys = [k for k in build_config({}, method="adaptseg", preset="study-cpu").flat() if k != "method"]
    assert [ln.split()[0] for ln in lines[1:]] == keys
    line = next(ln for ln in lines if ln.startswith("run.iterations "))
    assert line.split()[1:4] == ["int", "400", ">="] and "training iterations" in line  # the preset's value
    assert "deeplabv2_r101 | deeplabv2_vgg16" in next(ln for ln in lines if ln.startswith("model.arch "))
    assert "[0.0, 1.0]" in next(ln for ln in lines if ln.startswith("optim.momentum "))
    assert main(["config"]) == 0  # every method's section
    every = capsys.readouterr().out
    assert "dast.lambda_c " in every and "pww.T " in every
