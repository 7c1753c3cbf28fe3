"""The engine and the baseline methods on a tiny tree in the real layouts, on CPU."""

from __future__ import annotations

import math

import pytest
import torch

from trees import random_batches, tiny_cfg
from uda_ray.config import ConfigError
from uda_ray.checkpoint import load_checkpoint_file
from uda_ray.engine import Context, NonFiniteLoss, build_segmenter, fit, poly_lr
from uda_ray.losses import gan_loss, seg_loss
from uda_ray.config import METHODS


def test_losses_on_hand_cases():
    # two pixels, two classes: logits (0, ln 3) -> p = (1/4, 3/4)

    logits = torch.tensor([0.0, math.log(3.0)]).view(1, 2, 1, 1).expand(1, 2, 1, 2)
    label = torch.tensor([[[1, 255]]])  # second pixel ignored
    assert seg_loss(logits, label).item() == pytest.approx(-math.log(0.75))
    d = torch.tensor([0.0, 2.0]).view(1, 1, 1, 2)
    assert gan_loss(d, 1.0, "ls").item() == pytest.approx(((0 - 1) ** 2 + (2 - 1) ** 2) / 2)
    expected = (math.log(2) + (math.log1p(math.exp(-2.0)))) / 2  # BCE(sigmoid(0),1), BCE(sigmoid(2),1)
    assert gan_loss(d, 1.0, "vanilla").item() == pytest.approx(expected)
    assert poly_lr(1.0, 50, 100, 0.9) == pytest.approx(0.5 ** 0.9)
    assert poly_lr(1.0, 100, 100, 0.9) == 0.0


def _adaptseg(data_root, tmp_path, dtype=torch.float32, **kw):
    cfg = tiny_cfg(data_root, tmp_path, "adaptseg", **kw)
    ctx = Context(cfg, torch.device("cpu"), amp=False, channels_last=False)
    method = METHODS["adaptseg"](cfg, build_segmenter(cfg, ctx.device).to(dtype), ctx)
    for d in method.discs.values():
        d.to(dtype)
    return (method, *random_batches(2, dtype))


def test_adaptseg_generator_step_leaves_discriminators_untouched(data_root, tmp_path):
    method, src, tgt = _adaptseg(data_root, tmp_path)
    logs, prob_s, prob_t = method.generator_step(src, tgt)
    for d in method.discs.values():
        assert all(p.grad is None for p in d.parameters())
        assert all(p.requires_grad for p in d.parameters())  # unfrozen again for their own step
    assert all(p.grad is not None for p in method.model.parameters() if p.requires_grad)
    assert set(logs) == {"loss/seg_src", "loss/seg_src_aux", "loss/adv_tgt_main", "loss/adv_tgt_aux"}
    seg_grads = [p.grad.clone() for p in method.model.parameters()]
    method.discriminator_step(prob_s, prob_t)
    for d in method.discs.values():
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in d.parameters())
    assert all(torch.equal(a, p.grad) for a, p in zip(seg_grads, method.model.parameters()))


def test_adaptseg_adversarial_weights_scale_the_segmenter_gradient(data_root, tmp_path):
    # With the segmentation weights of the source term fixed, the target term's gradient
    # on the segmenter is linear in lambda_adv: doubling both lambdas doubles the difference.
    grads = {}
    for lam in (0.0, 1e-3, 2e-3):
        torch.manual_seed(0)
        method, src, tgt = _adaptseg(data_root, tmp_path, torch.float64, **{"adaptseg.lambda_adv_main": lam,
                                                             "adaptseg.lambda_adv_aux": lam})
        method.generator_step(src, tgt)
        grads[lam] = torch.cat([p.grad.flatten() for p in method.model.parameters()])
    d1, d2 = grads[1e-3] - grads[0.0], grads[2e-3] - grads[0.0]
    assert d1.abs().max() > 0
    assert torch.allclose(d2, 2 * d1, rtol=1e-6, atol=1e-15)


