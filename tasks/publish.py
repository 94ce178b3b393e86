"""Writing the run-level objects: the label map first, the manifest last."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from polyburn.pipeline import write_label_map, write_manifest
from tasks.common import destination_for, retry_if_transient

_io = dict(
    retries=3,
    retry_delay_seconds=exponential_backoff(backoff_factor=2),
    retry_jitter_factor=0.5,
    retry_condition_fn=retry_if_transient,
    cache_policy=NO_CACHE,
)


@task(name="publish-label-map", **_io)
def publish_label_map(destination_uri: str, label_map: dict[str, int]) -> None:
    write_label_map(destination_for(destination_uri), label_map)


@task(name="publish-manifest", **_io)
def publish_manifest(destination_uri: str, records: list[dict]) -> None:
    write_manifest(destination_for(destination_uri), records)
