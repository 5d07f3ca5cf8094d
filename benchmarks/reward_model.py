"""Bradley-Terry reward model on real HH pairs: held-out accuracy with a 95% CI (not a test).

    python benchmarks/reward_model.py --data ../shared/data/hh-rlhf-harmless-base-test.jsonl.gz
    python benchmarks/reward_model.py --data ... --model tiny --pairs 0      # all pairs, tiny Llama

Trains ``train.objective=reward_model`` (scalar head on the backbone) with 2 Ray Train workers on
the pairs not held out (20% by pair_id hash), then scores the held-out pairs on an actor pool
(``dpo_ray.eval.pairs.pair_accuracy``) and prints accuracy, its bootstrap CI and the timings.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    parser.add_argument("--pairs", type=int, default=800, help="first N rows of the file; 0 = all")
    parser.add_argument("--max-length", type=int, default=192)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--learning-rate", type=float, default=None)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    from dpo_ray.assets import smollm2_path, tiny_model
    from dpo_ray.config import DataConfig, ReferenceConfig, RunConfig, TrainConfig
    from dpo_ray.eval.pairs import pair_accuracy
    from dpo_ray.ray_env import init_ray
    from dpo_ray.training import train

    init_ray()
    tmp = tempfile.mkdtemp(prefix="rm-bench-")
    smollm2 = str(smollm2_path())
    model = smollm2 if args.model == "smollm2" else str(tiny_model(smollm2, f"{tmp}/tiny"))
    lr = args.learning_rate or (1e-5 if args.model == "smollm2" else 3e-4)
    config = RunConfig(
        data=DataConfig(source=args.data, tokenizer=smollm2, on_bad_row="skip", limit=args.pairs or None,
                        max_length=args.max_length, max_prompt_length=args.max_length // 2),
        reference=ReferenceConfig(model=model),
        train=TrainConfig(objective="reward_model", learning_rate=lr, num_train_epochs=args.epochs,
                          per_device_train_batch_size=8, lr_scheduler_type="linear", warmup_steps=5,
                          eval_fraction=0.2, num_workers=args.workers, output_dir=tmp,
                          run_name="rm", logging_steps=10))
    started = time.perf_counter()
    result = train(config)
    trained = time.perf_counter() - started
    started = time.perf_counter()
    accuracy = pair_accuracy(result.run_dir)
    scored = time.perf_counter() - started
    print(json.dumps({"model": args.model, "steps": result.metrics[-1]["step"],
                      "global_batch": 8 * args.workers, "held_out_pairs": accuracy["n"],
                      "accuracy": round(accuracy["accuracy"], 4),
                      "ci95": [round(accuracy["ci_low"], 4), round(accuracy["ci_high"], 4)],
                      "train_s": round(trained, 1), "score_s": round(scored, 1),
                      "final_train_loss": round(result.metrics[-1]["loss"], 4)}))


if __name__ == "__main__":
    main()
