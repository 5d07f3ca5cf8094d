"""Offline vs iterative DPO at matched compute, for several β: the DPO paper's reward-vs-KL
frontier, on the controlled-sentiment task of ``recipes/sentiment.py`` and from its parts.

For every β in ``betas``, from the same original model and with the same hyper-parameters:

- **(a) offline**: the original model's own samples are paired once (best vs worst under the
  training judge), and DPO trains ``rounds`` epochs on those pairs;
- **(b) iterative**: ``rounds`` rounds of one epoch, each on fresh pairs sampled from the current
  policy. Its first round trains on the same pairs from the same start as the offline run's first
  epoch, so it *is* that epoch: the offline run checkpoints at every epoch boundary and round 2
  starts from the epoch-1 checkpoint (the schedule is constant, so nothing else differs).

Both arms see ``pairs_per_round`` pairs per epoch or round (the first ones in prompt order) and take
the same number of optimizer steps. Each run keeps ``final_model/`` (the offline run also its
epoch-1 policy, as ``iterative_round_1/``); its checkpoints go once those are copied. The offline
pairs and their reference values are computed once and shared by every β. Every final policy
then answers the held-out prompts against the original model, under the training judge and a
judge it never trained on, with KL to the original model, the mean judge score and how often
samples hit ``max_new_tokens``.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, field, replace
from pathlib import Path
from typing import Annotated

import numpy as np
import pandas as pd
from pydantic import Field
from pydantic.dataclasses import dataclass

from dpo_ray.config import STRICT, EvalConfig, Positive, PositiveInt
from dpo_ray.recipes.sentiment import (SentimentConfig, _progress, dpo_run_config, eval_judges,
                                       round_pairs, start_experiment)


@dataclass(config=STRICT)
class FrontierConfig(SentimentConfig):
    """``SentimentConfig``'s fields (prompts, judges, sampling, training settings) plus the sweep.
    ``rounds`` is R: the iterative arm's rounds and the offline arm's epochs."""

    betas: Annotated[list[Positive], Field(min_length=1)] = field(default_factory=lambda: [0.05, 0.1, 0.2, 0.5])
    pairs_per_round: PositiveInt = 64  # pairs per epoch (offline) or round (iterative); a multiple of the global batch
    max_prompts: PositiveInt | None = 120  # 72 training prompts for 64 pairs, 48 held out
    output_dir: str = "runs/frontier"

    def __post_init__(self) -> None:
        t = self.train
        if self.rounds < 2:
            raise ValueError("rounds must be >= 2: with one round, offline and iterative are the same run")
        if self.reference != "initial":
            raise ValueError("reference must be initial: both arms are regularised toward, and "
                             "measured against, the original model")
        if t.beta != TRAIN_BETA:
            raise ValueError(f"train.beta={t.beta}: the frontier sets β per point; use betas=[...]")
        if t.num_train_epochs != 1 or t.max_steps > 0:
            raise ValueError("train.num_train_epochs / train.max_steps: the frontier sets them "
                             "(rounds epochs offline, one per round iterative)")
        if t.lr_scheduler_type != "constant":
            raise ValueError("train.lr_scheduler_type must be constant: the iterative arm's first "
                             "round is the offline run's first epoch, which a decaying schedule would change")
        if self.pairs_per_round % t.global_batch_size:
            raise ValueError(f"pairs_per_round={self.pairs_per_round} is not a multiple of the global "
                             f"batch ({t.global_batch_size}): both arms must train on every pair they are given")

    @property
    def steps_per_round(self) -> int:
        return self.pairs_per_round // self.train.global_batch_size


TRAIN_BETA = SentimentConfig().train.beta  # the only train.beta the frontier accepts (it sets β itself)

SIZES = {
    # 4 β x (offline, iterative) on SmolLM2 in <= 45 minutes on 2 CPU cores (README).
    "default": {},
    # The same path in a few minutes, for CI: two β, few prompts, short samples.
    "quick": {"betas": [0.1, 0.5], "max_prompts": 24, "held_out_prompts": 8, "pairs_per_round": 8,
              "samples_per_prompt": 2, "eval_samples_per_prompt": 1, "min_score_gap": 0.0,
              "generation": {"max_new_tokens": 8}},
}


def _epoch_policy(run_dir: Path, step: int, dest: Path) -> str:
    """The offline run's checkpoint at ``step`` as a plain model folder (no optimizer state)."""
    from dpo_ray.training.trainer import export_model, run_checkpoints

    for found, checkpoint in run_checkpoints(run_dir):
        if found == step:
            export_model(checkpoint, dest)
            return str(dest)
    raise FileNotFoundError(f"{run_dir}: no checkpoint at step {step} (the end of epoch 1)")


