"""Which pairs train together (dpo_ray/training/batching.py): the same batches whatever the
cache's file layout (and the cache's row order is the data's whatever the pool: test_reference.py), every pair at most once per epoch, batches of similar length, a new batch
order every epoch."""

import numpy as np
import ray

from dpo_ray.training.batching import epoch_batches, packed_lengths, window_batches


def pairs(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """n fake pairs with random lengths: ids p0..p(n-1), prompt of 3 tokens."""
    rng = np.random.default_rng(seed)
    chosen = [list(range(3 + rng.integers(1, 60))) for _ in range(n)]
    rejected = [list(range(3 + rng.integers(1, 60))) for _ in range(n)]
    return {"pair_id": np.array([f"p{i}" for i in range(n)]),
            "chosen_input_ids": np.array(chosen, dtype=object),
            "rejected_input_ids": np.array(rejected, dtype=object),
            "prompt_length": np.full(n, 3)}


def ids(batches) -> list[list[str]]:
    return [b["pair_id"].tolist() for b in batches]


def test_a_window_yields_whole_batches_of_distinct_pairs_grouped_by_length():
    window = pairs(70)
    batches = window_batches(window, 8, seed=0, epoch=0, index=0, group_by_length=True)
    assert len(batches) == 8  # 70 pairs: 8 whole batches of 8, 6 pairs dropped as drop_last did
    flat = sum(ids(batches), [])
    assert len(set(flat)) == 64 and set(flat) <= set(window["pair_id"])
    spread = [np.ptp(packed_lengths(b)) for b in batches]
    random = window_batches(window, 8, seed=0, epoch=0, index=0, group_by_length=False)
    assert max(spread) < np.mean([np.ptp(packed_lengths(b)) for b in random]) / 2


def test_epochs_and_seeds_change_the_batch_order():
    window = pairs(64)
    first = ids(window_batches(window, 8, seed=0, epoch=0, index=0, group_by_length=True))
    assert first == ids(window_batches(window, 8, seed=0, epoch=0, index=0, group_by_length=True))
    second = ids(window_batches(window, 8, seed=0, epoch=1, index=0, group_by_length=True))
    assert first != second and sorted(sum(first, [])) == sorted(sum(second, []))
    ungrouped = [ids(window_batches(window, 8, seed=0, epoch=e, index=0, group_by_length=False))
                 for e in (0, 1)]
    assert sorted(map(sorted, ungrouped[0])) != sorted(map(sorted, ungrouped[1]))  # new batches
    assert first != ids(window_batches(window, 8, seed=1, epoch=0, index=0, group_by_length=True))


def test_the_batches_do_not_depend_on_the_datasets_block_layout(ray_session):
    """The same pairs in one block or in seven (as caches written by scoring pools of different
    sizes hold them): the same global batches, epoch after epoch."""
    rows = pairs(100)
    records = [{"pair_id": str(rows["pair_id"][i]), "chosen_input_ids": rows["chosen_input_ids"][i],
                "rejected_input_ids": rows["rejected_input_ids"][i], "prompt_length": 3} for i in range(100)]
    one = ray.data.from_items(records, override_num_blocks=1)
    many = ray.data.from_items(records, override_num_blocks=7)
    for epoch in (0, 1):
        batches = [ids(epoch_batches(ds.iterator(), 8, 4, 5, epoch, True)) for ds in (one, many)]
        assert batches[0] == batches[1]
        assert len(batches[0]) == 12  # windows of 32 pairs: 4 + 4 + 4 batches, 4 pairs dropped
