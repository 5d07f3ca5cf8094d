"""Models past toy size: LoRA adapters, bfloat16 weights, gradient checkpointing and FSDP, each
through the real TorchTrainer with 2 workers (gloo on CPU) and compared with the plain DDP run
(``reference_run`` in conftest.py). Runs that restart (resume, a killed worker) are marked slow."""

import json
import math
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dpo_ray.training import train
from dpo_ray.training.trainer import latest_checkpoint
from helpers import STEPS, assert_same_steps, assert_same_weights, own_ray_processes, run_config, weights


def test_fsdp_matches_ddp_and_holds_half_the_model_state(reference_run, hh_path, tiny_llama,
                                                         reference_cache, tmp_path):
    """FSDP2 over gloo: the same losses, held-out losses (including a rank with no held-out row)
    and weights as DDP, each worker holding half of the weights, gradients and Adam state."""
    fsdp = train(run_config(hh_path, tiny_llama, tmp_path, "fsdp", reference_cache,
                            parallel_strategy="fsdp", **STEPS))
    assert_same_steps(fsdp, reference_run)
    assert_same_weights(fsdp.final_model, reference_run.final_model)
    ratio = fsdp.metrics[-1]["model_state_mb"] / reference_run.metrics[-1]["model_state_mb"]
    assert 0.45 < ratio < 0.6, ratio  # half, plus the unevenly split remainders
    # A plain Hugging Face folder: the sharded class name is not recorded.
    config = json.loads((fsdp.final_model / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]


@pytest.mark.slow
def test_fsdp_run_stopped_mid_epoch_resumes_to_the_same_run(reference_run, hh_path, tiny_llama,
                                                           reference_cache, tmp_path):
    """Stopped after step 1 of epoch 1 and resumed (train.resume) from its gathered checkpoint:
    the data position, weights, Adam state and schedule continue exactly."""
    part = run_config(hh_path, tiny_llama, tmp_path, "fsdp", reference_cache, report_to=["mlflow"],
                      parallel_strategy="fsdp", **{**STEPS, "max_steps": 1})
    stopped = train(part)
    assert [m["step"] for m in stopped.metrics] == [1]
    whole = run_config(hh_path, tiny_llama, tmp_path, "fsdp", reference_cache, report_to=["mlflow"],
                       parallel_strategy="fsdp", resume=True, **STEPS)
    resumed = train(whole)
    # One tracked run across both attempts, its loss curve complete.
    from test_tracking import mlflow_client

    client, run_id = mlflow_client(resumed)
    assert run_id == mlflow_client(stopped)[1]
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1, 2, 3, 4]
    # Step 1's record is the stopped run's, which ended there and so also evaluated there.
    first = resumed.metrics[0]
    assert "eval_loss" in first and first["loss"] == pytest.approx(reference_run.metrics[0]["loss"], abs=1e-5)
    resumed.metrics[0] = {k: v for k, v in first.items() if not k.startswith("eval_")}
    assert_same_steps(resumed, reference_run)
    assert_same_weights(resumed.final_model, reference_run.final_model)
    state = torch.load(Path(latest_checkpoint(resumed.run_dir)) / "trainer_state.pt", weights_only=False)
    assert state["step"] == 4 and state["scheduler"]["last_epoch"] == 4
    # Resuming a run that already reached its last step trains nothing and keeps its model.
    again = train(whole)
    assert_same_weights(again.final_model, resumed.final_model, atol=0)


def _lora(**extra):
    from dpo_ray.config import LoraConfig

    return dict(peft=LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], merge=True),
                **{**STEPS, "learning_rate": 1e-2, **extra})


