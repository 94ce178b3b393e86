"""Listing items and collecting their labels."""

from __future__ import annotations

from datetime import datetime

from prefect import task

from polyburn import parallel
from polyburn.model import ItemRef
from tasks.common import IO_TASK_OPTIONS, source_for


@task(name="list-items", **IO_TASK_OPTIONS)
def list_items(
    source_uri: str, item_filter: str | None = None, updated_since: datetime | None = None
) -> list[ItemRef]:
    """Every item of the source (matching the filter), in a stable order."""
    return list(source_for(source_uri, item_filter, updated_since).list_items())


@task(name="collect-labels", **IO_TASK_OPTIONS)
def collect_labels(
    source_uri: str, refs: list[ItemRef], max_pixels: int, workers: int = 1
) -> list[str]:
    """The labels of the pixel annotations of the items; one task run for all of them, spread
    over ``workers`` processes (the burn pool)."""
    return sorted(parallel.collect_labels(refs, source_for(source_uri), max_pixels, workers))