SMOKE = [
    ("source_only", {}),
    ("source_only", {"model.bn": "frozen"}),
    ("source_only", {"model.bn": "per_domain"}),
    ("source_only", {"model.multi_level": False}),
    ("adaptseg", {}),
    ("adaptseg", {"adaptseg.gan": "ls"}),
    ("adaptseg", {"adaptseg.multi_level": False}),
    ("adaptseg", {"adaptseg.multi_level": False, "model.multi_level": False}),
    ("adaptseg", {"model.bn": "per_domain"}),
    ("adaptseg", {"model.bn": "frozen"}),
]


@pytest.mark.parametrize("method, values", SMOKE, ids=[f"{m}-{'-'.join(f'{k}={v}' for k, v in v.items())}"
                                                      for m, v in SMOKE])
def test_two_iteration_smoke(data_root, tmp_path, method, values):
    cfg = tiny_cfg(data_root, tmp_path, method, **{"run.iterations": 2, **values})
    result = fit(cfg)
    assert result.step == 2 and 0.0 <= result.scores.miou <= 1.0
    assert (result.run_dir / "mosaic.png").is_file()
    table = (result.run_dir / "iou_per_class.csv").read_text().splitlines()  # in per cent (issue 29.5)
    s = result.scores
    assert table[0] == "class,IoU %,Acc %" and table[-1] == f"mIoU,{100 * s.miou:.4f},{100 * s.macc:.4f}"


def test_adabn_reestimates_target_statistics_from_a_source_checkpoint(data_root, tmp_path):
    src = fit(tiny_cfg(data_root, tmp_path, "source_only", **{"run.name": "src", "run.iterations": 2}))
    before = load_checkpoint_file(src.run_dir)["modules"]["model"]
    cfg = tiny_cfg(data_root, tmp_path, "adabn", **{"run.name": "adabn", "run.init_from": str(src.run_dir)})
    result = fit(cfg)
    after = load_checkpoint_file(result.run_dir)["modules"]["model"]
    means = [k for k in before if k.endswith("running_mean")]
    assert means and all(not torch.equal(before[k], after[k]) for k in means)
    weights = [k for k in before if k.endswith("weight")]
    assert all(torch.equal(before[k], after[k]) for k in weights)  # no training
    with pytest.raises(ConfigError, match="run.init_from: adabn needs"):
        fit(tiny_cfg(data_root, tmp_path, "adabn", **{"run.name": "adabn2"}))


def test_adabn_encoder_scope_keeps_the_decoder_statistics(data_root, tmp_path):
    arch = {"model.arch": "mat_tiny", "run.iterations": 2}
    src = fit(tiny_cfg(data_root, tmp_path, "source_only", **{"run.name": "src", **arch}))
    before = load_checkpoint_file(src.run_dir)["modules"]["model"]
    cfg = tiny_cfg(data_root, tmp_path, "adabn", **{"run.name": "enc", "run.init_from": str(src.run_dir),
                                                     "model.arch": "mat_tiny", "adabn.scope": "encoder"})
    after = load_checkpoint_file(fit(cfg).run_dir)["modules"]["model"]
    means = [k for k in before if k.endswith("running_mean")]
    encoder = [k for k in means if k.startswith("backbone.")]
    decoder = [k for k in means if not k.startswith("backbone.")]
    assert encoder and decoder
    assert all(not torch.equal(before[k], after[k]) for k in encoder)
    assert all(torch.equal(before[k], after[k]) for k in decoder)


def test_multi_level_switch_needs_an_aux_head(data_root, tmp_path):
    with pytest.raises(ConfigError, match="adaptseg.multi_level: needs model.multi_level"):
        fit(tiny_cfg(data_root, tmp_path, "adaptseg", **{"model.multi_level": False}))


def test_non_finite_loss_stops_the_run(data_root, tmp_path):
    cfg = tiny_cfg(data_root, tmp_path, "source_only", **{"optim.lr": 1e30, "run.iterations": 6,
                                                          "run.log_every": 3})
    with pytest.raises(NonFiniteLoss, match=r"loss/seg_src.*non-finite between steps"):
        fit(cfg)


