"""Controlled-sentiment DPO (the DPO paper's IMDb experiment in miniature), with iterative rounds.

Each round:
1. the **current policy** samples ``samples_per_prompt`` continuations of every training prompt
   (generation actor pool);
2. the **training judge** (a packaged sentiment lexicon) scores them; per prompt the best and the
   worst become a pair (rejection sampling), near-ties (gap < ``min_score_gap``) are skipped, and
   the scores stay in the pairs file;
3. reference log-probs for the new pairs are computed once on the reference actor pool (the
   reference is the original model, or the previous round's policy with ``reference: previous``);
4. DPO on Ray Train from the current policy.
Finally every round's policy is evaluated on held-out prompts against the original model, under
the training judge **and** a second judge it never trained on (a gap between them exposes reward
hacking), with KL to the original model, and a report (Markdown + PNG) is written.

Why ``reference: initial`` by default: the win rate and KL are measured against the original model,
and keeping the same anchor keeps every round's objective the KL-regularised one the DPO paper
derives, relative to that model; a moving reference lets drift compound round after round (it
regularises only the last step) and makes each round's rewards incomparable.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import time
from dataclasses import asdict, field, replace
from pathlib import Path
from typing import Annotated, Literal

import pandas as pd
from pydantic import Field
from pydantic.dataclasses import dataclass

from dpo_ray.config import (STRICT, DataConfig, EvalConfig, GenerationConfig, JudgeConfig,
                            NonNegative, Pool, PositiveInt, ReferenceConfig, RunConfig, TrainConfig,
                            load_config, local_dir, merge_trees, read_yaml,
                            save_config)

INSTRUCTION = "Continue this movie review with one more sentence:\n\n{prefix}"


@dataclass(config=STRICT)
class SentimentConfig:
    model: str | None = None  # None: SmolLM2-135M-Instruct, exported from its PyPI package
    # Review text to take openings from, one per line (``__label__x`` tags are dropped), or a
    # data file whose rows' prompts are used as they are (e.g. a preference file); None: gensim's
    # packaged Pang & Lee sentences (200 real movie-review sentences).
    prompts_file: str | None = None
    prefix_words: PositiveInt = 6
    held_out_prompts: PositiveInt = 48
    max_prompts: PositiveInt | None = None  # cap on prompts read (train + held out)
    rounds: PositiveInt = 2
    reference: Literal["initial", "previous"] = "initial"
    # The training reward (its scores pick best vs worst) and a judge never trained on; each runs
    # on its own actor pool (``pool``), which builds the judge once per actor.
    train_judge: JudgeConfig = field(default_factory=lambda: JudgeConfig(kind="function", name="vader"))
    check_judge: JudgeConfig = field(default_factory=lambda: JudgeConfig(kind="function", name="textblob"))
    samples_per_prompt: Annotated[int, Field(ge=2)] = 4  # best vs worst needs two
    min_score_gap: NonNegative = 0.1
    generation: GenerationConfig = field(default_factory=lambda: GenerationConfig(
        max_new_tokens=20, temperature=1.0, batch_size=32, pool=Pool(num_cpus_per_actor=2.0)))
    eval_samples_per_prompt: PositiveInt = 2
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        beta=0.1, learning_rate=2e-5, lr_scheduler_type="constant", num_train_epochs=1,
        per_device_train_batch_size=4, num_workers=2))
    # Each round's data and reference stages (source, tokenizer and model are filled per round).
    max_length: PositiveInt = 256
    max_prompt_length: PositiveInt = 128
    reference_batch_size: PositiveInt = 32
    reference_pool: Pool = field(default_factory=lambda: Pool(num_cpus_per_actor=2.0))
    reference_cache_dir: str = "~/.cache/dpo_ray/reference"  # shared with every other run
    output_dir: str = "runs/sentiment"


SIZES = {
    # Finishes on 2 CPU cores in about 15-20 minutes (numbers in the README).
    "default": {},
    # The same code path in a few minutes, for CI: fewer prompts, shorter samples, still 2 rounds.
    "quick": {"max_prompts": 24, "held_out_prompts": 8, "samples_per_prompt": 2,
              "eval_samples_per_prompt": 1,
              "generation": {"max_new_tokens": 8}},
}


def sized(size: str = "default", overrides: list[str] | None = None,
          path: str | Path | None = None, cls: type = SentimentConfig, sizes: dict = SIZES):
    """The defaults of ``cls``, the YAML at ``path`` over them (``jobs/sentiment.yaml`` lists every
    field), the named size's changes, then ``key=value`` overrides (``rounds=3``, ``train.beta=0.2``)."""
    if size not in sizes:
        raise ValueError(f"unknown size {size!r}; choose from {sorted(sizes)}")
    tree = merge_trees(asdict(cls()), read_yaml(path) if path else {})
    return load_config(cls, overrides=overrides, defaults=merge_trees(tree, sizes[size]))


