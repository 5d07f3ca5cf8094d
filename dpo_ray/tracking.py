"""Experiment tracking: MLflow, TensorBoard and Weights & Biases, behind one small ``Tracker``.

A training run is one tracked run, whoever writes to it:
- rank 0 of the train workers opens it, logs the resolved config as params and every logged
  step's metrics (``metrics.jsonl``'s keys: ``loss``, ``rewards/margins``, ...);
- the driver reopens it after ``fit`` for the artifacts it writes there (``final_model/``,
  ``metrics.png``, ``config.yaml``), and the pipeline once more for the eval summary and report.

The run's ids live in ``<run_dir>/tracking.json``: a restarted worker or a resumed run continues
the same MLflow / W&B run instead of starting a new one. Each backend's package is optional
(``pip install dpo-ray[mlflow]`` etc.); asking for one that is not installed fails before Ray
starts.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpo_ray import storage

STATE_FILE = "tracking.json"
# Each backend and the package that provides it.
PACKAGES = {"mlflow": "mlflow", "tensorboard": "tensorboard", "wandb": "wandb"}


@dataclass(frozen=True)
class TrackingPlan:
    """Where a run is tracked, resolved on the driver (workers on other nodes do not see the
    driver's environment variables)."""

    backends: tuple[str, ...]
    run_dir: str  # a path or an object-store URI: files go to its local mirror (dpo_ray.storage)
    run_name: str
    project: str  # MLflow experiment, W&B project
    mlflow_uri: str | None
    wandb_mode: str | None  # WANDB_MODE: online, offline, disabled


def installed_trackers() -> list[str]:
    """The backends whose package is installed (``report_to: all``, as in transformers)."""
    return [name for name, package in PACKAGES.items() if importlib.util.find_spec(package)]


def check_trackers(backends: list[str], field: str) -> None:
    """A ``ValueError`` naming the extra to install for each backend whose package is missing.
    Run before any work (preflight, ``evaluate``): a missing package must not cost a run."""
    installed = installed_trackers()
    missing = [b for b in backends if b not in installed]
    if missing:
        raise ValueError(f"{field}={missing}: not installed; pip install "
                         + " ".join(f"'dpo-ray[{b}]'" for b in missing))


def mlflow_uri(tracking_uri: str | None, output_dir: str | Path, field: str) -> str:
    """``tracking_uri``, else $MLFLOW_TRACKING_URI, else a file store in ``<output_dir>/mlruns``
    (works with mlflow-skinny and no server; ``mlflow ui --backend-store-uri`` reads it). MLflow's
    file store is a local folder: with an object-store ``output_dir`` it needs a server."""
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    if storage.is_remote(output_dir):
        raise ValueError(f"{field} includes mlflow and the output directory is {output_dir}: MLflow's "
                         "default file store must be a folder every node sees; set tracking_uri "
                         "(or MLFLOW_TRACKING_URI) to an MLflow server, or log to tensorboard/wandb")
    return (storage.local_path(output_dir) / "mlruns").as_uri()


def plan_tracking(backends: list[str], run_dir: str | Path, run_name: str, project: str,
                  tracking_uri: str | None, output_dir: str | Path,
                  field: str = "train.report_to") -> TrackingPlan | None:
    """None without backends; MLflow's URI as ``mlflow_uri`` says."""
    if not backends:
        return None
    uri = None
    if "mlflow" in backends:
        uri = mlflow_uri(tracking_uri, output_dir, field)
    return TrackingPlan(tuple(backends), str(run_dir), run_name, project, uri,
                        os.environ.get("WANDB_MODE"))


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """``{"train": {"beta": 0.1}}`` -> ``{"train.beta": 0.1}`` (config as params)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


class Tracker:
    """The open run in every backend of a plan. ``params`` are logged only when the run is new
    (MLflow refuses to change a param, and a resumed run keeps the config it started with)."""

    def __init__(self, plan: TrackingPlan, params: dict | None = None):
        self.plan = plan
        self.state_path = storage.local_dir(plan.run_dir) / STATE_FILE
        state = json.loads(self.state_path.read_text()) if self.state_path.exists() else {}
        self._backends = [_BACKENDS[name](plan, state, params or {}) for name in plan.backends]
        self.state_path.write_text(json.dumps({**state, **{b.name: b.id for b in self._backends
                                                            if b.id is not None}}, indent=2))

    def log_metrics(self, metrics: dict, step: int) -> None:
        numbers = {k: float(v) for k, v in metrics.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}
        for backend in self._backends:
            backend.log_metrics(numbers, step)

    def log_artifact(self, path: Path, name: str | None = None) -> None:
        """A file, or a folder under ``name`` (default: its own name)."""
        for backend in self._backends:
            backend.log_artifact(Path(path), name or Path(path).name)

    def close(self, status: str | None = None) -> None:
        """Flush and let go; ``status`` FINISHED or FAILED ends the run (rank 0 leaves it open
        for the driver's artifacts)."""
        for backend in self._backends:
            backend.close(status)


class _MLflow:
    name = "mlflow"

    def __init__(self, plan: TrackingPlan, state: dict, params: dict):
        uri = plan.mlflow_uri
        if uri.startswith("file:") or "://" not in uri:
            # MLflow 3 refuses its file store unless told; a user who asked for a local path (or
            # took our default) asked for exactly that store.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow import MlflowClient
        from mlflow.entities import Param

        self.client = MlflowClient(uri)
        self.id = state.get(self.name)
        if self.id is None:
            experiment = self.client.get_experiment_by_name(plan.project)
            experiment_id = (experiment.experiment_id if experiment is not None
                             else self.client.create_experiment(plan.project))
            self.id = self.client.create_run(experiment_id, run_name=plan.run_name).info.run_id
            items = [Param(k, str(v)[:6000]) for k, v in flatten(params).items()]
            for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
                self.client.log_batch(self.id, params=items[start:start + 100])
        else:
            self.client.update_run(self.id, status="RUNNING")

    def log_metrics(self, metrics: dict, step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def log_artifact(self, path: Path, name: str) -> None:
        if path.is_dir():
            self.client.log_artifacts(self.id, str(path), artifact_path=name)
        else:
            self.client.log_artifact(self.id, str(path))

    def close(self, status: str | None) -> None:
        if status is not None:
            self.client.set_terminated(self.id, status=status)


class _TensorBoard:
    """Event files in ``<run_dir>/tensorboard`` (``tensorboard --logdir runs/``); the config as a
    text summary. TensorBoard stores no artifacts: those stay in the run directory."""

    name = "tensorboard"

    def __init__(self, plan: TrackingPlan, state: dict, params: dict):
        import yaml
        from torch.utils.tensorboard import SummaryWriter

        self.id = None
        self.writer = SummaryWriter(log_dir=str(storage.local_dir(plan.run_dir) / "tensorboard"))
        if params:
            self.writer.add_text("config", "```\n" + yaml.safe_dump(params, sort_keys=False) + "```")

    def log_metrics(self, metrics: dict, step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def log_artifact(self, path: Path, name: str) -> None:
        pass

    def close(self, status: str | None) -> None:
        self.writer.close()


class _WandB:
    """A W&B run with a fixed id, resumed by every writer; ``WANDB_MODE=offline`` keeps it in
    ``<run_dir>/wandb`` for ``wandb sync`` later."""

    name = "wandb"

    def __init__(self, plan: TrackingPlan, state: dict, params: dict):
        import wandb

        self.id = state.get(self.name) or uuid.uuid4().hex[:8]  # W&B ids: 8 lowercase alphanumerics
        self.run = wandb.init(project=plan.project, name=plan.run_name, id=self.id, resume="allow",
                              dir=str(storage.local_dir(plan.run_dir)), config=params or None, mode=plan.wandb_mode,
                              reinit="create_new")

    def log_metrics(self, metrics: dict, step: int) -> None:
        self.run.log(metrics, step=step)

    def log_artifact(self, path: Path, name: str) -> None:
        import wandb

        artifact = wandb.Artifact(f"{self.run.name}-{name}".replace("/", "-"), type="model"
                                  if path.is_dir() else "file")
        artifact.add_dir(str(path)) if path.is_dir() else artifact.add_file(str(path))
        self.run.log_artifact(artifact)

    def close(self, status: str | None) -> None:
        self.run.finish(exit_code=1 if status == "FAILED" else 0)


_BACKENDS = {"mlflow": _MLflow, "tensorboard": _TensorBoard, "wandb": _WandB}
