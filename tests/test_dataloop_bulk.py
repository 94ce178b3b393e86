"""Issue #15: Dataloop read and written in bulk, with the REAL dtlpy client against the fake gate.

The bulk read (one ``itemId $in`` annotation query per page of items, item JSON from the listing)
gives the same items as the per-item read; an item whose annotations span two annotation pages
is whole; a failing page query heals inside the retry budget or fails exactly that page's items.
Write-back uploads once per item and removes replaced masks with one bulk delete per batch; a
bulk delete answered with a partial count fails exactly the items it missed, and the next run
converges. Requests are counted, so a regression to per-item calls fails here, not only in
``bench/dataloop_bulk.py``. Speed itself is measured there, never here.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from polyburn import dataloop_bulk as bulk
from polyburn.destinations.dataloop import DataloopDestination
from polyburn.errors import TransientError
from polyburn.model import Item
from polyburn.parallel import process_items
from polyburn.params import MaskOptions
from polyburn.pipeline import process_item, write_label_map
from polyburn.sources.dataloop import DataloopSource
from polyburn.state import failed_marks, read_record
from tests.support.fake_gate import FakeGate
from tests.test_dataloop import (  # noqa: F401 - dataloop_env: this module's environment
    QUERY,
    build_dataset,
    dataloop_env,
    ours,
    pixel_items,
    png_uri,
    run_flow,
    theirs,
)

LABELS = {"car": 1, "car.sedan": 2, "road": 3}
UPLOADS = r"/items/[0-9a-f]{24}/annotations$"
ITEM_GETS = r"/items/[0-9a-f]{24}$"


def same_item(a: Item, b: Item) -> None:
    """Two parsed items are equal: ids, size, revision, counts, every ring and mask."""
    assert (a.item_id, a.path, a.width, a.height, a.revision, a.filename, a.skipped) == (
        b.item_id,
        b.path,
        b.width,
        b.height,
        b.revision,
        b.filename,
        b.skipped,
    )
    assert [p.as_dict() for p in a.problems] == [p.as_dict() for p in b.problems]
    assert len(a.annotations) == len(b.annotations)
    for x, y in zip(a.annotations, b.annotations, strict=True):
        assert (x.annotation_id, x.label, x.type, x.index, x.object_id) == (
            y.annotation_id,
            y.label,
            y.type,
            y.index,
            y.object_id,
        )
        assert len(x.rings) == len(y.rings)
        assert all(np.array_equal(r, s) for r, s in zip(x.rings, y.rings, strict=True))
        assert (x.mask is None) == (y.mask is None)
        if x.mask is not None:
            assert np.array_equal(x.mask, y.mask)
    assert [o["id"] for o in a.own_outputs or []] == [o["id"] for o in b.own_outputs or []]


def own_mask(item_id: str) -> dict:
    """A mask an earlier polyburn run wrote on the item (never input)."""
    mask = np.zeros((16, 24), bool)
    mask[2:9, 3:12] = True
    marker = {"tool": "polyburn", "key": "semantic/car", "sha256": "0" * 64, "bytes": 1}
    return {
        "type": "binary",
        "label": "car",
        "coordinates": png_uri(mask),
        "metadata": {"user": {"polyburn": marker}},
        "itemId": item_id,
    }


def shift_polygons(gate: FakeGate, dataset_id: str, dx: float = 1.0) -> None:
    """Move every human polygon of the dataset by ``dx`` pixels (every item's masks change)."""
    with gate._lock:
        for annotation in gate.annotations.values():
            if annotation["datasetId"] == dataset_id and annotation["type"] == "segment":
                annotation["coordinates"] = [
                    [{**point, "x": point["x"] + dx} for point in ring]
                    for ring in annotation["coordinates"]
                ]


# ------------------------------------------------------------------------------------ read
def test_bulk_read_equals_the_per_item_read_with_one_query_per_page(fake_gate):
    ds, items = build_dataset(fake_gate, "bulk-read", 60, seed=11)
    own_id = fake_gate.add_annotations(items[0]["id"], [own_mask(items[0]["id"])])[0]["id"]
    source = DataloopSource.from_uri(f"dataloop://{ds}")
    refs = list(source.list_items())
    assert len(refs) == len(pixel_items(items)) == 54

    fake_gate.clear_requests()
    preloaded = source.preload(refs)
    assert len(fake_gate.requests) == 1  # 54 items: one annotation query, nothing per item
    body = fake_gate.requests[0].body
    assert body["resource"] == "annotations" and body["pageSize"] == 1000
    assert {"itemId": {"$in": [r.item_id for r in refs]}} in body["filter"]["$and"]
    assert {"type": {"$in": ["segment", "binary"]}} in body["filter"]["$and"]

    fake_gate.clear_requests()
    in_bulk = [source.load(ref, 10**8) for ref in preloaded]
    assert fake_gate.requests == []  # loading asks for nothing more
    one_by_one = [source.load(dataclasses.replace(ref, data=""), 10**8) for ref in refs]
    assert len(fake_gate.requests) == 2 * len(refs)  # the old path: GET item + a query each
    for a, b in zip(in_bulk, one_by_one, strict=True):
        same_item(a, b)

    first = in_bulk[0]
    car = next(a for a in first.annotations if a.label == "car")
    assert len(car.rings) == 2  # the hole is kept
    assert "binary" in {a.type for a in first.annotations}  # the human binary mask is input
    assert own_id not in {a.annotation_id for a in first.annotations}  # never input...
    assert [o["id"] for o in first.own_outputs] == [own_id]  # ...but known to write-back


def test_an_item_whose_annotations_span_two_pages_is_whole(fake_gate, monkeypatch):
    ds, items = build_dataset(fake_gate, "span", 6, seed=12)
    source = DataloopSource.from_uri(f"dataloop://{ds}")
    refs = list(source.list_items())
    monkeypatch.setattr(bulk, "ANNOTATIONS_PER_PAGE", 3)
    fake_gate.clear_requests()
    preloaded = source.preload(refs)
    pages = [r.body for r in fake_gate.requests_to(QUERY)]
    owners = [  # the item of each pixel annotation, in the order the pages return them
        a["itemId"]
        for a in sorted(fake_gate.annotations.values(), key=lambda a: a["id"])
        if a["datasetId"] == ds and a["type"] in ("segment", "binary")
    ]
    split = [owners[k - 1] == owners[k] for k in range(3, len(owners), 3)]
    assert any(split)  # some item has annotations on both sides of a page boundary
    assert len(pages) == len(owners) // 3 + 1
    for ref, bulk_ref in zip(refs, preloaded, strict=True):
        same_item(source.load(bulk_ref, 10**8), source.load(ref, 10**8))


def test_a_failing_page_query_heals_or_fails_exactly_its_items(fake_gate):
    ds, items = build_dataset(fake_gate, "pages", 12, seed=13)
    source = DataloopSource.from_uri(f"dataloop://{ds}")
    refs = list(source.list_items())
    first, second = refs[:5], refs[5:]

    fault = fake_gate.inject(QUERY, "http500", times=3, body=first[0].item_id)
    healed = source.preload(first)
    assert fault.hits == 3
    assert [source.load(r, 10**8).item_id for r in healed] == [r.item_id for r in first]

    fake_gate.inject(QUERY, "http503", times=None, body=second[0].item_id, message="overloaded")
    broken = source.preload(second)  # does not raise: the page's refs carry the error
    for ref in broken:
        with pytest.raises(TransientError) as err:
            source.load(ref, 10**8)
        assert f"reading the annotations of {len(second)} items" in str(err.value)
        assert str(err.value).endswith("HTTP 503: overloaded")
    assert all(source.load(r, 10**8) for r in source.preload(first))  # other pages unharmed


# ------------------------------------------------------------------------------------ write
def test_replaced_masks_go_in_one_bulk_delete_and_a_partial_count_fails_its_items(fake_gate):
    ds, items = build_dataset(fake_gate, "partial", 7, seed=15)
    source = DataloopSource.from_uri(f"dataloop://{ds}")
    destination = DataloopDestination.from_uri("dataloop://", source_dataset=source.uri)
    write_label_map(destination, LABELS)
    options = MaskOptions(modes=["semantic"])

    def publish() -> list[dict]:
        refs = source.preload(list(source.list_items()))
        return [process_item(r, source, destination, options, LABELS) for r in refs]

    records = publish()
    destination.finish_batch(records)
    assert all(r.status == "ok" and r.cleanup is None for r in records)
    first = {r.item: sorted(a["id"] for a in ours(fake_gate, r.item)) for r in records}

    shift_polygons(fake_gate, ds)
    records = publish()
    stale = {r.item: r.cleanup for r in records}
    assert all(stale[i] and set(stale[i]) <= set(first[i]) for i in stale)  # old ids only
    every = sorted(a for ids in stale.values() for a in ids)
    fake_gate.short_deletes(len(every) - 2)  # the server leaves the last 2 (and says so)
    fake_gate.clear_requests()
    destination.finish_batch(records)
    deletes = [r for r in fake_gate.requests_to(QUERY) if r.body.get("delete")]
    assert len(deletes) == 1 and not fake_gate.requests_to(r"/annotations/", "DELETE")
    assert {"id": {"$in": every}} in deletes[0].body["filter"]["$and"]
    assert len(fake_gate.requests) == 2  # the delete, then one look at what is left
    hit = {i for i, ids in stale.items() if set(ids) & set(every[-2:])}
    assert hit and len(hit) < len(records)
    for record in records:
        assert record.cleanup is None
        if record.item in hit:
            assert record.status == "failed"
            assert "did not delete the masks it replaced" in record.error
            assert record.error.startswith(record.path)
        else:
            assert record.status == "ok"

    records = publish()  # the next run removes what was left
    destination.finish_batch(records)
    assert all(r.status == "ok" for r in records)
    for record in records:
        keys = [a["metadata"]["user"]["polyburn"]["key"] for a in ours(fake_gate, record.item)]
        assert len(keys) == len(set(keys)) > 0


def test_requests_in_flight_are_bounded_per_process(fake_gate, monkeypatch):
    monkeypatch.setenv("POLYBURN_DATALOOP_CONCURRENCY", "3")
    ds, items = build_dataset(fake_gate, "flight", 30, seed=16)
    source = DataloopSource.from_uri(f"dataloop://{ds}")
    destination = DataloopDestination.from_uri("dataloop://", source_dataset=source.uri)
    write_label_map(destination, LABELS)
    refs = list(source.list_items())
    fake_gate.clear_requests()
    fake_gate.latency = 0.05
    try:
        records = process_items(refs, source, destination, MaskOptions(), LABELS, workers=1)
    finally:
        fake_gate.latency = 0.0
    assert all(r.status == "ok" for r in records)
    assert len(fake_gate.requests_to(UPLOADS, "POST")) == len(refs)  # one upload per item
    assert 2 <= fake_gate.max_in_flight <= 3
    assert len(fake_gate.requests) == len(refs) + 1  # + the batch's annotation query


@pytest.mark.usefixtures("prefect_api")
def test_write_back_of_1000_items_keeps_one_set_and_every_human_annotation(fake_gate):
    ds, items = build_dataset(fake_gate, "bulk-write", 1000, seed=14)
    listed = pixel_items(items)
    options = {"modes": ["instance", "binary"]}
    fake_gate.clear_requests()
    state, summary = run_flow(f"dataloop://{ds}", "dataloop://", options=options)
    assert state.is_completed() and summary["ok"] == len(listed) == 900, summary["failures"]
    uploads = fake_gate.requests_to(UPLOADS, "POST")
    assert len(uploads) == len(listed)  # one upload per item, all its masks in it
    assert not fake_gate.requests_to(ITEM_GETS, "GET")
    others = [(r.method, r.path) for r in fake_gate.requests if r not in uploads]
    assert len(others) <= 0.1 * len(listed), others  # listing pages, page queries, look-ups
    assert len(fake_gate.requests) <= 1.5 * len(listed)

    shift_polygons(fake_gate, ds)
    human = {it["id"]: theirs(fake_gate, it["id"]) for it in items}
    fake_gate.clear_requests()
    state, summary = run_flow(f"dataloop://{ds}", "dataloop://", options=options)
    assert state.is_completed() and summary["ok"] == 900, summary["failures"]
    deletes = [r for r in fake_gate.requests_to(QUERY) if r.body.get("delete")]
    assert 0 < len(deletes) <= 9 + 1  # one bulk delete per batch of 100, none per annotation
    assert not fake_gate.requests_to(r"/annotations/", "DELETE")
    assert len(fake_gate.requests) <= 1.5 * len(listed)
    for item in items:
        assert theirs(fake_gate, item["id"]) == human[item["id"]]  # humans' work untouched
        keys = [a["metadata"]["user"]["polyburn"]["key"] for a in ours(fake_gate, item["id"])]
        assert len(keys) == len(set(keys))
        assert bool(keys) == (item in listed)


@pytest.mark.usefixtures("prefect_api")
def test_a_one_item_run_makes_a_handful_of_requests(fake_gate):
    ds, items = build_dataset(fake_gate, "one-item", 150, seed=17)
    fake_gate.clear_requests()
    state, summary = run_flow(f"dataloop://{ds}", "dataloop://", item_ids=[items[5]["id"]])
    assert state.is_completed() and summary["items"] == summary["ok"] == 1
    asked = [(r.method, r.path) for r in fake_gate.requests]
    assert len(fake_gate.requests_to(QUERY)) == 3, asked  # the item, its labels, its burn
    assert len(asked) <= 10, asked  # + dataset, recipe and ontology look-ups and the upload


def test_an_item_read_ahead_is_read_again_when_another_run_stored_a_newer_version(
    fake_gate, tmp_path
):
    """Run A reads a page in bulk; the item is edited and run B (reading it now) stores the new
    version; when A reaches the item under its lease, it reads it again instead of writing the
    older version over B's."""
    from polyburn.destinations.local import LocalDestination
    from polyburn.state import read_record

    ds, items = build_dataset(fake_gate, "read-ahead", 6, seed=5)
    source = DataloopSource.from_uri(f"dataloop://{ds}")
    ref = next(r for r in source.list_items() if r.item_id == items[1]["id"])
    (ahead,) = source.preload([ref])  # run A's bulk read
    unchanged = dataclasses.replace(ahead)  # nothing stored since: no second read

    polygon = next(a for a in theirs(fake_gate, ref.item_id) if a["label"] == "road")
    fake_gate.annotations[polygon["id"]]["coordinates"] = [
        [{"x": 0, "y": 0}, {"x": 24, "y": 0}, {"x": 24, "y": 16}, {"x": 0, "y": 16}]
    ]
    fake_gate.update_item(ref.item_id)
    destination = LocalDestination(tmp_path / "masks")
    options = MaskOptions(modes=["semantic"])
    fresh = process_item(ref, source, destination, options, LABELS)  # run B, reads it now
    assert fresh.status == "ok"

    fake_gate.clear_requests()
    late = process_item(ahead, source, destination, options, LABELS)  # run A, later
    assert late.status == "ok" and late.revision == fresh.revision
    assert fake_gate.requests_to(ITEM_GETS, "GET")  # it read the item again
    stored = read_record(destination.state, ref.path)  # the newest revision's outputs
    assert stored.revision == fresh.revision
    assert [dict(o, written=None) for o in stored.outputs] == [
        dict(o, written=None) for o in fresh.outputs
    ]
    assert [o["written"] for o in late.outputs] == [False] * len(fresh.outputs)

    other = LocalDestination(tmp_path / "other")
    assert process_item(unchanged, source, other, options, LABELS).status == "ok"
    fake_gate.clear_requests()
    again = process_item(unchanged, source, other, options, LABELS)  # its own record: same run
    assert again.status == "ok" and not fake_gate.requests


def test_an_item_its_batch_fails_after_publishing_has_a_failed_record(fake_gate):
    """The bulk delete of the masks an item's new ones replaced runs after the item's record
    was stored; when Dataloop leaves some, the stored record says failed, as the run reports."""
    ds, items = build_dataset(fake_gate, "late-failure", 7, seed=15)
    source = DataloopSource.from_uri(f"dataloop://{ds}")
    destination = DataloopDestination.from_uri("dataloop://", source_dataset=source.uri)
    write_label_map(destination, LABELS)
    options = MaskOptions(modes=["semantic"])
    refs = list(source.list_items())
    assert all(r.status == "ok" for r in process_items(refs, source, destination, options, LABELS))
    shift_polygons(fake_gate, ds)
    fake_gate.short_deletes(2)  # the server deletes 2 of the replaced masks, leaves the rest
    records = process_items(list(source.list_items()), source, destination, options, LABELS)
    failed = [r for r in records if r.status == "failed"]
    assert failed and all("did not delete the masks it replaced" in r.error for r in failed)
    for record in records:
        stored = read_record(destination.state, record.path)
        assert stored.status == record.status
        assert stored.error == record.error
    assert set(failed_marks(destination.state)) == {r.path for r in failed}
