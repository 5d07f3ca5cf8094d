"""DPO training throughput: pairs/s, tokens/s and peak memory per worker (not a test).

    python benchmarks/training.py --data ../shared/data/hh-rlhf-harmless-base-test.jsonl.gz
    python benchmarks/training.py --data ... --models tiny smollm2 --workers 1 2 --steps 4

For each model and worker count: a cold run (empty reference cache: scoring happens first) and
a warm run (cache reused). Steady-state pairs/s and tokens/s are the median over steps after the
first of each epoch (those include the data iterator's start-up); wall time is the whole call.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--models", nargs="+", default=["tiny", "smollm2"])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--global-batch", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--gpu", action="store_true")
    args = parser.parse_args()

    from dpo_ray.assets import smollm2_path, tiny_model
    from dpo_ray.config import DataConfig, Pool, ReferenceConfig, RunConfig, TrainConfig
    from dpo_ray.ray_env import init_ray
    from dpo_ray.training import train

    init_ray()
    work = Path(tempfile.mkdtemp(prefix="dpo-bench-"))
    smollm2 = smollm2_path()
    models = {"tiny": tiny_model(smollm2, work / "tiny"), "smollm2": smollm2}
    pairs = args.global_batch * args.steps
    print(f"{pairs} HH pairs, max_length {args.max_length}, global batch {args.global_batch}, "
          f"{args.steps} steps, {os.cpu_count()} CPUs")
    print(f"{'model':>8} {'workers':>7} {'cache':>5} {'wall_s':>7} {'pairs/s':>8} {'tokens/s':>9} "
          f"{'peak_MB/worker':>14}")
    for name in args.models:
        for workers in args.workers:
            cache = work / f"cache-{name}-{workers}"
            for label in ("cold", "warm"):
                config = RunConfig(
                    data=DataConfig(source=args.data, tokenizer=str(models[name]), limit=pairs + 8,
                                    on_bad_row="skip", max_length=args.max_length,
                                    max_prompt_length=args.max_length // 2),
                    reference=ReferenceConfig(model=str(models[name]), cache_dir=str(cache),
                                              pool=Pool(max_actors=workers,
                                                        num_cpus_per_actor=(os.cpu_count() or 2) / workers,
                                                        num_gpus_per_actor=1 if args.gpu else 0)),
                    train=TrainConfig(output_dir=str(work / "runs"), run_name=f"{name}-{workers}-{label}",
                                      num_workers=workers, use_gpu=args.gpu, bf16=args.bf16,
                                      per_device_train_batch_size=args.global_batch // workers,
                                      max_steps=args.steps, learning_rate=1e-6,
                                      cpus_per_worker=(os.cpu_count() or 2) / workers),
                )
                start = time.perf_counter()
                result = train(config)
                wall = time.perf_counter() - start
                steady = result.metrics[1:] or result.metrics
                print(f"{name:>8} {workers:>7} {label:>5} {wall:>7.1f} "
                      f"{statistics.median(m['pairs_per_second'] for m in steady):>8.2f} "
                      f"{statistics.median(m['tokens_per_second'] for m in steady):>9.0f} "
                      f"{max(m['peak_memory_mb'] for m in result.metrics):>14.0f}", flush=True)


if __name__ == "__main__":
    main()
