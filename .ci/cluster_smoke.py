"""The cluster path end to end on one machine (run by ``bash .ci/cluster-smoke``; README,
"Try the cluster path on one machine").

What it starts, all on loopback, in a temporary folder it removes at the end (also when a step
fails): an S3-compatible server (moto), an MLflow tracking server whose artifacts go to that
S3, and a Ray cluster of a head with no CPU (``trial_driver`` slots only, as cluster.yaml's)
and two workers with one CPU each, each worker in its own mount namespace with a tmpfs over
the study's folder: no worker can read what the study's driver writes, as on a real cluster.

What it checks:
1. a table study with the default local storage is refused before any trial (exit 2, one
   line saying to pass ``--storage-path s3://...``);
2. the same study's smoke test with ``--storage-path s3://...`` and ``--tracking-uri http://...``
   finishes every row; dependent rows ran on another node than their parent (the runs'
   ``uda_ray.node`` tags); the MLflow record names each parent's ``s3://`` checkpoint; and
   ``compare`` equals the same study run on one machine (a local Ray, local files) seed for
   seed;
3. a worker node is killed (its raylet, by pid) while a trial trains: the trial restarts on
   the other node from its last checkpoint in S3 (``resumed_from_step``) and the study's table
   equals the uninterrupted one's.

Needs root (``unshare -m`` and ``mount``) and the ``[cluster]`` extra (boto3, moto[server]).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TABLE = "dast_table3"        # the table study run across the nodes (its smoke test)
KILL = ROOT / ".ci" / "cluster_kill_study.py"
BUCKET = "uda-ray-ci"


def say(msg: str) -> None:
    print(f"[cluster-smoke {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, check, timeout: float, every: float = 1.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            got = check()
        except Exception:  # noqa: BLE001 - not up yet
            got = None
        if got:
            return got
        time.sleep(every)
    raise RuntimeError(f"{what}: not ready after {timeout:.0f} s")


class Cluster:
    """Every process and folder this test makes, stopped and removed by :meth:`close`."""

    def __init__(self):
        self.tmp = Path(tempfile.mkdtemp(prefix="uda-ray-cluster-"))
        self.study_dir = self.tmp / "study"      # the driver's folder: hidden from the workers
        self.study_dir.mkdir()
        self.servers: list[subprocess.Popen] = []
        self.worker_ports: list[int] = []
        self.env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "UDA_RAY_STORE", "UDA_RAY_STORAGE")}

    # --- servers ------------------------------------------------------------------------
    def start_s3(self) -> None:
        port = free_port()
        self.s3 = f"http://127.0.0.1:{port}"
        self.servers.append(subprocess.Popen(["moto_server", "-H", "127.0.0.1", "-p", str(port)],
                                             stdout=open(self.tmp / "moto.log", "w"), stderr=subprocess.STDOUT,
                                             start_new_session=True))
        self.env.update({"AWS_ENDPOINT_URL_S3": self.s3, "AWS_ENDPOINT_URL": self.s3, "AWS_ACCESS_KEY_ID": "ci",
                         "AWS_SECRET_ACCESS_KEY": "ci", "AWS_DEFAULT_REGION": "us-east-1",
                         "MLFLOW_S3_ENDPOINT_URL": self.s3, "RAY_AUTH_MODE": "disabled",
                         "RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true"})
        os.environ.update({k: self.env[k] for k in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
                                                    "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
                                                    "MLFLOW_S3_ENDPOINT_URL")})
        import boto3

        wait_for("the S3 server", lambda: urllib.request.urlopen(self.s3, timeout=2), 60)
        boto3.client("s3", endpoint_url=self.s3).create_bucket(Bucket=BUCKET)
        say(f"S3 server {self.s3}, bucket {BUCKET}")

    def start_mlflow(self) -> None:
        port = free_port()
        self.mlflow = f"http://127.0.0.1:{port}"
        self.servers.append(subprocess.Popen(
            ["mlflow", "server", "--backend-store-uri", f"sqlite:///{self.tmp / 'mlflow.db'}",
             "--default-artifact-root", f"s3://{BUCKET}/mlflow", "--no-serve-artifacts", "--host", "127.0.0.1",
             "--port", str(port), "--workers", "1"],
            env=self.env, stdout=open(self.tmp / "mlflow.log", "w"), stderr=subprocess.STDOUT,
            start_new_session=True))
        wait_for("the MLflow server", lambda: urllib.request.urlopen(f"{self.mlflow}/health", timeout=2), 180)
        say(f"MLflow tracking server {self.mlflow}")

    # --- the Ray cluster ----------------------------------------------------------------
    def ray_start(self, args: list[str], *, hidden: bool = False) -> None:
        cmd = ["ray", "start", *args, "--disable-usage-stats"]
        if hidden:  # its own mount namespace: a tmpfs over the study's folder
            inner = " ".join(f"'{a}'" for a in cmd)
            cmd = ["unshare", "-m", "--propagation", "private", "sh", "-c",
                   f"mount -t tmpfs tmpfs '{self.study_dir}' && exec {inner}"]
        subprocess.run(cmd, env=self.env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                       timeout=180)

    def start_ray(self) -> None:
        port = free_port()
        self.address = f"127.0.0.1:{port}"
        self.ray_start(["--head", "--node-ip-address", "127.0.0.1", "--port", str(port), "--num-cpus", "0",
                        "--resources", json.dumps({"trial_driver": 4}), "--temp-dir", str(self.tmp / "ray"),
                        "--dashboard-port", str(free_port()), "--ray-client-server-port", str(free_port()),
                        "--node-manager-port", str(free_port())])
        for _ in range(2):
            nm = free_port()
            self.worker_ports.append(nm)
            self.ray_start(["--address", self.address, "--node-ip-address", "127.0.0.1", "--num-cpus", "1",
                            "--node-manager-port", str(nm)], hidden=True)
        status = lambda: "2 node" if self.alive_workers() == 2 else None  # noqa: E731
        wait_for("two worker nodes", status, 120)
        say(f"Ray cluster {self.address}: a head (0 CPUs, trial_driver slots) and 2 workers (1 CPU each, "
            f"no view of {self.study_dir})")

    def raylet_pid(self, nm_port: int) -> int | None:
        for pid, args in self._processes():
            if "raylet" in args.split()[0] and f"--node_manager_port={nm_port}" in args:
                return pid
        return None

    def alive_workers(self) -> int:
        return sum(self.raylet_pid(p) is not None for p in self.worker_ports)

    def _processes(self) -> list[tuple[int, str]]:
        out = []
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                try:
                    args = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
                except OSError:
                    continue
                if args:
                    out.append((int(d.name), args))
        return out

    def ray_pids(self) -> list[int]:
        """Every process of this cluster (its command line names the cluster's temp folder or
        one of its nodes' ports), never another Ray on the machine."""
        marks = [str(self.tmp), self.address, *[f"--node_manager_port={p}" for p in self.worker_ports]]
        return [pid for pid, args in self._processes() if pid != os.getpid() and any(m in args for m in marks)]

    # --- studies ------------------------------------------------------------------------
    def study(self, script: str, *args: str, timeout: float = 900, background: bool = False):
        cmd = ["uda-ray", "study", script, *args]
        log = open(self.tmp / f"study-{int(time.time() * 1000)}.log", "w+")
        p = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        p.log = log
        if background:
            return p
        return finish(p, timeout)

    def close(self) -> None:
        for pid in self.ray_pids():
            with contextlib_suppress():
                os.kill(pid, signal.SIGTERM)
        for p in self.servers:
            with contextlib_suppress():
                os.killpg(p.pid, signal.SIGTERM)
        time.sleep(3)
        for pid in self.ray_pids():
            with contextlib_suppress():
                os.kill(pid, signal.SIGKILL)
        for p in self.servers:
            with contextlib_suppress():
                os.killpg(p.pid, signal.SIGKILL)
        # `ray start --head` named this cluster the machine's current one: forget it
        current = Path(tempfile.gettempdir(), "ray", "ray_current_cluster")
        with contextlib_suppress():
            if getattr(self, "address", "") and self.address in current.read_text():
                current.unlink()
        shutil.rmtree(self.tmp, ignore_errors=True)
        left = self.ray_pids()
        say(f"cleaned up (processes left: {len(left)}; {self.tmp} removed)")


def contextlib_suppress():
    import contextlib

    return contextlib.suppress(Exception)


def finish(p: subprocess.Popen, timeout: float) -> tuple[int, str]:
    try:
        p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.send_signal(signal.SIGINT)
        p.wait(timeout=60)
    p.log.seek(0)
    return p.returncode, p.log.read()


def seed_table(name: str, uri: str, out: Path) -> dict:
    from uda_ray.compare import compare_study

    seeds = compare_study(name, tracking_uri=uri, out_dir=out, log_to_parent=False).seeds
    col = next(c for c in seeds.columns if c.endswith("mIoU") and c != "sel_mIoU")
    return {(r["row"], str(r["seed"])): float(r[col]) for _, r in seeds[seeds["counted"]].iterrows()}


def same(a: dict, b: dict) -> list[str]:
    diffs = [f"{k}: {a.get(k)} vs {b.get(k)}" for k in sorted(set(a) | set(b))
             if k not in a or k not in b or not math.isclose(a[k], b[k], rel_tol=0, abs_tol=1e-9)]
    return diffs


def rows_of(uri: str, study: str) -> dict:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(study)
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`uda_ray.kind` = 'row'")
    return {(r.data.tags["row"], r.data.tags["seed"]): r for r in runs}


def check(ok: bool, what: str) -> None:
    if not ok:
        raise AssertionError(what)
    say(f"ok: {what}")


def main() -> int:
    if os.geteuid() != 0:
        print("cluster-smoke: needs root (unshare -m, mount) to give each worker a disk of its own", file=sys.stderr)
        return 2
    t0 = time.time()
    c = Cluster()
    try:
        c.start_s3()
        c.start_mlflow()
        c.start_ray()
        from uda_ray.study import load_study

        table = load_study(ROOT / "studies" / f"{TABLE}.py")
        parents = {r.name: r.init_from for r in table.rows}
        smoke = f"{TABLE}-smoke"

        # 1. local storage on a cluster whose nodes share no disk: refused before any trial
        rc, log = c.study(TABLE, "--smoke-test", "--address", c.address, "--tracking-uri", c.mlflow,
                          "--out", str(c.study_dir / "local-storage"), timeout=300)
        last = log.strip().splitlines()[-1] if log.strip() else ""
        check(rc == 2 and "--storage-path s3://" in last and "Traceback" not in log,
              f"local storage refused in one line, exit {rc}: {last}")

        # 2. the study across the nodes: S3 storage and stage store, the MLflow server
        t = time.time()
        rc, log = c.study(TABLE, "--smoke-test", "--address", c.address, "--storage-path", f"s3://{BUCKET}/storage",
                          "--tracking-uri", c.mlflow, "--out", str(c.study_dir / "runs"))
        if rc != 0:
            print(log[-6000:])
        check(rc == 0, f"{smoke} on the cluster finished (exit {rc}, {time.time() - t:.0f} s)")
        runs = rows_of(c.mlflow, smoke)
        check(all(r.info.status == "FINISHED" for r in runs.values()) and
              {k[0] for k in runs} == set(parents), f"every row FINISHED: {sorted(k[0] for k in runs)}")
        nodes = {k: r.data.tags.get("uda_ray.node", "")[:8] for k, r in runs.items()}
        say("placement: " + ", ".join(f"{row} s{seed} on node {n}" for (row, seed), n in sorted(nodes.items())))
        moved = [row for (row, seed), r in runs.items() if parents[row] and "reused" not in r.data.tags
                 and nodes[(row, seed)] != nodes.get((parents[row], seed))]
        check(len(set(nodes.values())) == 2 and moved,
              f"rows ran on both workers; dependent rows on another node than their parent: {sorted(moved)}")
        inits = {row: r.data.params.get("run.init_from", "") for (row, _), r in runs.items() if parents[row]}
        check(all(v.startswith(f"s3://{BUCKET}/") for v in inits.values()),
              f"every dependent row records its parent's s3:// checkpoint ({len(inits)} rows)")

        rc, log = c.study(TABLE, "--smoke-test", "--address", "local", "--tracking-uri",
                          f"sqlite:///{c.tmp / 'local.db'}", "--out", str(c.tmp / "local"))
        check(rc == 0, f"{smoke} on one machine finished (exit {rc})")
        diffs = same(seed_table(smoke, c.mlflow, c.tmp / "cmp-cluster"),
                     seed_table(smoke, f"sqlite:///{c.tmp / 'local.db'}", c.tmp / "cmp-local"))
        check(not diffs, f"compare on the cluster equals compare on one machine, seed for seed {diffs[:3]}")

        # 3. a worker node lost mid-trial
        ref_rc, _ = c.study(str(KILL), "--address", "local", "--tracking-uri", f"sqlite:///{c.tmp / 'local.db'}",
                            "--out", str(c.tmp / "local"))
        check(ref_rc == 0, "the node-kill study, uninterrupted on one machine, finished")
        p = c.study(str(KILL), "--address", c.address, "--storage-path", f"s3://{BUCKET}/kill",
                    "--tracking-uri", c.mlflow, "--out", str(c.study_dir / "kill"), background=True)
        import mlflow

        client = mlflow.MlflowClient(tracking_uri=c.mlflow)

        def training_src():
            exp = client.get_experiment_by_name("cluster_kill")
            if exp is None:
                return None
            for r in client.search_runs([exp.experiment_id], filter_string="tags.row = 'src'"):
                steps = [m.step for m in client.get_metric_history(r.info.run_id, "loss/seg_src")] \
                    if r.info.status == "RUNNING" else []
                if steps and max(steps) >= 50:  # past two checkpoints (every 20 steps)
                    return r
            return None

        src = wait_for("the src trial past its second checkpoint", training_src, 600, every=0.5)
        pid = int(src.data.tags["uda_ray.pid"])
        raylet = next((ppid for ppid in ancestors(pid) if any(
            ppid == c.raylet_pid(nm) for nm in c.worker_ports)), None)
        check(raylet is not None, f"the src trial (pid {pid}) runs under worker raylet {raylet}")
        killed_node = src.data.tags.get("uda_ray.node", "")
        os.kill(raylet, signal.SIGKILL)
        say(f"killed worker raylet {raylet} (node {killed_node[:8]}) at step "
            f"{max(m.step for m in client.get_metric_history(src.info.run_id, 'loss/seg_src'))}")
        rc, log = finish(p, 900)
        if rc != 0:
            print(log[-6000:])
        check(rc == 0, f"the node-kill study finished after losing a node (exit {rc})")
        runs = rows_of(c.mlflow, "cluster_kill")
        src = runs[("src", "0")]
        check(src.info.status == "FINISHED" and int(src.data.tags.get("resumed_from_step", "0")) >= 20,
              f"src restarted from its last checkpoint (step {src.data.tags.get('resumed_from_step')})")
        check(src.data.tags.get("uda_ray.node", "") not in ("", killed_node),
              f"src finished on the other node ({src.data.tags.get('uda_ray.node', '')[:8]})")
        diffs = same(seed_table("cluster_kill", c.mlflow, c.tmp / "cmp-kill"),
                     seed_table("cluster_kill", f"sqlite:///{c.tmp / 'local.db'}", c.tmp / "cmp-kill-local"))
        check(not diffs, f"the table after the node kill equals the uninterrupted one {diffs[:3]}")
        say(f"passed in {time.time() - t0:.0f} s")
        return 0
    except Exception as e:  # noqa: BLE001 - reported, then cleaned up
        say(f"FAILED: {type(e).__name__}: {e}")
        for f in sorted(c.tmp.glob("*.log")):
            print(f"--- {f.name} (last lines)")
            print("\n".join(f.read_text(errors="replace").splitlines()[-30:]))
        return 1
    finally:
        c.close()


def ancestors(pid: int) -> list[int]:
    out = []
    while pid > 1:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            break
        pid = int(stat.rsplit(")", 1)[1].split()[1])
        out.append(pid)
    return out


if __name__ == "__main__":
    sys.exit(main())