def _drop_checkpoints(run_dir: Path) -> None:
    """A finished run's Ray Train checkpoints, once its models are copied out: each holds the
    optimizer state (~1.6 GB for SmolLM2 in float32) and 4 β x 3 runs would fill a small disk;
    nothing here resumes a finished run."""
    from dpo_ray.training.trainer import run_checkpoints

    for _, checkpoint in run_checkpoints(run_dir):
        shutil.rmtree(checkpoint)


def run(config: FrontierConfig) -> Path:
    """Both arms for every β, one evaluation of every final policy, the report; returns its path."""
    from dpo_ray.eval import evaluate
    from dpo_ray.training import train

    started = time.perf_counter()
    out, initial, train_prompts, held_prompts = start_experiment(config, "frontier")
    R, K, steps = config.rounds, config.pairs_per_round, config.steps_per_round
    step = _progress(started, 2 + len(config.betas) * (1 + 2 * (R - 1)))
    print(f"{len(train_prompts)} training prompts, {len(held_prompts)} held out; model {initial}; "
          f"β {config.betas}; {R} rounds of {K} pairs ({steps} steps each) per arm", flush=True)

    step("offline pairs: sampling from the original model (shared by every β)")
    offline_pairs = out / "offline_pairs"
    counts, mean_score = round_pairs(initial, train_prompts, config, config.generation.seed + 1,
                                     offline_pairs, "offline pairs", K)
    rounds = [{"arm": "both", "beta": None, "round": 1, "sample_mean_score": mean_score, **counts}]
    points = []
    for beta in config.betas:
        folder = out / f"beta_{beta}"
        step(f"β={beta} offline: {R} epochs on the offline pairs")
        offline = train(dpo_run_config(config, offline_pairs / "pairs.jsonl", initial, initial, replace(
            config.train, beta=beta, model=initial, num_train_epochs=R, save_steps=steps,
            save_total_limit=None, output_dir=str(folder), run_name="offline")))
        policy = _epoch_policy(offline.run_dir, steps, folder / "iterative_round_1")
        _drop_checkpoints(offline.run_dir)
        for r in range(2, R + 1):
            step(f"β={beta} iterative round {r}: sampling from the round {r - 1} policy")
            counts, mean_score = round_pairs(policy, train_prompts, config, config.generation.seed + r,
                                             folder / f"iterative_round_{r}_pairs", f"β={beta} round {r}", K)
            rounds.append({"arm": "iterative", "beta": beta, "round": r, "sample_mean_score": mean_score, **counts})
            step(f"β={beta} iterative round {r}: DPO")
            result = train(dpo_run_config(config, folder / f"iterative_round_{r}_pairs" / "pairs.jsonl",
                                          initial, initial, replace(
                config.train, beta=beta, model=policy, output_dir=str(folder),
                run_name=f"iterative_round_{r}")))
            policy = str(result.final_model)
            _drop_checkpoints(result.run_dir)
        points += [{"beta": beta, "arm": "offline", "policy": str(offline.final_model),
                    "steps": offline.metrics[-1]["step"]},
                   {"beta": beta, "arm": "iterative", "policy": policy, "steps": steps * R}]

    step(f"evaluating {len(points)} policies on {len(held_prompts)} held-out prompts against the original model")
    judges = eval_judges(config)
    evaluated = evaluate(EvalConfig(
        prompts=str(out / "held_out_prompts.jsonl"), policies=[p["policy"] for p in points],
        reference=initial, baseline="reference", judges=judges, output_dir=str(out), name="eval",
        generation=replace(config.generation, num_samples=config.eval_samples_per_prompt)))
    table = frontier_table(points, evaluated.summary["results"], judges[0].label, judges[1].label)
    report = write_report(out, config, table, rounds, evaluated.summary, time.perf_counter() - started)
    print(f"done in {(time.perf_counter() - started) / 60:.1f} min\nreport: {report}", flush=True)
    return report


