"""Outputs in object storage (dpo_ray/storage.py) against a real S3-compatible endpoint: moto's
server, started on 127.0.0.1 by the ``s3`` fixture (conftest.py), as Ray's own tests do for S3.
Nothing of ours is mocked: pyarrow's S3 client talks HTTP to it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from dpo_ray import storage


def test_paths_and_uris(tmp_path, monkeypatch):
    monkeypatch.setenv("DPO_RAY_CACHE", str(tmp_path / "cache"))
    assert not storage.is_remote("/runs") and not storage.is_remote("file:///runs")
    assert storage.is_remote("s3://bucket/runs") and storage.is_remote("gs://b/x")
    assert storage.join("s3://bucket/runs/", "job", "final_model") == "s3://bucket/runs/job/final_model"
    assert storage.join("file:///shared/runs", "job") == "/shared/runs/job"
    assert storage.local_dir("/shared/runs") == Path("/shared/runs")
    # The mirror follows the URI's layout: a folder inside a staged folder is the staging of the
    # URI inside it (the pipeline's eval directory inside its run directory).
    assert storage.local_dir("s3://bucket/runs/job") == tmp_path / "cache" / "staging" / "s3" / "bucket" / "runs" / "job"
    assert storage.local_dir(storage.join("s3://bucket/runs", "job")) / "eval" == storage.local_dir(
        "s3://bucket/runs/job/eval")


def test_publish_uploads_what_changed_and_pull_brings_it_back(s3, tmp_path):
    uri = f"{s3}/publish/job"
    local = tmp_path / "job"
    (local / "tensorboard").mkdir(parents=True)
    (local / "config.yaml").write_text("a: 1\n")
    (local / "tensorboard" / "events").write_bytes(b"\x00" * 10)
    assert storage.publish(local, uri) == 2
    assert storage.publish(local, uri) == 0  # nothing changed
    (local / "metrics.jsonl").write_text('{"step": 1}\n')
    with (local / "metrics.jsonl").open("a") as f:
        f.write('{"step": 2}\n')
    assert storage.publish(local, uri, exclude=("tensorboard*",)) == 1
    assert storage.read_text(f"{uri}/metrics.jsonl").splitlines() == ['{"step": 1}', '{"step": 2}']
    assert storage.read_text(f"{uri}/missing.json") is None
    assert storage.names(uri) == ["config.yaml", "metrics.jsonl", "tensorboard"]
    assert storage.find(uri, "tensorboard/*") == [f"{uri}/tensorboard/events"]
    assert storage.find(f"{s3}/nothing-here", "*") == []
    back = tmp_path / "back"
    assert storage.pull(uri, back, exclude=("tensorboard*",)) == 2
    assert sorted(p.name for p in back.iterdir()) == ["config.yaml", "metrics.jsonl"]
    assert storage.publish(local, str(local)) == 0  # a local run directory is its own copy


def test_an_unwritable_bucket_fails_before_any_work(s3, tmp_path):
    from dpo_ray.preflight import check_writable_dir

    check_writable_dir(f"{s3}/check", "train.output_dir")  # writes and deletes a marker
    assert storage.find(f"{s3}/check", "*") == []
    with pytest.raises(PermissionError, match="train.output_dir='s3://no-such-bucket-here/runs' is not writable"):
        check_writable_dir("s3://no-such-bucket-here/runs", "train.output_dir")
    # MLflow's default store is a local folder: with the run in a bucket it needs a server.
    from dpo_ray.tracking import mlflow_uri

    with pytest.raises(ValueError, match="set tracking_uri"):
        mlflow_uri(None, f"{s3}/runs", "train.report_to")
    assert mlflow_uri("http://mlflow:5000", f"{s3}/runs", "train.report_to") == "http://mlflow:5000"


def test_a_model_in_the_bucket_loads_on_any_node(s3, tiny_llama, tmp_path, monkeypatch):
    """``local_model``: downloaded whole into the node's cache, reused while unchanged, fetched
    again when the model at that URI is re-written; ``load_causal_lm`` takes the URI itself."""
    import torch

    from dpo_ray.models import load_causal_lm

    monkeypatch.setenv("DPO_RAY_CACHE", str(tmp_path / "cache"))
    uri = f"{s3}/models/tiny"
    assert storage.publish(Path(tiny_llama), uri) > 0
    first = storage.local_model(uri)
    assert Path(first, "config.json").exists() and storage.local_model(uri) == first
    model = load_causal_lm(uri)
    original = load_causal_lm(str(tiny_llama))
    for (name, a), (_, b) in zip(model.state_dict().items(), original.state_dict().items()):
        assert torch.equal(a, b), name
    config = json.loads(Path(tiny_llama, "config.json").read_text())
    storage.pull(uri, tmp_path / "edit")
    (tmp_path / "edit" / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-5}))
    storage.publish(tmp_path / "edit", uri)
    assert storage.local_model(uri) != first  # a new download, not the stale copy
    assert storage.local_model("/a/local/folder") == "/a/local/folder"
    with pytest.raises(FileNotFoundError, match="no files there"):
        storage.local_model(f"{s3}/models/none")
    assert not any(p.name.startswith(".") for p in (tmp_path / "cache" / "downloads").iterdir())
    assert os.environ["AWS_ENDPOINT_URL"].startswith("http://127.0.0.1:")


def test_a_failed_run_in_the_bucket_does_not_block_its_retry_but_a_checkpointed_one_does(
        s3, tmp_path, monkeypatch):
    """As on disk (test_hardening.py): a run that failed before its first checkpoint is started
    again (its files are replaced: a rename in a bucket copies everything); one with a checkpoint
    needs train.resume=true, which brings the run's files (not its checkpoints) into the mirror."""
    from dpo_ray.config import DataConfig, ReferenceConfig, RunConfig, TrainConfig
    from dpo_ray.training.trainer import _run_dir

    monkeypatch.setenv("DPO_RAY_CACHE", str(tmp_path / "cache"))
    output = f"{s3}/{tmp_path.name}"
    config = RunConfig(data=DataConfig(source="x", tokenizer="t"), reference=ReferenceConfig(model="m"),
                       train=TrainConfig(output_dir=output, run_name="r"))
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "config.yaml").write_text("from the failed attempt")
    storage.publish(earlier, f"{output}/r")
    stale = storage.local_dir(f"{output}/r")
    stale.mkdir(parents=True)
    (stale / "metrics.jsonl").write_text("an older run's mirror on this machine\n")
    local, run = _run_dir(config)
    assert run == f"{output}/r" and local == stale and list(local.iterdir()) == []
    (earlier / "ray_train" / "checkpoint_1").mkdir(parents=True)
    (earlier / "ray_train" / "checkpoint_1" / "dpo_state.json").write_text('{"step": 1}')
    storage.publish(earlier, run)
    with pytest.raises(FileExistsError, match="train.resume=true"):
        _run_dir(config)
    from dataclasses import replace

    local, _ = _run_dir(replace(config, train=replace(config.train, resume=True)))
    assert sorted(p.name for p in local.iterdir()) == ["config.yaml"]


