"""The ``uda-ray`` command line."""

from __future__ import annotations

import argparse
import sys
import time

DEFAULT_SYNTH_ROOT = "data/synth"
# The top-level help's description: plain text (the module docstring is reStructuredText).
DESCRIPTION = ("uda-ray: domain-adaptive semantic segmentation runs and studies (Ray Tune, Optuna, MLflow). "
               "'uda-ray COMMAND --help' shows a command's options.")


def _cmd_data_synth(args) -> int:
    from pathlib import Path

    from .data import synth

    out = Path(args.out).resolve()
    print(f"generating the embedded benchmark (regime {args.regime!r}, seed {args.seed}) in {out} ...")
    t0 = time.perf_counter()
    counts = {k: v for k, v in (("n_source", args.n_source), ("n_target", args.n_target),
                                ("n_val", args.n_val)) if v is not None}  # None: the generator's default
    summary = synth.generate(out, seed=args.seed, regime=args.regime, workers=args.workers,
                             progress=True, **counts)
    print(f"done in {time.perf_counter() - t0:.1f} s: {summary['counts']}")
    print(f"  source (GTA5 layout):       {out / 'gta5'}")
    print(f"  target (Cityscapes layout): {out / 'cityscapes'}")
    if args.pretrain:
        from .data import synth_pretrain

        record = synth_pretrain.generate(out / "pretrain", workers=args.workers, progress=True)
        print(f"  pretraining domain (ImageNet and ADE20k layouts, {record['seconds']:.1f} s): {out / 'pretrain'}")
    return 0


def _cmd_pretrain(args) -> int:
    from pathlib import Path

    from .errors import UserError
    from .pretrain import KINDS, describe, ensure_weights, pretrain_root

    if args.data_root is not None:  # the old place of the cache; said, not silently ignored
        raise UserError(f"--data-root: the embedded weights no longer live under the data root; without --out "
                        f"they are built in uda-ray's cache ({pretrain_root()}; set UDA_RAY_CACHE to move it)")
    root = Path(args.out).resolve() if args.out else pretrain_root()
    kinds = KINDS if args.kind == "all" else (args.kind,)
    recipes = {}
    if args.iterations is not None:
        if not args.out:
            raise UserError(f"--iterations: the cache ({root}) holds the default recipe, which "
                            "model.pretrained=embedded loads; write another recipe elsewhere with --out DIR")
        recipes = {k: {"iterations": args.iterations} for k in kinds}
    for kind in kinds:
        path = ensure_weights(root, kind, progress=not args.quiet, recipes=recipes)
        meta = describe(path)
        result = ", ".join(f"{k} {v}" for k, v in meta.get("result", {}).items())
        print(f"{kind}: {path}\n  {result}")
    if not args.out:
        print("rows load them with --set model.pretrained=embedded (ImageNet stand-in) or embedded_seg "
              "(ADE20k stand-in)")
    else:
        print("rows load them with --set model.pretrained=<the file>")
    return 0


def _cmd_data_check(args) -> int:
    from .data.check import check_dataset
    from .data.datasets import build_dataset

    kw = {"split": args.split, "missing_label": "skip"}
    if args.num_classes:
        kw["num_classes"] = args.num_classes
    ds = build_dataset(args.dataset, args.root, **kw)
    report = check_dataset(ds, workers=args.workers, progress=not args.quiet)
    print(report.format(max_problems=args.max_problems))
    return 1 if report.problems else 0


def _resolve_config(args):
    """CONFIG is a YAML file, a preset name, or an existing run directory (resumed)."""
    from pathlib import Path

    from .config import PRESETS, load_config, parse_overrides

    overrides = parse_overrides(args.set or [])
    src = Path(args.config)
    if src.is_dir():
        if not (src / "config.yaml").is_file():
            from .config import ConfigError

            raise ConfigError(f"{src} is a folder without config.yaml (not a run directory)")
        return _same_method(load_config(src / "config.yaml", overrides, method=args.method), src / "config.yaml",
                            args, overrides), src
    if src.is_file():
        return _same_method(load_config(src, overrides, method=args.method), src, args, overrides), None
    if args.config in PRESETS:
        return load_config(None, overrides, preset=args.config, method=args.method), None
    from .config import ConfigError
    from .errors import did_you_mean

    raise ConfigError(f"{args.config}: neither a config file, a run directory nor a preset "
                      f"({', '.join(sorted(PRESETS))}){did_you_mean(args.config, PRESETS)}")


def _same_method(cfg, path, args, overrides):
    """``cfg`` (from the config file ``path``, which takes ``--method`` where it names none),
    unless ``--method`` contradicts the method it names: refused rather than ignored."""
    if args.method is not None and cfg.method != args.method:
        from .config import ConfigError

        where = "--set method" if "method" in overrides else f"{path}"
        raise ConfigError(f"{where} has method {cfg.method!r} but --method {args.method!r}: drop --method, or change "
                          f"the config's method")
    return cfg


