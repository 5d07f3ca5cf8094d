"""The main job: controlled-sentiment DPO on SmolLM2-135M-Instruct, end to end on Ray.

    python jobs/main.py                       # default size: ~15-20 min on 2 CPU cores
    python jobs/main.py --size quick          # the same path in a few minutes (CI)
    python jobs/main.py rounds=3 reference=previous train.beta=0.2   # any SentimentConfig field
    python jobs/main.py --config my_sentiment.yaml                     # every field: jobs/sentiment.yaml

Prompts are real movie-review openings (gensim's packaged Pang & Lee sentences); the policy's own
samples are scored by a packaged sentiment lexicon (VADER) and paired best vs worst (rejection
sampling); reference values are cached on the reference actor pool; DPO runs on Ray Train; every
round's policy is then judged on held-out prompts against the original model by VADER and by
TextBlob (never trained on). See dpo_ray/recipes/sentiment.py and the README for numbers.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from dpo_ray.cli import report_user_errors
from dpo_ray.console import VERBOSE_ENV
from dpo_ray.recipes.sentiment import SIZES, run, sized


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(Path(__file__).with_name("sentiment.yaml")),
                        help="YAML with SentimentConfig fields (default: jobs/sentiment.yaml)")
    parser.add_argument("--size", default="default", choices=sorted(SIZES),
                        help="changes applied over the YAML (quick: the same path in minutes)")
    parser.add_argument("--verbose", action="store_true",
                        help="show Ray's own logs and every worker's output (DPO_RAY_VERBOSE=1)")
    parser.add_argument("overrides", nargs="*", help="key=value for SentimentConfig fields")
    args = parser.parse_args(argv)
    if args.verbose:
        os.environ[VERBOSE_ENV] = "1"

    def main_job() -> int:
        run(sized(args.size, args.overrides, args.config))
        return 0

    return report_user_errors(main_job)  # bad settings and data: one line, exit 2


if __name__ == "__main__":
    sys.exit(main())
