"""jobs/frontier.py: offline vs iterative DPO at matched compute, for several β."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import yaml
from helpers import load_job

from dpo_ray.recipes.frontier import SIZES, FrontierConfig, matched_kl_gap
from dpo_ray.recipes.sentiment import sized



@pytest.mark.parametrize("override, message", [
    ("train.beta=0.3", "the frontier sets β per point; use betas"),
    ("rounds=1", "rounds must be >= 2"),
    ("pairs_per_round=60", "not a multiple of the global batch (8)"),
    ("reference=previous", "reference must be initial"),
    ("train.num_train_epochs=2", "the frontier sets them"),
    ("train.lr_scheduler_type=cosine", "lr_scheduler_type must be constant"),
    ("betas=[]", "betas: List should have at least 1 item"),
])
def test_settings_that_would_unmatch_the_arms_are_refused(override, message, capsys):
    assert load_job("frontier").main([override]) == 2  # before Ray starts or a model loads
    assert message in capsys.readouterr().err


def test_default_size_is_the_readme_run():
    config = sized("default", [], None, FrontierConfig, SIZES)
    assert config.betas == [0.05, 0.1, 0.2, 0.5] and config.rounds == 2
    assert (config.pairs_per_round, config.steps_per_round) == (64, 8)


def _table(offline: list[tuple], iterative: list[tuple], base=0.0) -> pd.DataFrame:
    rows = [{"arm": arm, "kl": kl, "score": s, "check_score": s, "baseline_score": base,
             "baseline_check_score": base} for arm, points in (("offline", offline), ("iterative", iterative))
            for kl, s in points]
    return pd.DataFrame(rows)


def test_matched_kl_gap_compares_the_curves_where_both_arms_reach():
    # Iterative reaches 0.4 at KL 2, offline 0.2 at KL 2 (and further, 0.5 at KL 6): over [0, 2]
    # the curves run from 0 to 0.4 and 0 to 0.2, so the gap grows linearly from 0 to 0.2.
    gap = matched_kl_gap(_table([(2.0, 0.2), (6.0, 0.5)], [(2.0, 0.4)]))
    assert gap["kl_range"] == [0.0, 2.0]
    assert gap["mean_gap"] == pytest.approx(0.1) and gap["max_gap"] == pytest.approx(0.2)
    assert gap["min_gap"] == pytest.approx(0.0)
    flipped = matched_kl_gap(_table([(2.0, 0.4)], [(2.0, 0.2), (6.0, 0.5)]))
    assert flipped["mean_gap"] == pytest.approx(-0.1)
    # A KL estimate below 0 (sampling noise) still gives increasing curves.
    noisy = matched_kl_gap(_table([(-0.1, 0.0), (1.0, 0.1)], [(0.5, 0.2)]))
    assert noisy["kl_range"][0] == pytest.approx(0.0) and noisy["mean_gap"] > 0
    assert matched_kl_gap(_table([(1.0, 0.1)], [])) is None


@pytest.mark.slow
def test_quick_frontier_trains_both_arms_at_matched_steps_and_reports(ray_session, tiny_llama,
                                                                      tmp_path, capsys):
    """The quick size on the tiny model (the real model's path is the main job's test): two β,
    both arms, one evaluation, the report with the frontier, the reading and the truncation share."""
    assert load_job("frontier").main([
        "--size", "quick", f"model={tiny_llama}", f"output_dir={tmp_path}",
        f"reference_cache_dir={tmp_path / 'cache'}"]) == 0
    printed = capsys.readouterr().out
    (out,) = list(tmp_path.glob("frontier-*"))
    assert f"report: {out / 'report.md'}" in printed and "[8/8" in printed

    # The offline pairs are sampled and scored once: both β read one reference entry.
    keys = {json.loads((out / f"beta_{b}" / "offline" / "reference.json").read_text())["key"]
            for b in (0.1, 0.5)}
    assert len(keys) == 1
    for beta in (0.1, 0.5):
        folder = out / f"beta_{beta}"
        offline = [json.loads(line) for line in (folder / "offline" / "metrics.jsonl").open()]
        iterative = [json.loads(line) for line in (folder / "iterative_round_2" / "metrics.jsonl").open()]
        # Matched compute: 2 epochs x 8 pairs offline; round 1 (= epoch 1) + round 2 x 8 pairs.
        assert [m["step"] for m in offline] == [1, 2] and [m["step"] for m in iterative] == [1]
        config = yaml.safe_load((folder / "iterative_round_2" / "config.yaml").read_text())
        assert config["train"]["model"] == str(folder / "iterative_round_1")  # the epoch-1 checkpoint
        assert config["train"]["beta"] == beta and config["reference"]["model"] == str(tiny_llama)
        assert len((folder / "iterative_round_2_pairs" / "pairs.jsonl").read_text().splitlines()) == 8
        assert not (folder / "iterative_round_1" / "trainer_state.pt").exists()
        # Finished runs keep their final model, not their checkpoints (optimizer state).
        assert not [c for c in folder.glob("*/ray_train*/checkpoint_*") if c.is_dir()]
        assert (folder / "offline" / "final_model" / "config.json").exists()

    summary = json.loads((out / "summary.json").read_text())
    points = pd.DataFrame(summary["points"])
    assert sorted(zip(points["beta"], points["arm"])) == [
        (0.1, "iterative"), (0.1, "offline"), (0.5, "iterative"), (0.5, "offline")]
    assert (points["steps"] == 2).all()
    for r in points.itertuples():
        assert r.ci_low <= r.win_rate <= r.ci_high and r.check_ci_low <= r.check_win_rate <= r.check_ci_high
        assert 0.0 <= r.truncated <= 1.0 and r.kl is not None
    assert set(summary["matched_kl"]) == {"train_judge", "check_judge"}
    report = (out / "report.md").read_text()
    assert "| 0.5 | iterative |" in report and "cut at max_new_tokens" in report
    # (on the tiny model both arms' KL may sit on opposite sides of 0: then the report says so)
    assert "## At matched KL" in report
    assert "iterative minus offline" in report or "cannot be compared at matched KL" in report
    assert (out / "frontier.png").stat().st_size > 0
    assert len(pd.read_csv(out / "frontier.csv")) == 4


def test_an_empty_sample_is_never_best_or_worst():
    """The model may end a sample at once; such a sample is no response to pair (the data stage
    would refuse the pair), so best vs worst is chosen among the others and the count says so."""
    from dpo_ray.recipes.sentiment import best_vs_worst

    samples = pd.DataFrame({"prompt_id": ["a", "a", "a", "b", "b"], "prompt_json": ['"p"'] * 5,
                            "response": ["good", "", "bad", " ", "fine"],
                            "score": [0.9, 1.0, 0.1, 0.5, 0.2]})
    rows, counts = best_vs_worst(samples, min_gap=0.1)
    assert [(r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in rows] == [("good", "bad")]
    assert counts == {"pairs": 1, "skipped_near_ties": 1, "empty_samples": 2}  # b: one sample left