@pytest.fixture(scope="module")
def lora_run(ray_session, hh_path, tiny_llama, reference_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora")
    return train(run_config(hh_path, tiny_llama, out, "lora", reference_cache, **_lora()))


def test_lora_trains_only_adapters_saves_merges_and_scores(lora_run, hh_path, tiny_llama,
                                                           reference_cache, tmp_path):
    from dpo_ray.logps import collate_pairs, concatenated_forward
    from dpo_ray.models import load_causal_lm
    from dpo_ray.reference import cache_key, ensure_reference

    whole = lora_run
    assert whole.metrics[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # the guard passed
    # Only the adapter is stored: a few KiB, no copy of the base weights.
    final, merged_folder = whole.final_model, whole.run_dir / "final_model_merged"
    assert (final / "adapter_config.json").exists() and not (final / "model.safetensors").exists()
    adapter = load_file(final / "adapter_model.safetensors")
    assert adapter and all("lora_" in k for k in adapter)
    assert all(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)  # B starts at 0
    assert whole.metrics[-1]["model_state_mb"] < 0.5 * train_state_of_full_model(tiny_llama)

    # The adapter folder loads as base + adapter, the same model as the merged folder.
    ids = torch.tensor([[1, 40, 50, 60, 70]])
    merged = load_causal_lm(str(merged_folder))
    with torch.no_grad():
        adapted = load_causal_lm(str(final))(input_ids=ids).logits
        base = load_causal_lm(str(tiny_llama))(input_ids=ids).logits
        assert torch.allclose(adapted, merged(input_ids=ids).logits, atol=1e-5)
    assert not torch.allclose(adapted, base, atol=1e-4)

    # ...and the reference actor pool scores with it: its cache key names adapter and base (so it
    # is not the merged folder's), and its values are the merged model's.
    config = run_config(hh_path, tiny_llama, tmp_path, "unused", reference_cache, **STEPS)
    scored = ensure_reference(config.data, replace(config.reference, model=str(final)))
    assert scored.key != cache_key(config.data, replace(config.reference, model=str(merged_folder)))[0]
    rows = scored.dataset.to_pandas()
    batch = collate_pairs({k: rows[k].to_numpy() for k in ("chosen_input_ids", "rejected_input_ids",
                                                           "prompt_length")}, pad_id=0)
    with torch.no_grad():
        direct = concatenated_forward(merged, batch["chosen_input_ids"], batch["chosen_attention_mask"],
                                      batch["rejected_input_ids"], batch["rejected_attention_mask"],
                                      batch["prompt_lengths"], pad_id=0)
    assert rows["ref_chosen_logps"].to_numpy() == pytest.approx(direct["chosen_logps"].numpy(), abs=1e-4)


@pytest.mark.slow
def test_killed_worker_restarts_a_lora_run_from_its_checkpoint(lora_run, hh_path, tiny_llama,
                                                               reference_cache, tmp_path):
    """A train worker killed after step 2: Ray Train restarts the worker group (max_failures=1),
    which restores the adapter, Adam state, schedule and data position from the last checkpoint,
    and the run ends as the uninterrupted one did."""
    config = run_config(hh_path, tiny_llama, tmp_path, "fault", reference_cache,
                        **_lora(max_failures=1, save_steps=1))
    metrics = tmp_path / "runs" / "fault" / "metrics.jsonl"
    killed = []

    def kill_a_worker_after_step_2():
        deadline = time.time() + 600
        while time.time() < deadline and not killed:
            if metrics.exists() and any(json.loads(line)["step"] >= 2
                                        for line in metrics.read_text().splitlines()):
                for proc in own_ray_processes("RayTrainWorker")[:1]:
                    proc.kill()
                    killed.append(proc.pid)
                    return
            time.sleep(0.2)

    watcher = threading.Thread(target=kill_a_worker_after_step_2, daemon=True)
    watcher.start()
    result = train(config)
    watcher.join(timeout=5)
    assert killed, "no train worker was killed"
    assert_same_steps(result, lora_run)
    state = torch.load(Path(latest_checkpoint(result.run_dir)) / "trainer_state.pt", weights_only=False)
    assert state["step"] == 4 and state["scheduler"]["last_epoch"] == 4
    # Checkpoints are written beside their final place and renamed into it: what a killed
    # worker was writing is removed by the next save, never resumed from.
    assert not list(result.run_dir.glob("ray_train*/.staging-*"))
    a = load_file(result.final_model / "adapter_model.safetensors")
    b = load_file(lora_run.final_model / "adapter_model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in b)


def train_state_of_full_model(model_folder) -> float:
    """MiB of weights + gradients + AdamW moments of full fp32 fine-tuning: 16 bytes/parameter."""
    return sum(v.numel() for v in weights(model_folder).values()) * 16 / 2**20


def test_bf16_autocast_tracks_the_float32_run_and_its_step0_guard_stays_exact(reference_run, hh_path,
                                                                                tiny_llama, reference_cache,
                                                                                tmp_path):
    """bf16 autocast over float32 weights (the default where the CPU or GPU has bf16): the step-0
    guard checks a float32 pass against the float32 cache (absolute, as without autocast), and
    the losses follow the plain float32 run within rounding."""
    run = train(run_config(hh_path, tiny_llama, tmp_path, "autocast", reference_cache, bf16=True,
                           vocab_chunk_size=8192, **STEPS))  # chunked log-probs, as by default
    assert json.loads((run.run_dir / "precision.json").read_text()) == {
        "weights": "float32", "bf16_autocast": True, "why": "train.bf16=true", "device": "cpu"}
    guard = json.loads((run.run_dir / "step0_guard.json").read_text())
    assert guard["policy_precision"] == "float32" and guard["max_abs_logratio"] < 1e-3, guard
    assert guard["loss"] == pytest.approx(math.log(2), abs=1e-3)
    # The passes that trained ran in bf16: rounding moves their log-probs off the cache (the
    # absolute check on them would fire)...
    assert run.metrics[0]["max_abs_logratio"] > 1e-3
    # ...and the losses stay within rounding of the float32 run's.
    for ours, plain in zip(run.metrics, reference_run.metrics, strict=True):
        assert ours["loss"] == pytest.approx(plain["loss"], abs=5e-3), ours["step"]
        if "eval_loss" in plain:
            assert ours["eval_loss"] == pytest.approx(plain["eval_loss"], abs=5e-3), ours["step"]


def test_bf16_auto_is_on_where_the_device_computes_bf16_fast_and_false_turns_it_off():
    from dpo_ray.config import RunConfig, TrainConfig, load_config
    from dpo_ray.models import bf16_autocast

    assert TrainConfig().bf16 == "auto"
    cpu = torch.device("cpu")
    fast = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    on, why = bf16_autocast("auto", cpu)
    assert on == fast and why.startswith("train.bf16=auto: the CPU ")
    assert bf16_autocast(False, cpu) == (False, "train.bf16=false")
    assert bf16_autocast(True, cpu) == (True, "train.bf16=true")
    base = ["data.source=x", "data.tokenizer=t", "reference.model=m"]
    assert load_config(RunConfig, overrides=[*base, "train.bf16=false"]).train.bf16 is False
    with pytest.raises(ValueError, match="train.bf16"):
        load_config(RunConfig, overrides=[*base, "train.bf16=sometimes"])


def test_bfloat16_weights_pass_the_step0_guard_against_a_float32_cache(ray_session, hh_path,
                                                                        tiny_llama, reference_cache,
                                                                        tmp_path):
    result = train(run_config(hh_path, tiny_llama, tmp_path, "bf16", reference_cache, dtype="bfloat16",
                              vocab_chunk_size=8192, **{**STEPS, "max_steps": 2}))
    first = result.metrics[0]
    # Rounding moves log-probs off the float32 cache (the absolute check would fire)...
    assert first["max_abs_logratio"] > 1e-3
    assert first["loss"] == pytest.approx(math.log(2), abs=0.05)
    # ...and the weights are stored as trained: bfloat16, half the bytes.
    assert {v.dtype for v in weights(result.final_model).values()} == {torch.bfloat16}


def test_lora_and_sharding_settings_come_from_yaml_and_overrides(tmp_path):
    from dpo_ray.config import LoraConfig, RunConfig, TrainConfig, load_config

    run = tmp_path / "run.yaml"
    run.write_text("data: {source: pairs.jsonl, tokenizer: tok}\nreference: {model: m}\n"
                   "train: {peft: {r: 8, target_modules: [q_proj, v_proj]}}\n")
    config = load_config(RunConfig, run, ["train.peft.alpha=16", "train.parallel_strategy=fsdp",
                                          "train.dtype=bfloat16"])
    assert config.train.peft == LoraConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"])
    assert (config.train.parallel_strategy, config.train.dtype) == ("fsdp", "bfloat16")
    assert TrainConfig().peft is None  # full fine-tuning unless asked
    for bad, named in (("train.peft.r=0", "train.peft.r"), ("train.parallel_strategy=zero3",
                                                             "train.parallel_strategy"),
                       ("train.dtype=float8", "train.dtype"), ("train.peft.rank=4", "rank")):
        with pytest.raises(ValueError, match=named):
            load_config(RunConfig, run, [bad])


def test_step0_guard_in_low_precision_tolerates_rounding_and_names_both_precisions():
    from dpo_ray.config import TrainConfig
    from dpo_ray.training.loop import Step0GuardError, _step0_guard

    rounding = {"loss": 0.70, "rewards/chosen": 0.01, "rewards/rejected": -0.01,
                "max_abs_logratio": 0.8, "max_rel_logratio": 0.004}  # 0.4% of |logp_ref|
    _step0_guard(rounding, TrainConfig(dtype="bfloat16"), "bfloat16", "float32")  # passes
    _step0_guard(rounding, TrainConfig(bf16=True), "bfloat16", "float32")
    _step0_guard(rounding, TrainConfig(), "float32", "bfloat16")
    with pytest.raises(Step0GuardError, match="expected 0"):  # float32 on both sides: absolute
        _step0_guard(rounding, TrainConfig(), "float32", "float32")
    wrong_cache = {**rounding, "max_abs_logratio": 40.0, "max_rel_logratio": 0.3}
    with pytest.raises(Step0GuardError, match=r"runs in bfloat16 \(train.dtype=bfloat16.*scored in "
                                              r"float32.*wrong cache, model or tokenizer"):
        _step0_guard(wrong_cache, TrainConfig(dtype="bfloat16"), "bfloat16", "float32")
