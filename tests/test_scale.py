"""Models past toy size: LoRA adapters, bfloat16 weights, gradient checkpointing and FSDP, each
through the real TorchTrainer with 2 workers (gloo on CPU) and compared with the plain DDP run."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from dpo_ray.training import train
from test_train import run_config, weights

# 16 pairs, of which 5 held out (by their hash) and 11 trained on; 2 workers x 2 pairs: 2 steps
# per epoch. A constant schedule, so a run stopped after 2 steps and resumed to 4 must equal the
# uninterrupted one. The held-out pairs come in global batches of 4 and then 1, so one rank gets
# no row in the last batch (under FSDP it must still join the forward pass).
STEPS = dict(pairs=16, per_device_train_batch_size=2, learning_rate=1e-3, num_train_epochs=2,
             lr_scheduler_type="constant", max_steps=4, eval_fraction=0.25, eval_steps=2,
             per_device_eval_batch_size=2)


@pytest.fixture(scope="module")
def ddp(ray_session, hh_path, tiny_llama, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    return train(run_config(hh_path, tiny_llama, tmp, "ddp", **STEPS))


def assert_same_steps(a, b, atol=1e-5):
    assert [m["step"] for m in a.metrics] == [m["step"] for m in b.metrics]
    for x, y in zip(a.metrics, b.metrics):
        assert x["loss"] == pytest.approx(y["loss"], abs=atol)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-3)
        assert ("eval_loss" in x) == ("eval_loss" in y) == (x["step"] % 2 == 0)
        if "eval_loss" in x:
            assert x["eval_loss"] == pytest.approx(y["eval_loss"], abs=atol)


def test_gradient_checkpointing_gives_the_plain_run(ddp, hh_path, tiny_llama, tmp_path):
    checkpointed = train(run_config(hh_path, tiny_llama, tmp_path, "gc", gradient_checkpointing=True,
                                    **STEPS))
    assert_same_steps(checkpointed, ddp)
    w, v = weights(checkpointed.final_model), weights(ddp.final_model)
    assert all(torch.allclose(w[k], v[k], atol=1e-5) for k in v)


def test_fsdp_matches_ddp_holds_half_the_model_state_and_resumes(ddp, hh_path, tiny_llama, tmp_path):
    """FSDP2 over gloo: the same losses and weights as DDP, each worker holding half of the weights,
    gradients and Adam state; stopped after 2 steps and resumed from its (gathered) checkpoint."""
    first = train(run_config(hh_path, tiny_llama, tmp_path, "fsdp", parallel_strategy="fsdp",
                             **{**STEPS, "max_steps": 2}))
    resumed = train(run_config(hh_path, tiny_llama, tmp_path, "fsdp", parallel_strategy="fsdp",
                               resume=True, **STEPS))
    assert_same_steps(resumed, ddp)
    w, v = weights(resumed.final_model), weights(ddp.final_model)
    assert w.keys() == v.keys() and all(torch.allclose(w[k], v[k], atol=1e-5) for k in v)
    ratio = first.metrics[-1]["model_state_mb"] / ddp.metrics[-1]["model_state_mb"]
    assert 0.45 < ratio < 0.6, ratio  # half, plus the unevenly split remainders
    # Resuming a run that already reached its last step trains nothing and keeps its model.
    again = train(run_config(hh_path, tiny_llama, tmp_path, "fsdp", parallel_strategy="fsdp",
                             resume=True, **STEPS))
    assert all(torch.equal(w[k], v) for k, v in weights(again.final_model).items())
    # A plain Hugging Face folder: the sharded class name is not recorded.
    config = json.loads((resumed.final_model / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]


def test_lora_trains_only_adapters_saves_resumes_merges_and_scores(ray_session, hh_path, tiny_llama,
                                                                   tmp_path):
    from dpo_ray.config import LoraConfig, Pool, ReferenceConfig
    from dpo_ray.models import load_causal_lm
    from dpo_ray.reference import ensure_reference

    lora = dict(peft=LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], merge=True),
                **{**STEPS, "learning_rate": 1e-2})
    whole = train(run_config(hh_path, tiny_llama, tmp_path, "lora", **lora))
    assert whole.metrics[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # the guard passed
    # Only the adapter is stored: a few KiB, no copy of the base weights.
    final = whole.final_model
    assert (final / "adapter_config.json").exists() and not (final / "model.safetensors").exists()
    adapter = load_file(final / "adapter_model.safetensors")
    assert adapter and all("lora_" in k for k in adapter)
    assert all(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)  # B starts at 0
    assert whole.metrics[-1]["model_state_mb"] < 0.5 * train_state_of_full_model(tiny_llama)

    # Stopped after 2 steps and resumed: the same adapter as the uninterrupted run.
    train(run_config(hh_path, tiny_llama, tmp_path, "lora-resumed", **{**lora, "max_steps": 2}))
    resumed = train(run_config(hh_path, tiny_llama, tmp_path, "lora-resumed", resume=True, **lora))
    assert_same_steps(resumed, whole)
    again = load_file(resumed.final_model / "adapter_model.safetensors")
    assert all(torch.allclose(adapter[k], again[k], atol=1e-5) for k in adapter)

    # The adapter folder loads as base + adapter, the same model as the merged folder.
    ids = torch.tensor([[1, 40, 50, 60, 70]])
    with torch.no_grad():
        adapted = load_causal_lm(str(final))(input_ids=ids).logits
        merged = load_causal_lm(str(whole.run_dir / "final_model_merged"))(input_ids=ids).logits
        base = load_causal_lm(str(tiny_llama))(input_ids=ids).logits
    assert torch.allclose(adapted, merged, atol=1e-5) and not torch.allclose(adapted, base, atol=1e-4)

    # ...and the reference actor pool scores with it (its cache key names adapter and base).
    config = run_config(hh_path, tiny_llama, tmp_path, "unused", **STEPS)
    scored = ensure_reference(config.data, ReferenceConfig(
        model=str(final), cache_dir=str(tmp_path / "cache"), pool=Pool(num_cpus_per_actor=0.5)))
    by_merged = ensure_reference(config.data, ReferenceConfig(
        model=str(whole.run_dir / "final_model_merged"), cache_dir=str(tmp_path / "cache"),
        pool=Pool(num_cpus_per_actor=0.5)))
    assert scored.key != by_merged.key
    a = scored.dataset.to_pandas().sort_values("pair_id")
    b = by_merged.dataset.to_pandas().sort_values("pair_id")
    assert a["ref_chosen_logps"].to_numpy() == pytest.approx(b["ref_chosen_logps"].to_numpy(), abs=1e-4)


def train_state_of_full_model(model_folder) -> float:
    """MiB of weights + gradients + AdamW moments of full fp32 fine-tuning: 16 bytes/parameter."""
    return sum(v.numel() for v in weights(model_folder).values()) * 16 / 2**20


def test_bfloat16_weights_pass_the_step0_guard_against_a_float32_cache(ray_session, hh_path,
                                                                        tiny_llama, tmp_path):
    result = train(run_config(hh_path, tiny_llama, tmp_path, "bf16", dtype="bfloat16",
                              **{**STEPS, "max_steps": 2}))
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
    _step0_guard(rounding, TrainConfig(dtype="bfloat16"), "float32")  # passes
    _step0_guard(rounding, TrainConfig(bf16=True), "float32")
    _step0_guard(rounding, TrainConfig(), "bfloat16")
    with pytest.raises(Step0GuardError, match="expected 0"):  # float32 on both sides: absolute
        _step0_guard(rounding, TrainConfig(), "float32")
    wrong_cache = {**rounding, "max_abs_logratio": 40.0, "max_rel_logratio": 0.3}
    with pytest.raises(Step0GuardError, match=r"runs in bfloat16 \(train.dtype=bfloat16.*scored in "
                                              r"float32.*wrong cache, model or tokenizer"):
        _step0_guard(wrong_cache, TrainConfig(dtype="bfloat16"), "float32")
