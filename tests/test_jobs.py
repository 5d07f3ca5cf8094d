"""`ray job submit` against a real local head node: the pipeline job (data -> reference -> train
-> pair accuracy -> win rate) on a tiny model with stages placed by custom resources, surviving
its train node's death mid-run, and a job given bad input that must end FAILED with the reason in
its logs.

Auth is set one way everywhere: RAY_AUTH_MODE=token for the head, the CLI and the jobs (Ray 2.60
enables token auth by default; mixing modes fails with AuthenticationError).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import yaml

# Whole jobs on the real model / a second head node: the full suite only.
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")


_GIVEN: set[int] = set()


def _free_port() -> int:
    """A free port not handed out before in this session: the OS can return a port it just
    returned again once its probe socket is closed (CI once gave a node's agent gRPC and HTTP
    ports the same number, and `ray start` refused)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _GIVEN:
            _GIVEN.add(port)
            return port


CLUSTER = REPO / "cluster.yaml"


@dataclass
class Cluster:
    address: str  # the dashboard / job server
    env: dict  # the "laptop" environment that submits jobs
    token: str
    kill_train_node: Callable[[], None]
    start_train_node: Callable[[], None]
TOKEN_FILE = "~/.ray/auth_token"  # where `ray get-auth-token --generate` writes, on any machine


def _ports() -> list[str]:
    """Every port a node opens, free ones: three nodes (and the test session's Ray) on one machine."""
    flags = ("--object-manager-port", "--node-manager-port", "--dashboard-agent-listen-port",
             "--metrics-export-port", "--runtime-env-agent-port", "--dashboard-agent-grpc-port")
    return [part for flag in flags for part in (flag, str(_free_port()))]


def _local_command(command: str, gcs_port: int) -> str:
    """A start command of cluster.yaml, run on this machine: the head's address and port are
    local ones, every other port is chosen per node (_ports), and the autoscaler's bootstrap file
    (which `ray up` writes on a real head) is left out."""
    command = " ".join(command.split())
    command = command.replace("$RAY_HEAD_IP:6379", f"127.0.0.1:{gcs_port}")
    command = command.replace("--port=6379", f"--port={gcs_port}")
    command = re.sub(r" --object-manager-port=\d+", "", command)
    return re.sub(r" --autoscaling-config=\S+", "", command)