def test_train_cli_logs_a_full_row_to_mlflow(data_root, tmp_path, capsys):
    import mlflow

    from uda_ray.cli import main as cli

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = tmp_path / "run.yaml"
    cfg.write_text(tiny_cfg(data_root, tmp_path, "adaptseg", **{"run.name": "cli", "run.eval_every": 2}).to_yaml())
    assert cli(["train", str(cfg), "--set", "run.seed=5", "--tracking-uri", uri, "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "target-val mIoU" in out and "mlflow ui --backend-store-uri" in out
    client = mlflow.MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("uda-ray").experiment_id])
    assert run.info.status == "FINISHED"
    # issue 29.8: the UI command with one web worker, and the URL of the run list (not the
    # experiment's GenAI overview page, which shows no runs)
    assert f"mlflow ui --backend-store-uri {uri} --workers 1" in out
    assert f"/#/experiments/{run.info.experiment_id}/runs?workflowType=machine_learning" in out
    assert run.data.params["adaptseg.lambda_adv_main"] == "0.001" and run.data.params["run.seed"] == "5"
    tags = run.data.tags
    assert tags["method"] == "adaptseg" and tags["seed"] == "5" and tags["bn"] == "shared"
    assert tags["switch.adaptseg.multi_level"] == "True" and tags["dataset"] == "gta5->cityscapes"
    assert len(tags["mlflow.source.git.commit"]) == 40 and "uda_ray_version" in tags  # MLflow's standard tag
    assert tags["mlflow.source.type"] == "LOCAL" and tags["mlflow.loggedImages"]  # the mosaic as an image series
    # the store's artifacts are beside it, not in ./mlruns
    assert run.info.artifact_uri.startswith((tmp_path / "mlflow-artifacts").as_uri())
    assert {"val/mIoU", "val/IoU/road", "loss/seg_src", "loss/disc_main"} <= set(run.data.metrics)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/mIoU")] == [2, 4]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"mosaic.png", "iou_per_class.csv", "config.yaml", "images"} <= artifacts
    assert any("mosaic~val+step+4" in a.path for a in client.list_artifacts(run.info.run_id, "images"))
    # pointing train at the run directory resumes it (here: already finished, so it only evaluates)
    assert cli(["train", str(tmp_path / "runs" / "cli"), "--no-mlflow", "--quiet"]) == 0


def test_eval_cli_reports_the_protocol(data_root, tmp_path, capsys):
    from uda_ray.cli import main as cli

    result = fit(tiny_cfg(data_root, tmp_path, "source_only", **{"run.name": "ev", "run.iterations": 2}))
    capsys.readouterr()
    assert cli(["eval", str(result.run_dir)]) == 0
    out = capsys.readouterr().out
    assert "19-class protocol" in out and f"{100 * result.scores.miou:.2f}" in out


def test_selection_split_is_carved_from_target_train_and_reported_apart(data_root, tmp_path):
    from uda_ray.engine import build_datasets

    cfg = tiny_cfg(data_root, tmp_path, "source_only", **{"data.select_n": 2, "data.source_val_n": 2})
    data = build_datasets(cfg)
    sel = {p for p, _ in data["sel"].samples}
    tgt = {p for p, _ in data["target"].samples}
    val = {p for p, _ in data["val"].samples}
    assert len(sel) == 2 and len(tgt) == 1 and not sel & tgt and not sel & val
    assert all(lab is None for _, lab in data["target"].samples)  # adaptation never sees labels
    assert all("/train/" in str(p) for p in sel)
    assert len(data["src_val"]) == 2 and len(data["source"]) == 4
    again = build_datasets(cfg)
    assert {p for p, _ in again["sel"].samples} == sel  # seeded
    result = fit(cfg)
    assert {"val/mIoU", "sel/mIoU", "tgt/entropy", "src/mIoU", "val/IoU/road"} <= set(result.metrics)
    assert "sel/IoU/road" not in result.metrics and 0.0 <= result.metrics["tgt/entropy"] <= 1.0


