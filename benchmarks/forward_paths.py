"""The policy's forward+backward on one DPO batch, three ways:

- ``full``: chosen and rejected as padded rows, the LM head on every position (the first path);
- ``response``: padded rows, the LM head only where a response token is predicted
  (``dpo_ray.logps.response_logps``, transformers' boolean ``logits_to_keep``);
- ``packed`` (the default): one prompt|chosen|rejected sequence per pair, packed with no padding,
  the LM head only where needed (``dpo_ray.logps.pack_pairs`` / ``packed_logps``).

Not a test; it prints numbers.

    python benchmarks/forward_paths.py --data ../shared/data/hh-rlhf-harmless-base-test.jsonl.gz
    python benchmarks/forward_paths.py --data ... --models tiny smollm2 --pairs 8 --repeats 5

Same pairs, same weights, one process (no Ray): the median of ``--repeats`` timed passes after
one warm-up, for each path, alternating. Also printed: the positions the model body computes and
the ones that need logits on each path, and each path's largest log-prob difference to ``full``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--models", nargs="+", default=["tiny", "smollm2"])
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    from dpo_ray.assets import smollm2_path, tiny_model
    from dpo_ray.config import DataConfig
    from dpo_ray.data.sources import _canonical, _records_table
    from dpo_ray.data.tokenize import PairTokenizer
    from dpo_ray.logps import (collate_pairs, concatenate_pairs, model_forward_logits, pack_pairs, packed_logps,
                               response_labels, response_logps, sequence_logps)

    smollm2 = smollm2_path()
    models = {"tiny": tiny_model(smollm2, Path(tempfile.mkdtemp()) / "tiny"), "smollm2": smollm2}
    with gzip.open(args.data, "rt") as f:
        rows = [json.loads(line) for line, _ in zip(f, range(args.pairs * 2))]
    config = DataConfig(source=args.data, tokenizer=str(smollm2), max_length=args.max_length,
                        on_bad_row="skip")
    table = PairTokenizer(config)(_records_table(args.data, [(i, _canonical(r), None)
                                                             for i, r in enumerate(rows, 1)]))
    pairs = table.filter(table["skip_reason"].is_null()).slice(0, args.pairs).to_pydict()
    batch = collate_pairs({k: __import__("numpy").array(v, dtype=object) for k, v in pairs.items()}, 0)
    ids, mask = concatenate_pairs(batch["chosen_input_ids"], batch["chosen_attention_mask"],
                                  batch["rejected_input_ids"], batch["rejected_attention_mask"], 0)
    labels = response_labels(ids, batch["prompt_lengths"].repeat(2), mask)
    packed = pack_pairs(*(batch[k] for k in ("chosen_input_ids", "chosen_attention_mask", "rejected_input_ids",
                                             "rejected_attention_mask", "prompt_lengths")))
    real = int(mask.sum())
    print(f"{args.pairs} HH pairs (max_length {args.max_length}), {torch.get_num_threads()} threads. "
          f"Positions through the model body / through the LM head:")
    print(f"  padded rows {tuple(ids.shape)}: {ids.numel()} ({1 - real / ids.numel():.0%} padding) / "
          f"full {ids.numel()}, response {int((labels[:, 1:] != -100).sum())}")
    print(f"  packed rows {tuple(packed.input_ids.shape)}: {packed.input_ids.numel()} "
          f"({packed.input_ids.numel() / ids.numel():.0%} of padded) / {int(packed.keep.sum())}")
    print(f"{'model':>8} {'full_s':>8} {'response_s':>10} {'packed_s':>9} {'full/packed':>11} "
          f"{'response/packed':>15} {'max|dlogp|':>11}")

    def full(model):
        return sequence_logps(model_forward_logits(model, ids, mask), labels)[0]

    def kept(model):
        return response_logps(model, ids, mask, labels)[0]

    def pack(model):
        return packed_logps(model, packed)[0]

    paths = {"full": full, "response": kept, "packed": pack}
    for name in args.models:
        model = AutoModelForCausalLM.from_pretrained(models[name], dtype=torch.float32, attn_implementation="sdpa")
        times = {label: [] for label in paths}
        values = {}
        for repeat in range(args.repeats + 1):
            for label, fn in paths.items():
                model.zero_grad(set_to_none=True)
                started = time.perf_counter()
                logps = fn(model)
                logps.sum().backward()
                if repeat:  # the first pass of each is a warm-up
                    times[label].append(time.perf_counter() - started)
                values[label] = logps.detach()
        t = {label: statistics.median(ts) for label, ts in times.items()}
        diff = max(float((values["full"] - values[label]).abs().max()) for label in ("response", "packed"))
        print(f"{name:>8} {t['full']:>8.3f} {t['response']:>10.3f} {t['packed']:>9.3f} "
              f"{t['full'] / t['packed']:>10.2f}x {t['response'] / t['packed']:>14.2f}x {diff:>11.2e}")


if __name__ == "__main__":
    main()