def frontier_table(points: list[dict], results: list[dict], train_judge: str, check_judge: str) -> pd.DataFrame:
    """One row per (β, arm): win rate and CI under each judge, KL, mean judge scores, share of
    samples cut at max_new_tokens."""
    by = {(r["policy"], r["judge"]): r for r in results}
    rows = []
    for p in points:
        t, c = by[(p["policy"], train_judge)], by[(p["policy"], check_judge)]
        rows.append({"beta": p["beta"], "arm": p["arm"], "steps": p["steps"],
                     "win_rate": t["win_rate"], "ci_low": t["ci_low"], "ci_high": t["ci_high"],
                     "check_win_rate": c["win_rate"], "check_ci_low": c["ci_low"], "check_ci_high": c["ci_high"],
                     "kl": t["kl_to_reference"], "score": t["policy_mean_score"],
                     "check_score": c["policy_mean_score"], "baseline_score": t["baseline_mean_score"],
                     "baseline_check_score": c["baseline_mean_score"],
                     "truncated": t["policy_truncated"], "baseline_truncated": t["baseline_truncated"],
                     "policy": p["policy"]})
    return pd.DataFrame(rows)


def matched_kl_gap(table: pd.DataFrame, column: str = "score", points: int = 50) -> dict | None:
    """Iterative minus offline ``column``, each arm's reward-vs-KL curve linearly interpolated
    (through the original model at KL 0) over the KL range both arms cover; None without both
    arms or an overlap. Returns the range and the mean and min/max gap over it."""
    curves = {}
    base = table["baseline_score" if column == "score" else "baseline_check_score"].iloc[0]
    for arm, rows in table.groupby("arm"):
        kl = np.concatenate([[0.0], rows["kl"].to_numpy(float)])  # a KL estimate can dip below 0
        order = np.argsort(kl, kind="stable")
        curves[arm] = (kl[order], np.concatenate([[base], rows[column].to_numpy(float)])[order])
    if set(curves) != {"offline", "iterative"}:
        return None
    low = max(curves["offline"][0].min(), curves["iterative"][0].min())
    high = min(curves["offline"][0].max(), curves["iterative"][0].max())
    if high <= low:
        return None
    grid = np.linspace(low, high, points)
    gap = np.interp(grid, *curves["iterative"]) - np.interp(grid, *curves["offline"])
    return {"kl_range": [float(low), float(high)], "mean_gap": float(gap.mean()),
            "min_gap": float(gap.min()), "max_gap": float(gap.max())}


