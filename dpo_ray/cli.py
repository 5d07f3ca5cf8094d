"""``dpo-ray`` command line: one subcommand per stage (data; reference, train, eval follow).

Each takes ``--config run.yaml`` (the stage reads its own section, e.g. ``data:``) and
``key=value`` overrides such as ``data.max_length=256``.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from dpo_ray.config import DataConfig, load_config


def _data(args: argparse.Namespace) -> int:
    from dpo_ray.data import BadRow, prepare_pairs, write_pairs
    from dpo_ray.ray_env import init_ray

    overrides = list(args.overrides)
    if args.data:
        overrides.append(f"data.source={args.data}")
    if args.tokenizer:
        overrides.append(f"data.tokenizer={args.tokenizer}")
    config = load_config(DataConfig, args.config, overrides, section="data")
    init_ray(args.address)
    try:
        pairs, report = prepare_pairs(config)
    except BadRow as bad:
        print(f"error: {bad}\n(set data.on_bad_row=skip to drop and count such rows)",
              file=sys.stderr)
        return 2
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dpo-ray", description=__doc__.splitlines()[0])
    parser.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS or local)")
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="read, validate and tokenize preference pairs; print the report")
    data.add_argument("--config", help="YAML file with a `data:` section")
    data.add_argument("--data", help="shortcut for data.source (file, dir, glob, URI or hf://id)")
    data.add_argument("--tokenizer", help="shortcut for data.tokenizer (folder or hub id)")
    data.add_argument("--output", help="write pairs/ (Parquet), data_report.json, data_config.yaml here")
    data.add_argument("--show", type=int, default=0, help="print the first N pairs' ids and lengths")
    data.add_argument("--json", action="store_true", help="also print the report as one JSON line")
    data.add_argument("overrides", nargs="*", help="key=value, e.g. data.max_length=256")
    data.set_defaults(run=_data)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
