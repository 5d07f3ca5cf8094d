"""``dpo-ray`` command line: one subcommand per stage (data, reference, train, eval) and the pipeline.

Each takes ``--config run.yaml`` (the stage reads its own section, e.g. ``data:``) and
``key=value`` overrides such as ``data.max_length=256``, or the same as TRL-style flags
(``--beta 0.1``, ``--train.beta=0.1``). ``dpo-ray <command> --help`` lists every field.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict

from dpo_ray import storage
from dpo_ray.cli_fields import FlagError, flags_to_overrides, help_text
from dpo_ray.console import VERBOSE_ENV
from dpo_ray.config import DataConfig, EvalConfig, RunConfig, load_config, save_config
from dpo_ray.data.errors import BAD_ROW_REASONS, PreferenceDataError
from dpo_ray.preflight import (
    USER_ERRORS, check_data_source, check_eval_paths, check_model_path, check_paths,
    check_writable_dir,
)


def _overrides(args: argparse.Namespace) -> list[str]:
    """Shortcut flags become overrides (explicit ``key=value`` arguments win, being later)."""
    shortcuts = {"data": "data.source", "tokenizer": "data.tokenizer", "model": "reference.model"}
    extra = [f"{key}={getattr(args, flag)}" for flag, key in shortcuts.items()
             if getattr(args, flag, None)]
    if getattr(args, "model", None) and not getattr(args, "tokenizer", None):
        extra.append(f"data.tokenizer={args.model}")  # a model folder carries its tokenizer
    return extra + list(args.overrides)


def _data(args: argparse.Namespace) -> int:
    from dpo_ray.data import prepare_pairs, write_pairs
    from dpo_ray.ray_env import init_ray

    config = load_config(DataConfig, args.config, _overrides(args), section="data")
    check_data_source(config.source, "data.source", config.file_format)
    check_model_path(config.tokenizer, "data.tokenizer", need_config=False)
    if args.output:
        check_writable_dir(args.output, "--output")
    init_ray(args.address)
    pairs, report = prepare_pairs(config)
    print(report.summary())
    if args.output:
        where = write_pairs(pairs, report, config, args.output)
        print(f"wrote {report.pairs} pairs to {where} (report: {where.parent / 'data_report.json'})")
    if args.show:
        for row in pairs.take(args.show):
            print(json.dumps({k: row[k] for k in ("pair_id", "source_file", "source_row",
                                                  "prompt_length", "chosen_length",
                                                  "rejected_length")}))
    if args.json:
        print(json.dumps(asdict(report)))
    return 0


def _reference(args: argparse.Namespace) -> int:
    from dpo_ray.ray_env import init_ray
    from dpo_ray.reference import ensure_reference

    config = load_config(RunConfig, args.config, _overrides(args))
    check_paths(config)
    if args.output:
        check_writable_dir(args.output, "--output")
    init_ray(args.address)
    result = ensure_reference(config.data, config.reference)
    if args.output:  # the resolved config and what was used, beside any run that asks for it
        from pathlib import Path

        out = Path(args.output)
        out.mkdir(parents=True, exist_ok=True)
        save_config(config, out / "config.yaml")
        (out / "reference.json").write_text(json.dumps(
            {"key": result.key, "path": result.path, "rows": result.rows,
             "cache_hit": result.cache_hit}, indent=2))
    return 0


def _train(args: argparse.Namespace) -> int:
    from dpo_ray.training import train

    config = load_config(RunConfig, args.config, _overrides(args))
    from dpo_ray.ray_env import init_ray

    check_paths(config)
    init_ray(args.address)
    result = train(config)
    last = result.metrics[-1] if result.metrics else {}
    print(json.dumps({"run_dir": result.run_uri, "final_model": storage.join(result.run_uri, "final_model"),
                      **{k: last[k] for k in ("step", "loss", "rewards/accuracies") if k in last}}))
    return 0


def _pipeline(args: argparse.Namespace) -> int:
    from dpo_ray.pipeline import run_pipeline
    from dpo_ray.ray_env import init_ray

    config = load_config(RunConfig, args.config, _overrides(args))
    check_paths(config)
    init_ray(args.address)
    print(json.dumps(run_pipeline(config)))
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from dpo_ray.ray_env import init_ray
    from dpo_ray.sweep import SweepTrialsFailed, sweep

    config = load_config(RunConfig, args.config, _overrides(args))
    if config.sweep is None:
        raise ValueError("no sweep section: give the train fields to vary, e.g. "
                         "sweep.grid.beta=[0.05,0.1] (docs: dpo-ray sweep --help)")
    check_paths(config)
    init_ray(args.address)
    try:
        result = sweep(config)
    except SweepTrialsFailed as err:  # the table is written; each trial's error is in it
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(json.dumps({"sweep_dir": str(result.sweep_dir), "best": result.summary["best"],
                      "reference": result.summary["reference"]}, default=str))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from dpo_ray.eval import evaluate
    from dpo_ray.ray_env import init_ray

    overrides = list(args.overrides)
    if args.prompts:
        overrides.append(f"eval.prompts={args.prompts}")
    if args.policy:
        overrides.append(f"eval.policies={json.dumps(args.policy)}")
    config = load_config(EvalConfig, args.config, overrides, section="eval")
    check_eval_paths(config)
    init_ray(args.address)
    result = evaluate(config)
    print(json.dumps({"eval_dir": result.eval_uri, "results": [
        {k: r[k] for k in ("policy", "judge", "win_rate", "ci_low", "ci_high", "kl_to_reference")}
        for r in result.summary["results"]]}))
    return 0


def _pair_accuracy(args: argparse.Namespace) -> int:
    from dpo_ray.eval.pairs import pair_accuracy

    print(json.dumps(pair_accuracy(args.run_dir, args.model, args.actors, address=args.address)))
    return 0


# Which config each subcommand reads (class, YAML section): its --help lists these fields and its
# --flags name them.
CONFIGS = {"data": (DataConfig, "data"), "reference": (RunConfig, None), "train": (RunConfig, None),
           "pipeline": (RunConfig, None), "sweep": (RunConfig, None), "eval": (EvalConfig, "eval")}
# TRL DPOConfig / script names that mean a field here (see docs/trl.md).
TRL_FLAGS = {"warmup_ratio": "train.warmup_ratio", "optim": "train.optim",
             "precompute_ref_log_probs": "train.precompute_ref_log_probs",
             "output_dir": "train.output_dir", "report_to": "train.report_to",
             "dataset_train_split": "data.hf_split", "dataset_config": "data.hf_name"}


def _add_parser(sub, name: str, help: str) -> argparse.ArgumentParser:
    cls, section = CONFIGS[name]
    return sub.add_parser(name, help=help, description=help, epilog=help_text(cls, section),
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def _stage_parser(sub, name, help, config_help, model_help, overrides_help, run):
    """A subcommand that reads a whole RunConfig: --config, the shortcut flags, overrides."""
    stage = _add_parser(sub, name, help)
    stage.add_argument("--config", help=config_help)
    stage.add_argument("--data", "--dataset_name", help="shortcut for data.source")
    stage.add_argument("--model", "--model_name_or_path", help=model_help)
    stage.add_argument("--tokenizer", help="shortcut for data.tokenizer")
    stage.add_argument("overrides", nargs="*", help=overrides_help)
    stage.set_defaults(run=run)
    return stage


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dpo-ray", description=__doc__.splitlines()[0])
    parser.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS or local)")
    parser.add_argument("--verbose", action="store_true",
                        help="show Ray's own logs and every worker's output (DPO_RAY_VERBOSE=1)")
    sub = parser.add_subparsers(dest="command", required=True)

    data = _add_parser(sub, "data", "read, validate and tokenize preference pairs; print the report")
    data.add_argument("--config", help="YAML file with a `data:` section")
    data.add_argument("--data", help="shortcut for data.source (file, dir, glob, URI, or a hub "
                      "dataset: owner/name or hf://owner/name)")
    data.add_argument("--tokenizer", help="shortcut for data.tokenizer (folder or hub id)")
    data.add_argument("--output", help="write pairs/ (Parquet), data_report.json, data_config.yaml here")
    data.add_argument("--show", type=int, default=0, help="print the first N pairs' ids and lengths")
    data.add_argument("--json", action="store_true", help="also print the report as one JSON line")
    data.add_argument("overrides", nargs="*", help="key=value, e.g. data.max_length=256")
    data.set_defaults(run=_data)

    ref = _stage_parser(sub, "reference", "score every pair with the reference model once and "
                        "cache the values (reused when already cached)",
                        "YAML file with `data:` and `reference:` sections",
                        "shortcut for reference.model (and data.tokenizer if unset)",
                        "key=value, e.g. reference.pool.max_actors=4", _reference)
    ref.add_argument("--output", help="write config.yaml and reference.json (cache key, path) here")
    _stage_parser(sub, "train", "DPO on Ray Train (computes the reference cache if missing)",
                  "YAML file with data:, reference: and train: sections",
                  "shortcut for reference.model (policy starts from it)",
                  "key=value, e.g. train.beta=0.1 train.num_workers=2", _train)
    _stage_parser(sub, "pipeline", "data -> reference -> train -> pair accuracy -> win rate, as one job",
                  "YAML file with data:, reference:, train: and (optional) eval: sections",
                  "shortcut for reference.model (policy starts from it)",
                  "key=value, e.g. train.max_steps=10 eval.limit=50", _pipeline)

    _stage_parser(sub, "sweep", "Ray Tune trials over train fields (sweep: section), every trial "
                  "on one cached reference pass",
                  "YAML file with data:, reference:, train: and sweep: sections",
                  "shortcut for reference.model (policy starts from it)",
                  "key=value, e.g. sweep.grid.beta=[0.05,0.1] train.max_steps=20", _sweep)

    ev = _add_parser(sub, "eval", "win rate of policies against a baseline under judges")
    ev.add_argument("--config", help="YAML file with an `eval:` section (docs/eval.md)")
    ev.add_argument("--prompts", help="shortcut for eval.prompts")
    ev.add_argument("--policy", action="append", help="a policy model or run dir (repeatable)")
    ev.add_argument("overrides", nargs="*", help="key=value, e.g. eval.limit=100")
    ev.set_defaults(run=_eval)

    acc = sub.add_parser("pair-accuracy", help="held-out pairwise accuracy (with CI) of a DPO or "
                         "reward-model training run")
    acc.add_argument("run_dir")
    acc.add_argument("--model", help="a checkpoint folder (default: RUN_DIR/final_model)")
    acc.add_argument("--actors", type=int, default=1)
    acc.set_defaults(run=_pair_accuracy)
    return parser


def report_user_errors(call) -> int:
    """Run ``call()``. Anything the user can fix (bad data, a bad setting, a path, a resource the
    cluster lacks) is printed as one ``error:`` line with exit 2, also when it was raised inside
    a Ray task, actor or train worker. Set DPO_RAY_TRACEBACK=1 to see the full trace."""
    try:
        return call()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - sorted below: user errors print, bugs re-raise
        from dpo_ray.ray_env import root_cause

        cause = root_cause(err)
        if os.environ.get("DPO_RAY_TRACEBACK") == "1" or not isinstance(cause, USER_ERRORS):
            raise
        print(f"error: {cause}", file=sys.stderr)
        if isinstance(cause, PreferenceDataError) and cause.reason in BAD_ROW_REASONS:
            print("(set data.on_bad_row=skip to drop and count such rows)", file=sys.stderr)
        return 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """argparse, after the config flags (``--beta 0.1``) of the subcommand became overrides."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((i for i, a in enumerate(argv) if a in CONFIGS), None)
    if command is None or "-h" in argv or "--help" in argv:
        return parser.parse_args(argv)
    cls, section = CONFIGS[argv[command]]
    subparser = parser._subparsers._group_actions[0].choices[argv[command]]
    try:
        kept, overrides = flags_to_overrides(argv[command + 1:], cls, section,
                                             set(subparser._option_string_actions),
                                             TRL_FLAGS if cls is RunConfig else None)
    except FlagError as err:
        subparser.error(str(err))
    args = parser.parse_args(argv[:command + 1] + kept)
    args.overrides = list(args.overrides) + overrides  # flags after key=value args: flags win
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.verbose:
        os.environ[VERBOSE_ENV] = "1"
    return report_user_errors(lambda: args.run(args))


if __name__ == "__main__":
    sys.exit(main())