def _cmd_train(args) -> int:
    from pathlib import Path

    from .engine import fit
    from .memory import sizes

    cfg, run_dir = _resolve_config(args)
    args.memory_hint = sizes(cfg)  # named by an out-of-memory error (main)
    if not args.no_mlflow:
        from .tracking import resolve_uri

        resolve_uri(args.tracking_uri)  # an unsupported URI is refused before the run directory is made
    from .store import StageStore, default_root

    store = StageStore(args.store or default_root())
    if args.reuse == "exact" and not args.overwrite:
        reused = _reuse_stage(cfg, run_dir, store, args)
        if reused is not None:
            return reused
    opened = []  # the MLflow tracker, once fit has claimed the run directory

    def open_tracker(where: Path):
        from .tracking import MlflowTracker

        # a resume continues the MLflow run recorded in the run directory
        opened.append(MlflowTracker.for_run_dir(where, experiment=args.experiment, run_name=cfg.run_name,
                                                tracking_uri=args.tracking_uri))
        return opened[0]

    try:
        result = fit(cfg, run_dir=run_dir, tracker=None if args.no_mlflow else open_tracker,
                     progress=not args.quiet, overwrite=args.overwrite)
    except BaseException as e:
        for tracker in opened:
            tracker.fail(e)
        raise
    tracker = opened[0] if opened else None
    if tracker is not None:
        tracker.finish("FINISHED")
    _store_trained(result, cfg, store, tracker)
    print(f"{cfg.run_name}: step {result.step}, target-val mIoU {100 * result.scores.miou:.2f} "
          f"({result.seconds:.0f} s); run directory {result.run_dir}")
    print(result.scores.format_table())
    if tracker is not None:
        print(_ui_hint(tracker))
    return 0


def _ui_hint(tracker) -> str:
    """Where to see a ``uda-ray train`` run: the command that serves the MLflow UI (one web
    worker) and the URL of the experiment's run list (MLflow 3.17 opens an experiment on a
    page without runs otherwise)."""
    from .tracking import runs_url, ui_command

    url = runs_url(tracker.tracking_uri, tracker.experiment_id, view=False)
    cmd = ui_command(tracker.tracking_uri)
    if not cmd:  # a tracking server serves its own UI
        return f"MLflow run {tracker.run_id}: {url}"
    return f"MLflow run {tracker.run_id}: serve the UI with  {cmd}\n  then open  {url}"


def _reuse_stage(cfg, run_dir, store, args) -> int | None:
    """``uda-ray train`` of a stage the store holds (same lineage): its checkpoint copied into
    the run directory and an MLflow run with its metrics, marked reused; None when the store
    does not hold it or the run directory already has a checkpoint (resumed as usual)."""
    import shutil
    from pathlib import Path

    from .checkpoint import checkpoint_path, lineage_of, load_checkpoint_file
    from .engine import ensure_data
    from .models.from_config import start_of

    run_dir = Path(run_dir or Path(cfg.run.out) / cfg.run_name)
    if checkpoint_path(run_dir).exists():
        return None
    ensure_data(cfg)
    lineage = lineage_of(cfg, start=None if cfg.run.init_from else start_of(cfg))["lineage"]
    stage = store.get(lineage)
    if stage is None:
        return None
    local = Path(stage["checkpoint"]) / "last.pt"
    if store.remote or not local.is_file():
        return None  # a remote stage: trained here (uda-ray study fetches remote stages)
    load_checkpoint_file(local)  # refuses a file that is not a readable, finite checkpoint
    checkpoint_path(run_dir).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(local, checkpoint_path(run_dir))
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    where = f"study {stage.get('study')}, {stage.get('row')} s{stage.get('seed')}, run {str(stage.get('run_id'))[:8]}"
    metrics = {k: v[-1][1] for k, v in stage.get("metrics", {}).items() if v}
    if not args.no_mlflow:
        from .study import adopt_stage
        from .tracking import MlflowTracker

        tracker = MlflowTracker.for_run_dir(run_dir, experiment=args.experiment, run_name=cfg.run_name,
                                            tracking_uri=args.tracking_uri)
        adopt_stage(tracker.client, tracker.run_id, stage, cfg.flat(), used_by=f"train/{cfg.run_name}", store=store)
        tracker.finish("FINISHED")
        print(f"MLflow run {tracker.run_id} (reused)")
    else:
        store.touch(lineage, used_by=f"train/{cfg.run_name}")
    miou = metrics.get("val/mIoU")
    print(f"{cfg.run_name}: reused stage {lineage} ({where}) from the stage store {store.root}: no training; "
          f"target-val mIoU {100 * miou:.2f}" if miou is not None else f"{cfg.run_name}: reused stage {lineage}")
    print(f"run directory {run_dir} (its checkpoint copied from the store; --reuse never trains it anyway)")
    return 0


def _store_trained(result, cfg, store, tracker) -> None:
    """Keep a finished ``uda-ray train`` run's stage in the store (see uda_ray.store)."""
    import time

    from .checkpoint import checkpoint_path, load_checkpoint_file

    path = checkpoint_path(result.run_dir)
    if not path.is_file():
        return
    state = load_checkpoint_file(path)
    lineage = state.get("lineage")
    if not lineage or not state.get("finite", False):
        return
    if tracker is not None:
        from .study import store_stage

        store_stage(tracker.client, tracker.run_id, str(path.parent), cfg.flat(), store, study="", row=cfg.run_name,
                    seed=cfg.run.seed, tracking_uri=tracker.tracking_uri)
        return
    now = int(time.time() * 1000)
    metrics = {k: [[result.step, v, now]] for k, v in result.scores.as_dict("val/", per_class=True).items()}
    store.put(lineage, str(path.parent), {"study": "", "row": cfg.run_name, "seed": cfg.run.seed, "run_id": "",
                                          "iterations": cfg.run.iterations, "config": cfg.flat(), "metrics": metrics,
                                          "parent_lineage": state.get("parent_lineage", ""), "tags": {}})


