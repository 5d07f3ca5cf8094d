"""Win-rate evaluation through the real Ray paths: generation and judge actor pools, a reward
model trained with Ray Train on real HH pairs, and the eval directory a user reads."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from dpo_ray.config import (DataConfig, EvalConfig, GenerationConfig, JudgeConfig, ReferenceConfig,
                            RunConfig, TrainConfig)
from helpers import write_jsonl

PROMPTS = ["What is the capital of France?", "Name a color.", "Write one sentence about cats.",
           "What is 2+2?", "Say hello in French."]


def test_greedy_generation_through_the_pool_equals_model_generate(ray_session, smollm2, tmp_path):
    """Batched (left-padded, length-sorted) greedy decoding on the actor pool gives, token for
    token, what a single-process ``model.generate`` gives for each prompt alone."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dpo_ray.eval.generate import generate, prompt_ids

    frame = pd.DataFrame({"prompt_id": [str(i) for i in range(len(PROMPTS))],
                          "prompt_json": [json.dumps(p) for p in PROMPTS]})
    config = GenerationConfig(do_sample=False, max_new_tokens=16, batch_size=4)
    got = generate(ray_session.data.from_pandas(frame), str(smollm2), config).to_pandas()
    got = got.sort_values("prompt_id").reset_index(drop=True)
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    model = AutoModelForCausalLM.from_pretrained(smollm2).eval()
    for prompt, row in zip(PROMPTS, got.itertuples()):
        ids = prompt_ids(tokenizer, prompt, True, 256)
        assert list(row.prompt_input_ids) == ids
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)
        expected = out[0, len(ids):].tolist()
        if tokenizer.eos_token_id in expected:
            expected = expected[:expected.index(tokenizer.eos_token_id) + 1]
        assert list(row.response_input_ids) == expected, prompt
        assert row.finished == (expected[-1] == tokenizer.eos_token_id)
        assert row.logp < 0 and row.response_tokens == len(expected)
    assert "Paris" in got.loc[0, "response"]


@pytest.mark.slow
def test_smollm2_against_itself_is_a_coin_flip_with_zero_kl(ray_session, smollm2, hh_path, tmp_path):
    """The policy is the reference: sampled answers differ (another seed), the lexicon judge's
    win rate CI covers 0.5, the KL estimate is 0, and the eval directory holds every judgment."""
    from dpo_ray.eval import evaluate

    config = EvalConfig(
        prompts=str(hh_path), policies=[str(smollm2)], reference=str(smollm2), baseline="reference",
        judges=[JudgeConfig(kind="function", name="vader")], limit=16, on_bad_row="skip",
        output_dir=str(tmp_path), name="self",
        generation=GenerationConfig(max_new_tokens=24, num_samples=2, chat_template=False,
                                    max_prompt_length=128))
    result = evaluate(config)
    row = result.win_rate()
    assert row["n"] == 32 and row["wins"] + row["ties"] + row["losses"] == 32
    assert row["ci_low"] <= 0.5 <= row["ci_high"], row
    assert row["kl_to_reference"] == 0.0
    samples = result.samples
    policy, baseline = samples[samples.role == "policy"], samples[samples.role == "baseline"]
    assert len(policy) == len(baseline) == 32
    assert (policy.sort_values(["prompt_id", "sample_index"])["response"].to_numpy()
            != baseline.sort_values(["prompt_id", "sample_index"])["response"].to_numpy()).any()
    assert set(policy.seed) != set(baseline.seed)
    for name in ("config.yaml", "judgments.parquet", "samples.parquet", "summary.json", "report.md",
                 "winrate.png"):
        assert (result.eval_dir / name).exists(), name
    judged = pd.read_parquet(result.eval_dir / "judgments.parquet")
    assert len(judged) == 32 and set(judged.verdict) <= {"policy", "baseline", "tie"}
    assert (judged.policy_score > judged.baseline_score).sum() == row["wins"]
    summary = json.loads((result.eval_dir / "summary.json").read_text())
    # Every row is validated (limit keeps the first 16 distinct prompts): the same bad HH rows
    # the data stage reports.
    assert summary["prompts"]["skipped"] == {"empty_response": 4, "prompt_mismatch": 5}
    assert "| vader |" in (result.eval_dir / "report.md").read_text()


def test_chosen_baseline_and_an_llm_judge_in_both_orders(ray_session, smollm2, tiny_llama, tmp_path):
    """The HH protocol's baseline (the dataset's chosen answers) and an LLM judge on its own actor
    pool; every pair is asked in both orders and a verdict that flips is a tie."""
    from dpo_ray.eval import evaluate

    rows = [{"prompt": f"Question {i}: what is {i} + {i}?", "chosen": f"It is {2 * i}.",
             "rejected": "No idea."} for i in range(6)]
    source = write_jsonl(tmp_path / "pairs.jsonl", rows)
    config = EvalConfig(
        prompts=str(source), policies=[str(tiny_llama)], baseline="chosen",
        judges=[JudgeConfig(kind="llm", name=str(smollm2), label="smollm2-judge"),
                JudgeConfig(kind="function", name="length")],
        output_dir=str(tmp_path), name="chosen", generation=GenerationConfig(max_new_tokens=8),
        report_to=["mlflow"], tracking_uri=(tmp_path / "mlruns").as_uri())
    result = evaluate(config)
    judged = result.judgments[result.judgments.judge == "smollm2-judge"]
    assert len(judged) == 6 and set(judged.baseline_response) == {r["chosen"] for r in rows}
    consistent = {("first", "second"): "policy", ("second", "first"): "baseline"}
    for row in judged.itertuples():
        expected = consistent.get((row.verdict_policy_first, row.verdict_baseline_first), "tie")
        assert row.verdict == expected
    assert result.win_rate(judge="smollm2-judge")["kl_to_reference"] is None
    # eval.report_to: the summary's win rates and the report, in an MLflow run named after it.
    from mlflow import MlflowClient

    client = MlflowClient((tmp_path / "mlruns").as_uri())
    run = client.get_run(json.loads((result.eval_dir / "tracking.json").read_text())["mlflow"])
    assert run.info.run_name == "chosen" and run.info.status == "FINISHED"
    for label in ("smollm2-judge", "length"):
        row = result.win_rate(judge=label)
        assert run.data.metrics[f"eval/{label}/win_rate"] == pytest.approx(row["win_rate"])
        assert run.data.metrics[f"eval/{label}/ci_low"] == pytest.approx(row["ci_low"])
    assert run.data.params["baseline"] == "chosen"
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"report.md", "summary.json",
                                                                         "winrate.png"}


