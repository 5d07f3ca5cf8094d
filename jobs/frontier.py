"""Offline vs iterative DPO at matched compute, for several β: the reward-vs-KL frontier of the
controlled-sentiment task, on SmolLM2-135M-Instruct, end to end on Ray.

    python jobs/frontier.py                   # default: 4 β x 2 arms, <= 45 min on 2 CPU cores
    python jobs/frontier.py --size quick      # the same path in a few minutes (CI)
    python jobs/frontier.py betas=[0.1,0.3] rounds=3 pairs_per_round=48   # any FrontierConfig field
    python jobs/frontier.py --config my.yaml  # FrontierConfig fields: jobs/sentiment.yaml's + betas, pairs_per_round

Each β trains (a) offline: `rounds` epochs on pairs sampled once from the original model, and
(b) iterative: `rounds` rounds on fresh pairs from the current policy, with the same pairs per
round and optimizer steps; every final policy is judged on held-out prompts against the original
model. See dpo_ray/recipes/frontier.py and the README for the numbers and their reading.
"""

from __future__ import annotations

import sys

from dpo_ray.recipes.frontier import SIZES, FrontierConfig, run
from dpo_ray.recipes.sentiment import job_main


def main(argv: list[str] | None = None) -> int:
    return job_main(argv, __doc__, FrontierConfig, SIZES, run)


if __name__ == "__main__":
    sys.exit(main())
