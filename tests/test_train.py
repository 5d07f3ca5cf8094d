"""DPO training through Ray Train TorchTrainer with 2 workers (real DDP over gloo).

Each TorchTrainer run costs ~25 s here however small, so each serves several assertions; most
compare with the session's plain run (``reference_run`` in conftest.py).
"""

import json
import math

import pytest
import torch

from dpo_ray.training import train
from helpers import STEPS, assert_same_weights, run_config, weights


@pytest.fixture(scope="module")
def overfit(ray_session, hh_path, tiny_llama, reference_cache, tmp_path_factory):
    """24 HH pairs, held out: a separate file (data.eval_source) of 8 later HH lines plus one of
    the training lines (which the run must report)."""
    import dataclasses
    import gzip

    tmp = tmp_path_factory.mktemp("overfit")
    lines = gzip.open(hh_path, "rt").read().splitlines()
    held_out = tmp / "held_out.jsonl"
    held_out.write_text("\n".join(lines[100:108] + lines[:1]) + "\n")
    config = run_config(hh_path, tiny_llama, tmp, "overfit", reference_cache, pairs=24, learning_rate=3e-3,
                        per_device_train_batch_size=4, num_train_epochs=8, beta=0.1,
                        lr_scheduler_type="constant", save_steps=0, eval_steps=4,
                        vocab_chunk_size=8192)  # as by default: chunked log-probs through DDP
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, eval_source=str(held_out)))
    return config, train(config)


