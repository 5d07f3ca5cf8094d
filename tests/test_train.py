"""DPO training through Ray Train TorchTrainer with 2 workers (real DDP over gloo)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dpo_ray.config import DataConfig, ReferenceConfig, RunConfig, TrainConfig
from dpo_ray.train import train


def run_config(hh_path, model, tmp_path, name, pairs=16, **train_kw):
    return RunConfig(
        data=DataConfig(source=str(hh_path), tokenizer=str(model), limit=pairs, on_bad_row="skip",
                        max_length=96, max_prompt_length=48),
        reference=ReferenceConfig(model=str(model), cache_dir=str(tmp_path / "cache"),
                                  num_cpus_per_actor=0.5, max_actors=1),
        train=TrainConfig(output_dir=str(tmp_path / "runs"), run_name=name, seed=0,
                          **{"num_workers": 2, "cpus_per_worker": 1.0, **train_kw}),
    )


def weights(folder):
    return {k: v for p in sorted(Path(folder).glob("*.safetensors")) for k, v in load_file(p).items()}


@pytest.fixture(scope="module")
def overfit(ray_session, hh_path, tiny_llama, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("overfit")
    config = run_config(hh_path, tiny_llama, tmp, "overfit", pairs=16, learning_rate=3e-3,
                        per_device_train_batch_size=4, num_train_epochs=12, beta=0.1,
                        lr_scheduler_type="constant", save_steps=0)
    return config, train(config)


def test_two_worker_training_overfits_a_small_subset(overfit, tiny_llama):
    config, result = overfit
    metrics = result.metrics
    assert metrics[0]["step"] == 1 and metrics[-1]["step"] == len(metrics)
    assert metrics[0]["loss"] == pytest.approx(math.log(2), abs=1e-3)  # step 0: policy == reference
    assert metrics[0]["rewards/chosen"] == pytest.approx(0, abs=1e-3)
    assert metrics[-1]["rewards/accuracies"] > 0.9
    assert metrics[-1]["rewards/margins"] > metrics[len(metrics) // 2]["rewards/margins"] > 0
    before, after = weights(tiny_llama), weights(result.final_model)
    assert any(not torch.equal(before[k], after[k]) for k in after)
    for name in ("config.yaml", "reference.json", "versions.json", "metrics.jsonl", "metrics.png"):
        assert (result.run_dir / name).exists(), name
    assert {"loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
            "logps/chosen", "logps/rejected", "grad_norm", "learning_rate", "epoch", "step",
            "tokens_per_second", "pairs_per_second"} <= set(metrics[-1])


def test_final_model_loads_in_plain_transformers_and_generates(overfit):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, result = overfit
    model = AutoModelForCausalLM.from_pretrained(result.final_model)
    tok = AutoTokenizer.from_pretrained(result.final_model)
    out = model.generate(**tok("Hello", return_tensors="pt"), max_new_tokens=5, do_sample=False)
    assert out.shape[1] > 1


def test_new_run_with_same_name_is_refused(overfit):
    config, _ = overfit
    with pytest.raises(FileExistsError, match="resume"):
        train(config)
