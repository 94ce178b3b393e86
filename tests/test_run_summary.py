"""The run summary: a typed value in polyburn, a dict only as the flow's result and ``--json``."""

from __future__ import annotations

import json

import pytest

from polyburn.records import RunSummary

RUN_LEVEL = {
    "label_map": {"car": 1, "person": 2},
    "retries": 0,
    "cached_batches": 2,
    "unchanged_items": 5,
    "polyburn_version": "1.2.3",
    "shards": [{"shard": 0, "run": "r-0", "state": "COMPLETED", "message": "", "items": 3}],
    "removed_items": ["gone/one"],
}


def counted() -> RunSummary:
    return RunSummary(
        items=4,
        ok=3,
        failed=1,
        annotations=9,
        shapes=7,
        repairs=2,
        repairs_by_kind={"closed": 1, "self_intersection": 1},
        rejected=1,
        rejections=[{"path": "a", "annotation": "a-0", "reason": "degenerate"}],
        empty_items=1,
        empty_items_skipped=1,
        empty=[{"path": "e", "skipped": {"box": 1}, "rejected": 0, "skipped_empty": True}],
        skipped_by_type={"box": 1},
        item_retries=1,
        io_retries=3,
        outputs_written=6,
        seconds=1.5,
        failures=[{"path": "f", "error": "f: broken"}],
    )


@pytest.mark.parametrize("run_level", [{}, RUN_LEVEL], ids=["counts only", "with run fields"])
def test_a_summary_round_trips_through_its_dict(run_level):
    summary = counted()
    for name, value in run_level.items():
        setattr(summary, name, value)
    data = summary.as_dict()
    assert data.keys() >= set(run_level) and not data.keys() & (RUN_LEVEL.keys() - run_level)
    again = RunSummary.from_dict(data)
    assert again == summary
    assert again.as_dict() == data
    assert list(again.as_dict()) == list(data)  # the --json output's key order
    assert RunSummary.from_dict(json.loads(json.dumps(data))) == summary


def test_a_summary_dict_without_some_keys_reads_with_the_defaults():
    summary = RunSummary.from_dict({"items": 2, "ok": 2, "polyburn_version": "1.0", "new": 1})
    assert summary == RunSummary(items=2, ok=2, polyburn_version="1.0")
    assert summary.retries is None and summary.rejections == []
    assert summary.as_dict()["polyburn_version"] == "1.0" and "retries" not in summary.as_dict()
