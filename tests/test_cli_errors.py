"""Bad input on the command line: one line on stderr naming the file or key, exit status 2, no
traceback (``uda-ray --debug`` shows it instead)."""

from __future__ import annotations

import itertools

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


def test_config_lists_every_key_with_type_value_range_and_help(capsys, monkeypatch):
    from uda_ray.config import build_config

    monkeypatch.setenv("COLUMNS", "120")
    assert main(["config", "study-cpu", "--method", "adaptseg"]) == 0
    lines = capsys.readouterr().out.splitlines()
    keys = [k for k in build_config({}, method="adaptseg", preset="study-cpu").flat() if k != "method"]
    assert [ln.split()[0] for ln in lines[1:] if not ln.startswith(" ")] == keys  # wrapped lines start with " "
    line = next(ln for ln in lines if ln.startswith("run.iterations "))
    assert line.split()[1:4] == ["int", "400*", ">="] and "training iterations" in line  # the preset's value
    i = next(i for i, ln in enumerate(lines) if ln.startswith("model.arch "))
    block = lines[i] + "".join(itertools.takewhile(lambda ln: ln.startswith(" "), lines[i + 1:]))
    assert "deeplabv2_r101 |" in block and "deeplabv2_vgg16 |" in block and "tiny_ppm" in block
    assert "[0.0, 1.0]" in next(ln for ln in lines if ln.startswith("optim.momentum "))
    assert main(["config"]) == 0  # every method's section
    every = capsys.readouterr().out
    assert "dast.lambda_c " in every and "pww.T " in every


