"""Global batch (numpy columns from the cached dataset) -> this rank's padded tensors.

Every worker iterates the same globally ordered batches and keeps rows ``rank::world_size``.
This costs each worker a read of every pair (cheap next to a forward pass) and buys two things:
the global batch is the same whatever the number of workers, and the data position is a single
batch counter, so a restarted run can skip exactly the batches it already trained on.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch
from ray.data.collate_fn import NumpyBatchCollateFn

from dpo_ray.logps import pad_sequences

PAIR_TRAIN_COLUMNS = ["pair_id", "chosen_input_ids", "rejected_input_ids", "prompt_length"]
TRAIN_COLUMNS = [*PAIR_TRAIN_COLUMNS, "ref_chosen_logps", "ref_rejected_logps"]  # DPO


def collate_pairs(batch: dict[str, np.ndarray], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad chosen and rejected of each pair (right padding); keep pairs aligned row by row.

    Returns (B, Tc)/(B, Tr) ids and masks, and (B,) prompt lengths and reference log-probs
    (reward-model training has no reference columns).
    """
    chosen_ids, chosen_mask = pad_sequences([list(x) for x in batch["chosen_input_ids"]], pad_id)
    rejected_ids, rejected_mask = pad_sequences([list(x) for x in batch["rejected_input_ids"]], pad_id)
    out = {
        "chosen_input_ids": chosen_ids, "chosen_attention_mask": chosen_mask,
        "rejected_input_ids": rejected_ids, "rejected_attention_mask": rejected_mask,
        "prompt_lengths": torch.as_tensor(np.asarray(batch["prompt_length"], dtype=np.int64)),
    }
    for name in ("ref_chosen_logps", "ref_rejected_logps"):
        if name in batch:
            out[name] = torch.as_tensor(np.asarray(batch[name], dtype=np.float64))
    return out


class RankPairCollate(NumpyBatchCollateFn):
    """``iter_torch_batches`` collate class: this rank's rows of a global batch, split into
    ``accumulation_steps`` micro-batches of padded tensors (a list, one entry per micro-batch;
    empty when the batch has fewer rows than ranks and none fall to this one)."""

    def __init__(self, rank: int, world_size: int, accumulation_steps: int, pad_id: int):
        super().__init__()
        self.rank, self.world_size = rank, world_size
        self.accumulation_steps, self.pad_id = accumulation_steps, pad_id

    def __call__(self, batch: dict[str, np.ndarray]) -> list[dict[str, torch.Tensor]]:
        rows = np.arange(len(batch["pair_id"]))[self.rank::self.world_size]
        if not len(rows):
            # Only a last held-out batch can be smaller than the world (training drops partial
            # batches): this rank has nothing to score in it, and says so with no micro-batch.
            return []
        micro = [chunk for chunk in np.array_split(rows, self.accumulation_steps) if len(chunk)]
        out = [collate_pairs({k: v[chunk] for k, v in batch.items()}, self.pad_id) for chunk in micro]
        # A checksum of the whole global batch, which every rank must agree on (see loop.py).
        crc = zlib.crc32("".join(map(str, batch["pair_id"])).encode()) & 0x7FFFFFFF
        out[0]["global_batch_crc"] = torch.tensor(crc % (1 << 24))  # exact in float64 reductions
        return out