def pang_lee_sentences() -> Path:
    """gensim's packaged Pang & Lee file, found without importing gensim (it is not needed)."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the default prompts come from gensim's test data: "
                                "pip install gensim (or pass prompts_file)")
    return Path(spec.submodule_search_locations[0]) / "test" / "test_data" / "pang_lee_polarity.cor"


def read_prompts(config: SentimentConfig) -> tuple[list[list[dict]], list[list[dict]]]:
    """(train, held-out) prompts as chat messages, split by hash of the prompt (stable across runs).

    A text file gives review openings (the first ``prefix_words`` words of each line) wrapped in
    ``INSTRUCTION``; a data file (JSONL/JSON/Parquet/CSV, e.g. a preference file) gives its rows'
    prompts as they are (text becomes a user turn; messages stay messages).
    """
    from dpo_ray.data.sources import EXTENSIONS

    path = Path(config.prompts_file) if config.prompts_file else pang_lee_sentences()
    keyed = {}  # split key -> messages; the key is the review opening, or the prompt as JSON
    if str(path).endswith(EXTENSIONS):
        from dpo_ray.eval.prompts import load_prompts

        frame, _ = load_prompts(str(path), on_bad_row="skip")
        for prompt in map(json.loads, frame["prompt_json"]):
            messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            keyed.setdefault(json.dumps(messages), messages)
    else:
        for line in path.read_text(encoding="latin-1").splitlines():
            words = [w for w in line.split() if not w.startswith("__label__")]
            if len(words) >= 2:  # something left to continue
                prefix = " ".join(words[:min(config.prefix_words, len(words) - 1)])
                keyed.setdefault(prefix, _messages(prefix))
    keys = list(keyed)[:config.max_prompts]
    if len(keys) <= config.held_out_prompts:
        raise ValueError(f"{path}: {len(keys)} prompts, need more than held_out_prompts="
                         f"{config.held_out_prompts}")
    held = set(sorted(keys, key=lambda k: hashlib.sha256(k.encode()).hexdigest())[:config.held_out_prompts])
    return [keyed[k] for k in keys if k not in held], [keyed[k] for k in keys if k in held]


def _messages(prefix: str) -> list[dict]:
    return [{"role": "user", "content": INSTRUCTION.format(prefix=prefix)}]


def sample_and_score(policy: str, prompts: list[list[dict]], config: SentimentConfig,
                     seed: int) -> pd.DataFrame:
    """``samples_per_prompt`` samples per prompt from the pool, scored by the training judge."""
    import ray

    from dpo_ray.console import counted, progress
    from dpo_ray.eval.generate import generate
    from dpo_ray.eval.prompts import prompt_id
    from dpo_ray.ray_env import actor_pool_kwargs

    judge = config.train_judge
    frame = pd.DataFrame({"prompt_json": [json.dumps(p) for p in prompts],
                          "prompt_id": [prompt_id(p) for p in prompts],
                          "prompt_index": range(len(prompts))})
    gen = replace(config.generation, num_samples=config.samples_per_prompt, seed=seed)
    with progress("sampling", len(frame) * gen.num_samples, "samples") as bar:
        samples = counted(generate(ray.data.from_pandas(frame), policy, gen), bar).materialize()
    scored = samples.map_batches(
        _ScoreSamples, fn_constructor_args=(judge,), batch_format="pandas",
        batch_size=judge.batch_size, **actor_pool_kwargs(judge.pool, "training judge"))
    with progress(f"scoring ({judge.name})", len(frame) * gen.num_samples, "samples") as bar:
        scored = counted(scored, bar).to_pandas()
    # In prompt order, not in the order Ray's tasks finished: pairs.jsonl (and so the reference
    # cache key and the order training reads the pairs in) must be the same in every run.
    ordered = scored.merge(frame, on="prompt_id").sort_values(["prompt_index", "sample_index"])
    return ordered.drop(columns="prompt_index").reset_index(drop=True)


class _ScoreSamples:
    """Ray Data callable class: the training judge, built once per actor, scores every sample
    (a score judge: best vs worst needs a number per sample, not a pairwise verdict)."""

    def __init__(self, judge: JudgeConfig):
        from dpo_ray.eval.judges import build_judge
        from dpo_ray.models import pick_device

        self.judge = build_judge(judge, str(pick_device(judge.pool.num_gpus_per_actor)))
        if self.judge.pairwise:
            raise ValueError(f"train_judge {judge.name!r} is pairwise; the recipe needs a score "
                             "judge, (prompt, response) -> score")

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        batch["score"] = self.judge.scores([""] * len(batch), batch["response"].tolist())
        return batch


def best_vs_worst(samples: pd.DataFrame, min_gap: float) -> tuple[list[dict], dict]:
    """Per prompt: the highest-scoring sample is chosen, the lowest rejected (conversational rows
    for the data stage, scores kept). Returns rows and counts (pairs, skipped near-ties/duplicates
    and prompts with fewer than two non-empty samples, empty samples left out)."""
    rows, near_ties = [], 0
    # A sample that is empty (the model ended at once) is no response to prefer or reject: the
    # data stage refuses such a pair, so it never becomes best or worst.
    empty = samples["response"].str.strip() == ""
    for _, group in samples[~empty].groupby("prompt_id", sort=False):
        group = group.sort_values("score", kind="stable")
        worst, best = group.iloc[0], group.iloc[-1]
        if best.score - worst.score < min_gap or best.response.strip() == worst.response.strip():
            near_ties += 1
            continue
        rows.append({"prompt": json.loads(best.prompt_json),
                     "chosen": [{"role": "assistant", "content": best.response}],
                     "rejected": [{"role": "assistant", "content": worst.response}],
                     "score_chosen": float(best.score), "score_rejected": float(worst.score)})
    return rows, {"pairs": len(rows), "skipped_near_ties": near_ties, "empty_samples": int(empty.sum())}


def round_pairs(policy: str, prompts: list[list[dict]], config: SentimentConfig, seed: int,
                folder: Path, what: str, max_pairs: int | None = None) -> tuple[dict, float]:
    """Sample, score and pair (best vs worst) into ``folder``: ``samples.parquet`` and
    ``pairs.jsonl`` (the first ``max_pairs`` pairs in prompt order, when given). Returns the pair
    counts and the mean training-judge score of the samples."""
    folder.mkdir(parents=True, exist_ok=True)
    samples = sample_and_score(policy, prompts, config, seed=seed)
    samples.drop(columns=["prompt_input_ids", "response_input_ids"]).to_parquet(folder / "samples.parquet")
    pairs, counts = best_vs_worst(samples, config.min_score_gap)
    if max_pairs is not None:
        if len(pairs) < max_pairs:
            raise ValueError(f"{what}: {len(pairs)} pairs ({counts['skipped_near_ties']} near-ties "
                             f"skipped), fewer than the {max_pairs} each round needs: lower "
                             "pairs_per_round or min_score_gap, or add prompts")
        pairs, counts = pairs[:max_pairs], dict(counts, pairs=max_pairs, unused=len(pairs) - max_pairs)
    (folder / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    mean_score = float(samples["score"].mean())
    print(f"{what}: mean {config.train_judge.name} score of the policy's samples {mean_score:.3f}; "
          f"{counts['pairs']} pairs, {counts['skipped_near_ties']} near-ties skipped"
          + (f", {counts['empty_samples']} empty samples left out" if counts["empty_samples"] else ""),
          flush=True)
    return counts, mean_score


def dpo_run_config(config: SentimentConfig, pairs: Path, tokenizer: str, reference: str,
                   train: TrainConfig) -> RunConfig:
    """A round's data, reference and training settings for its ``pairs.jsonl``."""
    return RunConfig(
        data=DataConfig(source=str(pairs), tokenizer=tokenizer, format="conversational",
                        max_length=config.max_length, max_prompt_length=config.max_prompt_length),
        reference=ReferenceConfig(model=reference, batch_size=config.reference_batch_size,
                                  pool=config.reference_pool, cache_dir=config.reference_cache_dir),
        train=train)