def test_bad_prompt_rows_are_named_or_counted(ray_session, tmp_path):
    from dpo_ray.data import BadRow
    from dpo_ray.eval.prompts import load_prompts

    source = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "hi"}, {"text": "no prompt"}],
                         raw_lines={3: "{not json"})
    with pytest.raises(BadRow, match=r"prompts.jsonl, row 2: missing_field"):
        load_prompts(str(source))
    frame, counts = load_prompts(str(source), on_bad_row="skip")
    assert list(frame.prompt_text) == ["hi"]
    assert counts["skipped"] == {"missing_field": 1, "malformed_json": 1}


def test_eval_without_policies_or_judges_or_with_one_twice_fails_before_any_work(tmp_path):
    from dpo_ray.eval import evaluate

    source = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "hi"}])
    vader = JudgeConfig(kind="function", name="vader")
    with pytest.raises(ValueError, match=r"eval.policies is empty"):
        evaluate(EvalConfig(prompts=str(source), judges=[vader], output_dir=str(tmp_path / "evals")))
    with pytest.raises(ValueError, match=r"eval.judges is empty"):
        evaluate(EvalConfig(prompts=str(source), judges=[], policies=["some/model"],
                            output_dir=str(tmp_path / "evals")))
    # Results and the report are keyed by policy and judge: twice would fail only at the report.
    with pytest.raises(ValueError, match=r"eval.policies names \['a/model'\] more than once"):
        evaluate(EvalConfig(prompts=str(source), judges=[vader], policies=["a/model", "b", "a/model"],
                            output_dir=str(tmp_path / "evals")))
    with pytest.raises(ValueError, match=r"eval.judges names \['vader'\] more than once"):
        evaluate(EvalConfig(prompts=str(source), judges=[vader, vader], policies=["a/model"],
                            output_dir=str(tmp_path / "evals")))
    assert not (tmp_path / "evals").exists()  # nothing half-written


@pytest.mark.slow
def test_reward_model_on_real_hh_pairs_beats_chance(ray_session, hh_path, smollm2, tiny_llama,
                                                    tmp_path):
    """A Bradley-Terry reward model (tiny Llama + scalar head) trained by 2 Ray Train workers on
    the real HH pairs; held-out pairs (disjoint by pair_id) are ranked right more often than
    chance, with the 95% CI above 0.5, and the same number the training loop reported."""
    from dpo_ray.eval.pairs import pair_accuracy
    from dpo_ray.training import train
    from dpo_ray.data.pipeline import is_held_out

    config = RunConfig(
        data=DataConfig(source=str(hh_path), tokenizer=str(smollm2), on_bad_row="skip",
                        max_length=256, max_prompt_length=128),
        reference=ReferenceConfig(model=str(tiny_llama), cache_dir=str(tmp_path / "cache")),
        train=TrainConfig(objective="reward_model", learning_rate=3e-4, num_train_epochs=1,
                          per_device_train_batch_size=8, lr_scheduler_type="constant",
                          eval_fraction=0.2, output_dir=str(tmp_path), run_name="rm",
                          logging_steps=20))
    result = train(config)
    assert not (tmp_path / "cache").exists() and result.reference_key is None  # no reference
    got = pair_accuracy(result.run_dir)
    assert got["ci_low"] > 0.5, got
    assert got["accuracy"] == pytest.approx(result.metrics[-1]["eval_rewards/accuracies"], abs=1e-9)
    assert "logps/chosen" not in result.metrics[-1]
    assert 400 < got["n"] < 520  # ~20% of 2303 pairs
    from dpo_ray.eval.judges import RewardModelJudge

    judge = RewardModelJudge(str(result.final_model))
    assert judge.compare(["p"], ["a"], ["a"])["verdict"] == ["tie"]
    assert is_held_out("0" * 32, 0.2) and not is_held_out("f" * 32, 0.2)


def test_a_lexicon_judge_without_its_package_names_the_demo_extra(tmp_path, monkeypatch):
    """The lexicons live in the [demo] extra: without it the eval fails before Ray starts."""
    import importlib.util

    from dpo_ray.eval import evaluate

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "vaderSentiment" else real(name, *a))
    source = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "hi"}])
    with pytest.raises(ValueError, match=r"judge 'vader' needs the vaderSentiment package: pip install 'dpo-ray\[demo\]'"):
        evaluate(EvalConfig(prompts=str(source), policies=["some/model"], output_dir=str(tmp_path),
                            judges=[JudgeConfig(kind="function", name="vader")]))