def test_two_worker_training_overfits_a_small_subset(overfit, tiny_llama):
    config, result = overfit
    metrics = result.metrics
    assert metrics[0]["step"] == 1 and metrics[-1]["step"] == len(metrics)
    assert metrics[0]["loss"] == pytest.approx(math.log(2), abs=1e-3)  # step 0: policy == reference
    assert metrics[0]["rewards/chosen"] == pytest.approx(0, abs=1e-3)
    assert metrics[-1]["rewards/accuracies"] > 0.9
    assert metrics[-1]["rewards/margins"] > metrics[len(metrics) // 2]["rewards/margins"] > 0
    evaluated = [m for m in metrics if "eval_loss" in m]
    assert [m["step"] for m in evaluated] == list(range(4, len(metrics) + 1, 4))
    assert evaluated[0]["eval_rewards/chosen"] != 0  # held-out pairs scored on cached values
    assert json.loads((result.run_dir / "held_out.json").read_text()) == {
        "eval_source": config.data.eval_source, "pairs": 9, "also_training_pairs": 1}
    before, after = weights(tiny_llama), weights(result.final_model)
    assert any(not torch.equal(before[k], after[k]) for k in after)
    for name in ("config.yaml", "reference.json", "versions.json", "metrics.jsonl", "metrics.png"):
        assert (result.run_dir / name).exists(), name
    assert {"loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
            "logps/chosen", "logps/rejected", "grad_norm", "learning_rate", "epoch", "step",
            "tokens_per_second", "pairs_per_second"} <= set(metrics[-1])


def test_held_out_split_is_stable_disjoint_and_roughly_the_asked_share():
    import hashlib

    from dpo_ray.data.pipeline import is_held_out

    ids = [hashlib.sha256(str(i).encode()).hexdigest()[:32] for i in range(4000)]
    held = [i for i in ids if is_held_out(i, 0.1)]
    assert 0.08 < len(held) / len(ids) < 0.12
    assert held == [i for i in ids if is_held_out(i, 0.1)]  # same pairs every time
    assert not any(is_held_out(i, 0.0) for i in ids) and all(is_held_out(i, 1.0) for i in ids)


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


def test_one_worker_recomputing_activations_and_logging_in_windows_gives_the_two_worker_run(
        reference_run, hh_path, tiny_llama, reference_cache, tmp_path):
    """One TorchTrainer run, four things that change no number: one worker with 4 pairs per step
    is two with 2 each; recomputing activations (gradient checkpointing); streaming the splits
    from the cache every epoch (what a dataset too large for the object store does) where the
    plain run holds them in memory. And as TRL logs them: with logging_steps=2, step 2's record
    averages steps 1-2 (every step has the same number of pairs), not step 2's batch alone."""
    run = train(run_config(hh_path, tiny_llama, tmp_path, "one", reference_cache,
                           **{**STEPS, "num_workers": 1, "per_device_train_batch_size": 4,
                              "materialize_datasets": "never", "gradient_checkpointing": True,
                              "logging_steps": 2}))
    assert [m["step"] for m in run.metrics] == [2, 4]
    each = reference_run.metrics
    for record, steps in zip(run.metrics, (each[0:2], each[2:4]), strict=True):
        for name in ("loss", "rewards/accuracies", "rewards/margins", "logps/chosen"):
            assert record[name] == pytest.approx(sum(m[name] for m in steps) / 2, abs=1e-5), name
        assert record["max_abs_logratio"] == pytest.approx(max(m["max_abs_logratio"] for m in steps),
                                                           abs=1e-5)
        assert record["grad_norm"] == pytest.approx(steps[-1]["grad_norm"], rel=1e-3)  # the last step's
        assert record["eval_loss"] == pytest.approx(steps[-1]["eval_loss"], abs=1e-5)
    assert each[1]["loss"] != pytest.approx(math.log(2), abs=1e-4)  # step 2 saw an update
    assert_same_weights(run.final_model, reference_run.final_model)


def test_step0_guard_rejects_reference_values_from_another_computation(ray_session, hh_path,
                                                                       tiny_llama, reference_cache,
                                                                       tmp_path):
    config = run_config(hh_path, tiny_llama, tmp_path, "guard", reference_cache, max_steps=1,
                        per_device_train_batch_size=2)
    # Same weights, other numerics: bfloat16 rounding is allowed for (relative check) but not at
    # this tolerance, so the guard fires and says which precisions met.
    config.reference.dtype = "bfloat16"
    config.train.step0_rtol_low_precision = 1e-6
    with pytest.raises(Exception, match=r"step-0 guard.*policy runs in float32.*scored in bfloat16") as failed:
        train(config)
    # Raised in a Ray Train worker; the CLI unwraps it to print this one message, not Ray's stack.
    from dpo_ray.ray_env import root_cause
    from dpo_ray.training.loop import Step0GuardError

    assert isinstance(root_cause(failed.value), Step0GuardError)


@pytest.mark.slow
def test_smollm2_short_run_saves_a_model_that_reloads_and_generates(ray_session, hh_path, smollm2,
                                                                    tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = run_config(hh_path, smollm2, tmp_path, "smollm2", tmp_path / "cache", pairs=32, max_steps=2,
                        per_device_train_batch_size=4, learning_rate=1e-5,
                        bf16="auto", vocab_chunk_size=8192)  # the defaults
    result = train(config)
    assert [m["step"] for m in result.metrics] == [1, 2]
    # The step-0 guard compared in float32 (exact), whatever precision trained
    guard = json.loads((result.run_dir / "step0_guard.json").read_text())
    assert guard["policy_precision"] == "float32" and guard["max_abs_logratio"] < 1e-3
    assert result.metrics[0]["loss"] == pytest.approx(math.log(2), abs=2e-2)
    model = AutoModelForCausalLM.from_pretrained(result.final_model)
    tok = AutoTokenizer.from_pretrained(result.final_model)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     tokenize=False, add_generation_prompt=True)
    out = model.generate(**tok(prompt, return_tensors="pt"), max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0], skip_special_tokens=True)


def test_held_out_implicit_reward_accuracy_of_the_checkpoint_matches_the_loop(overfit):
    """pair_accuracy scores the final model on the actor pool against the cached reference values;
    the loop's last held-out evaluation saw the same weights and pairs, so the two must agree."""
    from dpo_ray.eval.pairs import pair_accuracy

    _, result = overfit
    got = pair_accuracy(result.run_dir)
    last = result.metrics[-1]
    assert got["accuracy"] == pytest.approx(last["eval_rewards/accuracies"], abs=1e-9)
    assert got["ci_low"] <= got["accuracy"] <= got["ci_high"]
    assert got["mean_margin"] == pytest.approx(last["eval_rewards/margins"], rel=1e-3, abs=1e-5)
    assert json.loads((result.run_dir / "pair_accuracy.json").read_text())["n"] == got["n"] == 9