def start_experiment(config: SentimentConfig, name: str) -> tuple[Path, str, list, list]:
    """Checks the judges' packages, makes ``<output_dir>/<name>-<time>/`` with the config and the
    held-out prompts in it, starts Ray. Returns (folder, original model, train and held-out prompts)."""
    from dpo_ray.assets import smollm2_path
    from dpo_ray.eval.judges import check_function_judges
    from dpo_ray.ray_env import init_ray

    check_function_judges([config.train_judge, config.check_judge])  # the [demo] extra
    out = local_dir(config.output_dir, "output_dir") / time.strftime(f"{name}-%Y%m%d-%H%M%S")
    out.mkdir(parents=True)
    save_config(config, out / f"{name}_config.yaml")
    initial = config.model or str(smollm2_path())
    init_ray()
    train_prompts, held_prompts = read_prompts(config)
    (out / "held_out_prompts.jsonl").write_text(
        "".join(json.dumps({"prompt": p}) + "\n" for p in held_prompts))
    return out, initial, train_prompts, held_prompts


def eval_judges(config: SentimentConfig) -> list[JudgeConfig]:
    """The training judge and the judge never trained on, labelled as the reports name them."""
    return [replace(config.train_judge, label=config.train_judge.label or f"{config.train_judge.name} (trained on)"),
            replace(config.check_judge, label=config.check_judge.label or f"{config.check_judge.name} (held-out judge)")]


