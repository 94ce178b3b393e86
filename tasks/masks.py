"""Burning a batch of items: one task run for many items (Prefect's per-task cost stays small)."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from polyburn.model import ItemRef
from polyburn.params import MaskOptions
from polyburn.pipeline import process_item
from tasks.common import destination_for, retry_if_transient, source_for


@task(
    name="burn-batch",
    retries=2,
    retry_delay_seconds=exponential_backoff(backoff_factor=2),
    retry_jitter_factor=0.5,
    retry_condition_fn=retry_if_transient,
    cache_policy=NO_CACHE,
)
def burn_batch(
    source_uri: str,
    destination_uri: str,
    refs: list[ItemRef],
    options: MaskOptions,
    label_map: dict[str, int],
    colours: dict[str, tuple[int, int, int]] | None = None,
    previous: dict[str, list[str]] | None = None,
) -> list[dict]:
    """Process each item of the batch; an item's failure is in its record, not an exception."""
    source = source_for(source_uri)
    destination = destination_for(destination_uri)
    previous = previous or {}
    return [
        process_item(
            ref,
            source,
            destination,
            options,
            label_map,
            colours,
            previous.get(ref.path, ()),
        )
        for ref in refs
    ]
