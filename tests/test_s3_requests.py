"""What a batch costs an S3 destination in requests, and what it does when the store pushes back.

Against the session's SeaweedFS, through the in-repo fault proxy (which counts every request and
injects faults). Batches run through :func:`polyburn.parallel.process_items`, the Prefect-free
core of the burn task, in this process, so the destination's in-flight window can be read.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import threading
import time
from pathlib import Path

import pytest

from polyburn import parallel
from polyburn.destinations.s3 import DEFAULT_MAX_POOL, S3Destination
from polyburn.inflight import InFlightWindow
from polyburn.manifest import manifest_line
from polyburn.parallel import process_items
from polyburn.params import MaskOptions
from polyburn.pipeline import scan_labels
from polyburn.records import ItemRecord
from polyburn.sources import open_source
from polyburn.state import (
    CLAIMS,
    RECORDS,
    attach_snapshot,
    current_records,
    settle_label_map,
    write_record,
    write_snapshot,
)
from tests.support.generate import write_export
from tests.test_s3 import intercept, proxied, stored

PREFIX = "runs/r1"
ITEMS = 40
OPTIONS = MaskOptions(modes=["semantic"])


@pytest.fixture
def export(tmp_path: Path) -> Path:
    return write_export(tmp_path / "export", ITEMS, seed=5, width=96, height=64, polygons=4)


def open_batch(export: Path, bucket: str):
    source = open_source(str(export))
    refs = list(source.list_items())
    destination = S3Destination.from_uri(f"s3://{bucket}/{PREFIX}")
    label_map = settle_label_map(destination.state, scan_labels(refs, source, 10**8))
    return source, refs, destination, label_map


def requests_by_kind(proxy, bucket: str) -> dict[str, int]:
    """Requests under the prefix, by method and by what they touch (state or masks)."""
    counts: dict[str, int] = {}
    for method in ("GET", "PUT", "HEAD", "DELETE", "POST"):
        for key in proxied(proxy, method, bucket):
            kind = "records" if key.startswith(RECORDS) else key.split("/", 1)[0]
            counts[f"{method} {kind}"] = counts.get(f"{method} {kind}", 0) + 1
    return counts


def check_stored_matches_records(weed_server, bucket: str, records: list[ItemRecord]) -> None:
    objects = stored(weed_server, bucket)
    masks = {k for k in objects if k.startswith("semantic/")}
    assert masks == {o["key"] for r in records for o in r.outputs}  # nothing lost or extra
    for record in records:
        stored_record = json.loads(objects[f"{RECORDS}{record.path}.json"])
        assert stored_record["outputs"] == record.outputs
        for output in record.outputs:
            assert hashlib.sha256(objects[output["key"]]).hexdigest() == output["sha256"]


def test_a_batch_costs_two_requests_per_item_and_a_rerun_writes_nothing(
    weed_server, s3_bucket, s3_env, fault_proxy, export
):
    """First run: per item one mask PUT and one record PUT, nothing else (no lease per item,
    no record GET for items without one, no HEAD); the batch's state costs a handful of
    requests. A re-run reads the records together and sends no mask, no HEAD and no record; a
    run that verifies HEADs every mask."""
    s3_env(fault_proxy.endpoint_url)
    source, refs, destination, label_map = open_batch(export, s3_bucket)

    fault_proxy.clear()
    records = process_items(refs, source, destination, OPTIONS, label_map)
    assert all(r.status == "ok" for r in records)
    counts = requests_by_kind(fault_proxy, s3_bucket)
    assert counts.pop("PUT semantic") == ITEMS and counts.pop("PUT records") == ITEMS
    assert sum(counts.values()) <= 8, counts  # the claim and one listing of the records
    assert len(fault_proxy.seen) <= 2.2 * ITEMS
    check_stored_matches_records(weed_server, s3_bucket, records)

    fault_proxy.clear()
    again = process_items(refs, source, destination, OPTIONS, label_map)
    assert all(r.status == "ok" and not r.outputs[0]["written"] for r in again)
    counts = requests_by_kind(fault_proxy, s3_bucket)
    assert "PUT semantic" not in counts and "HEAD semantic" not in counts
    assert counts["GET records"] == ITEMS  # read together, before the items were burned
    assert "PUT records" not in counts  # each stored record already says what this run found

    fault_proxy.clear()
    verify = MaskOptions(modes=["semantic"], verify=True)
    verified = process_items(refs, source, destination, verify, label_map)
    assert all(not r.outputs[0]["written"] for r in verified)
    counts = requests_by_kind(fault_proxy, s3_bucket)
    assert counts["HEAD semantic"] == ITEMS and "PUT semantic" not in counts
    assert destination.state.entries(CLAIMS) == []


def test_throttling_and_resets_shrink_the_requests_in_flight_and_lose_nothing(
    weed_server, s3_bucket, s3_env, fault_proxy, export, no_retry_backoff
):
    """503 SlowDown and connection resets on mask uploads: the in-flight window halves, grows
    back as requests go through, and every item ends stored once, whole, with its record. Each
    fault costs exactly one more request (retries stay bounded)."""
    s3_env(fault_proxy.endpoint_url)  # the default concurrency: the connection pool's size
    source, refs, destination, label_map = open_batch(export, s3_bucket)
    assert destination.concurrent_items == destination.window.ceiling == DEFAULT_MAX_POOL
    fault_proxy.clear()
    throttled = fault_proxy.add("http503", times=10, match=r"^PUT .*/semantic/")
    reset = fault_proxy.add("reset", times=4, match=r"^PUT .*/semantic/")
    records = process_items(refs, source, destination, OPTIONS, label_map)
    assert all(r.status == "ok" for r in records), [r.error for r in records]
    assert throttled.hits == 10 and reset.hits == 4
    mask_puts = [k for k in proxied(fault_proxy, "PUT", s3_bucket) if k.startswith("semantic/")]
    assert len(mask_puts) == ITEMS + 14
    window = destination.window
    assert window.cuts >= 1 and window.lowest <= DEFAULT_MAX_POOL / 2
    assert window.window > window.lowest  # grew back as requests went through
    check_stored_matches_records(weed_server, s3_bucket, records)


def test_a_snapshot_reads_only_the_records_written_since_the_last_one(
    weed_server, s3_bucket, s3_env, fault_proxy, export, tmp_path
):
    """``manifest.jsonl`` lines whose bytes have the listed record's ETag are that record: the
    next snapshot reads none of them again, only records written since, and says the same as a
    read of every record."""
    s3_env(fault_proxy.endpoint_url)
    source, refs, destination, label_map = open_batch(export, s3_bucket)
    records = process_items(refs, source, destination, OPTIONS, label_map)
    written = tmp_path / "written.jsonl"  # what a run hands its snapshot: the records it stored
    written.write_bytes(b"".join(manifest_line(r) for r in records[1:]))
    fault_proxy.clear()
    write_snapshot(destination.state, tmp_path, known=[written])
    read = [k for k in proxied(fault_proxy, "GET", s3_bucket) if k.startswith(RECORDS)]
    assert read == [f"{RECORDS}{refs[0].path}.json"]  # the one record not handed over
    first = stored(weed_server, s3_bucket)["manifest.jsonl"]
    assert sorted(first.splitlines(keepends=True)) == sorted(manifest_line(r) for r in records)

    fault_proxy.clear()
    write_snapshot(destination.state, tmp_path)
    assert [k for k in proxied(fault_proxy, "GET", s3_bucket) if k.startswith(RECORDS)] == []
    assert stored(weed_server, s3_bucket)["manifest.jsonl"] == first

    for ref in refs[3:5]:  # two items edited since (a label renamed), burned by another run
        file = export / "json" / f"{ref.path}.json"
        file.write_text(file.read_text().replace('"label": "', '"label": "renamed-'))
    edited = open_source(str(export)).find([ref.path for ref in refs[3:5]])
    renamed = scan_labels(edited, source, 10**8)
    label_map = settle_label_map(destination.state, set(label_map) | renamed)
    process_items(edited, source, destination, OPTIONS, label_map)
    fault_proxy.clear()
    with current_records(destination.state, tmp_path) as spool:
        lines = [json.dumps(r.to_dict(), sort_keys=True) for r in spool.records()]
    read = [k for k in proxied(fault_proxy, "GET", s3_bucket) if k.startswith(RECORDS)]
    assert sorted(read) == sorted(f"{RECORDS}{ref.path}.json" for ref in refs[3:5])
    objects = stored(weed_server, s3_bucket)
    every = sorted(
        json.dumps(json.loads(v), sort_keys=True)
        for k, v in objects.items()
        if k.startswith(RECORDS)
    )
    assert sorted(lines) == every


def test_the_in_flight_window_bounds_halves_and_grows_back():
    window = InFlightWindow(4, cooldown=0.05)
    active, peak, lock = [0], [0], threading.Lock()

    def hold() -> None:
        with window:
            with lock:
                active[0] += 1
                peak[0] = max(peak[0], active[0])
            time.sleep(0.01)
            with lock:
                active[0] -= 1

    threads = [threading.Thread(target=hold) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert peak[0] == 4

    window.congested()
    window.congested()  # within the cooldown: one burst counts once
    assert window.window == 2 and window.cuts == 1
    time.sleep(0.06)
    window.congested()
    assert window.window == 1 and window.lowest == 1
    for _ in range(20):
        window.succeeded()
    assert window.window == 4


def test_small_uploads_do_not_wait_for_100_continue(
    weed_server, s3_bucket, s3_env, tmp_path, monkeypatch
):
    """botocore sends ``Expect: 100-continue`` with every file-like upload, a round trip before
    the body; masks and records go without it (through botocore or the lean path), a large
    streamed file (a manifest) keeps it."""
    destination = S3Destination.from_uri(f"s3://{s3_bucket}/{PREFIX}")
    seen = intercept(destination, monkeypatch, lambda request: None)
    destination.put_new("semantic/a.png", b"x" * 50_000, "image/png", {"item-id": "a"})
    destination.put_record(f"{RECORDS}a.json", b'{"path": "a"}\n')  # the lean path
    destination.put_new("semantic/b.png", b"y" * 50_000, "image/png", {"item-id": "b"})
    big = tmp_path / "manifest.jsonl"
    big.write_bytes(b'{"path": "x"}\n' * 100_000)  # 1.4 MB
    destination.write_file("manifest.jsonl", big)
    sent = [(key.rpartition("/")[2], r.headers.get("Expect")) for m, key, r in seen if m == "PUT"]
    assert sent == [
        ("a.png", None),
        ("a.json", None),
        ("b.png", None),
        ("manifest.jsonl", b"100-continue"),
    ]
    assert stored(weed_server, s3_bucket)["semantic/a.png"] == b"x" * 50_000


def test_each_burn_process_opens_the_destination_once_for_all_its_threads(
    weed_server, s3_bucket, s3_env, fault_proxy, export
):
    """Items burned on two processes of 32 threads each: one client per process (its pool and
    in-flight window shared by its threads), so one up-front check per process, not per
    thread."""
    s3_env(fault_proxy.endpoint_url)
    if parallel._pool is not None:  # workers an earlier test started lack this environment
        parallel._discard_pool(parallel._pool)
    source, refs, destination, label_map = open_batch(export, s3_bucket)
    fault_proxy.clear()
    records = process_items(refs, source, destination, OPTIONS, label_map, workers=2)
    assert all(r.status == "ok" for r in records)
    checks = [k for k in proxied(fault_proxy, "PUT", s3_bucket) if k == ".polyburn/write-check"]
    assert 1 <= len(checks) <= 2


def test_reading_keys_spread_over_a_big_prefix_lists_a_bounded_range(
    weed_server, s3_bucket, s3_env, fault_proxy
):
    """get_many of a few keys far apart lists at most a page past the first, then GETs the
    keys beyond what it listed: never the whole prefix between them."""
    client = weed_server.client()
    keys = [f"r/{k:05d}.json" for k in range(2500)]
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        list(
            pool.map(
                lambda k: client.put_object(Bucket=s3_bucket, Key=f"{PREFIX}/{k}", Body=k), keys
            )
        )
    s3_env(fault_proxy.endpoint_url)
    destination = S3Destination.from_uri(f"s3://{s3_bucket}/{PREFIX}")
    wanted = [keys[0], keys[10], keys[1200], keys[2499], "r/01200x.json"]
    fault_proxy.clear()
    found = destination.get_many(wanted)
    assert found == {k: k.encode() for k in wanted if k in keys}
    assert len(fault_proxy.requests(r"^GET /[^/?]+\?list-type=2")) == 1
    assert destination.missing(wanted) == {"r/01200x.json"}


def test_a_rerun_takes_the_records_the_snapshot_holds_and_reads_only_the_others(
    weed_server, s3_bucket, s3_env, fault_proxy, export, tmp_path
):
    """A re-run with nothing in Prefect's cache (another worker, a wiped result store): the
    batch's records come from one read of the last snapshot, checked against the listing's
    ETags; only a record stored since the snapshot is read. Nothing is burned or written."""
    s3_env(fault_proxy.endpoint_url)
    source, refs, destination, label_map = open_batch(export, s3_bucket)
    first = process_items(refs, source, destination, OPTIONS, label_map)
    write_snapshot(destination.state, tmp_path)
    changed = dataclasses.replace(first[3], retries=1)  # stored since the snapshot: other bytes
    write_record(destination.state, changed)

    fault_proxy.clear()
    with attach_snapshot(destination.state, tmp_path, len(refs)) as lines:
        again = process_items(refs, source, destination, OPTIONS, label_map)
    assert lines == ITEMS and again.unchanged == ITEMS
    counts = requests_by_kind(fault_proxy, s3_bucket)
    assert counts.pop("GET records") == 1 and counts.pop("GET manifest.jsonl") == 1
    assert not any(kind.startswith(("PUT semantic", "PUT records")) for kind in counts)
    assert len(fault_proxy.seen) <= 0.2 * ITEMS, counts
    assert [r.outputs for r in again] == [
        [dict(o, written=False) for o in r.outputs] for r in first
    ]