def job_main(argv: list[str] | None, doc: str, cls: type, sizes: dict, run,
             default_config: str | None = None) -> int:
    """A recipe's command line (jobs/main.py, jobs/frontier.py): ``--config``, ``--size``,
    ``--verbose`` and ``key=value`` overrides of ``cls``; bad settings print one line, exit 2."""
    import argparse
    import os

    from dpo_ray.cli import report_user_errors
    from dpo_ray.console import VERBOSE_ENV

    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--config", default=default_config,
                        help=f"YAML with {cls.__name__} fields (default: {default_config or 'none'})")
    parser.add_argument("--size", default="default", choices=sorted(sizes),
                        help="changes applied over the YAML (quick: the same path in minutes)")
    parser.add_argument("--verbose", action="store_true",
                        help="show Ray's own logs and every worker's output (DPO_RAY_VERBOSE=1)")
    parser.add_argument("overrides", nargs="*", help=f"key=value for {cls.__name__} fields")
    args = parser.parse_args(argv)
    if args.verbose:
        os.environ[VERBOSE_ENV] = "1"

    def job() -> int:
        run(sized(args.size, args.overrides, args.config, cls, sizes))
        return 0

    return report_user_errors(job)


def run(config: SentimentConfig) -> Path:
    """The whole experiment; returns the report's path."""
    from dpo_ray.eval import evaluate
    from dpo_ray.training import train

    started = time.perf_counter()
    out, initial, train_prompts, held_prompts = start_experiment(config, "sentiment")
    step = _progress(started, 3 * config.rounds + 1)
    print(f"{len(train_prompts)} training prompts, {len(held_prompts)} held out; model {initial}",
          flush=True)

    policy, reference, rounds = initial, initial, []
    for r in range(1, config.rounds + 1):
        folder = out / f"round_{r}"
        folder.mkdir()
        step(f"round {r}: sampling {config.samples_per_prompt} per prompt from {Path(policy).name}")
        counts, mean_score = round_pairs(policy, train_prompts, config, config.generation.seed + r,
                                         folder, f"round {r}")

        step(f"round {r}: reference values (reference {Path(reference).name}) and DPO")
        result = train(dpo_run_config(config, folder / "pairs.jsonl", initial, reference,
                                      replace(config.train, model=policy, output_dir=str(out),
                                              run_name=f"round_{r}/dpo")))
        last = result.metrics[-1]
        rounds.append({"round": r, "policy": str(result.run_dir), "reference": reference,
                       "sample_mean_score": mean_score, **counts,
                       "final_loss": last["loss"], "final_rewards/accuracies": last["rewards/accuracies"],
                       "final_rewards/margins": last["rewards/margins"]})
        policy = str(result.final_model)
        if config.reference == "previous":
            reference = policy
        step(f"round {r} done")

    step("evaluating every round's policy on held-out prompts against the original model")
    judges = eval_judges(config)
    result = evaluate(EvalConfig(
        prompts=str(out / "held_out_prompts.jsonl"), policies=[r["policy"] for r in rounds],
        reference=initial, baseline="reference", judges=judges, output_dir=str(out), name="eval",
        generation=replace(config.generation, num_samples=config.eval_samples_per_prompt)))
    report = write_report(out, config, rounds, result, time.perf_counter() - started)
    print(f"done in {(time.perf_counter() - started) / 60:.1f} min\nreport: {report}\n"
          f"trained model: {policy}", flush=True)
    return report


