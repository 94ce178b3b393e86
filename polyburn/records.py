"""The typed values that cross a boundary between a batch and its run.

Item records stay JSON objects: they are the lines of ``manifest.jsonl``, read by tools that
know nothing of polyburn (:mod:`polyburn.manifest`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class BatchResult:
    """What a ``burn-batch`` task run returns (and what Prefect's cache keeps of it).

    ``records``: the batch's item records, packed (:func:`polyburn.manifest.pack_records`);
    ``items``: how many; ``attempts``: the task run's attempt that produced them (1 = first);
    ``unchanged``: items whose record already had their recipe digest, so they were not burned;
    ``previews``: path → the previews of the batch's items asked for one (empty: no picture).
    """

    records: bytes
    items: int
    attempts: int = 1
    unchanged: int = 0
    previews: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class RunSummary:
    """What a run reports: the counts over its items' records (:class:`~polyburn.manifest.
    RunCounts`), then what the run itself knows. :meth:`as_dict` is the flow's result, the
    CLI's ``--json`` and the summary artifact's source; ``shards`` and ``removed_items`` appear
    only when the run had them."""

    items: int = 0
    ok: int = 0
    failed: int = 0
    annotations: int = 0
    shapes: int = 0
    repairs: int = 0
    repairs_by_kind: dict[str, int] = field(default_factory=dict)
    rejected: int = 0
    rejections: list[dict[str, Any]] = field(default_factory=list)
    empty_items: int = 0
    empty_items_skipped: int = 0
    empty: list[dict[str, Any]] = field(default_factory=list)
    skipped_by_type: dict[str, int] = field(default_factory=dict)
    item_retries: int = 0
    io_retries: int = 0
    outputs_written: int = 0
    seconds: float = 0.0
    failures: list[dict[str, str]] = field(default_factory=list)
    """At most :data:`~polyburn.manifest.MAX_LISTED_FAILURES` (path, error), by path."""
    label_map: dict[str, int] | None = None
    retries: int | None = None
    """Batch task retries (Prefect's)."""
    cached_batches: int | None = None
    unchanged_items: int | None = None
    """Items not burned: their record had the recipe digest they have now."""
    polyburn_version: str | None = None
    shards: list[dict[str, Any]] | None = None
    removed_items: list[str] | None = None

    def as_dict(self) -> dict[str, Any]:
        """The summary as JSON-ready data; run-level fields left unset are left out."""
        summary = asdict(self)
        for optional in ("label_map", "retries", "cached_batches", "unchanged_items"):
            if summary[optional] is None:
                del summary[optional]
        for optional in ("polyburn_version", "shards", "removed_items"):
            if summary[optional] is None:
                del summary[optional]
        return summary


@dataclass
class ShardOutcome:
    """How one shard of a sharded run ended (:func:`flows.shards.run_shards`).

    ``shard``: its number, from 0; ``run``: its flow run's name; ``state`` and ``message``:
    how it ended; ``completed``: whether it completed; ``items``: how many items it had (its
    ``refs``); ``attempts``: shard runs started for it; ``ran_here``: run in the parent's
    process because no worker started it."""

    shard: int
    run: str
    state: str
    message: str
    completed: bool
    items: int
    attempts: int
    ran_here: bool = False
    refs: list[Any] = field(default_factory=list, repr=False)

    def summary(self) -> dict[str, Any]:
        """What the run summary shows of it (``shards``): all but its refs and completion."""
        shown = asdict(self)
        del shown["refs"], shown["completed"]
        return shown
