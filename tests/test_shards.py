"""Sharding without a server: the split, the shard parameters and what is refused."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from flows.shards import shard_parameters, split_evenly
from polyburn.model import ItemRef
from polyburn.params import RunParameters, ShardOf


def refs(n: int, ids: bool = False) -> list[ItemRef]:
    return [
        ItemRef(item_id=f"id{k:03d}" if ids else "", path=f"p/{k:03d}", locator=f"l{k}")
        for k in range(n)
    ]


@pytest.mark.parametrize("n,count", [(12, 3), (10, 3), (2, 5), (1000, 7), (1, 1)])
def test_split_is_contiguous_even_and_loses_nothing(n, count):
    items = refs(n)
    slices = split_evenly(items, count)
    assert [r for piece in slices for r in piece] == items
    assert len(slices) == min(n, count)
    sizes = {len(piece) for piece in slices}
    assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1


def test_shard_parameters_narrow_the_run_to_the_shard_and_carry_the_label_map():
    params = RunParameters(
        source="dataloop://ds",
        destination="s3://bucket/masks",
        shards=4,
        item_filter='{"dir": "/a"}',
        incremental=True,
        strict=True,
        labels="labels.json",
        batch_size=7,
    )
    shard = ShardOf(group="run-1", index=2, count=4, label_map={"car": 1, "tree": 2})
    dumped = shard_parameters(params, refs(3, ids=True), shard)
    again = RunParameters.model_validate(dumped)  # what the shard run's flow receives
    assert again.item_ids == ["id000", "id001", "id002"]
    assert (again.shards, again.incremental, again.strict) == (0, False, False)
    assert again.item_filter is None and again.labels is None and again.updated_since is None
    assert again.shard_of == shard and again.batch_size == 7
    assert (again.source, again.destination) == (params.source, params.destination)
    local = shard_parameters(params.model_copy(update={"source": "export"}), refs(2), shard)
    assert local["item_ids"] == ["p/000", "p/001"]  # a local export has no item ids


def test_sharding_is_refused_where_shards_could_not_hand_back_their_records():
    with pytest.raises(ValidationError, match="dataloop:// destination keeps its run state"):
        RunParameters(destination="dataloop://ds", shards=2)
    shard = ShardOf(group="g", index=0, count=2, label_map={"a": 1})
    with pytest.raises(ValidationError, match="cannot be sharded again"):
        RunParameters(shards=2, shard_of=shard)
    with pytest.raises(ValidationError):
        RunParameters(shards=-1)
    assert RunParameters(destination="dataloop://ds", shards=1).shards == 1


def test_a_folder_lists_the_keys_under_a_prefix_without_temp_files(tmp_path):
    from polyburn.destinations.local import LocalDestination

    destination = LocalDestination(tmp_path)
    for key in ["a/b/1.jsonl", "a/b/c/2.jsonl", "a/bc/3.jsonl", "x.json"]:
        destination.put(key, b"{}", "application/json", {})
    (tmp_path / "a" / "b" / ".1.jsonl.123.abc.part").write_bytes(b"")
    assert destination.keys("a/b/") == ["a/b/1.jsonl", "a/b/c/2.jsonl"]
    assert destination.keys("a/b") == ["a/b/1.jsonl", "a/b/c/2.jsonl", "a/bc/3.jsonl"]
    assert destination.keys("") == ["a/b/1.jsonl", "a/b/c/2.jsonl", "a/bc/3.jsonl", "x.json"]
    assert destination.keys("nothing/here/") == []
