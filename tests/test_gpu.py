"""Checks that need a CUDA device (skipped without one; benchmarks/gpu_check.py is the fuller
script run on a lent GPU machine, results in benchmarks/results/)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from dpo_ray.config import Pool
from helpers import run_config

pytestmark = pytest.mark.gpu


def test_reference_pool_on_a_gpu_gives_the_cpu_values(ray_session, hh_path, tiny_llama, tmp_path):
    from dpo_ray.reference import ensure_reference

    config = run_config(hh_path, tiny_llama, tmp_path, "unused", tmp_path / "cpu", pairs=32)
    cpu = ensure_reference(config.data, config.reference).dataset.to_pandas().sort_values("pair_id")
    on_gpu = replace(config.reference, cache_dir=str(tmp_path / "gpu"),
                     pool=Pool(num_cpus_per_actor=0.5, num_gpus_per_actor=1))
    gpu = ensure_reference(config.data, on_gpu).dataset.to_pandas().sort_values("pair_id")
    for column in ("ref_chosen_logps", "ref_rejected_logps"):
        assert gpu[column].to_numpy() == pytest.approx(cpu[column].to_numpy(), abs=1e-3)
