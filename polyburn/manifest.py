"""Manifest lines, and a run's records and counts kept on disk as batches finish.

A manifest is one JSON line per item record (sorted keys), sorted by item path (see
:mod:`polyburn.state` for where records live and when ``manifest.jsonl`` is written). Records are
spooled to a temporary file as they arrive
(:class:`RecordSpool`): the run keeps a ``path → (offset, length)`` index and running counts
(:class:`RunCounts`), not the records, so its memory does not grow with the records' size.
"""

from __future__ import annotations

import os
import tempfile
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from polyburn.losses import MAX_LISTED_LOSSES, ListedByPath, empty_entry, is_empty, rejections_of
from polyburn.records import ItemRecord, RunSummary

MAX_LISTED_FAILURES = 1000
"""Failures kept for the summary and the artifacts; all of them are in the manifest."""


def output_keys(record: ItemRecord | None) -> list[str]:
    """The keys of the outputs a manifest record lists (none without a record)."""
    return record.output_keys() if record is not None else []


def manifest_line(record: ItemRecord) -> bytes:
    """A record as one manifest line (UTF-8, sorted keys, newline-terminated): the bytes stored
    as the item's record (:meth:`~polyburn.records.ItemRecord.to_json`)."""
    return record.to_json()


def pack_records(records: Iterable[ItemRecord]) -> bytes:
    """Records as zlib-compressed manifest lines: what a batch hands back to its flow run.

    Prefect keeps every task result of a flow run alive until the run ends (it links results to
    their states), so a batch's result must be small: ~25 kB for 100 records instead of ~1 MB
    of dicts.
    """
    return zlib.compress(b"".join(record.to_json() for record in records), 1)


def unpack_records(packed: bytes) -> list[ItemRecord]:
    """The records of :func:`pack_records`, in order."""
    return [record for _, record in unpack_lines(packed)]


def unpack_lines(packed: bytes) -> list[tuple[bytes, ItemRecord]]:
    """The manifest lines of :func:`pack_records` with their records, in order."""
    lines = zlib.decompress(packed).splitlines(keepends=True)
    return [(line, ItemRecord.from_json(line)) for line in lines]


def iter_manifest(path: str | os.PathLike) -> Iterator[tuple[int, bytes, ItemRecord]]:
    """``(offset, line, record)`` for each line of a manifest file that parses and names a
    path; other lines (a torn or hand-edited manifest) are skipped."""
    offset = 0
    with open(path, "rb") as handle:
        for line in handle:
            start, offset = offset, offset + len(line)
            try:
                record = ItemRecord.from_json(line)
            except ValueError:  # also a line that does not parse (JSON, UTF-8)
                continue
            yield start, line, record


class RunCounts:
    """Running counts over a run's item records; :meth:`summary` is the run summary."""

    def __init__(self) -> None:
        self.totals: Counter[str] = Counter()
        self.repairs: Counter[str] = Counter()
        self.skipped: Counter[str] = Counter()
        self.failures: dict[str, str] = {}
        self.rejections = ListedByPath(MAX_LISTED_LOSSES)
        self.empty = ListedByPath(MAX_LISTED_LOSSES)

    def add(self, record: ItemRecord, sign: int = 1) -> None:
        """Count ``record`` in (``sign=1``) or out again (``sign=-1``, a replaced record)."""
        failed = not record.ok
        empty = is_empty(record)
        self.totals.update(
            {
                "items": sign,
                "ok": 0 if failed else sign,
                "failed": sign if failed else 0,
                "annotations": sign * (record.annotations or 0),
                "shapes": sign * (record.shapes or 0),
                "rejected": sign * len(record.problems or ()),
                "empty": sign * empty,
                "empty_skipped": sign * bool(record.skipped_empty),
                "item_retries": sign * (record.retries or 0),
                "io_retries": sign * (record.io_retries or 0),
                "outputs_written": sign * sum(1 for o in record.outputs or () if o.get("written")),
            }
        )
        for repair in record.repairs or ():
            self.repairs[repair["kind"]] += sign
        for kind, count in (record.skipped or {}).items():
            self.skipped[kind] += sign * count
        if failed and sign > 0:
            if len(self.failures) < MAX_LISTED_FAILURES:
                self.failures[record.path] = record.error
        elif failed:
            self.failures.pop(record.path, None)
        self.rejections.update(record.path, rejections_of(record), sign)
        self.empty.update(record.path, [empty_entry(record)] if empty else [], sign)

    def summary(self, seconds: float) -> RunSummary:
        """The run summary of the records counted, the run taking ``seconds``."""
        totals = self.totals
        return RunSummary(
            items=totals["items"],
            ok=totals["ok"],
            failed=totals["failed"],
            annotations=totals["annotations"],
            shapes=totals["shapes"],
            repairs=sum(self.repairs.values()),
            repairs_by_kind={k: v for k, v in sorted(self.repairs.items()) if v},
            rejected=totals["rejected"],
            rejections=self.rejections.listed(),
            empty_items=totals["empty"],
            empty_items_skipped=totals["empty_skipped"],
            empty=self.empty.listed(),
            skipped_by_type={k: v for k, v in sorted(self.skipped.items()) if v},
            item_retries=totals["item_retries"],
            io_retries=totals["io_retries"],
            outputs_written=totals["outputs_written"],
            seconds=round(seconds, 3),
            failures=[{"path": p, "error": e} for p, e in sorted(self.failures.items())],
        )

    def as_dict(self, seconds: float) -> dict[str, Any]:
        """:meth:`summary` as JSON-ready data."""
        return self.summary(seconds).as_dict()


