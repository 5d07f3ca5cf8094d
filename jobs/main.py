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

import sys
from pathlib import Path

from dpo_ray.recipes.sentiment import SIZES, SentimentConfig, job_main, run


def main(argv: list[str] | None = None) -> int:
    return job_main(argv, __doc__, SentimentConfig, SIZES, run,
                    default_config=str(Path(__file__).with_name("sentiment.yaml")))


if __name__ == "__main__":
    sys.exit(main())
