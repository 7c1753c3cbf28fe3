"""The ``uda-ray`` command line."""

from __future__ import annotations

import argparse
import sys
import time

DEFAULT_SYNTH_ROOT = "data/synth"


def _cmd_data_synth(args) -> int:
    from .data import synth

    print(f"generating the embedded benchmark (regime {args.regime!r}, seed {args.seed}) in {args.out} ...")
    t0 = time.perf_counter()
    counts = {k: v for k, v in (("n_source", args.n_source), ("n_target", args.n_target),
                                ("n_val", args.n_val)) if v is not None}  # None: the generator's default
    summary = synth.generate(args.out, seed=args.seed, regime=args.regime, workers=args.workers,
                             progress=True, **counts)
    print(f"done in {time.perf_counter() - t0:.1f} s: {summary['counts']}")
    print(f"  source (GTA5 layout):       {args.out}/gta5")
    print(f"  target (Cityscapes layout): {args.out}/cityscapes")
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


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .data.datasets import DATASETS

    p = argparse.ArgumentParser(prog="uda-ray", description=__doc__)
    p.add_argument("--version", action="version", version=f"uda-ray {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="generate and check datasets")
    dsub = data.add_subparsers(dest="data_command", required=True)

    s = dsub.add_parser("synth", help="write the embedded synthetic-to-real benchmark "
                                      "(GTA5 and Cityscapes layouts)")
    s.add_argument("--out", default=DEFAULT_SYNTH_ROOT, help="output folder (default: %(default)s)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--n-source", type=int, default=None, help="source images (default: the generator's)")
    s.add_argument("--n-target", type=int, default=None, help="target train images")
    s.add_argument("--n-val", type=int, default=None, help="target val images")
    s.add_argument("--regime", default="default", help="named domain-shift regime")
    s.add_argument("--workers", type=int, default=2)
    s.set_defaults(func=_cmd_data_synth)

    c = dsub.add_parser("check", help="read every sample; print counts, class histogram, problems")
    c.add_argument("root", help="the dataset's root folder")
    c.add_argument("--dataset", required=True, choices=sorted(DATASETS))
    c.add_argument("--split", default=None, help="split (default: the dataset's first)")
    c.add_argument("--num-classes", type=int, choices=(19, 16), default=None)
    c.add_argument("--workers", type=int, default=2)
    c.add_argument("--max-problems", type=int, default=50)
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    c.set_defaults(func=_cmd_data_check)
    return p


def main(argv: list[str] | None = None) -> int:
    from .data.io import DatasetError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except DatasetError as e:
        print(f"uda-ray: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
