"""The typed values that cross a boundary between an item, its batch and its run.

An item record is stored as one JSON object (:meth:`ItemRecord.to_json`): the lines of
``manifest.jsonl`` are those bytes, read by tools that know nothing of polyburn
(:mod:`polyburn.manifest`).
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal


class _Absent(enum.Enum):
    ABSENT = "ABSENT"

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return "ABSENT"


ABSENT = _Absent.ABSENT
"""The value of :attr:`ItemRecord.subset` when the record does not have the field at all (the
item was never read, or an older polyburn wrote the record): falsy, and unlike None (the item has
no subset) it is not written."""

_NOT_STORED = {"stored": False}


@dataclass(slots=True)
class ItemRecord:
    """What a run knows of one item: its manifest line, typed (see ``docs/outputs.md``).

    A field holding None is one the record does not have, and is not written: the item failed
    before it was known, the run did not do that step, or an older polyburn wrote the record.
    ``item``, ``path``, ``status`` and ``error`` are always written (``error`` null when ok);
    ``subset`` is written as null when the item has no ML subset and left out only when it is
    :data:`ABSENT`.

    The item: ``path`` (its item path), ``item`` (its id: Dataloop's, or the export's),
    ``status`` ("ok" or "failed"), ``error`` (one line, None when ok), ``transient`` (True: the
    failure was worth another try, and the retries did not help), ``revision`` (its cheap change
    marker), ``width`` and ``height`` (pixels), ``annotations`` (how many it had; a video's
    objects), ``skipped`` (annotation type → count of those not burned: boxes, points...),
    ``problems`` (the rejected annotations), ``subset`` (its ML subset), ``labels`` (the labels
    of its pixel annotations, sorted), ``file_name`` (its path as in Dataloop).
    What was burned: ``repairs``, ``shapes`` (shapes burned; a video's states), ``outputs``
    (each ``key``, ``sha256``, ``bytes`` and ``written``: whether this run wrote it),
    ``skipped_empty`` (True: nothing to burn, no masks written), ``video`` (``tracks``,
    ``frame_count``, ``frame_count_source``, ``frames``: [first, last] written).
    The run that wrote it: ``seconds`` (wall time of the item), ``retries`` (the item's earlier
    attempts), ``io_retries`` (the destination's retried requests), ``polyburn_version``,
    ``recipe`` (the item's recipe digest, :mod:`polyburn.recipe`; ok records only).

    The nested parts (``problems``, ``repairs``, ``outputs``, ``skipped``, ``video``) stay
    JSON-ready dicts and lists, as :meth:`to_dict` hands them out (not copied).

    ``extra``: the keys this polyburn does not know (a newer one wrote them), and known keys a
    writer set to null, kept as they were so that they are written back.

    Not stored, ever (they only travel with the record to the batch's end): ``preview`` (the
    item's mask previews, :func:`polyburn.report.mask_previews`, when one was asked for; {}
    when there is no picture) and ``cleanup`` (what :meth:`~polyburn.destinations.Destination.
    take_cleanup` left for ``finish_batch``: Dataloop's replaced annotation ids).
    """

    path: str
    item: str | None = None
    status: str = "ok"
    error: str | None = None
    transient: bool | None = None
    revision: str | None = None
    width: int | None = None
    height: int | None = None
    annotations: int | None = None
    skipped: dict[str, int] | None = None
    problems: list[dict[str, Any]] | None = None
    subset: str | None | Literal[_Absent.ABSENT] = ABSENT
    labels: list[str] | None = None
    file_name: str | None = None
    repairs: list[dict[str, Any]] | None = None
    shapes: int | None = None
    outputs: list[dict[str, Any]] | None = None
    skipped_empty: bool | None = None
    video: dict[str, Any] | None = None
    seconds: float | None = None
    retries: int | None = None
    io_retries: int | None = None
    polyburn_version: str | None = None
    recipe: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    preview: dict[str, Any] | None = field(default=None, metadata=_NOT_STORED)
    cleanup: Any = field(default=None, metadata=_NOT_STORED)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def output_keys(self) -> list[str]:
        """The keys of the outputs the record lists."""
        return [o["key"] for o in self.outputs or () if isinstance(o, dict) and "key" in o]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ItemRecord:
        """The record a JSON object holds, as any polyburn wrote it: fields it lacks are left
        unset, keys not known here are kept in ``extra``; one without a ``status`` is not ok
        ("failed"). Raises ValueError when ``data`` is not an object with a string ``path``
        (not a record)."""
        if not isinstance(data, Mapping) or not isinstance(data.get("path"), str):
            raise ValueError("not an item record: no path")
        keys = data.keys()
        kept = keys - _FIELDS  # (set operations: this runs for every record read)
        kept.update(k for k in keys & _OPTIONAL_SET if data[k] is None)
        if not kept and "status" in keys:
            return cls(**data)
        known = {k: v for k, v in data.items() if k not in kept}
        return cls(**{"status": "failed", **known}, extra={k: data[k] for k in data if k in kept})

    @classmethod
    def from_json(cls, line: bytes | str) -> ItemRecord:
        """The record of one manifest line; ValueError when it does not parse or is no record."""
        return cls.from_dict(json.loads(line))

    def to_dict(self) -> dict[str, Any]:
        """The record as stored: JSON-ready, without ``preview`` and ``cleanup``. For a record
        read with :meth:`from_dict`, equal to what it was read from."""
        data = dict(self.extra) if self.extra else {}
        data["item"] = self.item
        data["path"] = self.path
        data["status"] = self.status
        data["error"] = self.error
        if self.subset is not ABSENT:
            data["subset"] = self.subset
        for name in _OPTIONAL:
            value = getattr(self, name)
            if value is not None:
                data[name] = value
        return data

    def to_json(self) -> bytes:
        """The record's manifest line: what is stored, byte for byte (:func:`json_line`)."""
        return json_line(self.to_dict())


def json_line(data: Mapping[str, Any]) -> bytes:
    """``data`` as one JSON line: UTF-8, sorted keys, newline-terminated."""
    return (json.dumps(data, ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8")


_ALWAYS = ("item", "path", "status", "error")
_NULLABLE = frozenset((*_ALWAYS, "subset"))
"""Fields whose null is a value of theirs (written), not an absence."""
_OPTIONAL = tuple(
    f.name
    for f in fields(ItemRecord)
    if f.name not in _NULLABLE and f.name != "extra" and f.metadata.get("stored", True)
)
"""The fields written only when they are not None."""
_OPTIONAL_SET = frozenset(_OPTIONAL)
_FIELDS = _NULLABLE | _OPTIONAL_SET
"""The keys a stored record has fields for."""


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

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunSummary:
        """The summary :meth:`as_dict` gave (the flow's result): a field whose key is absent
        keeps its default (the run-level ones None), keys this polyburn does not know are
        left out. ``from_dict(s.as_dict()).as_dict() == s.as_dict()``."""
        return cls(**{k: v for k, v in data.items() if k in _SUMMARY_FIELDS})

    def as_dict(self) -> dict[str, Any]:
        """The summary as JSON-ready data; run-level fields left unset are left out."""
        data = asdict(self)
        for name in _RUN_LEVEL:
            if getattr(self, name) is None:
                del data[name]
        return data


_SUMMARY_FIELDS = frozenset(f.name for f in fields(RunSummary))
_RUN_LEVEL = (
    "label_map",
    "retries",
    "cached_batches",
    "unchanged_items",
    "polyburn_version",
    "shards",
    "removed_items",
)
"""The fields of a :class:`RunSummary` that :meth:`~RunSummary.as_dict` leaves out when None."""


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
