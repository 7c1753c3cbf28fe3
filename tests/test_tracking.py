"""MLflow bookkeeping on a real SQLite store: a fresh store opened by two processes at once, and
telemetry off by default. One fresh store for the module (creating one costs ~6 s)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from uda_ray import tracking

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}


def _python(code: str, *args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], env=ENV, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A fresh SQLite store that two processes open at once, each creating a tracked run."""
    root = tmp_path_factory.mktemp("tracking")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    code = """
        import sys
        from uda_ray.tracking import MlflowTracker
        t = MlflowTracker(experiment="race", tracking_uri=sys.argv[1], run_name=sys.argv[2])
        t.finish()
    """
    procs = [_python(code, uri, f"racer{i}") for i in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    return {"uri": uri, "root": root, "racers": [(p.returncode, o) for p, o in zip(procs, outs)]}


def _client(store):
    return tracking.mlflow_client(store["uri"])


def _runs(client, experiment: str) -> list:
    return client.search_runs([client.get_experiment_by_name(experiment).experiment_id])


def test_two_processes_creating_a_fresh_store_at_once_both_succeed(store):
    for rc, out in store["racers"]:
        assert rc == 0, out
    runs = _runs(_client(store), "race")
    assert sorted(r.info.run_name for r in runs) == ["racer0", "racer1"]
    assert all(r.info.status == "FINISHED" for r in runs)
    assert Path(store["root"] / "mlflow.db.lock").is_file()


def test_telemetry_is_off_once_tracking_is_imported_unless_turned_on():
    code = "import os, uda_ray.tracking; print(os.environ.get('MLFLOW_DISABLE_TELEMETRY'))"
    env = {k: v for k, v in ENV.items() if k != "MLFLOW_DISABLE_TELEMETRY"}
    run = lambda e: subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, text=True,  # noqa: E731
                                   check=True).stdout.strip()
    assert run(env) == "true"
    assert run({**env, "MLFLOW_DISABLE_TELEMETRY": "false"}) == "false"  # the user's choice is kept
