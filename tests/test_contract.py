"""The contract every method of the registry keeps, checked on each of them (and on the
later stages of the multi-stage methods):

- a run of N steps equals N/2 steps, a checkpoint, and a resumed N/2, bit for bit;
- every optimizer's parameters belong to a module of ``modules()`` (so the checkpoint
  holds everything that trains);
- ``uda-ray eval`` works on its checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

from trees import tiny_cfg
from uda_ray.checkpoint import checkpoint_path, load_checkpoint_file
from uda_ray.cli import main as cli
from uda_ray.config import METHODS
from uda_ray.engine import Context, build_segmenter, fit


@dataclass
class Case:
    method: str
    values: dict = field(default_factory=dict)
    parent: str | None = None  # the case whose run starts this one (run.init_from)


CASES = {
    "source_only": Case("source_only"),
    "adabn": Case("adabn", parent="source_only"),
    "adaptseg": Case("adaptseg"),
    "mat": Case("mat", {"model.arch": "mat_tiny", "mat.ndf": 8}),
    "mat_proxy": Case("mat", {"model.arch": "mat_tiny", "mat.ndf": 8, "mat.proxy": True}, parent="mat"),
    "dast": Case("dast", {"dast.ndf": 8, "dast.d_width": 16}),
    "dast_self_training": Case("dast", {"dast.ndf": 8, "dast.d_width": 16, "dast.self_training": True,
                                        "dast.rounds": 2}, parent="dast"),
    "jal": Case("jal", {"jal.ndf": 8}),
    "pww": Case("pww", {"pww.ndf": 8}),
    "curriculum": Case("curriculum", {"model.arch": "tiny_ppm", "model.num_decoders": 2}),
}


def test_every_registered_method_has_a_case():
    assert {c.method for c in CASES.values()} == set(METHODS)


def _run(data_root, tmp_path, name: str, case: str, stop_at: int = 0):
    c = CASES[case]
    values = {**c.values, "run.iterations": 2, "run.name": name}
    if c.parent:
        parent = tmp_path / "runs" / f"parent-{case}"
        if not checkpoint_path(parent).is_file():
            _run(data_root, tmp_path, f"parent-{case}", c.parent)
        values["run.init_from"] = str(parent)
    cfg = tiny_cfg(data_root, tmp_path, c.method, **values)
    return cfg, fit(cfg, stop_at=stop_at)


@pytest.mark.parametrize("case", list(CASES))
def test_method_contract(data_root, tmp_path, case, capsys):
    cfg, whole = _run(data_root, tmp_path, "whole", case)
    # every optimizer's parameters are in the checkpoint's modules
    ctx = Context(cfg, torch.device("cpu"), amp=False, channels_last=False, run_dir=tmp_path / "probe")
    method = METHODS[cfg.method](cfg, build_segmenter(cfg, ctx.device), ctx)
    held = {id(p) for m in method.modules().values() for p in m.parameters()}
    for name, so in method.optimizers().items():
        params = [p for g in so.optimizer.param_groups for p in g["params"]]
        assert params and all(id(p) in held for p in params), f"optimizer {name} trains a module not checkpointed"
    # N = N/2 + checkpoint + resume + N/2, bit for bit
    if method.trains:
        _, half = _run(data_root, tmp_path, "split", case, stop_at=1)
        assert half.step == 1 and half.scores is None
        _, split = _run(data_root, tmp_path, "split", case)
        assert split.step == whole.step == 2
        a = load_checkpoint_file(whole.run_dir)["modules"]
        b = load_checkpoint_file(split.run_dir)["modules"]
        assert a.keys() == b.keys()
        for mod in a:
            for k in a[mod]:
                assert torch.equal(a[mod][k], b[mod][k]), f"{case}: {mod}.{k} differs after resume"
    # eval of its checkpoint
    capsys.readouterr()
    assert cli(["eval", str(whole.run_dir), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert f"{cfg.method} at step {whole.step}" in out and "mIoU" in out