def test_config_fits_the_terminal_and_marks_what_the_preset_changed(capsys, monkeypatch):
    """Issue 29.8: lines up to 340 characters, and no sign of which values a preset sets."""
    for cols in (80, 100, 200):
        monkeypatch.setenv("COLUMNS", str(cols))
        assert main(["config", "study-cpu"]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert max(map(len, lines)) <= min(cols, 120), max(lines, key=len)
    row = {ln.split()[0]: ln.split() for ln in lines if not ln.startswith(" ")}
    assert row["run.iterations"][2] == "400*" and row["data.select_n"][2] == "50*" and row["adaptseg.ndf"][2] == "16*"
    assert row["run.seed"][2] == "0" and row["optim.momentum"][2] == "0.9"  # the defaults: not marked
    assert "*: set by the preset" in lines[0]
    assert main(["config", "--method", "adaptseg"]) == 0  # the defaults themselves: nothing marked
    plain = capsys.readouterr().out.splitlines()
    assert not [ln for ln in plain[1:] if not ln.startswith(" ") and ln.split()[2].endswith("*")]
    assert "*: set by" not in plain[0]


def test_cli_names_are_the_registries():
    """uda_ray.cli_spec's copies of the registries, which the parser lists without importing them."""
    from uda_ray.cli_spec import DATASET_NAMES, METHOD_NAMES, PRESET_NAMES
    from uda_ray.config import METHODS, PRESETS
    from uda_ray.data.datasets import DATASETS

    assert METHOD_NAMES == tuple(METHODS) and PRESET_NAMES == tuple(PRESETS) and DATASET_NAMES == tuple(DATASETS)


def test_parser_and_help_import_no_heavy_package():
    """Issue 29.8: uda-ray --help took 7-15 s, importing torch, Ray, MLflow, Optuna and pandas."""
    import subprocess
    import sys

    code = ("import sys, uda_ray.cli as c\n"
            "bad = [m for m in ('torch', 'ray', 'mlflow', 'optuna', 'pandas') if m in sys.modules]\n"
            "def walk(p):\n"
            "    p.format_help()\n"
            "    for a in p._actions:\n"
            "        for sub in (a.choices.values() if isinstance(a.choices, dict) else ()):\n"
            "            walk(sub)\n"
            "walk(c.build_parser())\n"
            "bad += [m for m in ('torch', 'ray', 'mlflow', 'optuna', 'pandas') if m in sys.modules]\n"
            "print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


def test_help_is_plain_text(capsys):
    """No reStructuredText (``uda-ray``) or Markdown backticks in any command's help."""
    from uda_ray.cli import build_parser

    texts = []

    def walk(p):
        texts.append(p.format_help())
        for a in p._actions:
            for sub in (a.choices.values() if isinstance(a.choices, dict) else ()):
                walk(sub)

    walk(build_parser())
    assert len(texts) > 10 and "uda-ray: domain-adaptive" in texts[0]
    assert not [t for t in texts if "`" in t or ":func:" in t or ":mod:" in t]


def test_mistyped_command_suggests_the_closest(capsys):
    one_line(*run(capsys, "trian"), "invalid choice: 'trian'; did you mean 'train'", "(choose from 'data'")
    one_line(*run(capsys, "bench", "stpe"), "did you mean 'step'")
    one_line(*run(capsys, "data", "check", "x", "--dataset", "gta"), "did you mean 'gta5'")


def test_bench_cli_times_help_in_fresh_processes(capsys):
    """``uda-ray bench cli``: a benchmark (printed, not asserted), here only that it runs."""
    assert main(["bench", "cli", "--runs", "1"]) == 0
    out = capsys.readouterr().out
    assert "--help: median" in out and "over 1 fresh processes" in out
    assert "heavy packages imported to build the parser: none" in out


# --- input that used to be accepted silently --------------------------------------------------

def _yaml(tmp_path, text: str, name: str = "cfg.yaml"):
    p = tmp_path / name
    # a data root that does not exist: a config that gets past the checks fails there instead
    p.write_text(text + f"data.root: {tmp_path / 'nodata'}\ndata.synth: false\n")
    return p


def test_method_flag_contradicting_the_config_is_refused(tmp_path, capsys):
    from uda_ray.cli import _resolve_config, build_parser

    p = _yaml(tmp_path, "method: mat\n")
    one_line(*run(capsys, "train", p, "--method", "adaptseg", "--no-mlflow"),
             str(p), "method 'mat'", "--method 'adaptseg'")
    cfg, _ = _resolve_config(build_parser().parse_args(["train", str(p), "--method", "mat"]))  # the same: fine
    assert cfg.method == "mat"
    cfg, _ = _resolve_config(build_parser().parse_args(["train", str(_yaml(tmp_path, "", "bare.yaml")),
                                                        "--method", "adaptseg"]))
    assert cfg.method == "adaptseg"  # a file without a method takes --method's
    rd = tmp_path / "runs" / "r"  # a run directory's config.yaml
    rd.mkdir(parents=True)
    (rd / "config.yaml").write_text("method: mat\n")
    one_line(*run(capsys, "train", rd, "--method", "source_only", "--no-mlflow"),
             str(rd / "config.yaml"), "method 'mat'", "--method 'source_only'")


@pytest.mark.parametrize("text, lines", [
    ("method: source_only\nrun:\n  seed: 1\nrun:\n  seed: 2\n", (2, 4)),
    ("method: source_only\nrun.seed: 1\nrun.iterations: 3\nrun.seed: 2\n", (2, 4)),
    ("method: source_only\nrun:\n  seed: 1\nrun.seed: 2\n", (3, 4)),
    ("method: source_only\nrun:\n  seed: 1\n  iterations: 2\n  seed: 2\n", (3, 5)),
])
def test_duplicate_yaml_keys_name_the_key_and_both_lines(tmp_path, capsys, text, lines):
    p = _yaml(tmp_path, text)
    key = "run" if text.count("run:") == 2 else "run.seed"
    one_line(*run(capsys, "train", p, "--no-mlflow"), str(p), f"{key} is set twice",
             f"lines {lines[0]} and {lines[1]}")


def test_yaml_merge_keys_still_override(tmp_path):
    from uda_ray.config import load_config

    p = _yaml(tmp_path, "method: source_only\nrun:\n  <<: {seed: 1, iterations: 3}\n  seed: 2\n")
    assert load_config(p).run.seed == 2


@pytest.mark.parametrize("name", ["../escaped", "a/b", "a\\b", ".", ".."])
def test_run_name_is_one_plain_folder_name(tmp_path, capsys, name):
    one_line(*train(capsys, tmp_path, "--set", f"run.name={name}"), "run.name: expected one folder name")
    assert not (tmp_path / "escaped").exists()


def test_blank_run_name_is_refused_and_empty_is_the_default():
    from uda_ray.config import ConfigError, build_config

    with pytest.raises(ConfigError, match="run.name: expected one folder name"):
        build_config({"run.name": "  "}, method="source_only")
    assert build_config({"run.name": ""}, method="source_only").run_name == "source_only-s0"


@pytest.mark.parametrize("bins", ["a,b", "1,,2", "0,1", "-1", "1.5"])
def test_ppm_bins_are_checked_for_every_arch(tmp_path, capsys, bins):
    one_line(*train(capsys, tmp_path, "--set", f"model.ppm_bins={bins}"),
             "model.ppm_bins: expected comma-separated positive integers", repr(bins))


# --- study definitions: one line, before Ray starts -------------------------------------------

STUDY_HEAD = ("from uda_ray.study import Row, Study\n"
              "BASE = {'preset': 'tiny-cpu', 'data.synth': False, 'data.root': 'nowhere'}\n")


@pytest.fixture
def no_ray(monkeypatch):
    """The study errors are found at load: Ray must never start."""
    from uda_ray import distributed

    def refuse(*a, **k):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(distributed, "init_ray", refuse)


@pytest.mark.parametrize("rows, extra, needles", [
    ("Row('a', 'source_only'), Row('b', 'adabn', init_from='nope')", "",
     ("row b starts from unknown row 'nope'",)),
    ("Row('a', 'adabn', init_from='b'), Row('b', 'adabn', init_from='a')", "", ("circular init_from",)),
    ("Row('a', 'adabn', init_from='a')", "", ("row a starts from itself",)),
    ("Row('a', 'source_only'), Row('a', 'adabn')", "", ("duplicate row names",)),
    ("Row('a', 'source_only')", ", baseline='z'", ("baseline 'z' is not a row",)),
])
def test_study_definition_errors_are_one_line(tmp_path, capsys, no_ray, rows, extra, needles):
    p = tmp_path / "bad_study.py"
    p.write_text(STUDY_HEAD + f"STUDY = Study(name='bad', base=BASE, rows=[{rows}]{extra})\n")
    one_line(*run(capsys, "study", p, "--out", tmp_path / "runs"), f"{p}: study bad: ", *needles)


def test_study_syntax_error_names_the_file_and_line(tmp_path, capsys, no_ray):
    p = tmp_path / "broken.py"
    p.write_text(STUDY_HEAD + "STUDY = Study(name='x', base=BASE,\n    rows=[Row('a' 'source_only')]]\n")
    one_line(*run(capsys, "study", p, "--out", tmp_path / "runs"), f"{p}:4: syntax error: ")


def test_study_errors_stay_value_errors():
    from uda_ray.study import Row, Study

    with pytest.raises(ValueError, match="duplicate row names"):
        Study(name="x", rows=[Row("a", "source_only"), Row("a", "source_only")])


# --- MLflow URIs --------------------------------------------------------------------------------

def test_unsupported_tracking_uri_is_one_line(tmp_path, capsys, no_ray):
    needles = ("garbage://x", "sqlite:///", "http")
    p = tmp_path / "ok_study.py"
    p.write_text(STUDY_HEAD + "STUDY = Study(name='ok', base=BASE, rows=[Row('a', 'source_only')])\n")
    one_line(*run(capsys, "study", p, "--out", tmp_path / "runs", "--tracking-uri", "garbage://x"), *needles)
    one_line(*run(capsys, "compare", "quickstart", "--tracking-uri", "garbage://x", "--out", tmp_path), *needles)
    tracked = [a for a in TINY if a != "--no-mlflow"]
    one_line(*run(capsys, "train", "tiny-cpu", *tracked, "--set", f"run.out={tmp_path / 'runs'}",
                  "--tracking-uri", "garbage://x"), *needles)
    assert not (tmp_path / "runs").exists()  # refused before a run directory is made


# --- pretrained weights that are not weights --------------------------------------------------

def test_pretrained_file_that_is_not_weights(tmp_path, capsys):
    import pickle

    import torch

    root = tree(tmp_path / "data")
    text = tmp_path / "notes.txt"
    text.write_text("not weights\n")
    pkl = tmp_path / "obj.pkl"
    pkl.write_bytes(pickle.dumps({"a": {1, 2}}))
    lst = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], lst)
    for f in (text, pkl, lst):
        one_line(*train(capsys, tmp_path, "--set", f"data.root={root}", "--set", f"model.pretrained={f}",
                        "--set", f"run.name={f.stem}"),
                 f"model.pretrained: {f}", "a torch state dict of tensors")
    other = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(2, 2)}, other)
    one_line(*train(capsys, tmp_path, "--set", f"data.root={root}", "--set", f"model.pretrained={other}",
                    "--set", "run.name=other"),
             f"model.pretrained: {other} does not fit the TinySeg backbone")


