"""Listing items and collecting their labels."""

from __future__ import annotations

from datetime import datetime

from prefect import task

from polyburn import parallel
from polyburn.model import ItemRef
from tasks.common import IO_TASK_OPTIONS, source_for


@task(name="list-items", **IO_TASK_OPTIONS)
def list_items(
    source_uri: str,
    item_filter: str | None = None,
    updated_since: datetime | None = None,
    item_ids: list[str] | None = None,
) -> list[ItemRef]:
    """Every item of the source (matching the filter), in a stable order; with ``item_ids``,
    only those (items the source no longer has are left out). A source that can look items up
    (``find``: a local export, by path) does so without listing the rest."""
    source = source_for(source_uri, item_filter, updated_since)
    if item_ids is None:
        return list(source.list_items())
    find = getattr(source, "find", None)
    if find is not None:
        return find(item_ids)
    wanted = set(item_ids)
    return [ref for ref in source.list_items() if ref.path in wanted or ref.item_id in wanted]


@task(name="collect-labels", **IO_TASK_OPTIONS)
def collect_labels(
    source_uri: str, refs: list[ItemRef], max_pixels: int, workers: int = 1
) -> list[str]:
    """The labels of the pixel annotations of the items; one task run for all of them, spread
    over ``workers`` processes (the burn pool)."""
    return sorted(parallel.collect_labels(refs, source_for(source_uri), max_pixels, workers))
