"""Win-rate evaluation, driver side: prompts -> samples (actor pool) -> KL (reference actor pool)
-> judges (actor pools, both orders for pairwise judges) -> statistics -> eval directory.

    from dpo_ray.eval import evaluate
    result = evaluate(eval_config)          # or: dpo-ray eval --config eval.yaml key=value ...

Eval directory ``<output_dir>/<name>`` (a path, or an object-store URI: written to a local mirror
and uploaded at the end, see ``dpo_ray/storage.py``): ``config.yaml``, ``samples.parquet`` (every generated
sample), ``judgments.parquet`` (every judgment), ``summary.json``, ``report.md``, ``winrate.png``.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import ray

from dpo_ray import storage
from dpo_ray.config import EvalConfig, JudgeConfig, config_dict, save_config
from dpo_ray.console import counted, progress
from dpo_ray.eval import stats
from dpo_ray.eval.generate import generate, score_samples
from dpo_ray.eval.judges import build_judge, check_function_judges
from dpo_ray.eval.prompts import load_prompts
from dpo_ray.ray_env import actor_pool_kwargs
from dpo_ray.tracking import Tracker, check_trackers, plan_tracking


@dataclass
class EvalResult:
    eval_dir: Path  # on this machine (for an object-store eval: its local mirror)
    summary: dict  # as summary.json
    judgments: pd.DataFrame
    samples: pd.DataFrame
    eval_uri: str = ""  # where the eval lives: str(eval_dir), or its s3:// (gs://, ...) URI

    def __post_init__(self):
        self.eval_uri = self.eval_uri or str(self.eval_dir)

    def win_rate(self, policy: str | None = None, judge: str | None = None) -> dict:
        """The result row for (policy, judge); defaults: the first of each."""
        for row in self.summary["results"]:
            if (policy in (None, row["policy"])) and (judge in (None, row["judge"])):
                return row
        raise KeyError((policy, judge))


def resolve_model(path: str) -> str:
    """A training run directory (a folder or a URI) means its ``final_model/``; anything else is
    used as given."""
    if storage.is_remote(path):
        final = storage.join(path, "final_model")
        return final if storage.exists(storage.join(final, "config.json")) or storage.exists(
            storage.join(final, "adapter_config.json")) else path
    final = Path(path).expanduser() / "final_model"
    return str(final.absolute()) if final.is_dir() else path


def judge_label(config: JudgeConfig) -> str:
    return config.label or (config.name if config.kind == "function" else f"{config.kind}:{config.name}")


class _JudgeActor:
    """Ray Data callable class: builds the judge once; (prompt, policy, baseline) -> verdicts."""

    def __init__(self, config: JudgeConfig):
        from dpo_ray.models import pick_device

        self.judge = build_judge(config, str(pick_device(config.pool.num_gpus_per_actor)))

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        got = self.judge.compare(batch["prompt_text"].tolist(), batch["policy_response"].tolist(),
                                 batch["baseline_response"].tolist())
        out = batch[["row"]].copy()
        out["verdict"] = [{"a": "policy", "b": "baseline", "tie": "tie"}[v] for v in got["verdict"]]
        out["policy_score"] = got.get("score_a", [np.nan] * len(out))
        out["baseline_score"] = got.get("score_b", [np.nan] * len(out))
        # Pairwise judges: what each order said ("first" / "second" / "tie"), to audit position bias.
        out["verdict_policy_first"] = got.get("verdict_a_first", [None] * len(out))
        out["verdict_baseline_first"] = got.get("verdict_b_first", [None] * len(out))
        return out


def run_judge(pairs: pd.DataFrame, config: JudgeConfig) -> pd.DataFrame:
    """Judgments for ``pairs`` (prompt_id, sample_index, prompt_text, policy_response,
    baseline_response) on the actor pool ``config.pool``: one row per pair, in ``pairs`` order.
    ``pairs`` may hold every policy's pairs: an eval starts one pool per judge, not one per
    (policy, judge), so a judge model loads once and a small judge's pool start-up (~3 s) is
    paid once."""
    rows = pairs[["prompt_text", "policy_response", "baseline_response"]].assign(row=np.arange(len(pairs)))
    judged = ray.data.from_pandas(rows).repartition(target_num_rows_per_block=config.batch_size).map_batches(
        _JudgeActor, fn_constructor_args=(config,), batch_format="pandas", batch_size=config.batch_size,
        **actor_pool_kwargs(config.pool, f"judge {judge_label(config)!r}",
                            blocks=math.ceil(len(pairs) / config.batch_size)))
    with progress(f"judging ({judge_label(config)})", len(pairs), "pairs") as bar:
        judged = counted(judged, bar).to_pandas().set_index("row").sort_index()
    if judged.index.tolist() != list(range(len(pairs))):  # (Arrow-backed: compare values)
        raise RuntimeError(f"judge {judge_label(config)!r} returned {len(judged)} verdicts for "
                           f"{len(pairs)} pairs")
    return pd.concat([pairs[["prompt_id", "sample_index"]].reset_index(drop=True),
                      judged.reset_index(drop=True)], axis=1)


def _samples(prompts: pd.DataFrame, model: str, config: EvalConfig, seed: int) -> pd.DataFrame:
    from dataclasses import replace

    gen = replace(config.generation, seed=seed)
    ds = ray.data.from_pandas(prompts[["prompt_id", "prompt_json"]])
    # One pool at a time: chained pools would each hold their CPUs, and Ray Data's per-operator
    # budget can then leave a multi-CPU actor unschedulable (a silent hang on a small machine).
    with progress(f"generating ({Path(model).name})", len(prompts) * gen.num_samples, "samples") as bar:
        samples = counted(generate(ds, model, gen), bar).materialize()
    if config.reference and model != config.reference:
        with progress("reference log-probs (KL)", samples.count(), "samples") as bar:
            frame = counted(score_samples(samples, config.reference, "ref_logp", gen), bar).to_pandas()
    else:
        frame = samples.to_pandas()
    if "ref_logp" not in frame:
        frame["ref_logp"] = frame["logp"] if model == config.reference else np.nan
    return frame.sort_values(["prompt_id", "sample_index"]).reset_index(drop=True)


def _baseline(prompts: pd.DataFrame, config: EvalConfig) -> tuple[str, pd.DataFrame]:
    """Baseline responses keyed by (prompt_id, sample_index)."""
    n = config.generation.num_samples
    if config.baseline == "chosen":
        if prompts["chosen"].isna().any():
            raise ValueError(f"baseline 'chosen' needs preference rows; {config.prompts} has "
                             f"{int(prompts['chosen'].isna().sum())} prompts without a chosen response")
        frame = prompts[["prompt_id", "chosen"]].rename(columns={"chosen": "response"})
        frame = frame.loc[frame.index.repeat(n)].assign(sample_index=np.tile(np.arange(n), len(frame)))
        frame["response_tokens"] = np.nan
        return "chosen", frame.reset_index(drop=True)
    model = config.reference if config.baseline == "reference" else resolve_model(config.baseline)
    if model is None:
        raise ValueError("baseline 'reference' needs eval.reference (a model folder or hub id)")
    # Another seed than the policies': a policy identical to the baseline must not produce the
    # very same samples (that would be all ties, not an honest 0.5).
    return model, _samples(prompts, model, config, config.generation.seed + 1)


def evaluate(config: EvalConfig) -> EvalResult:
    from dpo_ray.ray_env import init_ray

    # Checked before Ray starts and before any model loads: with nothing to compare, a run would
    # otherwise generate the baseline for minutes and then fail on an empty result table.
    for field in ("policies", "judges"):
        if not getattr(config, field):
            raise ValueError(f"eval.{field} is empty: name at least one (e.g. eval.{field}=[...] "
                             "or in the config file); `dpo-ray pipeline` fills eval.policies itself")
    for what, names in (("policies", config.policies), ("judges", [judge_label(j) for j in config.judges])):
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:  # results, judgments and the report are keyed by these names
            raise ValueError(f"eval.{what} names {twice} more than once; each must be distinct")
    check_function_judges(config.judges)
    check_trackers(config.report_to, "eval.report_to")  # before the work, not after it
    init_ray()
    name = config.name or time.strftime("eval-%Y%m%d-%H%M%S")
    uri = storage.join(config.output_dir, name)
    out = storage.local_dir(uri)
    if storage.is_remote(uri):  # a mirror left by an earlier eval of the same name is not this one
        shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "config.yaml")
    prompts, prompt_counts = load_prompts(config.prompts, config.held_out_fraction, config.limit,
                                           config.on_bad_row)
    print(f"eval: {prompt_counts['prompts']} prompts from {config.prompts} ({prompt_counts})", flush=True)

    baseline_id, baseline = _baseline(prompts, config)
    all_samples = [baseline.assign(role="baseline", model_id=baseline_id)]
    judgments, results, generated = [], [], []
    for policy_arg in config.policies:
        policy = resolve_model(policy_arg)
        print(f"eval: generating with {policy}", flush=True)
        samples = _samples(prompts, policy, config, config.generation.seed)
        all_samples.append(samples.assign(role="policy"))
        pairs = samples.merge(baseline[["prompt_id", "sample_index", "response", "response_tokens"]],
                              on=["prompt_id", "sample_index"], suffixes=("", "_baseline"),
                              validate="one_to_one")
        pairs = pairs.merge(prompts[["prompt_id", "prompt_text"]], on="prompt_id")
        pairs = pairs.rename(columns={"response": "policy_response", "response_baseline": "baseline_response"})
        generated.append((policy_arg, samples, pairs))
    # Every policy's pairs through each judge at once (one pool per judge), then split again.
    every_pair = pd.concat([pairs for _, _, pairs in generated], ignore_index=True)
    verdicts = [run_judge(every_pair, judge_config) for judge_config in config.judges]
    start = 0
    for policy_arg, samples, pairs in generated:
        kl = float((samples["logp"] - samples["ref_logp"]).mean()) if config.reference else None
        for judge_config, every_verdict in zip(config.judges, verdicts):
            label = judge_label(judge_config)
            judged = every_verdict.iloc[start:start + len(pairs)].reset_index(drop=True)
            rate = stats.win_rate(judged["verdict"], judged["prompt_id"], config.confidence,
                                  config.n_resamples, config.bootstrap_seed)
            results.append({
                "policy": policy_arg, "judge": label, "baseline": config.baseline, **rate,
                "policy_mean_score": _mean(judged["policy_score"]),
                "baseline_mean_score": _mean(judged["baseline_score"]),
                "policy_mean_tokens": float(pairs["response_tokens"].mean()),
                "baseline_mean_tokens": _mean(pairs["response_tokens_baseline"]),
                "policy_mean_chars": float(pairs["policy_response"].str.len().mean()),
                # cut at max_new_tokens, not ended by EOS: a share that differs between policy and
                # baseline makes length, not content, a candidate reason for a win
                "policy_truncated": _cut_share(samples),
                "baseline_truncated": _cut_share(baseline),
                "baseline_mean_chars": float(pairs["baseline_response"].str.len().mean()),
                "kl_to_reference": kl,
            })
            print(_line(results[-1]), flush=True)
            judgments.append(pairs[["prompt_id", "sample_index", "prompt_text", "policy_response",
                                    "baseline_response"]].merge(judged, on=["prompt_id", "sample_index"])
                             .assign(policy=policy_arg, judge=label))
        start += len(pairs)
    summary = {"eval_dir": uri, "prompts": prompt_counts, "baseline": config.baseline,
               "baseline_model": baseline_id, "generation": _gen_dict(config), "results": results}
    judgments = pd.concat(judgments, ignore_index=True)
    samples = pd.concat(all_samples, ignore_index=True)
    judgments.to_parquet(out / "judgments.parquet", index=False)
    samples.to_parquet(out / "samples.parquet", index=False)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    from dpo_ray.eval.report import write_report

    write_report(summary, judgments, out)
    print(f"eval report: {out / 'report.md'}", flush=True)
    if config.report_to:
        tracking = plan_tracking(config.report_to, uri, out.name, config.project,
                                 config.tracking_uri, config.output_dir, "eval.report_to")
        track_eval(Tracker(tracking, config_dict(config)), summary, out)
    storage.publish(out, uri)
    return EvalResult(out, summary, judgments, samples, uri)


def track_eval(tracker: Tracker, summary: dict, eval_dir: Path, step: int = 0) -> None:
    """The summary's win rates as metrics, the report files as artifacts under ``eval/``; ends
    the tracked run."""
    from dpo_ray.eval.report import summary_metrics

    tracker.log_metrics(summary_metrics(summary), step)
    for name in ("summary.json", "report.md", "winrate.png"):
        if (eval_dir / name).exists():
            tracker.log_artifact(eval_dir / name)
    tracker.close("FINISHED")


def _cut_share(samples: pd.DataFrame) -> float | None:
    """Share of samples that hit max_new_tokens (None for a baseline without token ids, e.g.
    given responses)."""
    if "finished" not in samples or samples["finished"].isna().all():
        return None
    return float(1.0 - samples["finished"].astype(bool).mean())


def _mean(series: pd.Series) -> float | None:
    value = pd.to_numeric(series, errors="coerce").mean()
    return None if pd.isna(value) else float(value)


def _gen_dict(config: EvalConfig) -> dict:
    from dataclasses import asdict

    return asdict(config.generation)


def _line(r: dict) -> str:
    kl = f", KL {r['kl_to_reference']:.3f} nats" if r["kl_to_reference"] is not None else ""
    return (f"eval: {r['policy']} vs {r['baseline']} under {r['judge']}: win rate "
            f"{r['win_rate']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}] "
            f"(W/T/L {r['wins']}/{r['ties']}/{r['losses']}){kl}"
            + (f", {r['policy_truncated']:.0%} of policy samples cut at max_new_tokens"
               if r.get("policy_truncated") is not None else ""))
