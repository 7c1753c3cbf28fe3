"""A run directory is one config's, and a checkpoint is data, never code: the cases of
the trust issue (code from a checkpoint, a reused run name, two runs in one directory, a
diverged run resumed, eval on every run type, unreadable checkpoints)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from trees import tiny_cfg
from uda_ray.checkpoint import (FORMAT, CheckpointError, checkpoint_path, claim_run_dir, load_checkpoint_file,
                                lock_run_dir)
from uda_ray.cli import main as cli
from uda_ray.engine import NonFiniteLoss, fit


class _Evil:
    """A pickle that runs a command when it is loaded without weights_only."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_checkpoint_that_would_run_code_is_refused_by_eval_and_init_from(data_root, tmp_path, capsys):
    marker = tmp_path / "pwned"
    bad = tmp_path / "downloaded.pt"
    torch.save({"format": FORMAT, "step": 0, "config": {}, "modules": {"model": _Evil(marker)}}, bad)
    with pytest.raises(CheckpointError, match="asks to run code"):
        load_checkpoint_file(bad)
    assert cli(["eval", str(bad), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(bad) in err and "weights_only" in err
    cfg = tmp_path / "run.yaml"
    cfg.write_text(textwrap.dedent(f"""
        method: source_only
        data: {{root: {data_root}, synth: false, source_w: 64, source_h: 32, target_w: 64, target_h: 32,
               select_n: 1}}
        model: {{arch: tiny, bn: shared}}
        run: {{out: {tmp_path / 'runs'}, iterations: 1, num_workers: 0, init_from: {bad}}}
    """))
    assert cli(["train", str(cfg), "--no-mlflow", "--quiet"]) == 2
    assert str(bad) in capsys.readouterr().err
    assert not marker.exists()


@pytest.mark.parametrize("content", ["truncated", "garbage", "tensor", "old_format"])
def test_unreadable_checkpoints_are_one_line_errors(data_root, tmp_path, content, capsys):
    good = fit(tiny_cfg(data_root, tmp_path, "source_only", **{"run.iterations": 1}))
    path = tmp_path / "x.pt"
    if content == "truncated":
        data = checkpoint_path(good.run_dir).read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif content == "garbage":
        path.write_bytes(b"not a checkpoint at all")
    elif content == "tensor":
        torch.save(torch.zeros(3), path)
    else:  # a state dict without the format tag (e.g. another tool's, or an older release's)
        torch.save({"modules": {}, "step": 1}, path)
    assert cli(["eval", str(path), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("uda-ray: error:") and "\n" not in err and str(path) in err
    with pytest.raises(CheckpointError, match="x.pt"):
        fit(tiny_cfg(data_root, tmp_path, "source_only", **{"run.name": "b", "run.init_from": str(path)}))


def test_a_run_directory_resumes_only_its_own_config(data_root, tmp_path):
    base = {"run.name": "base", "run.iterations": 2}
    first = fit(tiny_cfg(data_root, tmp_path, "source_only", **base))
    yaml_before = (first.run_dir / "config.yaml").read_text()
    weights = load_checkpoint_file(first.run_dir)["modules"]["model"]
    # another learning rate under the same name: refused, nothing written
    with pytest.raises(CheckpointError, match=r"another config \(optim.lr 0.01 -> 0.5\).*--overwrite"):
        fit(tiny_cfg(data_root, tmp_path, "source_only", **base, **{"optim.lr": 0.5}))
    # another method or architecture: refused by the same check (no KeyError, no state-dict error)
    with pytest.raises(CheckpointError, match="method 'source_only' -> 'adaptseg'"):
        fit(tiny_cfg(data_root, tmp_path, "adaptseg", **base))
    with pytest.raises(CheckpointError, match="model.arch"):
        fit(tiny_cfg(data_root, tmp_path, "source_only", **base, **{"model.arch": "tiny_ppm"}))
    assert (first.run_dir / "config.yaml").read_text() == yaml_before
    # the original config still resumes (a finished run: evaluated again, nothing trained)
    again = fit(tiny_cfg(data_root, tmp_path, "source_only", **base))
    assert again.step == 2 and again.scores.miou == pytest.approx(first.scores.miou)
    after = load_checkpoint_file(first.run_dir)["modules"]["model"]
    assert all(torch.equal(weights[k], after[k]) for k in weights)
    # --overwrite starts anew with the new config
    new = fit(tiny_cfg(data_root, tmp_path, "source_only", **base, **{"optim.lr": 0.5}), overwrite=True)
    assert load_checkpoint_file(new.run_dir)["config"]["optim.lr"] == 0.5
    assert "lr: 0.5" in (new.run_dir / "config.yaml").read_text()


def test_the_train_cli_refuses_another_config_in_a_run_directory(data_root, tmp_path, capsys):
    args = ["train", "tiny-cpu", "--method", "source_only", "--no-mlflow", "--quiet"]
    sets = [f"data.root={data_root}", "data.synth=false", "data.source_w=64", "data.source_h=32",
            "data.target_w=64", "data.target_h=32", "data.select_n=1", "run.iterations=1", "run.num_workers=0",
            f"run.out={tmp_path / 'runs'}", "run.name=base"]
    flags = [x for s in sets for x in ("--set", s)]
    assert cli(args + flags) == 0
    assert cli(args + flags + ["--set", "optim.lr=0.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "optim.lr" in err and "--overwrite" in err
    assert cli(args + flags + ["--set", "optim.lr=0.5", "--overwrite"]) == 0
    assert load_checkpoint_file(tmp_path / "runs" / "base")["config"]["optim.lr"] == 0.5


def test_a_second_process_on_the_same_run_fails_at_once(data_root, tmp_path):
    run_dir = tmp_path / "runs" / "same"
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from pathlib import Path
            from uda_ray.checkpoint import lock_run_dir
            lock = lock_run_dir(Path({str(run_dir)!r}))
            print("locked", flush=True)
            time.sleep(120)
        """)], stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parent)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(CheckpointError, match=rf"in use by pid {holder.pid} on"):
            fit(tiny_cfg(data_root, tmp_path, "source_only", **{"run.name": "same", "run.seed": 1}))
    finally:
        holder.kill()
        holder.wait()
    # the lock goes with its process (kill -9 included): the run can start now
    assert fit(tiny_cfg(data_root, tmp_path, "source_only", **{"run.name": "same", "run.iterations": 1})).step == 1
    with lock_run_dir(run_dir):  # and is released when a run ends
        pass


def test_a_diverged_run_is_never_resumed(data_root, tmp_path):
    bad = {"run.name": "div", "optim.lr": 1e30, "run.iterations": 6, "run.log_every": 3, "run.checkpoint_every": 1}
    with pytest.raises(NonFiniteLoss):
        fit(tiny_cfg(data_root, tmp_path, "source_only", **bad))
    assert checkpoint_path(tmp_path / "runs" / "div").is_file()  # its checkpoints stay, for inspection
    with pytest.raises(CheckpointError, match="diverged"):
        fit(tiny_cfg(data_root, tmp_path, "source_only", **bad))
    sane = tiny_cfg(data_root, tmp_path, "source_only", **{**bad, "optim.lr": 0.01})
    with pytest.raises(CheckpointError, match="diverged"):
        fit(sane)
    assert fit(sane, overwrite=True).step == 6


def test_non_finite_weights_are_flagged_and_refused(data_root, tmp_path):
    good = fit(tiny_cfg(data_root, tmp_path, "source_only", **{"run.iterations": 1, "run.name": "ok"}))
    state = load_checkpoint_file(good.run_dir)
    assert state["finite"] is True
    # a checkpoint whose weights went NaN (written as save_checkpoint would mark it)
    w = next(k for k, v in state["modules"]["model"].items() if v.is_floating_point())
    state["modules"]["model"][w] = torch.full_like(state["modules"]["model"][w], float("nan"))
    state["finite"] = False
    nan_dir = tmp_path / "runs" / "nan"
    checkpoint_path(nan_dir).parent.mkdir(parents=True)
    torch.save(state, checkpoint_path(nan_dir))
    with pytest.raises(CheckpointError, match="non-finite weights"):
        claim_run_dir(nan_dir, tiny_cfg(data_root, tmp_path, "source_only", **{"run.iterations": 1}))
    with pytest.raises(CheckpointError, match="non-finite weights"):
        fit(tiny_cfg(data_root, tmp_path, "source_only", **{"run.name": "child", "run.init_from": str(nan_dir)}))


def test_eval_reads_only_the_val_split_and_works_on_adabn(data_root, tmp_path, capsys):
    src = fit(tiny_cfg(data_root, tmp_path, "source_only", **{"run.iterations": 1, "run.name": "src"}))
    adabn = fit(tiny_cfg(data_root, tmp_path, "adabn", **{"run.name": "adabn", "run.init_from": str(src.run_dir)}))
    # a data root holding the target's val split only: no source folder, no target train split
    val_only = tmp_path / "val_only"
    for sub in ("leftImg8bit/val", "gtFine/val"):
        shutil.copytree(data_root / "cityscapes" / sub, val_only / "cityscapes" / sub)
    capsys.readouterr()
    assert cli(["eval", str(adabn.run_dir), "--device", "cpu", "--data-root", str(val_only)]) == 0
    out = capsys.readouterr().out
    miou = float(next(ln for ln in out.splitlines() if ln.startswith("mIoU")).split()[1])
    assert miou == pytest.approx(100 * adabn.scores.miou, abs=0.01)
