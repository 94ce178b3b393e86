"""What a run lost: rejected annotations and items with nothing to burn, per record (pure)."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from polyburn.records import ItemRecord

MAX_LISTED_LOSSES = 1000
"""Rejected annotations, and items with nothing to burn, kept for the summary and the artifacts
(each a count as well); all of them are in the manifest."""


def rejections_of(record: ItemRecord) -> list[dict[str, Any]]:
    """The rejected annotations of a record, each with its item path: ``path``, ``annotation``
    (id), ``label``, ``field`` and ``reason`` (and ``frame``, for a state of a video item)."""
    return [
        {
            "path": record.path,
            "annotation": problem.get("annotation"),
            "label": problem.get("label"),
            "field": problem.get("field"),
            "reason": problem.get("reason"),
            **({"frame": problem["frame"]} if "frame" in problem else {}),
        }
        for problem in record.problems or ()
    ]


def is_empty(record: ItemRecord) -> bool:
    """Whether a record is of an item read without error that had nothing to burn: no polygon
    or binary annotation survived parsing and repair (only boxes, points, classes…, or none)."""
    return record.ok and (record.shapes or 0) == 0


def empty_entry(record: ItemRecord) -> dict[str, Any]:
    """What the summary says of an item with nothing to burn: its path, the annotation types it
    had instead (``skipped``, type → count), how many annotations were rejected, and whether
    its masks were left out (``skipped_empty``)."""
    return {
        "path": record.path,
        "skipped": dict(record.skipped or {}),
        "rejected": len(record.problems or ()),
        "skipped_empty": bool(record.skipped_empty),
    }


class ListedByPath:
    """Entries grouped by item path, at most ``limit`` of them in all: the run keeps the first
    ones it meets for its summary and counts the rest (a record counted out again takes its
    entries with it)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._by_path: dict[str, list[dict[str, Any]]] = {}
        self._size = 0

    def update(self, path: str, entries: list[dict[str, Any]], sign: int) -> None:
        """Add ``entries`` of ``path`` (``sign=1``), or drop that path's entries (``sign=-1``)."""
        if sign < 0:
            self._size -= len(self._by_path.pop(path, ()))
        elif entries and self._size < self.limit:
            kept = entries[: self.limit - self._size]
            self._by_path[path] = kept
            self._size += len(kept)

    def listed(self) -> list[dict[str, Any]]:
        """The kept entries, sorted by item path."""
        return [entry for path in sorted(self._by_path) for entry in self._by_path[path]]


class RejectionLog:
    """Every rejected annotation of a run, in a temporary file: :meth:`take` reads a run's
    records once (the run's records listener), iterating yields the rejections back, one at a
    time. Memory stays flat however many there are."""

    def __init__(self) -> None:
        self._file = tempfile.TemporaryFile(prefix="polyburn-rejections-")  # noqa: SIM115
        self.taken = False

    def take(self, records: Iterable[ItemRecord]) -> None:
        for record in records:
            for rejection in rejections_of(record):
                self._file.write(json.dumps(rejection).encode("utf-8") + b"\n")
        self.taken = True

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self._file.seek(0)
        for line in self._file:
            yield json.loads(line)

    def close(self) -> None:
        self._file.close()
