"""The eval directory's ``report.md`` and ``winrate.png``: win rate with its CI per policy and
judge, the length and KL context that keeps a win rate honest, and a few judged samples."""

from __future__ import annotations

from pathlib import Path

import pandas as pd


def plot_win_rates(results: list[dict], path: Path, title: str = "win rate vs baseline") -> None:
    """Left: win rate with CI per (policy, judge). Right, when KL is known for several policies:
    each judge's mean policy score against KL to the reference (the reward-vs-KL frontier)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frame = pd.DataFrame(results)
    frontier = frame.dropna(subset=["kl_to_reference", "policy_mean_score"])
    two = frontier["policy"].nunique() > 1
    fig, axes = plt.subplots(1, 2 if two else 1, figsize=(11 if two else 6, 4), squeeze=False)
    ax = axes[0][0]
    judges = list(dict.fromkeys(frame["judge"]))
    policies = list(dict.fromkeys(frame["policy"]))
    width = 0.8 / max(len(judges), 1)
    for j, judge in enumerate(judges):
        rows = frame[frame["judge"] == judge].set_index("policy").reindex(policies)
        x = [i + j * width for i in range(len(policies))]
        ax.errorbar(x, rows["win_rate"], yerr=[rows["win_rate"] - rows["ci_low"],
                                                rows["ci_high"] - rows["win_rate"]],
                    fmt="o", capsize=4, label=judge)
    ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
    ax.set_xticks([i + width * (len(judges) - 1) / 2 for i in range(len(policies))])
    ax.set_xticklabels([Path(p).name or p for p in policies], rotation=15, fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel(f"win rate ({int(frame['confidence'].iloc[0] * 100)}% CI)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    if two:
        ax = axes[0][1]
        for judge, rows in frontier.groupby("judge", sort=False):
            kl, score = list(rows["kl_to_reference"]), list(rows["policy_mean_score"])
            if (rows["baseline"] == "reference").all():  # the reference itself sits at KL 0
                kl, score = [0.0, *kl], [float(rows["baseline_mean_score"].iloc[0]), *score]
            ax.plot(kl, score, marker="o", label=judge)
        ax.set_xlabel("KL(policy || reference), nats per sample")
        ax.set_ylabel("mean judge score of policy samples")
        ax.set_title("reward vs KL")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def summary_metrics(summary: dict) -> dict[str, float]:
    """The summary as flat tracker metrics: ``eval/<judge>/win_rate`` (and ci_low, ci_high, KL,
    mean scores), with the policy folder's name inserted when several policies were judged."""
    import re

    several = len({r["policy"] for r in summary["results"]}) > 1
    out = {}
    for r in summary["results"]:
        where = "/".join([Path(r["policy"]).name] * several + [r["judge"]])
        where = re.sub(r"[^A-Za-z0-9_\-. /]", "_", where)  # the characters MLflow allows in a key
        for key in ("win_rate", "ci_low", "ci_high", "kl_to_reference", "policy_mean_score",
                    "baseline_mean_score", "policy_mean_tokens", "policy_truncated"):
            if r.get(key) is not None:
                out[f"eval/{where}/{key}"] = r[key]
    return out


def results_table(results: list[dict]) -> str:
    lines = ["| policy | judge | win rate | CI | W / T / L | policy / baseline tokens | "
             "cut at max_new_tokens (policy / baseline) | KL (nats) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        base = f"{r['baseline_mean_tokens']:.1f}" if r["baseline_mean_tokens"] is not None else \
            f"{r['baseline_mean_chars']:.0f} chars"
        kl = f"{r['kl_to_reference']:.3f}" if r["kl_to_reference"] is not None else "n/a"
        lines.append(f"| {r['policy']} | {r['judge']} | {r['win_rate']:.3f} | "
                     f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}] | {r['wins']} / {r['ties']} / "
                     f"{r['losses']} | {r['policy_mean_tokens']:.1f} / {base} | "
                     f"{_share(r.get('policy_truncated'))} / {_share(r.get('baseline_truncated'))} | {kl} |")
    return "\n".join(lines)


def _share(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0%}"


def _short(text: str, n: int = 160) -> str:
    text = " ".join(str(text).split())
    return (text[:n] + "...") if len(text) > n else text


def write_report(summary: dict, judgments: pd.DataFrame, out: Path, examples: int = 3) -> None:
    plot_win_rates(summary["results"], out / "winrate.png")
    gen = summary["generation"]
    parts = [
        "# Win-rate evaluation", "",
        (f"{summary['prompts']['prompts']} prompts; baseline: {summary['baseline']} "
        f"({summary['baseline_model']}); {gen['num_samples']} sample(s) per prompt, "
        f"temperature {gen['temperature']}, top_p {gen['top_p']}, max_new_tokens {gen['max_new_tokens']}."),
        ("Win rate counts ties as half; the CI is a percentile bootstrap over prompts. Pairwise judges "
        "are asked in both orders and a verdict that flips with the order is a tie."), "",
        results_table(summary["results"]), "", "![win rate](winrate.png)", "", "## Examples", ""]
    first = judgments[judgments["judge"] == judgments["judge"].iloc[0]].head(examples)
    for row in first.itertuples():
        parts += [f"- **prompt**: {_short(row.prompt_text)}",
                  f"  - policy ({row.verdict}): {_short(row.policy_response)}",
                  f"  - baseline: {_short(row.baseline_response)}"]
    (out / "report.md").write_text("\n".join(parts) + "\n")
