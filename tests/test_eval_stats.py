"""Win-rate statistics and the position-bias protocol on constructed judgments with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from dpo_ray.eval import stats
from dpo_ray.eval.judges import FunctionJudge, load_function


def test_all_wins_is_one_with_a_degenerate_interval():
    got = stats.win_rate(["policy"] * 40)
    assert (got["win_rate"], got["ci_low"], got["ci_high"]) == (1.0, 1.0, 1.0)
    assert (got["wins"], got["ties"], got["losses"], got["n"]) == (40, 0, 0, 40)


def test_balanced_is_one_half_and_ties_count_half():
    assert stats.win_rate(["policy", "baseline"] * 50)["win_rate"] == 0.5
    got = stats.win_rate(["tie"] * 30)
    assert (got["win_rate"], got["ci_low"], got["ci_high"]) == (0.5, 0.5, 0.5)
    # 3 wins, 2 ties, 5 losses -> (3 + 1) / 10
    assert stats.win_rate(["policy"] * 3 + ["tie"] * 2 + ["baseline"] * 5)["win_rate"] == pytest.approx(0.4)
    with pytest.raises(ValueError, match="unknown verdicts"):
        stats.win_rate(["policy", "win"])


def test_bootstrap_interval_covers_the_true_rate_at_about_its_nominal_frequency():
    """400 simulated evaluations of 80 prompts with true win rate 0.6 (wins/ties/losses mixed):
    the 95% interval must contain 0.6 in about 95% of them (binomial sd ~1.1%; percentile
    intervals run a little narrow at this n, hence the band)."""
    rng = np.random.default_rng(1)
    probs = [0.5, 0.2, 0.3]  # win, tie, loss -> true rate 0.5 + 0.1 = 0.6
    covered = 0
    for i in range(400):
        verdicts = rng.choice(["policy", "tie", "baseline"], size=80, p=probs)
        got = stats.win_rate(verdicts, n_resamples=1000, seed=i)
        covered += got["ci_low"] <= 0.6 <= got["ci_high"]
    assert 0.91 <= covered / 400 <= 0.985, covered / 400


def test_cluster_bootstrap_widens_the_interval_when_samples_of_a_prompt_agree():
    """Four identical verdicts per prompt carry the information of one: resampling prompts must
    give a wider interval than pretending the 4 x 40 judgments were independent."""
    rng = np.random.default_rng(0)
    per_prompt = rng.choice(["policy", "baseline"], size=40)
    verdicts = np.repeat(per_prompt, 4)
    groups = np.repeat(np.arange(40), 4)
    clustered = stats.win_rate(verdicts, groups)
    naive = stats.win_rate(verdicts)
    assert clustered["win_rate"] == naive["win_rate"]
    assert clustered["ci_high"] - clustered["ci_low"] > 1.6 * (naive["ci_high"] - naive["ci_low"])


def test_accuracy_with_interval():
    got = stats.accuracy([True] * 70 + [False] * 30)
    assert got["accuracy"] == pytest.approx(0.7)
    assert 0.6 < got["ci_low"] < 0.7 < got["ci_high"] < 0.8


def test_a_judge_that_always_prefers_the_first_response_scores_all_ties():
    judge = FunctionJudge(lambda prompt, first, second: "first")
    got = judge.compare(["p"] * 20, ["policy says"] * 20, ["baseline says"] * 20)
    assert set(got["verdict"]) == {"tie"}
    verdicts = [{"a": "policy", "b": "baseline", "tie": "tie"}[v] for v in got["verdict"]]
    assert stats.win_rate(verdicts)["win_rate"] == 0.5


def test_an_order_consistent_pairwise_judge_keeps_its_verdicts():
    judge = FunctionJudge(lambda prompt, first, second:
                          "first" if len(first) > len(second) else "second" if len(second) > len(first) else "tie")
    got = judge.compare(["p", "p", "p"], ["long answer", "x", "same"], ["short", "longer", "same"])
    assert got["verdict"] == ["a", "b", "tie"]


def test_score_judges_use_the_packaged_lexicons_and_the_tie_margin():
    for name in ("vader", "textblob", "afinn"):
        judge = FunctionJudge(load_function(name))
        got = judge.compare(["review:"] * 2, ["a wonderful, moving film", "dull and tedious"],
                            ["dull and tedious", "a wonderful, moving film"])
        assert got["verdict"] == ["a", "b"], name
        assert got["score_a"][0] > got["score_b"][0]
    margin = FunctionJudge(load_function("length"), tie_margin=3)
    assert margin.compare(["p"] * 2, ["abcd", "abcdefgh"], ["abc", "a"])["verdict"] == ["tie", "a"]


def test_bad_judges_are_named():
    with pytest.raises(ValueError, match="takes \\(prompt, response\\)"):
        FunctionJudge(lambda x: 1.0)
    with pytest.raises(ValueError, match="use one of"):
        load_function("no_such_lexicon")
    with pytest.raises(ValueError, match="returned"):
        FunctionJudge(lambda p, a, b: "A").compare(["p"], ["a"], ["b"])
