"""One real HH-RLHF line, followed from the file to its DPO loss through the functions the real
stages run, printing every intermediate value. Read it with its output:

    pytest tests/test_one_pair.py -s

The pair passes through six files, in data-flow order:

    data/sources.py      read_records      file -> one record (JSON text), with file and row
    data/tokenize.py     extract_pair      record -> prompt / chosen / rejected (HH: implicit prompt)
                         PairTokenizer     -> token ids; prompt_length = where each response starts
    reference/scorer.py  ReferenceScorer   -> ref_chosen_logps, ref_rejected_logps (cached once)
    logps.py             collate_pairs     -> padded tensors (scorer and training loop alike)
                         concatenated_forward -> policy_chosen_logps, policy_rejected_logps
    training/loop.py     RankPairCollate, pair_losses  (one worker's view of a global batch)
    losses.py            preference_loss   -> -log sigma(beta * (chosen log-ratio - rejected log-ratio))

Everything else moves datasets, not values: data/pipeline.py (runs the tokenizing tasks, counts
bad rows), reference/stage.py and cache.py (score once, store by content key), training/trainer.py
(hands the cached dataset to Ray Train).
"""

from __future__ import annotations

import inspect
import math
from pathlib import Path

import pyarrow as pa
import pytest
import torch

import dpo_ray
from dpo_ray.config import DataConfig, ReferenceConfig, TrainConfig
from dpo_ray.data.sources import read_records
from dpo_ray.data.tokenize import PairTokenizer, extract_pair
from dpo_ray.logps import collate_pairs, concatenated_forward
from dpo_ray.losses import preference_loss
from dpo_ray.models import load_causal_lm
from dpo_ray.reference.scorer import ReferenceScorer, forward_counter
from dpo_ray.training.loop import TRAIN_COLUMNS, RankPairCollate, pair_losses

PATH = [read_records, extract_pair, PairTokenizer, ReferenceScorer, collate_pairs,
        concatenated_forward, RankPairCollate, pair_losses, preference_loss]


def _show(step: str, **values) -> None:
    print(f"\n--- {step}")
    for name, value in values.items():
        text = repr(value)
        print(f"  {name} = {text[:300] + ' ...' if len(text) > 300 else text}")


def test_the_path_of_a_pair_is_six_files_in_data_flow_order():
    package = Path(dpo_ray.__file__).parent
    files = list(dict.fromkeys(
        str(Path(inspect.getsourcefile(f)).relative_to(package)) for f in PATH))
    assert files == ["data/sources.py", "data/tokenize.py", "reference/scorer.py", "logps.py",
                     "training/loop.py", "losses.py"]


def test_one_hh_pair_from_its_line_to_its_loss(ray_session, hh_path, smollm2):
    data = DataConfig(source=str(hh_path), tokenizer=str(smollm2), limit=1, max_length=256,
                      max_prompt_length=128)

    # 1. Read: the first line of the gzipped JSONL, as canonical JSON text with its file and row.
    (record,) = read_records(data.source, data).take(1)
    _show("1. data/sources.py read_records", source_file=record["source_file"],
          source_row=record["source_row"], record=record["record"])
    assert record["source_row"] == 1 and record["read_error"] is None

    # 2. Extract: HH rows hold two whole dialogues; the prompt is their shared part up to the last
    #    "\n\nAssistant:", the responses are what follows it.
    pair = extract_pair(record["record"], record["read_error"], data)
    _show("2. data/tokenize.py extract_pair", format=pair.format, pair_id=pair.pair_id,
          prompt_end=pair.prompt[-80:], chosen=pair.chosen, rejected=pair.rejected)
    assert pair.format == "implicit" and pair.prompt.endswith("\n\nAssistant:")

    # 3. Tokenize (what each tokenizing task does to a batch): prompt ids + response ids + EOS.
    batch = pa.Table.from_pylist([record])
    tokenized = PairTokenizer(data)(batch)
    row = tokenized.to_pylist()[0]
    _show("3. data/tokenize.py PairTokenizer", prompt_length=row["prompt_length"],
          chosen_input_ids=row["chosen_input_ids"], rejected_length=row["rejected_length"],
          chosen_response_ids=row["chosen_input_ids"][row["prompt_length"]:])
    assert row["skip_reason"] is None
    assert row["chosen_input_ids"][:row["prompt_length"]] == row["rejected_input_ids"][:row["prompt_length"]]

    # 4. Reference: log pi_ref(y|x) summed over response tokens only, computed once per pair.
    forward_counter()
    reference = ReferenceConfig(model=str(smollm2))
    scored = ReferenceScorer(reference)(tokenized.drop_columns(["skip_reason", "skip_detail"]))
    ref = scored.to_pylist()[0]
    _show("4. reference/scorer.py ReferenceScorer", ref_chosen_logps=ref["ref_chosen_logps"],
          ref_rejected_logps=ref["ref_rejected_logps"],
          chosen_response_tokens=ref["chosen_response_tokens"])
    assert ref["chosen_response_tokens"] == row["chosen_length"] - row["prompt_length"]

    # 5. Training: the worker's collate (rank 0 of 1) pads the cached row into tensors...
    #    (the columns a worker reads from the cached dataset, as numpy, as Ray Data hands them)
    columns = {name: scored.column(name).to_numpy(zero_copy_only=False) for name in TRAIN_COLUMNS}
    (micro_batch,) = RankPairCollate(rank=0, world_size=1, accumulation_steps=1, pad_id=0)(columns)
    micro_batch.pop("global_batch_crc")
    _show("5. logps.py collate_pairs (via training/loop.py RankPairCollate)",
          **{k: tuple(v.shape) for k, v in micro_batch.items()})

    # 6. ...and the policy's live pass. The policy starts as the reference, so its log-probs equal
    #    the cached ones and the loss is ln 2: the step-0 guard checks exactly this in every run.
    policy = load_causal_lm(str(smollm2))
    t = TrainConfig(beta=0.1)
    out, losses, chosen_rewards, rejected_rewards = pair_losses(policy, micro_batch, t, pad_id=0)
    _show("6. logps.py concatenated_forward + losses.py preference_loss (via loop.pair_losses)",
          policy_chosen_logps=float(out["chosen_logps"].detach()),
          policy_rejected_logps=float(out["rejected_logps"].detach()), loss=float(losses.detach()), rewards_chosen=float(chosen_rewards), rewards_rejected=float(rejected_rewards))
    assert float(out["chosen_logps"].detach()) == pytest.approx(ref["ref_chosen_logps"], abs=1e-3)
    assert float(losses.detach()) == pytest.approx(math.log(2), abs=1e-3)

    # 7. One optimizer step on this pair: chosen up, rejected down, the loss below ln 2.
    optimizer = torch.optim.SGD(policy.parameters(), lr=1e-4)
    losses.sum().backward()
    optimizer.step()
    with torch.no_grad():
        _, after, chosen_rewards, rejected_rewards = pair_losses(policy, micro_batch, t, pad_id=0)
    _show("7. after one SGD step", loss=float(after), rewards_margins=float(chosen_rewards - rejected_rewards))
    assert float(after) < math.log(2) and float(chosen_rewards - rejected_rewards) > 0
