"""Shared fixtures: one Ray instance per test session, real assets, and the HH data path.

The HH-RLHF file comes from ``$DPO_RAY_DATA_DIR`` (``.ci/run`` passes ``../shared/data``).
Under CI (``CI=true``) a missing input is a failure, never a skip.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray Train's controller polls its workers every 2 s: each report barrier and the end of every
# run waited up to that long, ~6 s per tiny TorchTrainer run. The driver passes this variable on
# to the controller (ray.train.v2 constants), so job submissions see it too.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")

REPO = Path(__file__).resolve().parents[1]
# Ray workers must import test helpers (e.g. a scorer subclass that crashes on purpose); they
# inherit the environment of the raylet that the session's ray.init starts.
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(Path(__file__).parent), os.environ.get("PYTHONPATH")) if p)
HH_FILE = "hh-rlhf-harmless-base-test.jsonl.gz"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The S3-compatible endpoint the object-storage tests use (the ``s3`` fixture starts it). Set
# before the session's Ray starts, so that train workers, actors and the nodes test_jobs.py starts
# inherit it, as nodes of a real cluster carry their cloud credentials. Never a real bucket.
S3_PORT = _free_port()
os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{S3_PORT}", AWS_ACCESS_KEY_ID="testing",
                  AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
                  AWS_EC2_METADATA_DISABLED="true")


def pytest_collection_modifyitems(config, items):
    """``gpu`` tests need CUDA: without it they are skipped (CI here has no GPU; that is not a
    missing input)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _missing(what: str):
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what} is required in CI")
    pytest.skip(f"{what} not available on this machine")


@pytest.fixture(scope="session")
def hh_path() -> Path:
    data_dir = Path(os.environ.get("DPO_RAY_DATA_DIR", REPO.parent / "shared" / "data"))
    path = data_dir / HH_FILE
    if not path.exists():
        _missing(f"HH-RLHF data ({path}; set DPO_RAY_DATA_DIR)")
    return path


@pytest.fixture(scope="session")
def s3():
    """A real S3-compatible server (moto's, in its own process) on 127.0.0.1, with one bucket;
    yields the bucket's URI. pyarrow (ours and Ray Train's) reaches it through AWS_ENDPOINT_URL."""
    import subprocess
    import sys
    import time
    import urllib.request

    if importlib.util.find_spec("moto") is None:
        _missing("moto (pip install -e '.[test]')")
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(S3_PORT)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(os.environ["AWS_ENDPOINT_URL"], timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"moto's S3 server did not start on port {S3_PORT}")
                time.sleep(0.2)
        from pyarrow import fs

        fs.S3FileSystem(endpoint_override=f"127.0.0.1:{S3_PORT}", scheme="http",
                        allow_bucket_creation=True).create_dir("dpo-test")
        yield "s3://dpo-test"
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole session (starting Ray costs 5-11 s on these machines)."""
    import ray

    from dpo_ray.ray_env import init_ray

    init_ray()
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def reference_cache(tmp_path_factory) -> Path:
    """One content-addressed reference cache for the session: runs over the same pairs and model
    score them once. Tests about the cache itself (hits, damage, concurrency) use their own."""
    return tmp_path_factory.mktemp("reference-cache")


@pytest.fixture(scope="session")
def reference_run(ray_session, hh_path, tiny_llama, reference_cache, tmp_path_factory):
    """The plain 2-worker DDP run of ``helpers.STEPS``, which other training tests must equal
    (one worker, gradient checkpointing, FSDP, stop and resume). Tracked in MLflow (the default
    file store under train.output_dir) and TensorBoard: test_tracking.py reads both back."""
    from helpers import STEPS, run_config

    from dpo_ray.training import train

    out = tmp_path_factory.mktemp("reference-run")
    return train(run_config(hh_path, tiny_llama, out, "ddp", reference_cache,
                            report_to=["mlflow", "tensorboard"], **STEPS))


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The real SmolLM2-135M-Instruct folder (tokenizer with a real chat template)."""
    from dpo_ray.assets import smollm2_path

    try:
        return smollm2_path()
    except FileNotFoundError as err:
        _missing(str(err))


@pytest.fixture(scope="session")
def tokenizer(smollm2):
    from dpo_ray.data import load_tokenizer

    return load_tokenizer(str(smollm2))


@pytest.fixture(scope="session")
def tiny_llama(smollm2, tmp_path_factory) -> Path:
    from dpo_ray.assets import tiny_model

    return tiny_model(smollm2, tmp_path_factory.mktemp("models") / "tiny-llama", arch="llama")
