"""Win rates and accuracies with bootstrap confidence intervals. Pure functions, numpy in, numbers out.

A judgment scores the policy's response against the baseline's: win 1, tie 1/2, loss 0, so

    win_rate = (wins + ties / 2) / n

Samples of the same prompt are not independent (a hard prompt makes every sample lose), so the
bootstrap resamples *prompts* and keeps each prompt's samples together (a cluster bootstrap);
with one sample per prompt this is the ordinary bootstrap. Percentile intervals are used: they
stay defined when every judgment agrees (all wins -> [1, 1]), where BCa is not.
"""

from __future__ import annotations

import numpy as np
from scipy import stats

OUTCOME = {"policy": 1.0, "tie": 0.5, "baseline": 0.0}


def bootstrap_mean_ci(values: np.ndarray, groups: np.ndarray | None = None, confidence: float = 0.95,
                      n_resamples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of ``values`` (N,) and a percentile bootstrap CI, resampling ``groups`` (N,) as units.

    Returns (mean, low, high). Every group weighs its number of values.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return float("nan"), float("nan"), float("nan")
    if groups is None:
        groups = np.arange(values.size)
    _, index = np.unique(np.asarray(groups), return_inverse=True)
    sums = np.bincount(index, weights=values)  # (G,) per-group sums
    counts = np.bincount(index).astype(np.float64)  # (G,) per-group sizes
    if sums.size == 1 or np.all(values == values[0]):
        mean = float(values.mean())
        return mean, mean, mean  # no spread to resample (scipy would warn and return nan)

    def ratio(s, c, axis=-1):  # mean over the resampled groups' values
        return s.sum(axis=axis) / c.sum(axis=axis)

    result = stats.bootstrap((sums, counts), ratio, paired=True, vectorized=True,
                             confidence_level=confidence, n_resamples=n_resamples,
                             method="percentile", rng=np.random.default_rng(seed))
    return float(sums.sum() / counts.sum()), float(result.confidence_interval.low), \
        float(result.confidence_interval.high)


def win_rate(verdicts, groups=None, confidence: float = 0.95, n_resamples: int = 2000,
             seed: int = 0) -> dict:
    """``verdicts``: sequence of "policy" | "baseline" | "tie" (one per judgment); ``groups``: the
    prompt of each judgment. Returns counts, the win rate with ties as half, and its CI."""
    verdicts = list(verdicts)
    unknown = set(verdicts) - set(OUTCOME)
    if unknown:
        raise ValueError(f"unknown verdicts {sorted(unknown)}; expected {sorted(OUTCOME)}")
    scores = np.array([OUTCOME[v] for v in verdicts])
    rate, low, high = bootstrap_mean_ci(scores, groups, confidence, n_resamples, seed)
    return {"n": len(verdicts), "wins": verdicts.count("policy"), "ties": verdicts.count("tie"),
            "losses": verdicts.count("baseline"), "win_rate": rate, "ci_low": low, "ci_high": high,
            "confidence": confidence}


def accuracy(correct, confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0) -> dict:
    """Share of True in ``correct`` (e.g. r_chosen > r_rejected per held-out pair) with its CI."""
    correct = np.asarray(correct, dtype=np.float64)
    rate, low, high = bootstrap_mean_ci(correct, None, confidence, n_resamples, seed)
    return {"n": int(correct.size), "accuracy": rate, "ci_low": low, "ci_high": high,
            "confidence": confidence}
