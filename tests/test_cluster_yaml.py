"""cluster.yaml, checked offline: Ray's own config preparation and schema validation, the
resource layout, and the per-node environment produced by running the YAML's environment
commands in a scratch HOME (no AWS, no network, no SSH)."""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ray.autoscaler._private.command_runner import _with_interactive
from ray.autoscaler._private.util import prepare_config, validate_config, with_head_node_ip

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"
ENV_FILE = "~/uda-ray.env"

# GPUs and vCPUs per g5 instance type (AWS's published specs), to check the advertised resources.
G5 = {"g5.xlarge": (1, 4), "g5.2xlarge": (1, 8), "g5.4xlarge": (1, 16), "g5.8xlarge": (1, 32),
      "g5.16xlarge": (1, 64), "g5.12xlarge": (4, 48), "g5.24xlarge": (4, 96), "g5.48xlarge": (8, 192)}


def _block_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("cluster.yaml validation tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.fixture(scope="module")
def raw():
    return yaml.safe_load(CLUSTER_YAML.read_text())


@pytest.fixture(scope="module")
def config(raw):
    """The config as `ray up` sees it after prepare_config (defaults merged, setup_commands
    prepended to head_setup_commands and worker_setup_commands, per-type min/max filled in)."""
    return prepare_config(raw)


def _types(config):
    head = config["head_node_type"]
    nodes = config["available_node_types"]
    return nodes[head], {k: v for k, v in nodes.items() if k != head}


def test_ray_prepares_and_validates_it_offline(raw, monkeypatch):
    # prepare_config + validate_config are the parts of `ray up` that need no cloud. The AWS
    # bootstrap (key pair, security group, subnets, instance-type lookup) needs boto3 and
    # credentials and is left to `ray up`. Here: no network and no AWS credentials.
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    _block_network(monkeypatch)
    prepared = prepare_config(raw)
    validate_config(prepared)  # ray-schema.json (jsonschema) plus Ray's own consistency checks
    assert prepared["provider"]["type"] == "aws"


def test_provider_auth_and_no_docker(config):
    provider = config["provider"]
    assert provider["region"]
    assert isinstance(provider["cache_stopped_nodes"], bool)
    assert config["auth"]["ssh_user"] == "ubuntu"
    assert not config["docker"].get("image") and not config["docker"].get("container_name")
    head, workers = _types(config)
    amis = {t["node_config"].get("ImageId") for t in [head, *workers.values()]}
    assert len(amis) == 1 and None not in amis, "every node type should boot the same AMI"
    for node_type in [head, *workers.values()]:
        assert node_type["node_config"]["IamInstanceProfile"], "S3 access comes from an instance profile"


def test_head_runs_trial_drivers_but_no_training(config):
    head, workers = _types(config)
    res = head["resources"]
    # No CPU and no GPU: no Ray Train worker (GPU or CPU-only) can be placed on the head.
    assert res.get("CPU") == 0 and res.get("GPU") == 0, res
    # Trial drivers that ask for {"trial_driver": 1} run on the head: one slot per GPU the
    # cluster can grow to (one driver per concurrent one-GPU trial), and no worker type offers
    # the resource, so such drivers never land on a GPU node.
    max_gpus = sum(t["max_workers"] * t["resources"]["GPU"] for t in workers.values())
    assert res.get("trial_driver", 0) >= max_gpus, (res, max_gpus)
    assert not any("trial_driver" in t["resources"] for t in workers.values())
    assert head["min_workers"] == head["max_workers"] == 0


def test_gpu_workers_autoscale_from_zero(config):
    _, workers = _types(config)
    assert workers
    for name, t in workers.items():
        instance = t["node_config"]["InstanceType"]
        assert instance in G5, f"{name}: add {instance}'s GPU/vCPU counts to G5 in this test"
        gpus, vcpus = G5[instance]
        assert t["resources"]["GPU"] == gpus, name
        assert 0 < t["resources"]["CPU"] <= vcpus, name
        assert t["min_workers"] == 0, name
        assert 1 <= t["max_workers"] <= config["max_workers"], name
    assert config["idle_timeout_minutes"] > 0


def _node_env(tmp_path: Path, commands: list[str], extra_env: dict[str, str] | None = None) -> dict:
    """Run the setup commands that write ~/uda-ray.env in a scratch HOME, the way Ray runs
    them (each in its own shell), then return the environment a shell gets from that file.
    ~/venv points at this test's own virtualenv for the head's `ray.util` IP lookup."""
    home = tmp_path
    if not (home / "venv").exists():
        (home / "venv").symlink_to(sys.prefix, target_is_directory=True)
    env = {"HOME": str(home), "PATH": os.environ["PATH"], **(extra_env or {})}
    for cmd in commands:
        if ENV_FILE in cmd:
            proc = subprocess.run(["bash", "-c", cmd], env=env, capture_output=True, text=True, timeout=60)
            assert proc.returncode == 0, (cmd, proc.stderr)
    assert ". ~/uda-ray.env" in (home / ".bashrc").read_text(), "interactive shells should load the env file"
    out = subprocess.run(["bash", "-c", f". {ENV_FILE} && env"], env={"HOME": str(home), "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True, timeout=30, check=True).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def _with_bucket(commands: list[str], bucket: str) -> list[str]:
    return [re.sub(r'UDA_RAY_BUCKET="[^"]*"', f'UDA_RAY_BUCKET="{bucket}"', c) for c in commands]


@pytest.fixture(scope="module")
def node_envs(config, tmp_path_factory):
    """(head environment, worker environment), the worker told the head's IP the way Ray's
    autoscaler does it (RAY_HEAD_IP exported into the worker's setup commands)."""
    head_env = _node_env(tmp_path_factory.mktemp("head"),
                         _with_bucket(config["head_setup_commands"], "uda-ray-test-bucket"))
    head_ip = re.fullmatch(r"http://([^:/]+):\d+", head_env["MLFLOW_TRACKING_URI"]).group(1)
    worker_env = _node_env(tmp_path_factory.mktemp("worker"),
                           _with_bucket(config["worker_setup_commands"], "uda-ray-test-bucket"),
                           {"RAY_HEAD_IP": head_ip})
    return head_env, worker_env, head_ip


def test_every_node_sets_the_same_ray_auth_mode(config, node_envs):
    head_env, worker_env, _ = node_envs
    assert head_env["RAY_AUTH_MODE"] == worker_env["RAY_AUTH_MODE"]
    assert head_env["RAY_AUTH_MODE"] in ("token", "disabled")
    if head_env["RAY_AUTH_MODE"] == "token":  # then every node needs the same token
        assert config["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"
    # `ray start` runs after the env file is loaded, on the head and on every worker, so the
    # raylet (and every Ray worker process it starts) inherits the mode.
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in config[key] if "ray start" in c]
        assert len(starts) == 1, key
        assert 0 <= starts[0].find(f". {ENV_FILE}") < starts[0].find("ray start"), starts[0]


def test_storage_is_one_s3_uri_shared_by_all_nodes(config, node_envs):
    head_env, worker_env, _ = node_envs
    assert head_env["UDA_RAY_STORAGE"] == worker_env["UDA_RAY_STORAGE"] == "s3://uda-ray-test-bucket/uda-ray"
    assert head_env["AWS_DEFAULT_REGION"] == worker_env["AWS_DEFAULT_REGION"] == config["provider"]["region"]


def test_setup_refuses_the_unedited_bucket_placeholder(config, tmp_path):
    env_cmd = next(c for c in _with_bucket(config["worker_setup_commands"], "<your-bucket>") if "> ~/uda-ray.env" in c)
    proc = subprocess.run(["bash", "-c", env_cmd], env={"HOME": str(tmp_path), "PATH": os.environ["PATH"]},
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0 and "UDA_RAY_BUCKET" in proc.stderr


def test_workers_log_to_mlflow_on_the_head(config, node_envs):
    head_env, worker_env, head_ip = node_envs
    assert worker_env["MLFLOW_TRACKING_URI"] == f"http://{head_ip}:5000"
    assert head_env["MLFLOW_TRACKING_URI"] == worker_env["MLFLOW_TRACKING_URI"]
    assert head_ip not in ("127.0.0.1", "localhost", "0.0.0.0")
    assert head_env["UDA_RAY_HEAD_IP"] == head_ip  # the address the MLflow server binds
    assert head_env["MLFLOW_DISABLE_TELEMETRY"] == worker_env["MLFLOW_DISABLE_TELEMETRY"] == "true"


def test_mlflow_server_is_started_on_the_head(config):
    head_starts = config["head_start_ray_commands"]
    servers = [i for i, c in enumerate(head_starts) if "mlflow server" in c]
    assert len(servers) == 1
    ray_head = next(i for i, c in enumerate(head_starts) if "ray start --head" in c)
    assert ray_head < servers[0]
    cmd = head_starts[servers[0]]
    args = shlex.split(cmd[cmd.index("mlflow server"):].split(">", 1)[0])
    opt = {a: b for a, b in zip(args, args[1:]) if a.startswith("--")}
    assert opt["--port"] == "5000"
    assert opt["--backend-store-uri"].startswith("sqlite:////home/ubuntu/")
    assert opt["--default-artifact-root"].startswith("s3://")
    # MLflow has no login: bound to the head's private IP (what the workers use), not 0.0.0.0.
    assert opt["--host"] == "$UDA_RAY_HEAD_IP"
    assert not re.search(r"--host[ =]+['\"]?(0\.0\.0\.0|::|\*)", cmd)
    assert "http://$UDA_RAY_HEAD_IP:5000/health" in cmd  # the health check asks that address too
    assert not any("mlflow server" in c for c in config["worker_start_ray_commands"])
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head_starts[ray_head]


def test_setup_installs_uda_ray_on_every_node(config):
    assert config["file_mounts"]["~/uda-ray"] == "."
    assert (CLUSTER_YAML.parent / "pyproject.toml").is_file(), "run `ray up` from the repository root"
    assert ".gitignore" in config["rsync_filter"], "don't ship .venv, data/ or runs/"
    for key in ("head_setup_commands", "worker_setup_commands"):
        cmds = config[key]
        assert any(re.search(r"venv .*--python 3\.11", c) for c in cmds), key
        install = [c for c in cmds if re.search(r"pip install .*-e ~/uda-ray\b", c)]
        assert len(install) == 1, key
        assert "torch" not in install[0], "torch/torchvision come pinned from pyproject.toml"


def test_commands_are_valid_bash_as_ray_runs_them(config):
    # Ray runs each command as `bash --login -c -i 'source ~/.bashrc; ... && (CMD)'`, and a
    # worker's commands with `export RAY_HEAD_IP=...;` in front; `bash -n` parses without running.
    keys = ("setup_commands", "head_setup_commands", "worker_setup_commands",
            "head_start_ray_commands", "worker_start_ray_commands")
    for key in keys:
        cmds = config[key]
        if key.startswith("worker"):
            cmds = with_head_node_ip(cmds, "10.0.0.10")
        for cmd in cmds:
            script = shlex.split(_with_interactive(cmd)[-1])[0]
            proc = subprocess.run(["bash", "-n", "-c", script], capture_output=True, text=True, timeout=30)
            assert proc.returncode == 0, (key, cmd, proc.stderr)