def _progress(started: float, total: int):
    count = [0]

    def step(message: str) -> None:
        count[0] += 1
        print(f"[{count[0]}/{total} {time.perf_counter() - started:6.0f}s] {message}", flush=True)

    return step


def write_report(out: Path, config: SentimentConfig, rounds: list[dict], result, seconds: float) -> Path:
    from dpo_ray.eval.report import _short, plot_win_rates, results_table

    names = {r["policy"]: f"round {r['round']}" for r in rounds}
    results = [dict(r, policy=names[r["policy"]]) for r in result.summary["results"]]
    plot_win_rates(results, out / "report.png", title="held-out win rate vs the original model")
    samples = result.samples
    base = samples[samples.role == "baseline"].set_index(["prompt_id", "sample_index"])
    last = samples[(samples.role == "policy") & (samples.model_id == samples[samples.role == "policy"]
                                                 .model_id.iloc[-1])]
    lines = [
        "# Controlled-sentiment DPO", "",
        f"Model {Path(rounds[0]['reference']).name}; {config.rounds} round(s), reference "
        f"`{config.reference}`; judges: {config.train_judge.name} (training reward) and "
        f"{config.check_judge.name} (never trained on). {seconds / 60:.1f} minutes.", "",
        "## Held-out win rate against the original model", "",
        results_table(results), "", "![report](report.png)", "",
        "## Rounds", "", "| round | mean train-judge score of samples | pairs | near-ties skipped | "
        "final loss | rewards/accuracies | rewards/margins |", "|---|---|---|---|---|---|---|"]
    for r in rounds:
        lines.append(f"| {r['round']} | {r['sample_mean_score']:.3f} | {r['pairs']} | "
                     f"{r['skipped_near_ties']} | {r['final_loss']:.4f} | "
                     f"{r['final_rewards/accuracies']:.2f} | {r['final_rewards/margins']:.4f} |")
    lines += ["", "## Samples before (original model) and after (last round)", ""]
    for row in last.head(4).itertuples():
        before = base.loc[(row.prompt_id, row.sample_index), "response"]
        lines += [f"- before: {_short(before)}", f"  after: {_short(row.response)}"]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    (out / "summary.json").write_text(json.dumps({"config": asdict(config), "rounds": rounds,
                                                  "eval": results, "minutes": seconds / 60}, indent=2))
    return path
