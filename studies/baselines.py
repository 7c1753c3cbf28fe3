"""The engine's baselines on the embedded benchmark at the ``tiny-cpu`` preset, 3 seeds:
source-only, AdaBN and AdaptSegNet (both from the source-only checkpoint of the same seed),
and the target oracle (the same supervised training on labelled target-train images).

    uda-ray study studies/baselines.py

The domain gap is the oracle against source-only; whether AdaptSegNet beats source-only and
AdaBN is a finding, not a target.
"""

from uda_ray.study import Row, Study

STUDY = Study(
    name="baselines",
    base={"preset": "tiny-cpu"},
    rows=[
        Row("source_only", "source_only"),
        Row("adabn", "adabn", init_from="source_only"),
        Row("adaptseg", "adaptseg", init_from="source_only", set={"run.iterations": 400}),
        # Target oracle: supervised on target-train labels (the selection images included).
        Row("oracle", "source_only", set={"data.source": "cityscapes", "data.source_dir": "cityscapes",
                                          "data.source_split": "train", "data.source_w": 256,
                                          "data.source_h": 128}),
    ],
    seeds=(0, 1, 2),
    baseline="source_only",
    max_concurrent=2,
    smoke={"run.iterations": 2},
)

if __name__ == "__main__":
    raise SystemExit(STUDY.main())
