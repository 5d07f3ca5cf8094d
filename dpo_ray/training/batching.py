"""Which pairs form each global batch: shuffled and grouped by length inside bounded windows, in
an order that depends only on the pairs, the seed and the epoch.

1. On the driver, ``canonical_order`` sorts the training pairs by a seeded hash of their
   ``pair_id`` (a content hash). The cache's file layout, which depends on the scoring pool that
   wrote it, no longer decides which pairs train together, and the order is a random one.
2. Every worker reads that order in windows of ``shuffle_window`` global batches. For each epoch
   ``window_batches`` takes one window, with a generator seeded by (seed, epoch, window):
   - it permutes the window's pairs;
   - only the last window can hold more pairs than whole batches; it drops the rest, as
     ``drop_last`` did;
   - it sorts the pairs by packed length (prompt + chosen + rejected tokens), a stable sort, so
     equal lengths keep their random order (``group_by_length``);
   - it cuts whole global batches and permutes their order.

What this does to shuffling: a pair meets only pairs of its own window. Windows are random
subsets of the data (the hash order), but the same ones every epoch for a given seed, and with
length grouping a batch holds pairs of similar length. Batch order within a window changes
every epoch. The global batch is formed before it is split into ranks, so it is the same for any
number of workers, and a resumed run recomputes the same batches and skips the ones it trained.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import numpy as np

ORDER_COLUMN = "_order"


def order_keys(pair_ids, seed: int) -> np.ndarray:
    """(N,) pair ids -> (N,) uint64 sort keys: the first 8 bytes of blake2b(seed, pair_id)."""
    prefix = f"{seed}:".encode()
    return np.array([int.from_bytes(hashlib.blake2b(prefix + str(p).encode(), digest_size=8).digest(), "big")
                     for p in pair_ids], dtype=np.uint64)


def canonical_order(dataset, seed: int):
    """The Ray dataset sorted by ``order_keys`` (lazy; the sort runs when it is consumed)."""
    def add_key(batch: dict) -> dict:
        batch[ORDER_COLUMN] = order_keys(batch["pair_id"], seed)
        return batch

    return dataset.map_batches(add_key, batch_format="numpy").sort(ORDER_COLUMN).drop_columns([ORDER_COLUMN])


def packed_lengths(window: dict[str, np.ndarray]) -> np.ndarray:
    """(N,) tokens of each pair as one prompt|chosen|rejected sequence."""
    return np.array([len(c) + len(r) for c, r in zip(window["chosen_input_ids"], window["rejected_input_ids"])]
                    ) - np.asarray(window["prompt_length"], dtype=np.int64)


def window_batches(window: dict[str, np.ndarray], global_batch: int, seed: int, epoch: int, index: int,
                   group_by_length: bool) -> list[dict[str, np.ndarray]]:
    """One window of pairs (numpy columns of N rows) -> its whole global batches, in training order."""
    rng = np.random.default_rng([seed, epoch, index])
    rows = rng.permutation(len(window["pair_id"]))
    rows = rows[:len(rows) // global_batch * global_batch]
    if group_by_length:
        rows = rows[np.argsort(packed_lengths(window)[rows], kind="stable")]
    batches = rows.reshape(-1, global_batch)[rng.permutation(len(rows) // global_batch)]
    return [{name: column[batch] for name, column in window.items()} for batch in batches]


def epoch_batches(shard, global_batch: int, shuffle_window: int, seed: int, epoch: int,
                  group_by_length: bool) -> Iterator[dict[str, np.ndarray]]:
    """An epoch's global batches (numpy columns) from a Ray Train dataset shard in canonical order."""
    windows = shard.iter_batches(batch_size=global_batch * shuffle_window, batch_format="numpy")
    for index, window in enumerate(windows):
        yield from window_batches(window, global_batch, seed, epoch, index, group_by_length)