def _cmd_eval(args) -> int:
    from .checkpoint import check_finite, load_checkpoint_file
    from .config import METHODS, build_config
    from .engine import Context, build_segmenter, build_val_dataset, evaluate, resolve_device

    state = load_checkpoint_file(args.checkpoint)
    check_finite(state, args.checkpoint)  # a NaN model has no score to report
    values = dict(state["config"])
    # The checkpoint is the model's starting point: a method that needs an init_from
    # checkpoint to be built (AdaBN, a MAT or DAST later stage) finds its modules there.
    values.update({"run.init_from": str(args.checkpoint), "run.device": args.device,
                   "run.max_val_images": args.max_images})
    if args.data_root:
        values["data.root"] = args.data_root
    if args.split:
        values["data.val_split"] = args.split
    cfg = build_config(values)
    device = resolve_device(cfg.run.device)
    ctx = Context(cfg, device, amp=cfg.run.amp and device.type == "cuda", channels_last=False)
    method = METHODS[cfg.method](cfg, build_segmenter(cfg, device), ctx)
    for k, m in method.modules().items():
        m.load_state_dict(state["modules"][k])
    scores, _, _ = evaluate(method, build_val_dataset(cfg), ctx, max_images=cfg.run.max_val_images,
                            progress=True)
    print(f"{args.checkpoint}: {cfg.method} at step {state['step']}, {cfg.data.target} {cfg.data.val_split}, "
          f"{cfg.data.num_classes}-class protocol")
    if state.get("lineage"):
        parent = state.get("parent") or "its start weights"
        print(f"lineage {state['lineage']} (config {state.get('config_hash')}; started from {parent}, lineage "
              f"{state.get('parent_lineage')})")
    else:
        print("lineage unknown (a checkpoint written before uda-ray recorded lineages)")
    print(scores.format_table())
    return 0


def _cmd_bench_step(args) -> int:
    from .bench import PAPER_CASES, bench_cases, case_config, bench_step, format_table
    from .config import METHODS, parse_overrides

    overrides = parse_overrides(args.set or [])
    if args.compile:
        overrides["run.compile"] = "true"
    if args.method == "all":  # every training method at its paper's architecture, one table
        print(f"every method's iteration @ {args.preset}, scale {args.scale} ({args.warmup} warm-up, "
              f"{args.iters} timed iterations each, fastest of {args.rounds} interleaved rounds)")
        rows = bench_cases(args.preset, PAPER_CASES, overrides=overrides, scale=args.scale, warmup=args.warmup,
                           iters=args.iters, rounds=args.rounds)
        dev = next((r["device"] for r in rows if "device" in r), "?")
        print(f"on {dev}; FLOPs: fwd+bwd of one iteration (convolutions and matrix products); "
              f"peak: {'allocated' if dev != 'cpu' else 'process RSS so far'}")
        print(format_table(rows))
        return 1 if any("error" in r for r in rows) else 0
    if args.method not in METHODS:
        from .config import ConfigError

        raise ConfigError(f"--method: expected 'all' or one of {sorted(METHODS)}, got {args.method!r}")
    cfg = case_config(args.preset, args.method, {}, overrides, args.scale)
    from .memory import sizes

    args.memory_hint = sizes(cfg)  # named by an out-of-memory error (main)
    r = bench_step(cfg, warmup=args.warmup, iters=args.iters)
    print(f"{args.method} @ {args.preset} ({cfg.model.arch}, source {cfg.data.source_w}x{cfg.data.source_h}, "
          f"target {cfg.data.target_w}x{cfg.data.target_h}, batch {cfg.data.batch_size}) on {r['device']}")
    for k, v in r.items():
        if k != "device":
            print(f"  {k:<22} {v:.4g}" if isinstance(v, float) else f"  {k:<22} {v}")
    return 0


def _cmd_bench_device(args) -> int:
    from .bench_device import run_device_check

    return run_device_check(scale=args.scale, warmup=args.warmup, iters=args.iters, proxy_images=args.proxy_images,
                            device=args.device)


def _cmd_bench_study(args) -> int:
    from .bench_study import bench_study, format_report

    result = bench_study(seeds=args.seeds, iterations=args.iterations, concurrency=args.concurrency,
                         ray_train=True if args.ray_train == "always" else None, data_root=args.data_root,
                         out=args.out)
    print(format_report(result))
    return result["totals"]["returncode"]


# Packages that building the parser (and so `uda-ray --help`) must not import: each takes
# seconds to import (torch alone 1-10 s on a loaded machine).
HEAVY = ("torch", "torchvision", "ray", "mlflow", "optuna", "pandas", "matplotlib")


def bench_cli(runs: int = 7) -> dict:
    """``uda-ray --help`` run ``runs`` times, each in a fresh process: the median, fastest and
    slowest wall time (seconds), and the heavy packages (:data:`HEAVY`) that importing this
    module and building the parser imports (none expected)."""
    import statistics
    import subprocess
    from pathlib import Path

    script = Path(sys.executable).with_name("uda-ray")  # the console script of this environment
    cmd = [str(script), "--help"] if script.is_file() else [sys.executable, "-m", "uda_ray.cli", "--help"]
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - t0)
    probe = ("import sys, uda_ray.cli as c; c.build_parser().format_help(); "
             f"print(' '.join(m for m in {HEAVY!r} if m in sys.modules))")
    heavy = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True).stdout.split()
    return {"command": " ".join(cmd), "runs": runs, "median_s": statistics.median(times), "min_s": min(times),
            "max_s": max(times), "heavy_imports": heavy}


def _cmd_bench_cli(args) -> int:
    r = bench_cli(args.runs)
    print(f"{r['command']}: median {r['median_s']:.3f} s over {r['runs']} fresh processes "
          f"(fastest {r['min_s']:.3f} s, slowest {r['max_s']:.3f} s)")
    print(f"heavy packages imported to build the parser: {', '.join(r['heavy_imports']) or 'none'}")
    return 1 if r["heavy_imports"] else 0


