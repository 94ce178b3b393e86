"""The run-level state: the label map first, the manifest snapshot last."""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from prefect import task

from polyburn.dataset import write_dataset_files
from polyburn.pipeline import resolve_label_map
from polyburn.state import migrate, write_snapshot
from tasks.common import IO_TASK_OPTIONS, destination_for


@task(name="publish-label-map", **IO_TASK_OPTIONS)
def publish_label_map(
    destination_uri: str,
    labels_file: str | None,
    found: Iterable[str],
    declared: Mapping[str, Any] | None = None,
) -> dict[str, int]:
    """The run's label map, settled at the destination (see
    :func:`polyburn.pipeline.resolve_label_map`)."""
    return resolve_label_map(labels_file, destination_for(destination_uri), found, declared)


@task(name="migrate-state", **IO_TASK_OPTIONS)
def migrate_state(destination_uri: str) -> int:
    """Give a destination written by an earlier polyburn its per-item records (once)."""
    with tempfile.TemporaryDirectory(prefix="polyburn-migrate-") as folder:
        return migrate(destination_for(destination_uri).state, Path(folder))


@task(name="publish-manifest", **IO_TASK_OPTIONS)
def publish_manifest(
    destination_uri: str, forget: list[str], written: str | None = None
) -> dict[str, Any]:
    """Delete the records at ``forget`` (items gone from the source), then write
    ``manifest.jsonl`` from every item's current record and, for a folder or S3 destination,
    the splits and COCO files (:mod:`polyburn.dataset`); returns the snapshot's counts
    (``RunCounts.as_dict``). ``written`` is a local file of the records this run stored
    (manifest lines): those still current are not read back from the store."""
    destination = destination_for(destination_uri)
    state = destination.state
    state.remove(forget)
    with tempfile.TemporaryDirectory(prefix="polyburn-manifest-") as folder:
        scratch = Path(folder)

        def dataset_files(spool) -> None:
            if state is destination:  # a Dataloop destination's state folder is no dataset
                write_dataset_files(state, spool, scratch)

        known = [Path(written)] if written else []
        with write_snapshot(state, scratch, dataset_files, known) as spool:
            return spool.counts.as_dict(0.0)
