"""Batches whose boundaries follow the items' paths (polyburn.batching)."""

from __future__ import annotations

import random
import statistics

import pytest

from polyburn.batching import batches_of
from polyburn.model import ItemRef


def refs(n: int, seed: int = 0) -> list[ItemRef]:
    rng = random.Random(seed)
    paths = {f"{rng.choice('abcdef')}/img_{rng.randrange(10**9):09d}" for _ in range(n)}
    return [ItemRef("", path, "") for path in sorted(paths)]


@pytest.mark.parametrize("size", [1, 2, 3, 10, 100])
def test_batches_keep_every_item_in_order_within_their_bounds(size):
    items = refs(5000)
    batches = batches_of(items, size)
    assert [ref for batch in batches for ref in batch] == items
    assert all(max(1, size // 2) <= len(b) <= 2 * size for b in batches[:-1])
    assert 0.8 * size <= statistics.mean(len(b) for b in batches[:-1]) <= 1.2 * size
    assert batches_of(items, size) == batches  # deterministic


@pytest.mark.parametrize("where", [0, 1, 777, 2500, 4999])
def test_adding_or_removing_an_item_changes_at_most_two_batches(where):
    items = refs(5000, seed=1)
    before = {tuple(b) for b in batches_of(items, 50)}
    added = ItemRef("", items[where].path + "-new", "")
    for changed in (
        items[: where + 1] + [added] + items[where + 1 :],
        items[:where] + items[where + 1 :],
    ):
        after = [tuple(b) for b in batches_of(changed, 50)]
        assert sum(batch not in before for batch in after) <= 2


def test_a_batch_size_below_one_is_refused():
    with pytest.raises(ValueError, match="at least 1"):
        batches_of(refs(3), 0)
