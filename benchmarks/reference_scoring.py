"""Reference-scoring throughput: pairs/s and tokens/s with 1 and 2 actors (not a test).

    python benchmarks/reference_scoring.py --data ../shared/data/hh-rlhf-harmless-base-test.jsonl.gz
    python benchmarks/reference_scoring.py --data ... --pairs 256 --actors 1 2 --check

Default model: SmolLM2-135M-Instruct (offline, float32). Timing covers actor start-up, model
load and scoring of every pair (what a user waits for); the data stage runs once, before.
``--check`` also compares every value with an unbatched float64-softmax computation.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--model", default=None, help="default: the offline SmolLM2-135M-Instruct")
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()

    import torch

    from dpo_ray.assets import smollm2_path
    from dpo_ray.config import DataConfig, Pool, ReferenceConfig
    from dpo_ray.data import prepare_pairs
    from dpo_ray.ray_env import init_ray
    from dpo_ray.reference import forward_counts, score_pairs

    model = args.model or str(smollm2_path())
    init_ray()
    data_cfg = DataConfig(source=args.data, tokenizer=model, limit=args.pairs, on_bad_row="skip",
                          max_length=args.max_length, max_prompt_length=args.max_length // 2)
    pairs, report = prepare_pairs(data_cfg)
    rows = pairs.select_columns(["chosen_length", "rejected_length"]).to_pandas()
    tokens = int(rows.sum().sum())
    print(f"{report.pairs} pairs, {tokens} tokens (chosen + rejected), model {model}, "
          f"{os.cpu_count()} CPUs, torch {torch.__version__}")
    print(f"{'actors':>6} {'seconds':>8} {'pairs/s':>8} {'tokens/s':>9} {'forwards':>8}")
    scored = None
    for n in args.actors:
        ref_cfg = ReferenceConfig(model=model, pool=Pool(min_actors=n, max_actors=n,
                                                            num_cpus_per_actor=os.cpu_count() / n),
                                  micro_batch_size=args.micro_batch, batch_size=32)
        before = forward_counts()["forwards"]
        start = time.perf_counter()
        scored = score_pairs(pairs, ref_cfg).materialize()
        seconds = time.perf_counter() - start
        print(f"{n:>6} {seconds:>8.1f} {report.pairs / seconds:>8.2f} {tokens / seconds:>9.0f} "
              f"{forward_counts()['forwards'] - before:>8}", flush=True)
    if args.check and scored is not None:
        from dpo_ray.models import load_causal_lm

        reference = load_causal_lm(model).eval()
        worst = 0.0
        with torch.inference_mode():
            for row in scored.iter_rows():
                for side in ("chosen", "rejected"):
                    ids = torch.tensor([list(row[f"{side}_input_ids"])])
                    logprobs = torch.log_softmax(reference(input_ids=ids).logits[0].double(), -1)
                    n = row["prompt_length"]
                    direct = float(logprobs[n - 1:-1].gather(-1, ids[0, n:, None]).sum())
                    worst = max(worst, abs(direct - row[f"ref_{side}_logps"]))
        print(f"max |pool - direct| over {report.pairs} pairs: {worst:.2e}")


if __name__ == "__main__":
    main()
