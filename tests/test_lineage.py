"""A run's identity includes where it started from (its lineage), and the last ways a
checkpoint could be silently wrong: a run directory that resumes another parent's run, a
checkpoint whose ``finite`` flag lies, leftovers of killed or failed checkpoint writes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from trees import tiny_cfg
from uda_ray.checkpoint import (FORMAT, SCRATCH, CheckpointError, checkpoint_path, config_hash, file_identity,
                                lineage_hash, lineage_of, load_checkpoint_file)
from uda_ray.cli import main as cli
from uda_ray.engine import fit
from uda_ray.fingerprint import stage_context
from uda_ray.models.from_config import start_of


def test_the_lineage_is_the_config_over_the_parent_recursively(data_root, tmp_path):
    src_cfg = tiny_cfg(data_root, tmp_path, "source_only", **{"run.iterations": 1, "run.name": "src"})
    src = fit(src_cfg)
    state = load_checkpoint_file(src.run_dir)
    # a root run from random weights: its config hash over "scratch"
    assert state["parent_lineage"] == SCRATCH
    assert state["lineage"] == lineage_hash(config_hash(src_cfg.flat()), SCRATCH, stage_context(src_cfg))
    ad_cfg = tiny_cfg(data_root, tmp_path, "adaptseg", **{"run.iterations": 1, "run.name": "ad",
                                                           "run.init_from": str(src.run_dir)})
    ad = load_checkpoint_file(fit(ad_cfg).run_dir)
    assert ad["parent_lineage"] == state["lineage"] and ad["parent"] == str(src.run_dir)
    assert ad["lineage"] == lineage_hash(config_hash(ad_cfg.flat()), state["lineage"], stage_context(ad_cfg))
    # the name and folder of a run are not its identity; its parent is
    assert lineage_of(tiny_cfg(data_root, tmp_path / "elsewhere", "adaptseg", **{
        "run.iterations": 1, "run.name": "other", "run.init_from": str(src.run_dir)}))["lineage"] == ad["lineage"]


def test_pretrained_weights_are_the_parent_of_a_root_run(data_root, tmp_path):
    from uda_ray.models import build_model

    weights = tmp_path / "enc.pth"
    torch.save(build_model("tiny", num_classes=19).backbone.state_dict(), weights)
    cfg = tiny_cfg(data_root, tmp_path, "source_only", **{"model.pretrained": str(weights)})
    first = lineage_of(cfg, start=start_of(cfg))
    assert first["parent_lineage"] == f"{weights}:{file_identity(weights)}"
    torch.save({k: v + 1 if v.is_floating_point() else v
                for k, v in build_model("tiny", num_classes=19).backbone.state_dict().items()}, weights)
    os.utime(weights, ns=(1, 1))  # other bytes under the same name: another parent
    assert lineage_of(cfg, start=start_of(cfg))["lineage"] != first["lineage"]
    assert start_of(tiny_cfg(data_root, tmp_path, "source_only")) == SCRATCH


def _train_args(data_root, tmp_path, *sets):
    args = ["train", "tiny-cpu", "--no-mlflow", "--quiet"]
    base = [f"data.root={data_root}", "data.synth=false", "data.source_w=64", "data.source_h=32",
            "data.target_w=64", "data.target_h=32", "data.select_n=1", "run.iterations=1", "run.num_workers=0",
            f"run.out={tmp_path / 'runs'}", *sets]
    return args + [x for s in base for x in ("--set", s)]


def test_train_refuses_another_parent_under_the_same_run_name(data_root, tmp_path, capsys):
    runs = tmp_path / "runs"
    assert cli(_train_args(data_root, tmp_path, "run.name=srcA") + ["--method", "source_only"]) == 0
    assert cli(_train_args(data_root, tmp_path, "run.name=srcB", "optim.lr=0.02") + ["--method", "source_only"]) == 0
    ad = ["--method", "adaptseg"]
    assert cli(_train_args(data_root, tmp_path, "run.name=ad", f"run.init_from={runs / 'srcA'}") + ad) == 0
    yaml_before = (runs / "ad" / "config.yaml").read_text()
    weights = load_checkpoint_file(runs / "ad")["modules"]["model"]
    capsys.readouterr()
    # the same run name from another source model: refused in one line naming both parents
    assert cli(_train_args(data_root, tmp_path, "run.name=ad", f"run.init_from={runs / 'srcB'}") + ad) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(runs / "srcA") in err and str(runs / "srcB") in err and "--overwrite" in err
    assert (runs / "ad" / "config.yaml").read_text() == yaml_before  # the record still says srcA
    after = load_checkpoint_file(runs / "ad")["modules"]["model"]
    assert all(torch.equal(weights[k], after[k]) for k in weights)
    # the same parent resumes (a finished run: evaluated again); --overwrite starts from srcB
    assert cli(_train_args(data_root, tmp_path, "run.name=ad", f"run.init_from={runs / 'srcA'}") + ad) == 0
    assert cli(_train_args(data_root, tmp_path, "run.name=ad", f"run.init_from={runs / 'srcB'}") + ad
               + ["--overwrite"]) == 0
    assert load_checkpoint_file(runs / "ad")["parent"] == str(runs / "srcB")
    # a parent retrained in place (another config at srcA) changes the child's lineage too
    assert cli(_train_args(data_root, tmp_path, "run.name=srcA", "optim.lr=0.03") + ["--method", "source_only",
                                                                                    "--overwrite"]) == 0
    assert cli(_train_args(data_root, tmp_path, "run.name=ad2", f"run.init_from={runs / 'srcA'}") + ad) == 0
    assert load_checkpoint_file(runs / "ad2")["parent_lineage"] == load_checkpoint_file(runs / "srcA")["lineage"]


def test_eval_prints_the_lineage(data_root, tmp_path, capsys):
    run = fit(tiny_cfg(data_root, tmp_path, "source_only", **{"run.iterations": 1}))
    assert cli(["eval", str(run.run_dir), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert f"lineage {load_checkpoint_file(run.run_dir)['lineage']}" in out and SCRATCH in out


def test_a_checkpoint_whose_finite_flag_lies_is_refused(data_root, tmp_path, capsys):
    run = fit(tiny_cfg(data_root, tmp_path, "source_only", **{"run.iterations": 1}))
    state = torch.load(checkpoint_path(run.run_dir), weights_only=True)
    first = next(k for k, v in state["modules"]["model"].items() if v.is_floating_point())
    state["modules"]["model"][first][...] = float("nan")
    assert state["finite"] is True  # the flag says finite; the weights are not
    bad = tmp_path / "nan.pt"
    torch.save(state, bad)
    assert load_checkpoint_file(bad)["finite"] is False
    assert cli(["eval", str(bad), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "non-finite" in err and str(bad) in err
    with pytest.raises(CheckpointError, match="non-finite"):
        fit(tiny_cfg(data_root, tmp_path, "adaptseg", **{"run.name": "child", "run.init_from": str(bad)}))


def test_leftover_temporary_checkpoints_are_removed_by_the_next_run(data_root, tmp_path):
    cfg = tiny_cfg(data_root, tmp_path, "source_only", **{"run.iterations": 2, "run.name": "r"})
    fit(cfg, stop_at=1)
    ckpt = checkpoint_path(tmp_path / "runs" / "r")
    leftover = ckpt.with_name(f"{ckpt.name}.99999.tmp")  # a write killed mid-way (kill -9)
    leftover.write_bytes(b"half a checkpoint")
    assert fit(cfg).step == 2
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["last.pt"]


def test_a_failed_checkpoint_write_is_one_line_and_leaves_no_temporary_file(data_root, tmp_path):
    """A full disk, as the kernel reports it to a writer over its file-size limit (EFBIG):
    the write fails, the temporary file is removed and the error is one line."""
    run_dir = tmp_path / "runs" / "full"
    script = textwrap.dedent(f"""
        import resource, signal, sys
        from uda_ray.cli import main
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
        sys.exit(main({_train_args(data_root, tmp_path, "run.name=full") + ["--method", "source_only"]!r}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(err) == 1 and "could not be written" in err[0] and "File too large" in err[0], err
    assert not list((run_dir / "checkpoints").glob("*.tmp"))
    assert not (run_dir / "checkpoints" / "last.pt").exists()


def test_a_checkpoint_without_a_format_or_lineage_still_loads_as_a_parent(data_root, tmp_path):
    """A checkpoint written before lineages existed stands for its config at its step."""
    run = fit(tiny_cfg(data_root, tmp_path, "source_only", **{"run.iterations": 1}))
    state = torch.load(checkpoint_path(run.run_dir), weights_only=True)
    for k in ("lineage", "parent_lineage", "parent", "parent_run_id", "run_id"):
        state.pop(k, None)
    old = tmp_path / "old.pt"
    torch.save(state, old)
    assert state["format"] == FORMAT
    cfg = tiny_cfg(data_root, tmp_path, "adaptseg", **{"run.name": "c", "run.init_from": str(old)})
    assert lineage_of(cfg)["parent_lineage"] == f"legacy:{state['config_hash']}@1"
