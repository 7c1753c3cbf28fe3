"""Ray Tune's Optuna searcher, tolerant of reports without the objective.

A Train trial reports every checkpoint (so a restarted worker group resumes from it), and
only the reports at evaluation steps carry the selection metric. Ray's ``OptunaSearch``
indexes every intermediate result by the metric and raises ``KeyError`` on a checkpoint-only
report, which ends the whole search; this searcher passes only the results that carry it.
Imported only where Tune runs (it imports Ray).
"""

from __future__ import annotations

from ray.tune.search.optuna import OptunaSearch


class MetricReportsOptunaSearch(OptunaSearch):
    def on_trial_result(self, trial_id: str, result: dict) -> None:
        metrics = self.metric if isinstance(self.metric, (list, tuple)) else [self.metric]
        if all(m in result for m in metrics):
            super().on_trial_result(trial_id, result)
