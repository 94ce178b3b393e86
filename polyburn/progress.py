"""Process-wide hooks through which a flow reports to whoever started it in the same process
(the CLI): progress after each batch, and the run's records at its end. No-ops when nobody
listens."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from polyburn.records import ItemRecord

_listener: Callable[[int, int], None] | None = None


def set_listener(listener: Callable[[int, int], None] | None) -> None:
    """``listener(done, total)`` is called after each batch; None removes it."""
    global _listener
    _listener = listener


def report(done: int, total: int) -> None:
    if _listener is not None:
        _listener(done, total)


_records_listener: Callable[[Iterator[ItemRecord]], None] | None = None


def set_records_listener(listener: Callable[[Iterator[ItemRecord]], None] | None) -> None:
    """``listener(records)`` is called once at the end of a run with an iterator over the run's
    item records, read back from its spool one at a time; None removes it."""
    global _records_listener
    _records_listener = listener


def report_records(records: Iterator[ItemRecord]) -> None:
    """Hand a finished run's records to the listener; they are not read when nobody listens."""
    if _records_listener is not None:
        _records_listener(records)
