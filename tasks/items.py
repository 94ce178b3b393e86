"""Listing items and collecting their labels."""

from __future__ import annotations

from datetime import datetime

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from polyburn.model import ItemRef
from polyburn.pipeline import scan_labels
from tasks.common import retry_if_transient, source_for


@task(
    name="list-items",
    retries=3,
    retry_delay_seconds=exponential_backoff(backoff_factor=2),
    retry_jitter_factor=0.5,
    retry_condition_fn=retry_if_transient,
    cache_policy=NO_CACHE,
)
def list_items(
    source_uri: str, item_filter: str | None = None, updated_since: datetime | None = None
) -> list[ItemRef]:
    """Every item of the source (matching the filter), in a stable order."""
    return list(source_for(source_uri, item_filter, updated_since).list_items())


@task(
    name="collect-labels",
    retries=3,
    retry_delay_seconds=exponential_backoff(backoff_factor=2),
    retry_jitter_factor=0.5,
    retry_condition_fn=retry_if_transient,
    cache_policy=NO_CACHE,
)
def collect_labels(source_uri: str, refs: list[ItemRef], max_pixels: int) -> list[str]:
    """The labels of the pixel annotations of a batch of items."""
    return sorted(scan_labels(refs, source_for(source_uri), max_pixels))
