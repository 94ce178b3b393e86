"""Writing the run-level objects: the label map first, the manifest last."""

from __future__ import annotations

from prefect import task

from polyburn.pipeline import write_label_map, write_manifest
from tasks.common import IO_TASK_OPTIONS, destination_for


@task(name="publish-label-map", **IO_TASK_OPTIONS)
def publish_label_map(destination_uri: str, label_map: dict[str, int]) -> None:
    write_label_map(destination_for(destination_uri), label_map)


@task(name="publish-manifest", **IO_TASK_OPTIONS)
def publish_manifest(destination_uri: str, records: list[dict]) -> None:
    write_manifest(destination_for(destination_uri), records)
