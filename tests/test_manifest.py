"""The run manifest on disk: spooled records, replacement, partial-run merges, streamed I/O."""

from __future__ import annotations

import dataclasses
import json
import os
import tracemalloc
from pathlib import Path

import pytest

from polyburn.destinations.base import MANIFEST_KEY
from polyburn.destinations.local import LocalDestination
from polyburn.manifest import (
    MAX_LISTED_FAILURES,
    RecordSpool,
    iter_manifest,
    manifest_line,
)
from polyburn.records import ItemRecord


def record(path: str, status: str = "ok", **extra) -> ItemRecord:
    base = {
        "item": f"id-{path}",
        "path": path,
        "status": status,
        "error": None if status == "ok" else f"{path}: broken",
        "annotations": 3,
        "shapes": 2,
        "problems": [{"annotation": "a", "reason": "nan"}] if status != "ok" else [],
        "repairs": [{"kind": "clipped"}, {"kind": "made_valid"}],
        "skipped": {"point": 1},
        "outputs": [{"key": f"semantic/{path}.png", "written": True}],
    }
    return ItemRecord.from_dict(base | extra)


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_spool_writes_records_sorted_by_path_and_counts_them(tmp_path):
    records = [record("b/2"), record("a/1", "failed"), record("c", retries=2, io_retries=1)]
    with RecordSpool(tmp_path) as spool:
        for r in records:
            spool.add(r)
        manifest = spool.write_manifest(tmp_path / "m.jsonl")
        counts = spool.counts.as_dict(1.5)
    assert [r["path"] for r in lines(manifest)] == ["a/1", "b/2", "c"]
    assert lines(manifest) == sorted((r.to_dict() for r in records), key=lambda r: r["path"])
    assert counts["annotations"] == 9 and counts["shapes"] == 6 and counts["seconds"] == 1.5
    assert counts["items"] == 3 and counts["ok"] == 2 and counts["failed"] == 1
    assert counts["repairs_by_kind"] == {"clipped": 3, "made_valid": 3}
    assert counts["skipped_by_type"] == {"point": 3}
    assert counts["item_retries"] == 2 and counts["io_retries"] == 1
    assert counts["outputs_written"] == 3 and counts["rejected"] == 1
    assert counts["failures"] == [{"path": "a/1", "error": "a/1: broken"}]


def test_a_record_added_again_replaces_the_first_in_manifest_and_counts(tmp_path):
    with RecordSpool(tmp_path) as spool:
        spool.add(record("x", "failed"))
        spool.add(record("y"))
        assert spool.counts.as_dict(0)["failures"] == [{"path": "x", "error": "x: broken"}]
        spool.add(record("x", retries=1))
        manifest = spool.write_manifest(tmp_path / "m.jsonl")
        counts = spool.counts.as_dict(0)
        assert len(spool) == 2 and spool.get("x").status == "ok"
    assert [r["status"] for r in lines(manifest)] == ["ok", "ok"]
    assert counts["failed"] == 0 and counts["failures"] == [] and counts["items"] == 2
    assert counts["repairs"] == 4 and counts["item_retries"] == 1


def test_torn_and_foreign_lines_of_a_manifest_are_skipped(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_bytes(manifest_line(record("a")) + b"not json\n[1, 2]\n{}\n" + b'{"path": "b"}')
    assert [r.path for _, _, r in iter_manifest(path)] == ["a", "b"]


def test_failures_listed_are_capped_but_all_counted(tmp_path):
    with RecordSpool(tmp_path) as spool:
        for k in range(MAX_LISTED_FAILURES + 5):
            spool.add(record(f"{k:05d}", "failed"))
        counts = spool.counts.as_dict(0)
    assert counts["failed"] == MAX_LISTED_FAILURES + 5
    assert len(counts["failures"]) == MAX_LISTED_FAILURES


def test_spool_memory_does_not_hold_the_records(tmp_path):
    """The spool keeps an index, not the records: its file grows, its index stays small."""
    big = record("x", repairs=[{"kind": "clipped", "detail": "y" * 200}] * 50)
    with RecordSpool(tmp_path) as spool:
        tracemalloc.start()
        for k in range(2000):
            spool.add(dataclasses.replace(big, path=f"{k:06d}"))
        held, _ = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        size = spool._file.seek(0, os.SEEK_END)
    assert size > 2000 * 10_000  # ~20 MB of records went to disk ...
    assert held < 2_000_000  # ... and well under 1 kB per record stayed in memory


def large_manifest(path: Path) -> Path:
    """~12 MB of manifest lines: several 1 MiB blocks each way."""
    with open(path, "wb") as handle:
        for k in range(6000):
            handle.write(manifest_line(record(f"{k:06d}", detail="z" * 1800)))
    return path


class TracedPeak:
    """Python's allocations traced inside ``with``; ``bytes``: their peak, afterwards."""

    def __enter__(self) -> TracedPeak:
        tracemalloc.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bytes = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()


def test_local_destination_streams_the_manifest_and_skips_an_identical_one(tmp_path):
    destination = LocalDestination(tmp_path / "dest")
    target = tmp_path / "copy.jsonl"
    assert destination.read_file(MANIFEST_KEY, target) is False
    source = tmp_path / "m.jsonl"
    source.write_bytes(manifest_line(record("a")) + manifest_line(record("b")))
    first = destination.write_file(MANIFEST_KEY, source)
    again = destination.write_file(MANIFEST_KEY, source)
    assert first.written and not again.written and first.sha256 == again.sha256
    assert (tmp_path / "dest" / MANIFEST_KEY).read_bytes() == source.read_bytes()
    assert (
        destination.read_file(MANIFEST_KEY, target) and target.read_bytes() == source.read_bytes()
    )
    assert not list((tmp_path / "dest").rglob("*.part"))

    # streamed both ways: a large manifest is never held in memory whole
    large = large_manifest(tmp_path / "large.jsonl")
    with TracedPeak() as traced:
        assert destination.write_file(MANIFEST_KEY, large).written
        assert destination.read_file(MANIFEST_KEY, target)
    assert target.read_bytes() == large.read_bytes()
    assert traced.bytes < large.stat().st_size / 4


@pytest.fixture
def s3_destination(weed_server, s3_bucket, monkeypatch, tmp_path):
    from polyburn.destinations.s3 import S3Destination

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", weed_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", weed_server.secret_key)
    monkeypatch.setenv("AWS_DEFAULT_REGION", weed_server.region)
    monkeypatch.setenv("AWS_ENDPOINT_URL", weed_server.endpoint_url)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    return S3Destination.from_uri(f"s3://{s3_bucket}/runs")


