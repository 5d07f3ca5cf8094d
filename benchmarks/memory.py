"""Memory per worker and pairs/s of SmolLM2-135M DPO training, by how the model is held (not a test).

    python benchmarks/memory.py --data ../shared/data/hh-rlhf-harmless-base-test.jsonl.gz
    python benchmarks/memory.py --data ... --variants lora fsdp2 --steps 4

Variants: full fp32 weights, full bfloat16 weights, LoRA (r 16, all linear layers), each on one
worker, then DDP and FSDP over two workers. The reference cache is shared, so only the first
variant scores pairs. Columns:
  model_state_MB   weights + gradients + optimizer state this worker holds (its shard under FSDP)
  peak_RSS_MB      the worker process's peak resident memory: the above plus activations, the
                   libraries (torch, Ray, transformers: ~1 GB) and allocator slack
  pairs/s          median over the steps after the first
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

VARIANTS = {  # name: (workers, TrainConfig fields)
    "full_fp32": (1, {}),
    "full_bf16_weights": (1, {"dtype": "bfloat16"}),
    "lora": (1, {"peft": {"r": 16, "alpha": 32}, "learning_rate": 1e-4}),
    "ddp2": (2, {}),
    "fsdp2": (2, {"parallel_strategy": "fsdp"}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--global-batch", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=256)
    args = parser.parse_args()

    from dpo_ray.assets import smollm2_path
    from dpo_ray.config import build_config, RunConfig
    from dpo_ray.ray_env import init_ray
    from dpo_ray.training import train

    init_ray()
    work = Path(tempfile.mkdtemp(prefix="dpo-memory-"))
    model = str(smollm2_path())
    pairs = args.global_batch * args.steps
    cpus = os.cpu_count() or 2
    print(f"SmolLM2-135M, {pairs} HH pairs, max_length {args.max_length}, global batch "
          f"{args.global_batch}, {args.steps} steps, {cpus} CPUs")
    print(f"{'variant':>18} {'workers':>7} {'model_state_MB':>14} {'peak_RSS_MB':>11} "
          f"{'pairs/s':>8} {'wall_s':>7}")
    for name in args.variants:
        workers, fields = VARIANTS[name]
        config = build_config(RunConfig, {
            "data": {"source": args.data, "tokenizer": model, "limit": pairs + 8,
                     "on_bad_row": "skip", "max_length": args.max_length,
                     "max_prompt_length": args.max_length // 2},
            "reference": {"model": model, "cache_dir": str(work / "cache"), 
                          "pool": {"max_actors": 1, "num_cpus_per_actor": cpus}},
            "train": {"output_dir": str(work / "runs"), "run_name": name, "num_workers": workers,
                      "per_device_train_batch_size": args.global_batch // workers,
                      "max_steps": args.steps, "learning_rate": 1e-6,
                      "cpus_per_worker": cpus / workers, **fields},
        })
        started = time.perf_counter()
        result = train(config)
        wall = time.perf_counter() - started
        steady = result.metrics[1:] or result.metrics
        print(f"{name:>18} {workers:>7} {result.metrics[-1]['model_state_mb']:>14.0f} "
              f"{max(m['peak_memory_mb'] for m in result.metrics):>11.0f} "
              f"{statistics.median(m['pairs_per_second'] for m in steady):>8.3f} {wall:>7.1f}",
              flush=True)


if __name__ == "__main__":
    main()