def test_loss_curves_get_20_points_and_evaluation_time_is_not_training_time(data_root, tmp_path, monkeypatch):
    """A short run logs its losses often enough to draw a curve; the time an evaluation takes
    (here made 1 s) stays out of perf/sec_per_iter."""
    from types import SimpleNamespace

    from uda_ray import engine

    assert engine.log_interval(SimpleNamespace(log_every=50, iterations=150_000)) == 50
    assert engine.log_interval(SimpleNamespace(log_every=50, iterations=200)) == 10
    assert engine.log_interval(SimpleNamespace(log_every=50, iterations=2)) == 1

    logged = []

    class Recorder(engine.NullTracker):
        def log_metrics(self, metrics, step):
            logged.append((step, metrics))

    real = engine.evaluate_all

    def slow(*a, **k):
        import time

        time.sleep(1.0)
        return real(*a, **k)

    monkeypatch.setattr(engine, "evaluate_all", slow)
    cfg = tiny_cfg(data_root, tmp_path, "source_only", **{"run.iterations": 4, "run.eval_every": 1,
                                                          "run.log_every": 50, "run.mosaic_images": 0})
    fit(cfg, tracker=Recorder())
    losses = [(s, m) for s, m in logged if "loss/seg_src" in m]
    assert [s for s, _ in losses] == [1, 2, 3, 4]  # log_every 50 > 4 iterations / 20: every step
    assert all(m["perf/sec_per_iter"] < 0.5 for _, m in losses), losses


def test_training_bar_shows_whole_short_losses_that_fit_90_and_160_columns():
    """Issue 29.7: six losses pushed the bar to 1-6 characters at 160 columns and were cut
    mid-name at 90; now at most 4, abbreviated, only those that fit, the bar kept >= 10 wide."""
    import re

    from tqdm import tqdm

    from uda_ray.progress import BAR_LOSSES, fit_postfix, loss_postfix, short_loss_name

    assert [short_loss_name(k) for k in ("loss/seg_src", "loss/seg_src_aux", "loss/adv_tgt_main",
                                         "loss/adv_tgt_aux", "loss/disc_main", "loss/adv_tgt_discoverer")] == \
        ["seg", "seg.aux", "adv", "adv.aux", "D", "adv.disc"]
    means = {"loss/seg_src": 0.41234, "loss/seg_src_aux": 0.52345, "loss/adv_tgt_main": 0.0012345,
             "loss/adv_tgt_aux": 0.00045678, "loss/disc_main": 0.6931, "loss/disc_aux": 0.6932,
             "perf/sec_per_iter": 1.5}
    shown = {}
    for cols in (90, 160):
        for name, total, elapsed in (("adaptseg-s0", 150_000, 83), ("adaptseg_search-s12", 250_000, 50_000)):
            text = loss_postfix(means, cols, name, total)
            line = tqdm.format_meter(1234, total, elapsed, ncols=cols, prefix=name, postfix=text, unit="it")
            assert len(line) <= cols, line  # nothing cut
            assert line.endswith(f", {text}]") if text else re.search(r"(it/s|s/it)\]$", line), line
            assert len(re.search(r"\|(.*)\|", line).group(1)) >= 10, line  # the bar stays a bar
            items = text.split()
            assert len(items) <= BAR_LOSSES and "perf" not in text  # none where none fits
            assert all(re.fullmatch(r"[A-Za-z.]+=[-+0-9.e]+", i) for i in items), items
            shown[cols, name] = items
    assert shown[90, "adaptseg-s0"] == ["seg=0.412"]
    assert shown[160, "adaptseg-s0"] == ["seg=0.412", "seg.aux=0.523", "adv=0.00123", "adv.aux=0.000457"]
    # the last evaluation renames the bar "RUN (evaluating)": the losses that no longer fit go, whole
    for cols in (90, 160):
        desc = "adaptseg-s0 (evaluating): "  # tqdm's desc, with its ": "
        text = fit_postfix(" ".join(shown[160, "adaptseg-s0"]), cols, desc, 150_000)
        assert shown[160, "adaptseg-s0"][:len(text.split())] == text.split()
        line = tqdm.format_meter(1234, 150_000, 83, ncols=cols, prefix=desc[:-2], postfix=text, unit="it")
        assert len(line) <= cols and (line.endswith(f", {text}]") if text else re.search(r"(it/s|s/it)\]$", line))
    # not a terminal (a log file): 120 columns assumed; loss/total first; names that collide stay whole
    assert loss_postfix({"loss/seg_src": 1.0, "loss/total": 2.0, "loss/seg_tgt": 3.0}, None, "r", 10) == \
        "total=2 seg_src=1 seg_tgt=3"


