"""`ray job submit` against a real local head node: the pipeline job (data -> reference -> train
-> pair accuracy -> win rate) on a tiny model with stages placed by custom resources, and a job
given bad input that must end FAILED with the reason in its logs.

Auth is set one way everywhere: RAY_AUTH_MODE=token for the head, the CLI and the jobs (Ray 2.60
enables token auth by default; mixing modes fails with AuthenticationError).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

# Whole jobs on the real model / a second head node: the full suite only.
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A real head node (its own ports, dashboard bound to 127.0.0.1, token auth) with the custom
    resources cluster.yaml's node groups advertise; stopped at the end."""
    env = dict(os.environ, RAY_AUTH_MODE="token",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("RAY_ADDRESS", None)
    dashboard, gcs = _free_port(), _free_port()
    ports = ["--port", str(gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
             "--ray-client-server-port", str(_free_port()), "--dashboard-agent-listen-port",
             str(_free_port()), "--metrics-export-port", str(_free_port()),
             "--runtime-env-agent-port", str(_free_port()), "--dashboard-agent-grpc-port",
             str(_free_port())]
    temp = tmp_path_factory.mktemp("head")
    started = subprocess.run(
        [RAY, "start", "--head", "--num-cpus", "4", *ports, "--disable-usage-stats",
         "--resources", json.dumps({"dpo_score": 4, "dpo_train": 4}), "--temp-dir", str(temp)],
        env=env, capture_output=True, text=True, timeout=180, check=False)
    assert started.returncode == 0, started.stdout + started.stderr
    address = f"http://127.0.0.1:{dashboard}"
    try:
        yield address, env
    finally:
        _stop_head(temp)


def _stop_head(temp: Path) -> None:
    """Stop this head only. `ray stop` would kill every Ray on the machine, including the test
    session's own instance (and with it the pytest process, whose driver dies with its raylet).
    The head's daemons and workers all carry its temp dir on their command line."""
    import psutil

    mine = [p for p in psutil.process_iter(["cmdline"])
            if any(str(temp) in arg for arg in (p.info["cmdline"] or []))]
    for process in mine:
        process.terminate()
    _, alive = psutil.wait_procs(mine, timeout=15)
    for process in alive:
        process.kill()


def _submit(address, env, job_id, config_path) -> None:
    runtime_env = {"env_vars": {"RAY_DATA_DISABLE_PROGRESS_BARS": "1", "RAY_AUTH_MODE": "token"}}
    got = subprocess.run(
        [RAY, "job", "submit", "--address", address, "--submission-id", job_id, "--no-wait",
         "--working-dir", str(REPO), "--runtime-env-json", json.dumps(runtime_env), "--",
         sys.executable, "-m", "dpo_ray", "pipeline", "--config", str(config_path)],
        env=env, capture_output=True, text=True, timeout=300, check=False)
    assert got.returncode == 0, got.stdout + got.stderr


def _wait(address, job_id, timeout=900) -> tuple[str, str]:
    """Poll with Ray's Python job API (the CLI's status line is for humans)."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(address)
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = client.get_job_status(job_id)
        if status.is_terminal():
            return str(status.value), client.get_job_logs(job_id)
        time.sleep(3)
    raise TimeoutError(f"job {job_id} did not finish in {timeout} s")


def _pipeline_config(tmp_path, hh_path, tiny_llama, source=None) -> Path:
    placement = {"resources": {"dpo_score": 1}}
    config = {
        "data": {"source": str(source or hh_path), "tokenizer": str(tiny_llama), "limit": 48,
                 "on_bad_row": "skip" if source is None else "raise", "max_length": 96,
                 "max_prompt_length": 48},
        "reference": {"model": str(tiny_llama), "cache_dir": f"file://{tmp_path}/cache",
                      "pool": {"num_cpus_per_actor": 0.5, "placement": placement}},
        "train": {"output_dir": str(tmp_path / "runs"), "run_name": "job", "num_workers": 2,
                  "cpus_per_worker": 0.5, "per_device_train_batch_size": 4, "max_steps": 3,
                  "learning_rate": 1e-3, "eval_fraction": 0.25, "report_to": ["mlflow"],
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


def test_two_jobs_on_a_real_head_node_one_succeeds_one_fails_with_its_reason(
        head, hh_path, tiny_llama, tmp_path, monkeypatch):
    """Submitted together, as users share a cluster: the pipeline job on good data succeeds, the
    one given a bad row ends FAILED with file, row and reason in its logs."""
    address, env = head
    monkeypatch.setenv("RAY_AUTH_MODE", "token")  # the job API client, as the CLI
    bad = tmp_path / "bad" / "bad.jsonl"
    bad.parent.mkdir()
    bad.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n"
                   + json.dumps({"prompt": "p", "chosen": "a"}) + "\n")
    _submit(address, env, "dpo-pipeline-ok", _pipeline_config(tmp_path, hh_path, tiny_llama))
    _submit(address, env, "dpo-pipeline-bad", _pipeline_config(bad.parent, hh_path, tiny_llama, bad))

    state, logs = _wait(address, "dpo-pipeline-bad", timeout=300)
    assert state == "FAILED"
    assert "bad.jsonl, row 2: missing_field" in logs, logs[-3000:]

    state, logs = _wait(address, "dpo-pipeline-ok")
    assert state == "SUCCEEDED", logs[-4000:]
    run_dir = tmp_path / "runs" / "job"
    summary = json.loads((run_dir / "pipeline.json").read_text())
    manifest = Path(summary["reference_cache"].removeprefix("file://")) / "manifest.json"
    assert json.loads(manifest.read_text())["rows"] > 0
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(summary["final_model"])
    assert model.config.model_type == "llama"
    assert 0 <= summary["pair_accuracy"]["accuracy"] <= 1
    eval_summary = json.loads((Path(summary["eval_dir"]) / "summary.json").read_text())
    assert eval_summary["results"][0]["n"] == 6 and eval_summary["results"][0]["judge"] == "length"
    assert "pipeline finished" in logs
    # train.report_to: one MLflow run (default store <output_dir>/mlruns) holds the training
    # curve, the final model and the eval's win rates and report.
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow import MlflowClient

    client = MlflowClient((tmp_path / "runs" / "mlruns").as_uri())
    run = client.get_run(json.loads((run_dir / "tracking.json").read_text())["mlflow"])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3]
    assert run.data.metrics["eval/length/win_rate"] == eval_summary["results"][0]["win_rate"]
    assert {"final_model", "report.md"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    assert run.info.status == "FINISHED"