def _node_env(home: Path) -> dict:
    """A node's environment: its own home, no token in the environment, Ray's CLI on PATH."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("RAY_AUTH") and k not in ("RAY_ADDRESS", "HOME")}
    return dict(env, HOME=str(home), PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")


def _start(command: str, home: Path, temp: Path, cpus: int, resources: dict, extra=()) -> subprocess.CompletedProcess:
    home.mkdir(parents=True, exist_ok=True)
    args = ["--temp-dir", str(temp), "--num-cpus", str(cpus), "--disable-usage-stats",
            *_ports(), *extra] + (["--resources", json.dumps(resources)] if resources else [])
    return subprocess.run(["bash", "-c", f"{command} {' '.join(map(shlex.quote, args))}"],
                          env=_node_env(home), capture_output=True, text=True, timeout=180, check=False)


def _hand_token(laptop: Path, node_home: Path) -> None:
    """What cluster.yaml's file_mounts does: the laptop's token file to the same path on a node."""
    mounts = yaml.safe_load(CLUSTER.read_text())["file_mounts"]
    remote = next(r for r, local in mounts.items() if local == TOKEN_FILE)
    target = node_home / remote.removeprefix("~/")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(laptop / TOKEN_FILE.removeprefix("~/"), target)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A head and two worker nodes started by cluster.yaml's own start commands, each with a fresh
    home and its own temp dir: the token is made on a "laptop" home (`ray get-auth-token
    --generate`) and handed to every node as cluster.yaml's file_mounts hands it. The head
    advertises what cluster.yaml's head type does (0 CPUs); the workers carry the `dpo_score` and
    `dpo_train` resources of the cpu_score and gpu_train types (4 each, so that one node holds
    every actor of its kind here). Yields a ``Cluster``: the dashboard address, the laptop's
    environment (for `ray job submit`), the token, and what kills and restarts the train node;
    stops only these nodes."""
    root = tmp_path_factory.mktemp("cluster")
    config = yaml.safe_load(CLUSTER.read_text())
    types = config["available_node_types"]
    laptop = root / "laptop-home"
    laptop.mkdir()
    made = subprocess.run([RAY, "get-auth-token", "--generate"], env=_node_env(laptop),
                          capture_output=True, text=True, timeout=60, check=False)
    assert made.returncode == 0, made.stderr
    token = (laptop / TOKEN_FILE.removeprefix("~/")).read_text().strip()
    gcs, dashboard = _free_port(), _free_port()
    # Short temp dirs: a node's socket paths live under them, and AF_UNIX allows 107 bytes.
    temps = [Path(tempfile.mkdtemp(prefix=f"dpo-{name}-", dir="/tmp")) for name in ("head", "score", "train")]
    try:
        homes = {}
        for name in ("head", "score", "train"):
            homes[name] = root / name / "home"
            _hand_token(laptop, homes[name])
        (head_cmd,) = [c for c in config["head_start_ray_commands"] if c.strip() != "ray stop"]
        started = _start(_local_command(head_cmd, gcs), homes["head"], temps[0],
                         types[config["head_node_type"]]["resources"]["CPU"], {},
                         ["--dashboard-port", str(dashboard), "--ray-client-server-port", str(_free_port())])
        assert started.returncode == 0, started.stdout + started.stderr
        (worker_cmd,) = [c for c in config["worker_start_ray_commands"] if c.strip() != "ray stop"]

        def start_worker(name: str, temp: Path, node_type: str) -> None:
            resources = {key: 4 for key in types[node_type]["resources"]}
            joined = _start(_local_command(worker_cmd, gcs), homes[name], temp, 2, resources)
            assert joined.returncode == 0, joined.stdout + joined.stderr

        start_worker("score", temps[1], "cpu_score")
        start_worker("train", temps[2], "gpu_train")
        env = dict(_node_env(laptop), RAY_AUTH_MODE="token")
        yield Cluster(f"http://127.0.0.1:{dashboard}", env, token,
                      kill_train_node=lambda: _stop_nodes(temps[2], sig="kill"),
                      start_train_node=lambda: start_worker("train", temps[2], "gpu_train"))
    finally:
        _stop_nodes(*temps)
        for temp in temps:
            shutil.rmtree(temp, ignore_errors=True)


def test_a_fresh_node_without_the_token_does_not_start(tmp_path):
    """Why cluster.yaml hands the token out: cluster.yaml's head command on a home with no token
    file (and none in the environment) stops with Ray's AuthenticationError."""
    config = yaml.safe_load(CLUSTER.read_text())
    (head_cmd,) = [c for c in config["head_start_ray_commands"] if c.strip() != "ray stop"]
    temp = Path(tempfile.mkdtemp(prefix="dpo-notoken-", dir="/tmp"))
    try:
        started = _start(_local_command(head_cmd, _free_port()), tmp_path / "home", temp, 0, {},
                         ["--dashboard-port", str(_free_port()), "--ray-client-server-port", str(_free_port())])
    finally:
        _stop_nodes(temp)
        shutil.rmtree(temp, ignore_errors=True)
    assert started.returncode != 0
    assert "no authentication token was found" in started.stdout + started.stderr


def _submit(address, env, job_id, config_path, command="pipeline") -> None:
    runtime_env = {"env_vars": {"RAY_DATA_DISABLE_PROGRESS_BARS": "1", "RAY_AUTH_MODE": "token"}}
    got = subprocess.run(
        [RAY, "job", "submit", "--address", address, "--submission-id", job_id, "--no-wait",
         "--working-dir", str(REPO), "--runtime-env-json", json.dumps(runtime_env), "--",
         sys.executable, "-m", "dpo_ray", command, "--config", str(config_path)],
        env=env, capture_output=True, text=True, timeout=300, check=False)
    assert got.returncode == 0, got.stdout + got.stderr