def _cmd_bench_proxy(args) -> int:
    from .bench import bench_proxy
    from .config import ConfigError

    try:
        w, h = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        raise ConfigError(f"--size: expected WIDTHxHEIGHT (e.g. 1024x512), got {args.size!r}") from None
    if args.model:
        from .bench import bench_proxy_model
        from .config import parse_overrides

        r = bench_proxy_model(preset=args.preset, images=args.images, overrides=parse_overrides(args.set or []),
                              kind=args.policy, device=args.device, rounds=args.rounds)
        print(f"MAT proxy generation ({r['policy']}) with a real {r['arch']} model over {r['images']} images at "
              f"{r['size']} on {r['device']}, against an evaluation pass and a forward pass over the same images")
        for k, v in r.items():
            if k not in ("device", "policy", "arch", "size", "images"):
                print(f"  {k:<60} {v:.4g}" if isinstance(v, float) else f"  {k:<60} {v}")
        return 0
    r = bench_proxy(images=args.images, width=w, height=h, num_classes=args.classes, kind=args.policy,
                    portion=args.portion, portion2=args.portion2, device=args.device)
    print(f"proxy generation ({r['policy']}) over {r['images']} x {r['classes']} x {h} x {w} scores on {r['device']}")
    for k, v in r.items():
        if k not in ("device", "policy"):
            print(f"  {k:<34} {v:.4g}" if isinstance(v, float) else f"  {k:<34} {v}")
    return 0


def _cmd_study(args) -> int:
    from .study import find_study, load_study, run_study

    study = load_study(find_study(args.study))
    from .tracking import resolve_uri

    resolve_uri(args.tracking_uri)  # an unsupported URI is refused before Ray or any trial starts
    return run_study(study, smoke_test=args.smoke_test, address=args.address, storage_path=args.storage_path,
                     tracking_uri=args.tracking_uri, max_concurrent=args.max_concurrent, out=args.out,
                     variant=args.variant, reuse=args.reuse, store=args.store, plan=args.plan, seeds=args.seeds,
                     add_seeds=args.add_seeds, until_decided=args.until_decided, max_seeds=args.max_seeds)


def _cmd_plan(args) -> int:
    from .plan import format_plan, plan_studies
    from .study import find_study, load_study

    if args.trained:  # what finished studies trained, from MLflow
        from .compare import study_name
        from .plan import format_trained, trained

        total = 0
        for s in args.studies:  # the smoke tests' runs with --smoke-test, as the plan's names
            name = study_name(s) + ("-smoke" if args.smoke_test else "")
            rows = trained(name, args.tracking_uri)
            total += sum(a["iterations"] for a in rows.values())
            print(format_trained(name, rows))
        if len(args.studies) > 1:  # against what they ask when nothing is reused or stopped early
            asked = plan_studies([load_study(find_study(s)) for s in args.studies], smoke=args.smoke_test,
                                 store_root=args.store, storage_path=args.storage_path, variant=args.variant,
                                 with_mlflow=False).asked
            print(f"\nall {len(args.studies)} studies: {total} iterations trained of {asked} asked "
                  f"({100 * total / asked:.1f}%)" if asked else f"\nall {len(args.studies)} studies: {total} trained")
        return 0
    studies = [load_study(find_study(s)) for s in args.studies]
    plan = plan_studies(studies, smoke=args.smoke_test, tracking_uri=args.tracking_uri, store_root=args.store,
                        storage_path=args.storage_path, reuse=args.reuse, variant=args.variant, asha_all=args.asha)
    print(format_plan(plan, per_step=not args.totals))
    return 0


def _cmd_store(args) -> int:
    import time

    from .store import StageStore, default_root, human_size

    store = StageStore(args.store or default_root(args.storage_path))
    stages = store.stages()
    if args.store_command == "ls":
        print(f"stage store {store.root}: {len(stages)} stages")
        print(f"{'lineage':<16}  {'study':<22} {'row':<22} {'seed':>4}  {'size':>9}  {'last used':<16}  used by")
        for m in sorted(stages, key=lambda m: (m.get("study", ""), m.get("row", ""), m.get("seed", 0))):
            used = time.strftime("%Y-%m-%d %H:%M", time.localtime(m["last_used"])) if m.get("last_used") else \
                "(incomplete)"
            print(f"{m['lineage']:<16}  {str(m.get('study', '?')):<22} {str(m.get('row', '?')):<22} "
                  f"{str(m.get('seed', '?')):>4}  {human_size(m['size']):>9}  {used:<16}  "
                  f"{', '.join(m.get('used_by', []))}")
        return 0
    if args.store_command == "du":
        total = sum(m["size"] for m in stages)
        print(f"{human_size(total)} in {len(stages)} stages at {store.root}")
        return 0
    # gc: stages that no study's MLflow record references any more
    from .plan import referenced_lineages

    keep = referenced_lineages(args.tracking_uri)
    drop = [m for m in stages if m["lineage"] not in keep]
    for m in drop:
        print(f"{'would remove' if args.dry_run else 'removed'} {m['lineage']} ({m.get('study', '?')} "
              f"{m.get('row', '?')} s{m.get('seed', '?')}, {human_size(m['size'])})")
        if not args.dry_run:
            store.remove(m["lineage"])
    print(f"{len(drop)} of {len(stages)} stages unreferenced ({human_size(sum(m['size'] for m in drop))})"
          + (" (dry run: nothing removed)" if args.dry_run else ""))
    return 0


def _cmd_compare(args) -> int:
    from .compare import compare_study

    result = compare_study(args.study, tracking_uri=args.tracking_uri, out_dir=args.out,
                           log_to_parent=not args.no_log, per_class=args.per_class, fmt=args.format,
                           baseline=args.baseline, claims=_study_claims(args.study), against=args.against,
                           save_results=args.save_results)
    print(result.text)
    print(f"written to {result.files[0].parent}/: " + ", ".join(f.name for f in result.files))
    return 1 if result.differences else 0


def _study_claims(arg: str):
    """The claims of the study script ``arg`` names (a path, or studies/NAME.py), None where there
    is no such script here (compare then reads those the study recorded in MLflow). A variant
    (``NAME-shared_bn``) has its study's claims."""
    from .errors import UserError
    from .study import find_study, load_study

    for cand in (arg, arg.split("-")[0]):
        try:
            return list(load_study(find_study(cand)).claims)
        except UserError:
            continue
    return None


