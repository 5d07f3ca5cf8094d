"""Which pairs form each global batch: shuffled and grouped by length inside bounded windows, in
an order that depends only on the data, the seed and the epoch.

The training split arrives in the reference cache's row order, which is the data's own row order:
every Ray Data stage keeps its input order (``ray_env.keep_order``), so the pool that scored the
pairs does not change it. Every worker reads that order in windows of ``shuffle_window`` global
batches, and for each epoch ``window_batches`` takes one window, with a generator seeded by
(seed, epoch, window):

- it permutes the window's pairs;
- only the last window can hold more pairs than whole batches; it drops the rest, as
  ``drop_last`` did;
- with ``group_by_length``, it sorts the pairs by packed length (prompt + chosen + rejected
  tokens), a stable sort, so equal lengths keep their random order;
- it cuts whole global batches and permutes their order.

What this does to shuffling: a pair meets only pairs of its own window, the same window every
epoch (as a local shuffle buffer over the file order did before). Shuffle a file that is sorted
(by topic, length or source) before training on it. With length grouping a batch holds pairs of
similar length, and batch order within a window changes every epoch. The global batch is formed
before it is split into ranks, so it is the same for any number of workers, and a resumed run
recomputes the same batches and skips the ones it trained.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


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
    """An epoch's global batches (numpy columns) from a Ray Train dataset shard (every pair, in the cache's order)."""
    windows = shard.iter_batches(batch_size=global_batch * shuffle_window, batch_format="numpy")
    for index, window in enumerate(windows):
        yield from window_batches(window, global_batch, seed, epoch, index, group_by_length)
