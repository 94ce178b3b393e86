"""Listing items and collecting their labels."""

from __future__ import annotations

from datetime import datetime

from prefect import task

from polyburn.model import ItemRef
from polyburn.pipeline import scan_labels
from tasks.common import IO_TASK_OPTIONS, source_for


@task(name="list-items", **IO_TASK_OPTIONS)
def list_items(
    source_uri: str, item_filter: str | None = None, updated_since: datetime | None = None
) -> list[ItemRef]:
    """Every item of the source (matching the filter), in a stable order."""
    return list(source_for(source_uri, item_filter, updated_since).list_items())


@task(name="collect-labels", **IO_TASK_OPTIONS)
def collect_labels(source_uri: str, refs: list[ItemRef], max_pixels: int) -> list[str]:
    """The labels of the pixel annotations of a batch of items."""
    return sorted(scan_labels(refs, source_for(source_uri), max_pixels))