def _cmd_verdicts(args) -> int:
    from .study import load_study
    from .verdict import update_readme

    changed, stale = update_readme(args.readme, args.studies, args.results, check=args.check,
                                   claims_of=lambda p: load_study(p).claims)
    if args.check:
        if stale:
            print(f"{args.readme}: the verdict tables of {', '.join(stale)} are not what `uda-ray verdicts` "
                  f"generates from {args.results}/; run it", file=sys.stderr)
            return 1
        print(f"{args.readme}: every verdict table is as generated")
        return 0
    print(f"{args.readme}: " + (f"rewrote the verdict tables of {', '.join(changed)}" if changed else
                                "every verdict table was already as generated"))
    return 0


def _cmd_config(args) -> int:
    from .config import describe

    rows = describe(args.preset, args.method)
    if args.format == "yaml":
        print("\n".join(f"{r['key']}: {r['value']}  # {r['type']}{', ' + r['range'] if r['range'] else ''}; {r['help']}"
                         for r in rows))
        return 0
    head = {"key": "key", "type": "type", "value": f"value ({args.preset or 'default'})", "range": "range",
            "help": "help"}
    if args.preset:  # the values the preset changed from the defaults, marked with a *
        default = {r["key"]: r["value"] for r in describe(None, args.method)}
        rows = [{**r, "value": r["value"] + "*"} if default.get(r["key"], r["value"]) != r["value"] else r
                for r in rows]
        head["help"] = "help (*: set by the preset)"
    print("\n".join(config_table(rows, head, terminal_width())))
    return 0


def terminal_width(most: int = 120) -> int:
    """The terminal's columns (``COLUMNS``, else the terminal's, else 120), at most ``most``."""
    import shutil

    return max(40, min(shutil.get_terminal_size((most, 24)).columns, most))