@pytest.mark.slow
def test_a_run_in_the_bucket_stops_resumes_and_equals_the_run_on_disk(
        reference_run, s3, hh_path, tiny_llama, reference_cache, tmp_path, monkeypatch):
    """``train.output_dir=s3://...`` through two-worker DDP: Ray Train writes the checkpoints to
    the bucket, rank 0 its metrics, precision and TensorBoard files through its node's mirror. The
    driver here has a cache of its own, as a driver on another node would, so all it reads back
    comes from the bucket. Stopped after step 1 and resumed from the bucket, the run equals the
    one written to disk (``reference_run``), and its final model loads from the URI on a machine
    that never saw the run."""
    from dataclasses import replace

    from dpo_ray.models import load_causal_lm
    from dpo_ray.training import train
    from dpo_ray.training.trainer import run_checkpoints
    from helpers import STEPS, assert_same_steps, assert_same_weights, run_config, weights

    monkeypatch.setenv("DPO_RAY_CACHE", str(tmp_path / "driver-cache"))
    output = f"{s3}/{tmp_path.name}"

    def config(**steps):
        c = run_config(hh_path, tiny_llama, tmp_path, "job", reference_cache,
                       report_to=["tensorboard"], **steps)
        return replace(c, train=replace(c.train, output_dir=output))

    stopped = train(config(**{**STEPS, "max_steps": 1}))
    run = f"{output}/job"
    assert stopped.run_uri == run and [m["step"] for m in stopped.metrics] == [1]
    assert {"config.yaml", "versions.json", "reference.json", "precision.json", "step0_guard.json",
            "metrics.jsonl", "metrics.png", "tensorboard", "final_model", "ray_train"} <= set(storage.names(run))
    resumed = train(config(resume=True, **STEPS))
    assert [step for step, _ in sorted(run_checkpoints(run))] == [1, 4]
    assert [n for n in storage.names(run) if n.startswith("ray_train")] == ["ray_train", "ray_train-resume-1"]
    logged = [json.loads(line)["step"] for line in storage.read_text(f"{run}/metrics.jsonl").splitlines()]
    assert logged == [1, 2, 3, 4]  # the resumed rank 0 continued the uploaded file
    restart = json.loads(storage.read_text(f"{run}/restarts.jsonl"))
    assert (restart["restored_step"], restart["why"]) == (1, "train.resume")
    first = resumed.metrics[0]  # the stopped run ended at step 1, so it also evaluated there
    resumed.metrics[0] = {k: v for k, v in first.items() if not k.startswith("eval_")}
    assert_same_steps(resumed, reference_run)
    assert_same_weights(resumed.final_model, reference_run.final_model)

    monkeypatch.setenv("DPO_RAY_CACHE", str(tmp_path / "another-machine"))
    model = load_causal_lm(f"{run}/final_model")
    expected = weights(reference_run.final_model)
    got = {k: v for k, v in model.state_dict().items() if k in expected}
    assert got.keys() == expected.keys()
    assert all(v.allclose(expected[k], atol=1e-5) for k, v in got.items())