def test_s3_destination_streams_a_large_manifest_both_ways(s3_destination, tmp_path):
    source = large_manifest(tmp_path / "m.jsonl")
    missing = tmp_path / "missing.jsonl"
    assert s3_destination.read_file(MANIFEST_KEY, missing) is False
    copy = tmp_path / "copy.jsonl"
    with TracedPeak() as traced:
        first = s3_destination.write_file(MANIFEST_KEY, source)
        assert s3_destination.read_file(MANIFEST_KEY, copy) is True
    assert traced.bytes < source.stat().st_size / 4  # never the whole manifest in memory
    again = s3_destination.write_file(MANIFEST_KEY, source)
    assert first.written and not again.written
    assert first.size == source.stat().st_size
    assert copy.read_bytes() == source.read_bytes()
    assert s3_destination.get(MANIFEST_KEY) == source.read_bytes()


def test_packed_records_round_trip_and_are_small():
    from polyburn.manifest import pack_records, unpack_records

    records = [record(f"p/{k:04d}", "failed" if k % 7 == 0 else "ok") for k in range(100)]
    packed = pack_records(records)
    assert unpack_records(packed) == records
    assert len(packed) * 5 < sum(len(manifest_line(r)) for r in records)
    assert unpack_records(pack_records([])) == []


def test_spool_passes_read_only_the_records_a_pass_asks_for(tmp_path):
    """``records(mentioning=...)`` yields exactly the records whose line holds the text (those
    listing an output under a prefix); ``records_with_problems`` those with rejections, kept
    right when a record is replaced."""
    coco = {"outputs": [{"key": "coco/items/b.json", "written": True}]}
    with RecordSpool(tmp_path) as spool:
        spool.add(record("c"))
        spool.add(record("b", **coco))
        spool.add(record("a", "failed"))
        spool.add(record("d", "failed"))
        spool.add(record("d"))  # replaced: no problems any more
        assert [r.path for r in spool.records(mentioning="coco/items/")] == ["b"]
        assert [r.path for r in spool.records(mentioning="semantic/")] == ["a", "c", "d"]
        assert [r.path for r in spool.records()] == ["a", "b", "c", "d"]
        assert [r.path for r in spool.records_with_problems()] == ["a"]
        with pytest.raises(ValueError):
            list(spool.records(mentioning='"path": "b"'))


def test_spool_keeps_the_line_it_is_given_unless_it_is_not_one_line(tmp_path):
    """A record's stored bytes go into the manifest as they are (no second encoding), a
    newline added when missing; bytes spanning several lines are encoded again."""
    stored = b'{"item": "i", "path": "a", "status": "ok", "error": null, "z_newer": 1}'
    pretty = b'{\n  "item": "j",\n  "path": "b",\n  "status": "ok",\n  "error": null\n}\n'
    with RecordSpool(tmp_path) as spool:
        spool.add(ItemRecord.from_json(stored), stored)
        spool.add(ItemRecord.from_json(pretty), pretty)
        manifest = spool.write_manifest(tmp_path / "m.jsonl").read_bytes()
    assert manifest.splitlines(keepends=True) == [
        stored + b"\n",
        manifest_line(ItemRecord.from_json(pretty)),
    ]


@pytest.mark.parametrize(
    "key", ["../x", "a/../../x", "/etc/passwd", "", ".", "a/..", "../dest-sibling/f"]
)
def test_local_destination_keys_never_leave_its_folder(tmp_path, key):
    destination = LocalDestination(tmp_path / "dest")
    with pytest.raises(ValueError, match="escapes"):
        destination.put(key, b"x", "text/plain", {})


def test_local_destination_keys_map_to_files_and_back(tmp_path):
    destination = LocalDestination(tmp_path / "dest")
    destination.put("a/b/c.png", b"1", "image/png", {"m": "1"})
    destination.put("a/./d/../e.txt", b"2", "text/plain", {"m": "1"})
    assert (tmp_path / "dest" / "a" / "b" / "c.png").read_bytes() == b"1"
    assert [e.key for e in destination.entries("a/")] == ["a/b/c.png", "a/e.txt"]