def plot_frontier(table: pd.DataFrame, path: Path, train_judge: str, check_judge: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, column, base, judge in ((axes[0], "score", "baseline_score", train_judge),
                                    (axes[1], "check_score", "baseline_check_score", check_judge)):
        ax.scatter([0.0], [table[base].iloc[0]], color="black", marker="*", s=90, label="original model")
        for arm, marker in (("offline", "o"), ("iterative", "s")):
            rows = table[table["arm"] == arm].sort_values("kl")
            ax.plot(rows["kl"], rows[column], marker=marker, label=arm)
            for row in rows.itertuples():
                ax.annotate(f"β={row.beta}", (row.kl, getattr(row, column)), fontsize=7,
                            textcoords="offset points", xytext=(4, 4))
        ax.set_xlabel("KL(policy || original), nats per sample")
        ax.set_ylabel(f"mean {judge} score, held-out prompts")
        ax.set_title(f"reward vs KL: {judge}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _reading(gap: dict | None, judge: str) -> str:
    if gap is None:
        return f"{judge}: the arms' KL ranges do not overlap, so they cannot be compared at matched KL."
    lo, hi = gap["kl_range"]
    verdict = ("iterative is higher" if gap["min_gap"] > 0 else "offline is higher" if gap["max_gap"] < 0
               else "neither arm is higher over the whole range")
    return (f"{judge}: over KL from {lo:.2f} to {hi:.2f} nats (both arms' curves, linearly interpolated through "
            f"the original model), iterative minus offline mean score is {gap['mean_gap']:+.3f} on average "
            f"(from {gap['min_gap']:+.3f} to {gap['max_gap']:+.3f}): {verdict}.")


def write_report(out: Path, config: FrontierConfig, table: pd.DataFrame, rounds: list[dict],
                 eval_summary: dict, seconds: float) -> Path:
    judges = [r["judge"] for r in eval_summary["results"][:2]]
    plot_frontier(table, out / "frontier.png", *judges)
    table.to_csv(out / "frontier.csv", index=False)
    gaps = {"train_judge": matched_kl_gap(table, "score"), "check_judge": matched_kl_gap(table, "check_score")}
    n = eval_summary["prompts"]["prompts"] * config.eval_samples_per_prompt
    lines = [
        "# Offline vs iterative DPO: the reward-vs-KL frontier", "",
        f"Model {Path(config.model).name if config.model else 'SmolLM2-135M-Instruct'}; "
        f"β {config.betas}; {config.rounds} rounds x {config.pairs_per_round} pairs "
        f"({config.steps_per_round * config.rounds} optimizer steps) per arm; judges {judges[0]} and "
        f"{judges[1]}; {n} held-out judgments per policy (95% CI, prompts resampled). "
        f"{seconds / 60:.1f} minutes.", "",
        "| β | arm | win rate (train judge) | 95% CI | win rate (held-out judge) | 95% CI | KL (nats) | "
        "mean score (train / held-out judge) | cut at max_new_tokens |", "|---|---|---|---|---|---|---|---|---|"]
    for r in table.itertuples():
        lines.append(f"| {r.beta} | {r.arm} | {r.win_rate:.3f} | [{r.ci_low:.3f}, {r.ci_high:.3f}] | "
                     f"{r.check_win_rate:.3f} | [{r.check_ci_low:.3f}, {r.check_ci_high:.3f}] | {r.kl:.2f} | "
                     f"{r.score:.3f} / {r.check_score:.3f} | {r.truncated:.0%} |")
    base = table.iloc[0]
    lines += ["", f"Original model: mean score {base.baseline_score:.3f} / {base.baseline_check_score:.3f}, "
              f"{base.baseline_truncated:.0%} of samples cut at max_new_tokens.", "",
              "![frontier](frontier.png)", "", "## At matched KL", "",
              "- " + _reading(gaps["train_judge"], judges[0]), "- " + _reading(gaps["check_judge"], judges[1]),
              "", "## Pairs per round", "", "| arm | β | round | pairs | near-ties skipped | unused | "
              "mean train-judge score of the samples |", "|---|---|---|---|---|---|---|"]
    for r in rounds:
        lines.append(f"| {r['arm']} | {r['beta'] if r['beta'] is not None else 'all'} | {r['round']} | "
                     f"{r['pairs']} | {r['skipped_near_ties']} | {r.get('unused', 0)} | {r['sample_mean_score']:.3f} |")
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    (out / "summary.json").write_text(json.dumps(
        {"config": asdict(config), "points": table.to_dict("records"), "matched_kl": gaps,
         "rounds": rounds, "minutes": seconds / 60}, indent=2, default=str))
    return path
