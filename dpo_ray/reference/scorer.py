"""Score tokenized pairs with the frozen reference model on a Ray Data actor pool.

Each actor loads the model once and computes ``ref_chosen_logps`` / ``ref_rejected_logps`` with
``concatenated_forward`` -> ``sequence_logps``: the same functions the training workers run on the
policy, so cached and live values cannot be computed differently.
"""

from __future__ import annotations

import math

import pyarrow as pa
import ray
import torch

from dpo_ray.logps import collate_pairs, concatenated_forward
from dpo_ray.models import load_causal_lm, pick_device
from dpo_ray.ray_env import actor_pool_kwargs

REFERENCE_COLUMNS = {
    "ref_chosen_logps": pa.float64(),  # summed log-probs of the chosen response tokens
    "ref_rejected_logps": pa.float64(),
    "chosen_response_tokens": pa.int32(),  # how many tokens were summed
    "rejected_response_tokens": pa.int32(),
}
# Versioned: the actor is detached and outlives upgrades on a long-lived cluster; a counter of an
# older dpo_ray (add() without the actor id) must not be picked up by a newer one.
COUNTER_NAME = "dpo_ray_reference_forward_counter_v2"


@ray.remote(num_cpus=0)
class ForwardCounter:
    """Counts reference forward passes and scored pairs across all actors and runs on a cluster,
    so "a cache hit performs no reference forward pass" is counted, not inferred."""

    def __init__(self) -> None:
        self.forwards = self.pairs = 0
        self.by_actor: dict[str, int] = {}  # pairs scored by each scoring actor (its Ray id)

    def add(self, forwards: int, pairs: int, actor: str = "") -> None:
        self.forwards += forwards
        self.pairs += pairs
        self.by_actor[actor] = self.by_actor.get(actor, 0) + pairs

    def get(self) -> dict:
        return {"forwards": self.forwards, "pairs": self.pairs, "by_actor": dict(self.by_actor)}


COUNTER_NAMESPACE = "dpo_ray"


def forward_counter():
    """The cluster-wide counter (detached, so every driver and job on the cluster adds to the same
    count, and a CLI run can be checked from another process; it costs no CPU while idle)."""
    return ForwardCounter.options(name=COUNTER_NAME, namespace=COUNTER_NAMESPACE,
                                  lifetime="detached", get_if_exists=True).remote()


def forward_counts() -> dict:
    return ray.get(forward_counter().get.remote())


class ReferenceScorer:
    """Ray Data callable class: tokenized-pairs batch -> the same batch + ``REFERENCE_COLUMNS``."""

    def __init__(self, config):
        self.cfg = config
        self.device = pick_device(config.pool.num_gpus_per_actor)
        self.model = load_causal_lm(config.model, config.dtype, config.revision,
                                    config.trust_remote_code, self.device).eval()
        self.counter = ray.get_actor(COUNTER_NAME, namespace=COUNTER_NAMESPACE)

    @torch.inference_mode()
    def __call__(self, batch: pa.Table) -> pa.Table:
        columns = {name: batch.column(name).to_numpy(zero_copy_only=False)
                   for name in ("chosen_input_ids", "rejected_input_ids", "prompt_length")}
        n = len(batch)
        out = {name: [None] * n for name in REFERENCE_COLUMNS}
        # Bucket by length inside the batch: neighbours in this order pad to similar widths.
        order = sorted(range(n), key=lambda i: max(len(columns["chosen_input_ids"][i]),
                                                   len(columns["rejected_input_ids"][i])))
        forwards = 0
        for start in range(0, n, self.cfg.micro_batch_size):
            idx = order[start:start + self.cfg.micro_batch_size]
            # The same padding and forward as the policy's in training (training/loop.py). The
            # padding value is irrelevant: padded positions are masked and labelled -100.
            pairs = collate_pairs({k: v[idx] for k, v in columns.items()}, pad_id=0)
            pairs = {k: v.to(self.device) for k, v in pairs.items()}
            result = concatenated_forward(
                self.model, pairs["chosen_input_ids"], pairs["chosen_attention_mask"],
                pairs["rejected_input_ids"], pairs["rejected_attention_mask"],
                pairs["prompt_lengths"], pad_id=0, padding_free=self.cfg.padding_free,
                vocab_chunk=self.cfg.vocab_chunk_size)
            forwards += 1
            for j, i in enumerate(idx):
                out["ref_chosen_logps"][i] = float(result["chosen_logps"][j])
                out["ref_rejected_logps"][i] = float(result["rejected_logps"][j])
                out["chosen_response_tokens"][i] = int(result["chosen_tokens"][j])
                out["rejected_response_tokens"][i] = int(result["rejected_tokens"][j])
        ray.get(self.counter.add.remote(forwards, n, ray.get_runtime_context().get_actor_id() or ""))
        for name, arrow_type in REFERENCE_COLUMNS.items():
            batch = batch.append_column(name, pa.array(out[name], arrow_type))
        return batch


def score_pairs(pairs: ray.data.Dataset, config, scorer_cls=ReferenceScorer,
                rows: int | None = None) -> ray.data.Dataset:
    """Add reference columns to every pair on an actor pool sized by ``config`` (lazy)."""
    forward_counter()  # make sure the named counter exists before actors look it up
    # An actor processes whole blocks; a single-file source is one block, which would leave all
    # but one actor idle. Blocks of one batch each spread the work over the pool, and fewer pairs
    # than a batch per actor get smaller blocks (64 pairs were one 64-pair block: one actor of
    # two, one core of two, worked).
    per_block, blocks = config.batch_size, None
    if rows is not None:
        per_block = max(config.micro_batch_size, min(per_block, math.ceil(rows / config.pool.max_actors)))
        blocks = math.ceil(rows / per_block)
    return pairs.repartition(target_num_rows_per_block=per_block).map_batches(
        scorer_cls,
        fn_constructor_args=(config,),
        batch_format="pyarrow",
        batch_size=per_block,
        **actor_pool_kwargs(config.pool, "reference scorer", blocks),
    )