# --- memory -------------------------------------------------------------------------------------

def test_a_batch_too_large_for_memory_is_refused_before_training(tmp_path, capsys):
    import time

    root = tree(tmp_path / "data")
    t0 = time.perf_counter()
    line = one_line(*train(capsys, tmp_path, "--set", f"data.root={root}", "--set", "data.crop_w=100000",
                           "--set", "data.crop_h=100000", "--set", "run.name=huge"),
                    "data.crop_w x data.crop_h = 100000x100000", "data.batch_size = 4", "available")
    assert time.perf_counter() - t0 < 60, line
    assert not list((tmp_path / "runs" / "huge").glob("checkpoints/*"))
    assert train(capsys, tmp_path, "--set", f"data.root={root}", "--set", "data.crop_w=48",
                 "--set", "data.crop_h=24", "--set", "run.name=fits")[0] == 0  # a tiny run still trains


def test_out_of_memory_anywhere_is_one_line(capsys):
    one_line(*run(capsys, "bench", "step", "--preset", "tiny-cpu", "--method", "source_only", "--warmup", "0",
                  "--iters", "1", "--set", "data.source_w=200000", "--set", "data.source_h=200000"),
             "out of memory", "data.source_w x data.source_h = 200000x200000")


def test_out_of_memory_errors_are_recognised():
    import numpy as np
    from torch.utils.data import DataLoader, Dataset

    from uda_ray.cli import _out_of_memory

    class Huge(Dataset):
        def __len__(self):
            return 1

        def __getitem__(self, i):
            return np.empty((10**6, 10**6, 3), np.float32)  # 12 TB: refused at once

    with pytest.raises(MemoryError) as direct:
        Huge()[0]
    assert _out_of_memory(direct.value).startswith("Unable to allocate")
    with pytest.raises(RuntimeError) as worker:  # numpy's error in a loader worker comes back as a RuntimeError
        next(iter(DataLoader(Huge(), num_workers=1)))
    assert _out_of_memory(worker.value).startswith("Unable to allocate")
    assert _out_of_memory(ValueError("x")) is None