def config_table(rows: list[dict], head: dict, width: int) -> list[str]:
    """``uda-ray config``'s table within ``width`` columns: a key's line starts with the key;
    a long value or list of choices wraps within its column, the help within the rest of the
    line (on its own indented lines where the rest is too narrow). Continuation lines start
    with a space."""
    import textwrap

    cap = {"key": 40, "type": 8, "value": 20, "range": 20}
    w = {k: min(cap[k], max(len(head[k]), *(len(r[k]) for r in rows))) for k in cap}
    offset = sum(w.values()) + 2 * len(w)
    room = width - offset
    out = []
    for r in [head, *rows]:
        cells = {k: textwrap.wrap(r[k], w[k], break_on_hyphens=False) or [""] for k in w}
        cells["key"] = [r["key"]]  # a key is never wrapped (it overflows instead)
        helps = textwrap.wrap(r["help"], room) if room >= 30 else []
        below = [] if room >= 30 else textwrap.wrap(r["help"], width - 6)
        for i in range(max(len(helps), *(len(c) for c in cells.values()))):
            line = "  ".join((cells[k][i] if i < len(cells[k]) else "").ljust(w[k]) for k in w)
            line = (line + "  " + (helps[i] if i < len(helps) else "")).rstrip()
            out.append(line)  # after the first, the key's cell is blank: the line starts with spaces
        out += ["      " + h for h in below]
    return out


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line, as every other error of uda-ray (sub-commands
    are built with the parent's class, so they get it too)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def _check_value(self, action, value):
        """A value not among an argument's choices (a sub-command included): the closest
        choices first (``invalid choice: 'trian'; did you mean 'train'?``), then them all."""
        if action.choices is not None and value not in action.choices:
            from .errors import did_you_mean

            choices = ", ".join(map(repr, action.choices))
            raise argparse.ArgumentError(action, f"invalid choice: {value!r}{did_you_mean(value, action.choices)} "
                                                 f"(choose from {choices})")


def _count(text: str) -> int:
    """An option's count: an integer >= 0."""
    return _int_at_least(text, 0)


def _positive(text: str) -> int:
    """An option's count: an integer >= 1."""
    return _int_at_least(text, 1)


def _positive_float(text: str) -> float:
    """An option's scale: a finite number > 0."""
    import math

    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def _int_at_least(text: str, lo: int) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < lo:
        raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    # Names from a leaf module: building the parser and --help import no torch, Ray, MLflow,
    # Optuna or pandas (each command imports what it needs when it runs).
    from .cli_spec import DATASET_NAMES as DATASETS, METHOD_NAMES as METHODS, PRESET_NAMES as PRESETS, add_study_args

    p = _Parser(prog="uda-ray", description=DESCRIPTION)
    p.add_argument("--version", action="version", version=f"uda-ray {__version__}")
    p.add_argument("--debug", action="store_true",
                   help="on an error, show its traceback instead of a one-line message")
    sub = p.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="generate and check datasets")
    dsub = data.add_subparsers(dest="data_command", required=True)

    s = dsub.add_parser("synth", help="write the embedded synthetic-to-real benchmark "
                                      "(GTA5 and Cityscapes layouts)")
    s.add_argument("--out", default=DEFAULT_SYNTH_ROOT, help="output folder (default: %(default)s)")
    s.add_argument("--seed", type=_count, default=0, help="seed of the generator (default: %(default)s)")
    s.add_argument("--n-source", type=_positive, default=None, help="source images (default: the generator's)")
    s.add_argument("--n-target", type=_positive, default=None, help="target train images (default: the generator's)")
    s.add_argument("--n-val", type=_positive, default=None, help="target val images (default: the generator's)")
    s.add_argument("--regime", default="default",
                   help="named domain-shift regime: default, none, photo, appearance, layout, full "
                        "(default: %(default)s)")
    s.add_argument("--workers", type=_positive, default=2, help="generator processes (default: %(default)s)")
    s.add_argument("--pretrain", action="store_true",
                   help="also write the embedded pretraining domain (ImageNet and ADE20k stand-ins) in OUT/pretrain")
    s.set_defaults(func=_cmd_data_synth)

    c = dsub.add_parser("check", help="read every sample; print counts, class histogram, problems")
    c.add_argument("root", help="the dataset's root folder")
    c.add_argument("--dataset", required=True, choices=sorted(DATASETS), help="the dataset's reader (required)")
    c.add_argument("--split", default=None, help="split (default: the dataset's first)")
    c.add_argument("--num-classes", type=int, choices=(19, 16), default=None,
                   help="label space: 19, or 16 for SYNTHIA (default: the reader's)")
    c.add_argument("--workers", type=_count, default=2, help="reader processes (0: in this process; default: %(default)s)")
    c.add_argument("--max-problems", type=_count, default=50, help="problems listed (all are counted; default: %(default)s)")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    c.set_defaults(func=_cmd_data_check)

    t = sub.add_parser("train", help="train one config (a YAML file, a preset, or a run directory to resume)")
    t.add_argument("config", help=f"config YAML, preset name ({', '.join(sorted(PRESETS))}) or an existing run "
                                  "directory (resumed)")
    t.add_argument("--method", default=None, metavar="METHOD",
                   help=f"the method, required when CONFIG is a preset: {', '.join(sorted(METHODS))}")
    t.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config key (repeatable; uda-ray config lists the keys)")
    t.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: MLflow's, sqlite:///mlflow.db)")
    t.add_argument("--experiment", default="uda-ray", help="MLflow experiment (default: %(default)s)")
    t.add_argument("--no-mlflow", action="store_true", help="do not track this run")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument("--reuse", default="exact", choices=("exact", "never"),
                   help="exact (default): a config whose lineage (config, parent, data, code) the stage store holds "
                        "is taken from it, not trained; never: train it anyway")
    t.add_argument("--store", default=None, help="the stage store (default: UDA_RAY_STORE, else "
                                                 "UDA_RAY_STORAGE/stages, else ./runs/ray/stages)")
    t.add_argument("--overwrite", action="store_true",
                   help="remove the checkpoint and files of an earlier run in the run directory first "
                        "(otherwise a run directory resumes only a checkpoint of the same config)")
    t.set_defaults(func=_cmd_train)

    e = sub.add_parser("eval", help="evaluate a checkpoint on the target val split with the protocol of its label space")
    e.add_argument("checkpoint", help="checkpoint file or run directory")
    e.add_argument("--data-root", default=None, help="override data.root")
    e.add_argument("--split", default=None, help="target split (default: the run's data.val_split)")
    e.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:<index> (default: %(default)s)")
    e.add_argument("--max-images", type=_count, default=0, help="evaluate the first N images (0: all)")
    e.set_defaults(func=_cmd_eval)

    pt = sub.add_parser("pretrain", help="pretrain the small encoders on the embedded ImageNet / ADE20k stand-ins "
                                         "(what model.pretrained=embedded loads; built on first use anyway)",
                        description="Builds the weights model.pretrained=embedded|embedded_seg load in uda-ray's "
                                    "cache, CACHE/pretrain (CACHE: $UDA_RAY_CACHE, else $XDG_CACHE_HOME/uda-ray, "
                                    "else ~/.cache/uda-ray), or another recipe in --out DIR.")
    pt.add_argument("--data-root", default=None, help=argparse.SUPPRESS)  # the cache's old place: refused
    pt.add_argument("--kind", default="all", choices=("embedded", "embedded_seg", "all"),
                    help="embedded: classification (ImageNet stand-in); embedded_seg: scene parsing (ADE20k "
                         "stand-in, from embedded) (default: %(default)s)")
    pt.add_argument("--out", default=None,
                    help="another folder for the pretraining domain and its weights (e.g. with --iterations) "
                         "instead of the cache")
    pt.add_argument("--iterations", type=_positive, default=None, help="training iterations (only with --out)")
    pt.add_argument("--quiet", action="store_true", help="no progress bars")
    pt.set_defaults(func=_cmd_pretrain)


    st = sub.add_parser("study", help="run a study (studies/NAME.py) on the current Ray cluster")
    st.add_argument("study", help="the study: its script's path, or its name (NAME for studies/NAME.py)")
    add_study_args(st)
    st.set_defaults(func=_cmd_study)

    pl = sub.add_parser("plan", help="what studies would train, reuse or skip (in order, sharing the stage store), "
                                     "with the iterations and estimated time; runs nothing")
    pl.add_argument("studies", nargs="+", help="study names or script paths, in the order they would run")
    pl.add_argument("--smoke-test", action="store_true", help="plan the smoke tests")
    pl.add_argument("--variant", default=None, help="the variant of every study that has it")
    pl.add_argument("--reuse", default="exact", choices=("exact", "never"), help="as uda-ray study's")
    pl.add_argument("--store", default=None, help="the stage store (default: UDA_RAY_STORE, else STORAGE_PATH/stages)")
    pl.add_argument("--storage-path", default=None, help="as uda-ray study's (default: UDA_RAY_STORAGE or ./runs/ray)")
    pl.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: MLflow's, sqlite:///mlflow.db)")
    pl.add_argument("--totals", action="store_true", help="only the totals, not every row x seed")
    pl.add_argument("--asha", action="store_true",
                    help="a what-if: count every search as stopping trials early with the default ASHA (a third "
                         "of a trial's iterations) where its study does not, and print the least it can train")
    pl.add_argument("--trained", action="store_true",
                    help="instead: what the finished studies' runs trained (iterations per row, runs reused from "
                         "the stage store, search trials stopped early), read from MLflow")
    pl.set_defaults(func=_cmd_plan)

    so = sub.add_parser("store", help="the stage store: list stages, disk used, remove unreferenced ones")
    so.add_argument("store_command", choices=("ls", "du", "gc"),
                    help="ls: every stage (study, row, seed, lineage, size, last used); du: disk used; gc: remove "
                         "the stages no study's MLflow run references")
    so.add_argument("--store", default=None, help="the stage store (default: UDA_RAY_STORE, else STORAGE_PATH/stages)")
    so.add_argument("--storage-path", default=None, help="as uda-ray study's (default: UDA_RAY_STORAGE or ./runs/ray)")
    so.add_argument("--tracking-uri", default=None, help="gc: the MLflow store whose runs reference stages")
    so.add_argument("--dry-run", action="store_true", help="gc: say what would be removed")
    so.set_defaults(func=_cmd_store)

    cp = sub.add_parser("compare", help="a study's table from MLflow: mean ± std over seeds, Δ, per-class IoU, "
                                        "figures")
    cp.add_argument("study", help="study name (or its script path)")
    cp.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: MLflow's, sqlite:///mlflow.db)")
    cp.add_argument("--out", default=None,
                    help="folder for the tables (CSV, Parquet, Markdown, LaTeX), the per-seed table and the "
                         "figures (PNG, PDF, SVG) (default: runs/STUDY, where uda-ray study writes them)")
    cp.add_argument("--format", default="text", choices=("text", "markdown", "latex"),
                    help="how the table is printed (default: %(default)s; the files have every format)")
    cp.add_argument("--per-class", action="store_true", help="print the per-class IoU columns too")
    cp.add_argument("--baseline", default=None, metavar="ROW",
                    help="the Δ columns against another row (e.g. each parent of a cross-method row); files "
                         "STUDY_vs_ROW_* (default: the study's baseline)")
    cp.add_argument("--no-log", action="store_true", help="do not log the table to the study's parent run")
    cp.add_argument("--against", default=None, metavar="CSV",
                    help="committed results (studies/results/STUDY_seeds.csv): list every row x seed that differs "
                         "from them, to the last digit; exit 1 if any does")
    cp.add_argument("--save-results", default=None, metavar="CSV",
                    help="write the counted seed runs there (values, lineage, commit, data and code fingerprints), "
                         "the file to commit and compare --against later")
    cp.set_defaults(func=_cmd_compare)

    vd = sub.add_parser("verdicts", help="rewrite the verdict tables of studies/README.md from the studies' claims "
                                         "and their committed results (studies/results/NAME_seeds.csv)")
    vd.add_argument("--readme", default="studies/README.md", help="the file with <!-- verdicts:NAME --> blocks")
    vd.add_argument("--studies", default="studies", help="the folder of the study scripts (default: %(default)s)")
    vd.add_argument("--results", default="studies/results", help="the committed results (default: %(default)s)")
    vd.add_argument("--check", action="store_true", help="change nothing; exit 1 if a table is not as generated")
    vd.set_defaults(func=_cmd_verdicts)

    cf = sub.add_parser("config", help="list every config key: type, value, range and help")
    cf.add_argument("preset", nargs="?", default=None, metavar="PRESET",
                    help=f"show the values of a preset ({', '.join(sorted(PRESETS))}; default: the defaults)")
    cf.add_argument("--method", default=None, metavar="METHOD",
                    help="the shared keys and this method's (default: every method's)")
    cf.add_argument("--format", default="table", choices=("table", "yaml"),
                    help="a table, or YAML to start a config file from (default: %(default)s)")
    cf.set_defaults(func=_cmd_config)

    b = sub.add_parser("bench", help="benchmarks (timings printed, not tests)")
    bsub = b.add_subparsers(dest="bench_command", required=True)
    bs = bsub.add_parser("step", help="seconds per training iteration on random data at a preset's sizes")
    bs.add_argument("--preset", default="tiny-cpu", help="the preset whose sizes are timed (default: %(default)s)")
    bs.add_argument("--method", default="adaptseg",
                    help="a method, or 'all': every training method at its paper's architecture, one table "
                         "(default: %(default)s)")
    bs.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    bs.add_argument("--scale", type=_positive_float, default=1.0,
                    help="image sizes times SCALE (CPU: e.g. 0.25 is 320x180 + 256x128 for the paper preset)")
    bs.add_argument("--compile", action="store_true", help="run.compile=true: torch.compile the segmenter")
    bs.add_argument("--warmup", type=_count, default=5, help="untimed iterations first (default: %(default)s)")
    bs.add_argument("--iters", type=_positive, default=20, help="timed iterations (default: %(default)s)")
    bs.add_argument("--rounds", type=_positive, default=1,
                    help="with --method all: time every case this many times, interleaved, and keep each "
                         "case's fastest round (a shared machine's load spreads over all cases)")
    bs.set_defaults(func=_cmd_bench_step)
    bd = bsub.add_parser("device", help="one call on a GPU box (PyTorch only: no Ray, Optuna or MLflow needed): "
                                        "every method at paper sizes in fp32, TF32 and bf16+channels_last, "
                                        "device checks and the proxy benchmark, one table")
    bd.add_argument("--scale", type=_positive_float, default=1.0, help="image sizes times SCALE (1: the papers')")
    bd.add_argument("--warmup", type=_count, default=3, help="untimed iterations first (default: %(default)s)")
    bd.add_argument("--iters", type=_positive, default=10, help="timed iterations (default: %(default)s)")
    bd.add_argument("--proxy-images", type=_count, default=200, help="images of the proxy benchmark (0: skip)")
    bd.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:<index> (default: %(default)s)")
    bd.set_defaults(func=_cmd_bench_device)
    bst = bsub.add_parser("study", help="the overhead of a study: a small fixed study (source-only, then AdaBN and "
                                         "AdaptSegNet from it) with every trial's wall time split into Ray/Tune "
                                         "start, fit phases (training steps, evaluation, checkpoints) and teardown")
    bst.add_argument("--seeds", type=_positive, default=3, help="seeds of each row (default: %(default)s)")
    bst.add_argument("--iterations", type=_positive, default=60,
                     help="training iterations of source-only and AdaptSegNet (default: %(default)s)")
    bst.add_argument("--concurrency", type=_positive, default=2, help="trials at a time (default: %(default)s)")
    bst.add_argument("--ray-train", choices=("auto", "always"), default="auto",
                     help="auto: single-worker CPU trials fit in their Tune process; always: a TorchTrainer per "
                          "trial (default: %(default)s)")
    bst.add_argument("--data-root", default=None, help="the embedded benchmark's folder (default: the preset's)")
    bst.add_argument("--out", default=None, help="work folder (default: a new temporary folder)")
    bst.set_defaults(func=_cmd_bench_study)
    bp = bsub.add_parser("proxy", help="time and peak memory of one proxy-label generation over a synthetic "
                                       "score volume (default: Cityscapes train, 2975 x 19 x 512 x 1024)")
    bp.add_argument("--images", type=_positive, default=2975, help="images of the score volume (default: %(default)s)")
    bp.add_argument("--size", default="1024x512", help="WIDTHxHEIGHT of the scores (default: %(default)s)")
    bp.add_argument("--classes", type=_positive, default=19, help="classes of the scores (default: %(default)s)")
    bp.add_argument("--policy", default="adversarial", choices=("global", "class_balanced", "adversarial"),
                    help="the proxy-label policy (default: %(default)s)")
    bp.add_argument("--portion", type=float, default=0.6, help="global/class_balanced portion, or MAT's p1")
    bp.add_argument("--portion2", type=float, default=0.8, help="MAT's p2 (adversarial policy)")
    bp.add_argument("--device", default="auto", help="auto, cpu or cuda")
    bp.add_argument("--model", action="store_true",
                    help="MAT's generation with a real model over the preset's target images (--images of them), "
                         "timed against an evaluation pass and a forward pass over the same images")
    bp.add_argument("--preset", default="study-cpu", help="with --model: the preset (default: %(default)s)")
    bp.add_argument("--set", action="append", metavar="KEY=VALUE", help="with --model: config overrides")
    bp.add_argument("--rounds", type=_positive, default=1, help="with --model: keep each case's fastest of N")
    bp.set_defaults(func=_cmd_bench_proxy)
    bc = bsub.add_parser("cli", help="wall time of 'uda-ray --help' in a fresh process (what every command pays "
                                     "before it starts), and the heavy packages building the parser imports")
    bc.add_argument("--runs", type=_positive, default=7, help="fresh processes timed (default: %(default)s)")
    bc.set_defaults(func=_cmd_bench_cli)
    return p


