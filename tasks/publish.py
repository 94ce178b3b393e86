"""Writing the run-level objects: the label map first, the manifest last."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from polyburn.destinations.base import MANIFEST_KEY
from polyburn.pipeline import write_label_map
from tasks.common import IO_TASK_OPTIONS, destination_for


@task(name="publish-label-map", **IO_TASK_OPTIONS)
def publish_label_map(destination_uri: str, label_map: dict[str, int]) -> None:
    write_label_map(destination_for(destination_uri), label_map)


@task(name="publish-manifest", **IO_TASK_OPTIONS)
def publish_manifest(destination_uri: str, manifest_file: str, key: str = MANIFEST_KEY) -> None:
    """Store the run's manifest (a local file, see :class:`polyburn.manifest.RecordSpool`), or
    a shard's records at ``key``."""
    destination_for(destination_uri).write_file(key, Path(manifest_file))