def _stop_nodes(*temps: Path, sig: str = "terminate") -> None:
    """Stop the nodes started with these temp dirs only (all at once: one wait, not one per node).
    `ray stop` would kill every Ray on the machine, including the test session's own instance
    (and with it the pytest process, whose driver dies with its raylet). A node's daemons carry
    its temp dir on their command line; its workers are their children."""
    import psutil

    mine = [p for p in psutil.process_iter(["cmdline"])
            if any(str(temp) in arg for temp in temps for arg in (p.info["cmdline"] or []))]
    # Workers rename themselves (ray::RayTrainWorker...): they are found as the raylet's children.
    for process in list(mine):
        try:
            mine += [c for c in process.children(recursive=True) if c not in mine]
        except psutil.NoSuchProcess:
            continue
    for process in mine:
        with contextlib.suppress(psutil.NoSuchProcess):  # "kill": SIGKILL, a node that vanishes
            getattr(process, sig)()
    _, alive = psutil.wait_procs(mine, timeout=15)
    for process in alive:
        process.kill()


def _get(address: str, path: str, token: str) -> dict:
    """The job server's REST API with the cluster's token (the laptop's, not this session's)."""
    request = urllib.request.Request(f"{address}{path}", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def _wait(address, token, job_id, timeout=900) -> tuple[str, str]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = _get(address, f"/api/jobs/{job_id}", token)["status"]
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            return status, _get(address, f"/api/jobs/{job_id}/logs", token)["logs"]
        time.sleep(3)
    raise TimeoutError(f"job {job_id} did not finish in {timeout} s")


def _where(env: dict, address: str) -> dict[str, set[str]]:
    """Actor class name -> the custom resources of the nodes its actors ran on (Ray's state API,
    through the CLI with the laptop's token: dead actors are listed too)."""
    def listed(kind: str) -> list[dict]:
        got = subprocess.run([RAY, "list", kind, "--address", address, "--detail", "--format", "json",
                              "--limit", "10000"], env=env, capture_output=True, text=True,
                             timeout=120, check=False)
        assert got.returncode == 0, got.stdout + got.stderr
        return json.loads(got.stdout)

    nodes = {n["node_id"]: ",".join(sorted(k for k in n["resources_total"] if k.startswith("dpo_"))) or "head"
             for n in listed("nodes")}
    where: dict[str, set[str]] = {}
    for actor in listed("actors"):
        where.setdefault(actor["class_name"], set()).add(nodes.get(actor["node_id"], "?"))
    return where


def _pipeline_config(tmp_path, hh_path, tiny_llama, source=None, bucket=None) -> Path:
    """The pipeline job's run YAML; with ``bucket`` every output (reference cache, run and eval
    directories) goes there, and MLflow to its own store (a file store stands in for a server)."""
    placement = {"resources": {"dpo_score": 1}}
    outputs = f"{bucket}/{tmp_path.name}" if bucket else f"file://{tmp_path}"
    config = {
        "data": {"source": str(source or hh_path), "tokenizer": str(tiny_llama), "limit": 48,
                 "on_bad_row": "skip" if source is None else "raise", "max_length": 96,
                 "max_prompt_length": 48},
        "reference": {"model": str(tiny_llama), "cache_dir": f"{outputs}/cache",
                      "pool": {"num_cpus_per_actor": 0.5, "placement": placement}},
        "train": {"output_dir": f"{outputs}/runs", "run_name": "job", "num_workers": 2,
                  "cpus_per_worker": 0.5, "per_device_train_batch_size": 4, "max_steps": 3,
                  "learning_rate": 1e-3, "eval_fraction": 0.25, "report_to": ["mlflow"],
                  "tracking_uri": (tmp_path / "mlruns").as_uri(),
                  "placement": {"resources": {"dpo_train": 1}}},
        "eval": {"prompts": str(source or hh_path), "held_out_fraction": 0.25, "limit": 6,
                 "on_bad_row": "skip", "reference": str(tiny_llama),
                 "judges": [{"kind": "function", "name": "length", "pool": {"placement": placement}}],
                 "generation": {"max_new_tokens": 8, "chat_template": False,
                                "pool": {"num_cpus_per_actor": 0.5, "placement": placement}}},
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_two_jobs_one_fails_with_its_reason_one_survives_its_train_node_dying(
        cluster, s3, hh_path, tiny_llama, tmp_path, monkeypatch):
    """Submitted together from the "laptop", as users share a cluster. The one given a bad row
    ends FAILED with file, row and reason in its logs. The pipeline job on good data puts its
    reference actors on the dpo_score node and its train workers on the dpo_train node, and every
    output in the S3 bucket (each node reaches it as a cloud node would, with its own credentials
    and endpoint). Mid-training its dpo_train node is killed (SIGKILL: every process of it) once
    Ray Train has committed the step-5 checkpoint to the bucket, and started again as the
    autoscaler would replace it. With ``train.max_failures: -1`` Ray Train waits for train
    resources, restarts the workers from that checkpoint, and the job goes on to pair accuracy
    and the win rate: it succeeds, and the bucket keeps everything written before the failure
    (metrics.jsonl keeps every step logged before the kill; restarts.jsonl says where the workers
    restored from: the checkpoint, not the start)."""
    from dpo_ray import storage
    from dpo_ray.training.trainer import run_checkpoints

    address, env, token = cluster.address, cluster.env, cluster.token
    bad = tmp_path / "bad" / "bad.jsonl"
    bad.parent.mkdir()
    bad.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n"
                   + json.dumps({"prompt": "p", "chosen": "a"}) + "\n")
    config_path = _pipeline_config(tmp_path, hh_path, tiny_llama, bucket=s3)
    config = yaml.safe_load(config_path.read_text())
    steps_total = 30  # the node dies after step 5; the rest leaves time to see that first
    config["train"].update(max_steps=steps_total, num_train_epochs=30, save_steps=5, logging_steps=1,
                           max_failures=-1)
    config_path.write_text(yaml.safe_dump(config))
    run = f"{s3}/{tmp_path.name}/runs/job"
    _submit(address, env, "dpo-pipeline-ok", config_path)
    _submit(address, env, "dpo-pipeline-bad", _pipeline_config(bad.parent, hh_path, tiny_llama, bad))

    def committed() -> list[int]:
        """Steps of the checkpoints Ray Train has registered (its snapshot in the bucket names
        them): one uploaded but not yet registered when the node dies is not resumed from (seen:
        killed then, the run started again from step 0)."""
        snapshot = storage.read_text(f"{run}/ray_train/checkpoint_manager_snapshot.json") or ""
        return [step for step, path in run_checkpoints(run) if path.rsplit("/", 1)[-1] in snapshot]

    deadline = time.time() + 600
    while not any(step >= 5 for step in committed()):
        assert time.time() < deadline, "no checkpoint at step 5 in 10 minutes"
        status = _get(address, "/api/jobs/dpo-pipeline-ok", token)["status"]
        assert status == "RUNNING" or status == "PENDING", status
        time.sleep(0.2)
    cluster.kill_train_node()
    before = [json.loads(line)["step"] for line in storage.read_text(f"{run}/metrics.jsonl").splitlines()]
    print(f"train node killed after step {before[-1]}; checkpoints {sorted(run_checkpoints(run))}")
    assert before[-1] < steps_total, "the run ended before the node was killed: give it more steps"
    time.sleep(2)
    cluster.start_train_node()

    state, logs = _wait(address, token, "dpo-pipeline-bad", timeout=300)
    assert state == "FAILED"
    assert "bad.jsonl, row 2: missing_field" in logs, logs[-3000:]

    state, logs = _wait(address, token, "dpo-pipeline-ok")
    assert state == "SUCCEEDED", logs[-4000:]
    where = _where(env, address)
    for name, nodes in sorted(where.items()):
        print(f"{name}: ran on {sorted(nodes)}")
    assert where["RayTrainWorker"] == {"dpo_train"}  # before the failure and after
    assert where["MapWorker(MapBatches(ReferenceScorer))"] == {"dpo_score"}
    assert where["MapWorker(MapBatches(Generator))"] == {"dpo_score"}

    # The restart: from the checkpoint, and every step once the run went on.
    steps = [json.loads(line)["step"] for line in storage.read_text(f"{run}/metrics.jsonl").splitlines()]
    assert steps[:len(before)] == before  # what was written before the failure is still there
    (restart,) = [json.loads(line) for line in storage.read_text(f"{run}/restarts.jsonl").splitlines()]
    resumed_from = restart["restored_step"]
    print(f"resumed from the checkpoint at step {resumed_from}; logged steps {steps}")  # -s shows it
    assert restart["why"] == "the workers restarted after a failure"
    assert 5 <= resumed_from <= before[-1] and resumed_from % 5 == 0  # a checkpoint, not the start
    assert f"restarted from step {resumed_from} (the workers restarted after a failure)" in logs
    after = len(steps) - 1 - steps[::-1].index(resumed_from + 1)
    assert steps[after:] == list(range(resumed_from + 1, steps_total + 1))
    assert sorted(set(steps)) == list(range(1, steps_total + 1))
    assert max(step for step, _ in run_checkpoints(run)) == steps_total

    # Read back from the bucket, on a "laptop" cache that never saw the run.
    monkeypatch.setenv("DPO_RAY_CACHE", str(tmp_path / "laptop-cache"))
    summary = json.loads(storage.read_text(f"{run}/pipeline.json"))
    assert summary["run_dir"] == run and summary["eval_dir"] == f"{run}/eval"
    assert summary["reference_cache"].startswith(f"{s3}/{tmp_path.name}/cache/")
    assert json.loads(storage.read_text(f"{summary['reference_cache']}/manifest.json"))["rows"] > 0
    assert {"config.yaml", "metrics.jsonl", "final_model", "ray_train", "pair_accuracy.json",
            "eval"} <= set(storage.names(run))
    from dpo_ray.models import load_causal_lm

    model = load_causal_lm(summary["final_model"])
    assert model.config.model_type == "llama"
    assert 0 <= summary["pair_accuracy"]["accuracy"] <= 1
    assert json.loads(storage.read_text(f"{run}/pair_accuracy.json")) == summary["pair_accuracy"]
    eval_summary = json.loads(storage.read_text(f"{summary['eval_dir']}/summary.json"))
    assert eval_summary["results"][0]["n"] == 6 and eval_summary["results"][0]["judge"] == "length"
    assert "pipeline finished" in logs
    # train.report_to: one MLflow run (default store <output_dir>/mlruns) holds the training
    # curve (the steps between the checkpoint and the kill twice), the final model and the
    # eval's win rates and report.
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow import MlflowClient

    client = MlflowClient((tmp_path / "mlruns").as_uri())
    tracked = client.get_run(json.loads(storage.read_text(f"{run}/tracking.json"))["mlflow"])
    history = [m.step for m in client.get_metric_history(tracked.info.run_id, "loss")]
    assert sorted(set(history)) == list(range(1, steps_total + 1)), history
    assert tracked.data.metrics["eval/length/win_rate"] == eval_summary["results"][0]["win_rate"]
    assert {"final_model", "report.md"} <= {a.path for a in client.list_artifacts(tracked.info.run_id)}
    assert tracked.info.status == "FINISHED"