def test_evaluations_are_labelled_val_sel_and_src(monkeypatch):
    """Issue 29.7: the selection split (carved out of target train) was labelled ``eval train``."""
    from types import SimpleNamespace

    from uda_ray import engine

    labels = []

    def fake(method, dataset, ctx, **kw):
        labels.append(kw.get("label"))
        return SimpleNamespace(as_dict=lambda prefix, per_class=True: {f"{prefix}mIoU": 0.5}), [], 0.1

    monkeypatch.setattr(engine, "evaluate", fake)
    ctx = SimpleNamespace(cfg=SimpleNamespace(run=SimpleNamespace(max_val_images=0)), rank=0, world_size=1)
    metrics, _, _ = engine.evaluate_all(None, {"val": 1, "sel": 2, "src_val": 3}, ctx, progress=True)
    assert labels == ["val", "sel", "src"] and set(metrics) == {"val/mIoU", "sel/mIoU", "tgt/entropy", "src/mIoU"}


def test_mosaic_has_column_titles_and_a_class_legend(tmp_path):
    import numpy as np
    from PIL import Image

    from uda_ray.data.labels import train_palette
    from uda_ray.mosaic import mosaic_png

    g = torch.Generator().manual_seed(0)
    rows = [(torch.randn(3, 32, 64, generator=g), torch.zeros(32, 64, dtype=torch.long),
             torch.zeros(32, 64, dtype=torch.long), {"attention": torch.rand(32, 64, generator=g)})]
    with Image.open(mosaic_png(rows, tmp_path / "m.png", norm="imagenet", num_classes=19)) as im:
        arr = np.asarray(im.convert("RGB"))
    k = 3  # 64-pixel columns are enlarged 3x (>= 160 px) so that the titles fit
    assert arr.shape[1] == 4 * 64 * k and arr.shape[0] > 32 * k + 40
    title = arr[:20]
    assert (title < 100).all(axis=2).any() and (title == 255).all(axis=2).mean() > 0.8  # dark text on white
    legend = {tuple(c) for c in arr[20 + 32 * k:].reshape(-1, 3)}
    assert {tuple(c) for c in train_palette(19)} <= legend  # every class colour, and black (ignored)


@pytest.mark.parametrize("method,values", [("adaptseg", {"adaptseg.ndf": 8}),
                                           ("dast", {"dast.ndf": 8, "dast.d_width": 16, "dast.self_training": True,
                                                     "dast.rounds": 1}),
                                           ("mat", {"model.arch": "mat_tiny", "mat.ndf": 8})])
def test_gradient_probes_log_each_term_against_seg_and_leave_training_bit_identical(data_root, tmp_path, method,
                                                                                    values):
    """run.grad_probe_every: grad/<term> norms and grad/<term>_over_seg ratios on probe steps;
    the weights after training are those of the same run without probes, and so is the
    config's identity."""
    from uda_ray import engine
    from uda_ray.checkpoint import checkpoint_path, config_hash, load_checkpoint_file

    class MemoryTracker(engine.NullTracker):
        def __init__(self):
            self.metrics = {}

        def log_metrics(self, metrics, step):
            self.metrics.update({(k, step): v for k, v in metrics.items()})

    states, trackers = {}, {}
    for every in (0, 2):
        cfg = tiny_cfg(data_root, tmp_path, method, **{**values, "run.iterations": 4, "run.name": f"p{every}",
                                                       "run.grad_probe_every": every, "run.log_every": 2})
        trackers[every] = MemoryTracker()
        r = fit(cfg, tracker=trackers[every])
        states[every] = load_checkpoint_file(checkpoint_path(r.run_dir))["modules"]["model"]
    for k, v in states[0].items():
        assert torch.equal(v, states[2][k]), k
    assert config_hash({**cfg.flat(), "run.grad_probe_every": 0}) == config_hash(cfg.flat())
    logged = trackers[2].metrics
    steps = {s for (key, s) in logged if key == "grad/adv_over_seg"}
    assert steps == {2, 4}, sorted(logged)
    ratio = logged[("grad/adv_over_seg", 4)]
    assert ratio == pytest.approx(logged[("grad/adv", 4)] / logged[("grad/seg", 4)], rel=1e-5) and ratio > 0
    assert not any(key.startswith("grad/") for (key, _) in trackers[0].metrics)
    if method == "dast":
        assert ("grad/pseudo_over_seg", 4) in logged
