"""Experiment tracking, read back through each tracker's own reader: the session's plain DDP run
(``reference_run`` in conftest.py, logged with report_to=[mlflow, tensorboard]) in MLflow's
client and TensorBoard's event reader; W&B in offline mode. The eval summary's tracking is
checked in test_eval.py, resuming into the same run in test_scale.py."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from dpo_ray.tracking import STATE_FILE, Tracker, TrackingPlan, check_trackers


def mlflow_client(result):
    """MLflow's client on the run's default store (<output_dir>/mlruns) and the run's id."""
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow import MlflowClient

    state = json.loads((result.run_dir / STATE_FILE).read_text())
    return MlflowClient((result.run_dir.parent / "mlruns").as_uri()), state["mlflow"]


def test_mlflow_holds_every_metric_the_config_and_the_artifacts(reference_run):
    client, run_id = mlflow_client(reference_run)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == reference_run.run_dir.name
    assert client.get_experiment(run.info.experiment_id).name == "dpo_ray"
    params = run.data.params
    assert (params["train.beta"], params["data.max_length"], params["train.num_workers"]) == (
        "0.1", "96", "2")
    # Every numeric metric of every logged step, as in metrics.jsonl.
    logged = reference_run.metrics
    keys = {k for m in logged for k, v in m.items() if isinstance(v, float) and k != "step"}
    assert {"loss", "rewards/margins", "rewards/accuracies", "eval_loss", "grad_norm"} <= keys
    for key in keys:
        history = {m.step: m.value for m in client.get_metric_history(run_id, key)}
        assert history == pytest.approx({m["step"]: m[key] for m in logged if key in m}), key
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"final_model", "metrics.png", "config.yaml"} <= artifacts
    model_files = {Path(a.path).name for a in client.list_artifacts(run_id, "final_model")}
    assert {"config.json", "model.safetensors"} <= model_files
    # The artifact is the final model itself.
    local = client.download_artifacts(run_id, "final_model/model.safetensors",
                                      str(reference_run.run_dir / "downloaded"))
    assert Path(local).read_bytes() == (reference_run.final_model / "model.safetensors").read_bytes()


def test_tensorboard_event_files_hold_every_metric(reference_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(reference_run.run_dir / "tensorboard"))
    events.Reload()
    for key in ("loss", "rewards/margins", "eval_loss", "learning_rate"):
        expected = {m["step"]: m[key] for m in reference_run.metrics if key in m}
        assert {e.step: e.value for e in events.Scalars(key)} == pytest.approx(expected, rel=1e-6)
    assert any(tag.startswith("config") for tag in events.Tags()["tensors"])


def test_wandb_offline_run_is_resumed_by_id(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    plan = TrackingPlan(("wandb",), str(tmp_path), "run-a", "dpo_ray-test", None, "offline")
    first = Tracker(plan, {"train": {"beta": 0.1}})
    first.log_metrics({"loss": 0.69, "rewards/margins": 0.0, "run": "not a number"}, step=1)
    (tmp_path / "metrics.png").write_bytes(b"png")
    first.log_artifact(tmp_path / "metrics.png")
    first.close("FINISHED")
    run_id = json.loads((tmp_path / STATE_FILE).read_text())["wandb"]
    second = Tracker(plan)  # a restarted worker or the driver: the same W&B run
    second.log_metrics({"loss": 0.5}, step=2)
    second.close("FINISHED")
    # Two offline segments of one run id (``wandb sync`` joins them); the records hold the metrics.
    logs = sorted((tmp_path / "wandb").glob(f"offline-run-*-{run_id}*/run-{run_id}.wandb"))
    assert len(logs) == 2
    # wandb-core writes these files from its own process, and finish() can return before the
    # last records land (seen once in CI under load: the second file held only its header).
    deadline = time.time() + 30
    while True:
        records = [b"".join(_wandb_records(log)) for log in logs]
        if all(b"loss" in r for r in records) or time.time() > deadline:
            break
        time.sleep(0.5)
    assert all(b"loss" in r for r in records), records
    assert any(b"rewards/margins" in r for r in records)


def _wandb_records(path: Path) -> list[bytes]:
    """The records of a ``.wandb`` file: a 7-byte header, then LevelDB's log format (32 KiB blocks;
    chunks of crc32, length, type: 1 full, 2 first, 3 middle, 4 last). A record can straddle a
    block, so searching the raw bytes for a key can miss it."""
    import struct

    data, block, records, partial = path.read_bytes(), 32768, [], b""
    assert data[:4] == b":W&B", path
    at = 7
    while at + 7 <= len(data):
        if block - at % block < 7:  # the block's tail is padding
            at += block - at % block
            continue
        _, length, kind = struct.unpack("<IHB", data[at:at + 7])
        chunk, at = data[at + 7:at + 7 + length], at + 7 + length
        partial = chunk if kind in (1, 2) else partial + chunk
        if kind in (1, 4):
            records.append(partial)
    return records


def test_a_tracker_that_is_not_installed_is_named_with_its_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ValueError, match=r"train.report_to=\['wandb'\]: not installed; pip install 'dpo-ray\[wandb\]'"):
        check_trackers(["mlflow", "wandb"], "train.report_to")


def test_every_report_to_name_has_a_backend():
    """config's Tracker names and tracking's backends are one list ("all" expands to it)."""
    from typing import get_args

    from dpo_ray.config import Tracker
    from dpo_ray.tracking import _BACKENDS, PACKAGES

    assert set(get_args(Tracker)) == set(PACKAGES) == set(_BACKENDS)
