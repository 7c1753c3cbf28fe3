"""The study .ci/cluster-smoke runs to lose a worker node mid-trial: a source row long enough
to be killed between two of its checkpoints, and a row that starts from it. Not a paper's
table (the embedded benchmark, random init, study-cpu scale)."""

from uda_ray.study import Row, Study

STUDY = Study(
    name="cluster_kill",
    base={"preset": "study-cpu", "run.checkpoint_every": 20, "run.log_every": 10},
    rows=[
        Row("src", "source_only", set={"run.iterations": 240}),
        Row("ad", "adaptseg", init_from="src", set={"run.iterations": 4}),
    ],
    seeds=(0,),
    baseline="src",
    max_concurrent=1,
    max_failures=2,
)

if __name__ == "__main__":
    raise SystemExit(STUDY.main())