class RecordSpool:
    """A run's item records on disk, one manifest line each, with their counts.

    A record added again for the same path (an item processed once more) replaces the earlier
    one, in the manifest and in the counts. Use as a context manager, or :meth:`close`.
    """

    def __init__(self, directory: str | os.PathLike | None = None) -> None:
        self._file: BinaryIO = tempfile.TemporaryFile(  # noqa: SIM115 - closed by close()
            prefix="polyburn-records-", dir=directory
        )
        self._index: dict[str, tuple[int, int]] = {}
        self._with_problems: set[str] = set()
        self._end = 0
        self.counts = RunCounts()

    def __enter__(self) -> RecordSpool:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, path: object) -> bool:
        return path in self._index

    def add(self, record: ItemRecord, line: bytes | None = None) -> None:
        """Add ``record`` (replacing an earlier record of its path). ``line``: its manifest line
        when at hand (the bytes it was read from or stored as), kept instead of encoding the
        record again; bytes that are not one line are not used."""
        path = record.path
        if path in self._index:
            self.counts.add(self.get(path), sign=-1)
        if line is None or b"\n" in line[:-1]:
            line = record.to_json()
        elif not line.endswith(b"\n"):
            line += b"\n"
        self._file.seek(self._end)
        self._file.write(line)
        self._index[path] = (self._end, len(line))
        self._end += len(line)
        self.counts.add(record)
        if record.problems:
            self._with_problems.add(path)
        else:
            self._with_problems.discard(path)

    def get(self, path: str) -> ItemRecord:
        """The record of ``path`` (KeyError when there is none)."""
        return ItemRecord.from_json(self._line(path))

    def _line(self, path: str) -> bytes:
        offset, length = self._index[path]
        self._file.seek(offset)
        return self._file.read(length)

    def records(self, mentioning: str | None = None) -> Iterator[ItemRecord]:
        """This run's records, sorted by item path, read back one at a time.

        With ``mentioning``, only the records whose manifest line contains that text, which is
        checked before a line is parsed: a pass that wants, say, the records listing an output
        under some key prefix parses only those (a record listing one contains the prefix). The
        text must be one JSON writes as is (no quote, backslash or control character); raises
        ValueError otherwise."""
        if mentioning is None:
            for _, line in self._sorted_lines():
                yield ItemRecord.from_json(line)
            return
        if '"' in mentioning or "\\" in mentioning or not mentioning.isprintable():
            raise ValueError(f"{mentioning!r} is not written as is in JSON")
        needle = mentioning.encode("utf-8")
        for _, line in self._sorted_lines():
            if needle in line:
                yield ItemRecord.from_json(line)

    def records_with_problems(self) -> Iterator[ItemRecord]:
        """The records that list rejected annotations (``problems``), sorted by item path."""
        for path in sorted(self._with_problems):
            yield ItemRecord.from_json(self._line(path))

    def _sorted_lines(self) -> Iterator[tuple[str, bytes]]:
        for path in sorted(self._index):
            yield path, self._line(path)

    def write_manifest(self, target: Path) -> Path:
        """Write the records as a manifest to the local file ``target`` and return it."""
        with open(target, "wb") as handle:
            for _, line in self._sorted_lines():
                handle.write(line)
        return target
