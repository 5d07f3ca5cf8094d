"""Logits only where a loss needs them: forward+backward time of one DPO batch with the LM head
on every position (the old path) against response positions only (``dpo_ray.logps.response_logps``,
transformers' boolean ``logits_to_keep``). Not a test; it prints numbers.

    python benchmarks/response_logits.py --data ../shared/data/hh-rlhf-harmless-base-test.jsonl.gz
    python benchmarks/response_logits.py --data ... --models tiny smollm2 --pairs 8 --repeats 5

Same pairs, same weights, one process (no Ray): the median of ``--repeats`` timed passes after
one warm-up, for each path, alternating. Also printed: the share of positions that need logits
and the largest difference between the two paths' log-probs.
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
    from dpo_ray.logps import (collate_pairs, concatenate_pairs, model_forward_logits, response_labels,
                               response_logps, sequence_logps)

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
    needed = int((labels[:, 1:] != -100).sum())
    print(f"{args.pairs} HH pairs, padded batch {tuple(ids.shape)}: {needed} of {ids.numel()} positions "
          f"({needed / ids.numel():.1%}) predict a response token; {torch.get_num_threads()} threads")
    print(f"{'model':>8} {'full_s':>8} {'response_s':>10} {'speed-up':>8} {'max|dlogp|':>11}")

    def full(model):
        return sequence_logps(model_forward_logits(model, ids, mask), labels)[0]

    def kept(model):
        return response_logps(model, ids, mask, labels)[0]

    for name in args.models:
        model = AutoModelForCausalLM.from_pretrained(models[name], dtype=torch.float32)
        times = {"full": [], "kept": []}
        values = {}
        for repeat in range(args.repeats + 1):
            for label, fn in (("full", full), ("kept", kept)):
                model.zero_grad(set_to_none=True)
                started = time.perf_counter()
                logps = fn(model)
                logps.sum().backward()
                if repeat:  # the first pass of each is a warm-up
                    times[label].append(time.perf_counter() - started)
                values[label] = logps.detach()
        t_full, t_kept = statistics.median(times["full"]), statistics.median(times["kept"])
        diff = float((values["full"] - values["kept"]).abs().max())
        print(f"{name:>8} {t_full:>8.3f} {t_kept:>10.3f} {t_full / t_kept:>7.2f}x {diff:>11.2e}")


if __name__ == "__main__":
    main()
