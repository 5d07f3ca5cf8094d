"""dpo_ray against TRL's DPOTrainer, back to back, on the same model, pairs and hyper-parameters
(not a test; it prints numbers). TRL is a benchmark dependency only:

    pip install --target /tmp/trl_pkgs --no-deps trl==1.16.0   # accelerate/datasets come with dpo_ray
    PYTHONPATH=/tmp/trl_pkgs python benchmarks/trl_compare.py \\
        --data ../shared/data/hh-rlhf-harmless-base-test.jsonl.gz --model tiny --pairs 512
    PYTHONPATH=/tmp/trl_pkgs python benchmarks/trl_compare.py --data ... --model smollm2 --pairs 64

Both train one epoch on the first ``--pairs`` HH pairs as explicit prompt/chosen/rejected text
(extracted once, by dpo_ray's HH rule), max_length 256 with no separate prompt cut (TRL 1.x has
none), global batch 8, beta 0.1, lr 1e-4, seed 0. TRL precomputes the reference log-probs
(``precompute_ref_log_probs``) in one process using every core; dpo_ray runs its own path:
Ray Data, a reference actor pool (cold cache: empty; warm: the same entry reused), and
``--workers`` Ray Train workers sharing the cores. Printed for each:

- phase times (data, reference, training) and end-to-end pairs/s;
- the share of padding among the positions the model body computes in training (TRL: its
  collator's padding over a random batch order, computed from its tokenized pairs; dpo_ray: its
  own batching and packing functions on its own cached rows);
- useful training FLOP/s: 6 x parameters x (prompt + chosen + rejected tokens, each once) per
  second of training, against this machine's matmul peak (a 2048^2 matmul timed here).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

SETTINGS = {"max_length": 256, "global_batch": 8, "beta": 0.1, "learning_rate": 1e-4, "seed": 0}


def matmul_peak(dtype, size: int = 2048, repeats: int = 10) -> float:
    """GFLOP/s of a (size x size) @ (size x size) matmul in ``dtype``, median of ``repeats``."""
    import torch

    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - started)
    return 2 * size ** 3 / statistics.median(times) / 1e9


def text_pairs(data: str, tokenizer: str, count: int) -> list[dict]:
    """The first ``count`` valid HH pairs as explicit prompt/chosen/rejected text."""
    import gzip

    from dpo_ray.config import DataConfig
    from dpo_ray.data.tokenize import BadRow, extract_pair

    config = DataConfig(source=data, tokenizer=tokenizer)
    out = []
    with gzip.open(data, "rt") as f:
        for line in f:
            try:
                pair = extract_pair(line, None, config)
            except BadRow:
                continue
            out.append({"prompt": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected})
            if len(out) == count:
                return out
    raise SystemExit(f"{data} holds fewer than {count} valid pairs")


def run_trl(model_path: str, pairs: list[dict], work: Path, bf16: bool) -> dict:
    import numpy as np
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    phases = {}
    original = DPOTrainer._precompute_ref_logps

    def timed_precompute(self, *args, **kwargs):
        started = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            phases["reference"] = time.perf_counter() - started

    DPOTrainer._precompute_ref_logps = timed_precompute
    s = SETTINGS
    args = DPOConfig(output_dir=str(work / "trl"), per_device_train_batch_size=s["global_batch"],
                     learning_rate=s["learning_rate"], beta=s["beta"], num_train_epochs=1,
                     max_length=s["max_length"], precompute_ref_log_probs=True, bf16=bf16, use_cpu=True,
                     report_to="none", save_strategy="no", logging_steps=10 ** 6, seed=s["seed"],
                     lr_scheduler_type="linear", warmup_steps=0, dataloader_num_workers=0)
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(pairs),
                         processing_class=AutoTokenizer.from_pretrained(model_path))
    init = time.perf_counter() - started
    phases["data"] = init - phases.get("reference", 0.0)
    started = time.perf_counter()
    trainer.train()
    phases["training"] = time.perf_counter() - started
    DPOTrainer._precompute_ref_logps = original
    rows = trainer.train_dataset
    prompt = np.array([len(x) for x in rows["prompt_ids"]])
    chosen = prompt + np.array([len(x) for x in rows["chosen_ids"]])
    rejected = prompt + np.array([len(x) for x in rows["rejected_ids"]])
    g = s["global_batch"]
    order = np.random.default_rng(0).permutation(len(prompt))[:len(prompt) // g * g].reshape(-1, g)
    padded = sum(2 * g * max(chosen[b].max(), rejected[b].max()) for b in order)
    real = sum(int(chosen[b].sum() + rejected[b].sum()) for b in order)
    useful = int((chosen + rejected - prompt)[order.ravel()].sum())
    losses = [h["train_loss"] for h in trainer.state.log_history if "train_loss" in h]
    return {"phases": phases, "padding": 1 - real / padded, "useful_tokens": useful,
            "params": sum(p.numel() for p in model.parameters()), "pairs": len(order.ravel()),
            "mean_loss": losses[-1] if losses else None}


def run_dpo_ray(model_path: str, pairs: list[dict], work: Path, workers: int, bf16: bool, label: str,
                cache: Path) -> dict:
    import numpy as np
    import pyarrow.parquet as pq

    from dpo_ray.config import DataConfig, Pool, ReferenceConfig, RunConfig, TrainConfig
    from dpo_ray.data import prepare_pairs
    from dpo_ray.logps import collate_pairs, pack_pairs
    from dpo_ray.training import train
    from dpo_ray.training.batching import window_batches

    source = work / "pairs.jsonl"
    source.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    s, cpus = SETTINGS, os.cpu_count() or 2
    config = RunConfig(
        data=DataConfig(source=str(source), tokenizer=model_path, max_length=s["max_length"],
                        max_prompt_length=None, on_bad_row="skip"),  # TRL drops them too
        reference=ReferenceConfig(model=model_path, cache_dir=str(cache),
                                  pool=Pool(max_actors=workers, num_cpus_per_actor=cpus / workers)),
        train=TrainConfig(output_dir=str(work / "runs"), run_name=f"dpo_ray-{label}", num_workers=workers,
                          per_device_train_batch_size=s["global_batch"] // workers, bf16=bf16,
                          learning_rate=s["learning_rate"], beta=s["beta"], seed=s["seed"],
                          lr_scheduler_type="linear", cpus_per_worker=cpus / workers, logging_steps=1),
    )
    started = time.perf_counter()
    prepare_pairs(config.data)  # the data stage alone (train() runs it again, cached or not)
    data_seconds = time.perf_counter() - started
    started = time.perf_counter()
    result = train(config)
    wall = time.perf_counter() - started
    g = s["global_batch"]
    step_seconds = sum(g / m["pairs_per_second"] for m in result.metrics)
    # The positions the model body computes: the workers' own batching and packing functions
    # on the cached rows.
    entry = Path(json.loads((result.run_dir / "reference.json").read_text())["path"])
    manifest = json.loads((entry / "manifest.json").read_text())
    rows = pq.read_table([str(entry / f["path"]) for f in manifest["files"]]).to_pydict()
    columns = {k: np.array(rows[k], dtype=object) for k in ("pair_id", "chosen_input_ids", "rejected_input_ids")}
    columns["prompt_length"] = np.array(rows["prompt_length"], dtype=np.int64)
    order = columns["pair_id"]
    window = config.train.shuffle_window * g
    computed = useful = 0
    for index, start in enumerate(range(0, len(order), window)):
        chunk = {k: v[start:start + window] for k, v in columns.items()}
        for batch in window_batches(chunk, g, s["seed"], 0, index, config.train.group_by_length):
            useful += int(sum(len(c) + len(r) for c, r in zip(batch["chosen_input_ids"], batch["rejected_input_ids"]))
                          - batch["prompt_length"].sum())
            for rank in range(workers):
                t = collate_pairs({k: v[rank::workers] for k, v in batch.items()}, pad_id=0)
                computed += pack_pairs(t["chosen_input_ids"], t["chosen_attention_mask"], t["rejected_input_ids"],
                                       t["rejected_attention_mask"], t["prompt_lengths"]).input_ids.numel()
    return {"data": data_seconds, "wall": wall, "steps": step_seconds, "padding": 1 - useful / computed,
            "useful_tokens": useful, "pairs": len(result.metrics) * g, "loss": result.metrics[-1]["loss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--pairs", type=int, default=512)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast in both")
    parser.add_argument("--also-bf16", action="store_true",
                        help="then dpo_ray again with bf16 autocast (cold on its own cache, and warm), "
                             "against its float32 runs")
    args = parser.parse_args()

    import torch

    from dpo_ray.assets import smollm2_path, tiny_model
    from dpo_ray.ray_env import init_ray

    work = Path(tempfile.mkdtemp(prefix="dpo-trl-"))
    smollm2 = smollm2_path()
    model = str(tiny_model(smollm2, work / "tiny") if args.model == "tiny" else smollm2)
    pairs = text_pairs(args.data, model, args.pairs)
    peak = {name: matmul_peak(dtype) for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    print(f"{args.pairs} HH pairs, {args.model}, {'bf16 autocast' if args.bf16 else 'fp32'}, "
          f"{os.cpu_count()} CPUs; matmul peak fp32 {peak['fp32']:.0f} GFLOP/s, bf16 {peak['bf16']:.0f}")
    trl = run_trl(model, pairs, work, args.bf16)
    print("TRL:", json.dumps(trl), flush=True)
    init_ray()
    cache = work / "cache"
    cold = run_dpo_ray(model, pairs, work, args.workers, args.bf16, "cold", cache)
    warm = run_dpo_ray(model, pairs, work, args.workers, args.bf16, "warm", cache)
    flops = 6 * trl["params"]
    fp = peak["bf16" if args.bf16 else "fp32"]
    p = trl["phases"]
    trl_total = p["data"] + p["reference"] + p["training"]
    print(f"\n{'':>16} {'data_s':>7} {'ref_s':>7} {'train_s':>8} {'total_s':>8} {'pairs/s':>8} "
          f"{'vs TRL':>7} {'padding':>8} {'useful GFLOP/s':>15} {'of peak':>8}")
    print(f"{'TRL':>16} {p['data']:>7.1f} {p['reference']:>7.1f} {p['training']:>8.1f} {trl_total:>8.1f} "
          f"{trl['pairs'] / trl_total:>8.2f} {1:>6.2f}x {trl['padding']:>8.0%} "
          f"{flops * trl['useful_tokens'] / p['training'] / 1e9:>15.1f} "
          f"{flops * trl['useful_tokens'] / p['training'] / 1e9 / fp:>8.0%}")
    reference = cold["wall"] - warm["wall"]
    for label, run in (("dpo_ray cold", cold), ("dpo_ray warm", warm)):
        ref = reference if run is cold else 0.0
        rate = flops * run["useful_tokens"] / run["steps"] / 1e9
        print(f"{label:>16} {run['data']:>7.1f} {ref:>7.1f} {run['wall'] - ref:>8.1f} {run['wall']:>8.1f} "
              f"{run['pairs'] / run['wall']:>8.2f} {run['pairs'] / run['wall'] / (trl['pairs'] / trl_total):>6.2f}x "
              f"{run['padding']:>8.0%} "
              f"{rate:>15.1f} {rate / fp:>8.0%}")
    if args.also_bf16 and not args.bf16:
        bf16 = {"cold": run_dpo_ray(model, pairs, work, args.workers, True, "bf16-cold", work / "cache-bf16")}
        bf16["warm"] = run_dpo_ray(model, pairs, work, args.workers, True, "bf16-warm", work / "cache-bf16")
        print(f"\n{'':>16} {'total_s':>8} {'steps_s':>8} {'vs fp32 total':>14} {'vs fp32 steps':>14}")
        for label, fp32 in (("cold", cold), ("warm", warm)):
            run = bf16[label]
            print(f"{'dpo_ray bf16 ' + label:>16} {run['wall']:>8.1f} {run['steps']:>8.1f} "
                  f"{fp32['wall'] / run['wall']:>13.2f}x {fp32['steps'] / run['steps']:>13.2f}x")
        print("(bf16 autocast in training; the reference pass stays float32, reference.dtype's default)")
    print(f"\ntraining pairs (pairs/s and 'vs TRL' count these): TRL {trl['pairs']} (it drops pairs whose "
          f"prompt fills max_length), dpo_ray {cold['pairs']}; useful tokens (prompt once): "
          f"TRL {trl['useful_tokens']}, dpo_ray {cold['useful_tokens']}; dpo_ray data stage alone "
          f"{cold['data']:.1f} s (inside total); dpo_ray train_s is the run's wall time less the reference "
          f"pass (Ray Train start, data and steps: steps alone {cold['steps']:.1f} s cold, {warm['steps']:.1f} s warm); "
          f"dpo_ray useful FLOP/s are over its steps alone. Last loss: TRL mean {trl['mean_loss']}, "
          f"dpo_ray last step {cold['loss']:.4f}")


if __name__ == "__main__":
    main()
