"""The main job (controlled-sentiment DPO with iterative rounds) at its quick size, through
jobs/main.py as the README runs it, on the real SmolLM2 and the real Pang & Lee sentences."""

from __future__ import annotations

import json
import re

import pandas as pd
import pytest
import yaml
from helpers import load_job

# Whole jobs on the real model / a second head node: the full suite only.
pytestmark = pytest.mark.slow



def test_quick_main_job_runs_two_rounds_and_reports(ray_session, smollm2, tmp_path, capsys):
    # Its own reference cache: every round's values are computed here, whatever ~/.cache holds.
    assert load_job("main").main(["--size", "quick", f"output_dir={tmp_path}",
                                f"reference_cache_dir={tmp_path / 'cache'}"]) == 0
    printed = capsys.readouterr().out
    (out,) = list(tmp_path.glob("sentiment-*"))
    assert f"report: {out / 'report.md'}" in printed
    assert "[7/7" in printed  # progress through every step
    # A console a person can read: our stage lines and progress lines, not Ray's noise.
    assert "TrainingReport(" not in printed and "worker processes have been started" not in printed
    assert "(RayTrainWorker" not in printed
    for line in ("[data] reading and tokenizing", "[reference] scoring", "[train] 2 workers",
                 "sampling: 100%", "scoring (vader): 100%", "reference scoring: 100%",
                 "training: 100%", "generating (final_model): 100%", "reference log-probs (KL): 100%",
                 "judging (vader (trained on)): 100%", "judging (textblob (held-out judge)): 100%",
                 "[train] done in"):
        assert line in printed, f"{line!r} not in:\n{printed}"
    assert re.search(r"^tokenizing: \d+ rows \[", printed, re.M)  # a count: files have no length

    summary = json.loads((out / "summary.json").read_text())
    rounds = summary["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:
        assert r["pairs"] > 0 and r["pairs"] + r["skipped_near_ties"] == 16  # 24 prompts - 8 held out
        pairs = [json.loads(line) for line in (out / f"round_{r['round']}" / "pairs.jsonl").open()]
        assert all(p["score_chosen"] - p["score_rejected"] >= 0.1 for p in pairs)  # min_score_gap
        assert all(p["prompt"][0]["role"] == "user" and p["chosen"][0]["role"] == "assistant"
                   for p in pairs)
    # Round 2 samples from round 1's policy; the reference stays the original model (default).
    round2 = yaml.safe_load((out / "round_2" / "dpo" / "config.yaml").read_text())
    assert round2["train"]["model"] == str(out / "round_1" / "dpo" / "final_model")
    assert round2["reference"]["model"] == str(smollm2)
    samples = pd.read_parquet(out / "round_2" / "samples.parquet")
    assert set(samples.model_id) == {str(out / "round_1" / "dpo" / "final_model")}

    # Both judges, both rounds, with CI and KL; the report shows them and the samples.
    evals = summary["eval"]
    assert {(e["policy"], e["judge"]) for e in evals} == {
        (f"round {r}", j) for r in (1, 2) for j in ("vader (trained on)", "textblob (held-out judge)")}
    for e in evals:
        assert e["n"] == 8 and e["ci_low"] <= e["win_rate"] <= e["ci_high"]
        assert e["kl_to_reference"] is not None
    report = (out / "report.md").read_text()
    assert "| round 2 | vader (trained on) |" in report and "textblob (held-out judge)" in report
    assert "before:" in report and "after:" in report
    assert (out / "report.png").stat().st_size > 0
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out / "round_2" / "dpo" / "final_model")
