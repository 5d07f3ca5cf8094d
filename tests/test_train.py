"""DPO training through Ray Train TorchTrainer with 2 workers (real DDP over gloo)."""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dpo_ray.config import DataConfig, Pool, ReferenceConfig, RunConfig, TrainConfig
from dpo_ray.training import train
from dpo_ray.training.trainer import latest_checkpoint


def run_config(hh_path, model, tmp_path, name, pairs=16, **train_kw):
    return RunConfig(
        data=DataConfig(source=str(hh_path), tokenizer=str(model), limit=pairs, on_bad_row="skip",
                        max_length=96, max_prompt_length=48),
        reference=ReferenceConfig(model=str(model), cache_dir=str(tmp_path / "cache"),
                                  pool=Pool(num_cpus_per_actor=0.5)),
        train=TrainConfig(output_dir=str(tmp_path / "runs"), run_name=name, seed=0,
                          **{"num_workers": 2, "cpus_per_worker": 1.0, **train_kw}),
    )


def weights(folder):
    return {k: v for p in sorted(Path(folder).glob("*.safetensors")) for k, v in load_file(p).items()}


@pytest.fixture(scope="module")
def overfit(ray_session, hh_path, tiny_llama, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("overfit")
    config = run_config(hh_path, tiny_llama, tmp, "overfit", pairs=24, learning_rate=3e-3,
                        per_device_train_batch_size=4, num_train_epochs=8, beta=0.1,
                        lr_scheduler_type="constant", save_steps=0, eval_fraction=0.25,
                        eval_steps=4)
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


def test_one_and_two_workers_same_global_batch_give_the_same_steps(ray_session, hh_path,
                                                                    tiny_llama, tmp_path):
    common = dict(pairs=16, max_steps=2, learning_rate=1e-3, lr_scheduler_type="constant")
    one = train(run_config(hh_path, tiny_llama, tmp_path, "one", num_workers=1,
                           per_device_train_batch_size=4, **common))
    two = train(run_config(hh_path, tiny_llama, tmp_path, "two", num_workers=2,
                           per_device_train_batch_size=2, **common))
    for a, b in zip(one.metrics, two.metrics):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)  # same first gradients
    assert one.metrics[1]["loss"] != pytest.approx(math.log(2), abs=1e-4)  # step 2 saw an update
    w1, w2 = weights(one.final_model), weights(two.final_model)
    assert all(torch.allclose(w1[k], w2[k], atol=1e-5) for k in w1)


def test_step0_guard_rejects_reference_values_from_another_computation(ray_session, hh_path,
                                                                       tiny_llama, tmp_path):
    config = run_config(hh_path, tiny_llama, tmp_path, "guard", max_steps=1,
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


RESUME = dict(pairs=16, per_device_train_batch_size=2, num_train_epochs=2,
              learning_rate=1e-3, lr_scheduler_type="constant", max_steps=6)  # 4 steps per epoch


@pytest.fixture(scope="module")
def uninterrupted(ray_session, hh_path, tiny_llama, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("uninterrupted")
    return train(run_config(hh_path, tiny_llama, tmp, "full", **RESUME))


def assert_same_run(result, reference_run):
    assert [m["step"] for m in result.metrics] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(result.metrics, reference_run.metrics):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5), a["step"]
    state = torch.load(latest_checkpoint(result.run_dir) / "trainer_state.pt", weights_only=False)
    assert state["step"] == 6  # optimizer steps, and so pairs consumed (6 x global batch 4)
    assert state["scheduler"]["last_epoch"] == 6
    w, ref = weights(result.final_model), weights(reference_run.final_model)
    assert all(torch.allclose(w[k], ref[k], atol=1e-6) for k in w)


def test_logged_metrics_are_means_over_the_steps_since_the_last_log(uninterrupted, hh_path,
                                                                    tiny_llama, tmp_path):
    """As TRL logs them: with logging_steps=3, step 3's record averages steps 1-3 (every step has
    the same number of pairs), not step 3's batch alone."""
    logged = train(run_config(hh_path, tiny_llama, tmp_path, "every3", logging_steps=3, **RESUME))
    assert [m["step"] for m in logged.metrics] == [3, 6]
    each = uninterrupted.metrics
    for record, steps in zip(logged.metrics, (each[0:3], each[3:6])):
        for name in ("loss", "rewards/accuracies", "rewards/margins", "logps/chosen"):
            assert record[name] == pytest.approx(sum(m[name] for m in steps) / 3, abs=1e-6), name
        assert record["max_abs_logratio"] == pytest.approx(max(m["max_abs_logratio"] for m in steps))


def test_stop_and_resume_continues_mid_epoch_with_the_same_data(uninterrupted, hh_path,
                                                                tiny_llama, tmp_path):
    stopped = train(run_config(hh_path, tiny_llama, tmp_path, "part",
                               **{**RESUME, "max_steps": 3}))  # stops mid-epoch 1
    assert [m["step"] for m in stopped.metrics] == [1, 2, 3]
    resumed = train(run_config(hh_path, tiny_llama, tmp_path, "part", resume=True, **RESUME))
    assert_same_run(resumed, uninterrupted)


def test_killed_worker_restarts_from_checkpoint_and_matches(uninterrupted, hh_path, tiny_llama,
                                                            tmp_path):
    import threading
    import time

    from helpers import own_ray_processes

    config = run_config(hh_path, tiny_llama, tmp_path, "fault", max_failures=1, save_steps=1,
                        **RESUME)
    metrics = tmp_path / "runs" / "fault" / "metrics.jsonl"
    killed = []

    def kill_a_worker_at_step_3():
        deadline = time.time() + 600
        while time.time() < deadline and not killed:
            if metrics.exists() and any(json.loads(l)["step"] >= 3 for l in metrics.read_text().splitlines()):
                for proc in own_ray_processes("RayTrainWorker")[:1]:
                    proc.kill()
                    killed.append(proc.pid)
                    return
            time.sleep(0.2)

    watcher = threading.Thread(target=kill_a_worker_at_step_3, daemon=True)
    watcher.start()
    result = train(config)
    watcher.join(timeout=5)
    assert killed, "no train worker was killed"
    assert_same_run(result, uninterrupted)


def test_smollm2_short_run_saves_a_model_that_reloads_and_generates(ray_session, hh_path, smollm2,
                                                                    tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = run_config(hh_path, smollm2, tmp_path, "smollm2", pairs=32, max_steps=2,
                        per_device_train_batch_size=4, learning_rate=1e-5)
    result = train(config)
    assert [m["step"] for m in result.metrics] == [1, 2]
    assert result.metrics[0]["loss"] == pytest.approx(math.log(2), abs=1e-3)
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
    assert json.loads((result.run_dir / "pair_accuracy.json").read_text())["n"] == got["n"]