def _user_errors() -> tuple[type[BaseException], ...]:
    """The errors printed as one line (exit status 2): bad input a user can fix (config keys,
    dataset files, checkpoints and run directories, a run that diverged)."""
    from .errors import UserError

    return UserError, FileNotFoundError


def _one_line(e: BaseException) -> str:
    """The message of a user error, on one line.

    A DataLoader worker's exception is re-raised in the main process as the same type with
    the message "Caught DatasetError in DataLoader worker process 0.\nOriginal Traceback ...",
    the worker's formatted traceback, whose last line is "<module>.<Type>: <message>"
    (``torch._utils.ExceptionWrapper``): keep the worker's own message.
    """
    msg = str(e)
    if msg.startswith("Caught ") and "\nOriginal Traceback" in msg:
        last = msg.rstrip().splitlines()[-1]
        for prefix in (f"{type(e).__module__}.{type(e).__qualname__}: ", f"{type(e).__qualname__}: "):
            if last.startswith(prefix):
                return last[len(prefix):]
        return last
    lines = [line for line in msg.splitlines() if line.strip()]
    return " ".join(line.strip() for line in lines) or type(e).__name__


def _out_of_memory(e: BaseException) -> str | None:
    """What an allocation that failed says, on one line; None for any other error. Python's
    and numpy's ``MemoryError`` (``Unable to allocate 112. GiB for an array with shape ...``),
    PyTorch's CUDA ``OutOfMemoryError`` and its CPU allocator's ``RuntimeError`` ("can't
    allocate memory: you tried to allocate N bytes")."""
    import re

    torch = sys.modules.get("torch")
    if isinstance(e, MemoryError) or (torch is not None and isinstance(e, getattr(torch, "OutOfMemoryError", ()))):
        return _one_line(e) if str(e) else "a memory allocation failed"
    tried = re.search(r"can't allocate memory: you tried to allocate (\d+) bytes", str(e))
    if isinstance(e, RuntimeError) and tried:
        return f"tried to allocate {int(tried.group(1)) / 2**30:.1f} GiB"
    first = str(e).split("\n", 1)[0]
    if isinstance(e, RuntimeError) and first.startswith("Caught ") and "MemoryError in DataLoader" in first:
        # numpy's _ArrayMemoryError in a loader worker, which the main process cannot rebuild
        # as its own type (torch re-raises it as a RuntimeError with the worker's traceback)
        return str(e).rstrip().splitlines()[-1].split(": ", 1)[-1]
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except _user_errors() as e:
        if args.debug:
            raise
        print(f"uda-ray: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 (only out-of-memory errors are caught; the rest re-raised)
        what = None if args.debug else _out_of_memory(e)
        if what is None:
            raise
        hint = getattr(args, "memory_hint", "")
        print(f"uda-ray: error: out of memory: {what}" + (f" ({hint}); lower them" if hint else ""),
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: what was written stays (checkpoints are written atomically)
        if args.debug:
            raise
        print("uda-ray: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
