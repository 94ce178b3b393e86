"""The main flow: list items → validate/repair → burn → publish, in batches."""

from __future__ import annotations

import time
from typing import Any

from prefect import flow, get_run_logger
from prefect.futures import as_completed
from prefect.states import Completed, Failed

from polyburn import progress
from polyburn.params import RunParameters
from polyburn.pipeline import previous_outputs, resolve_label_map, summarize
from tasks.common import destination_for, source_for
from tasks.items import collect_labels, list_items
from tasks.masks import burn_batch
from tasks.publish import publish_label_map, publish_manifest


def chunk(seq: list, size: int) -> list[list]:
    """Consecutive slices of ``seq`` of at most ``size`` elements."""
    return [seq[i : i + size] for i in range(0, len(seq), size)]


@flow(name="polygons-to-masks", log_prints=False, validate_parameters=True)
def polygons_to_masks(params: RunParameters | None = None) -> dict[str, Any]:
    """Turn the polygon and binary annotations of every item of ``params.source`` into masks at
    ``params.destination``, with a label map beside them and a manifest written last.

    Items are processed in batches of ``params.batch_size`` (one task run each). A failed item is
    reported in the manifest and the summary; the run fails only in ``strict`` mode.
    """
    params = params or RunParameters()
    logger = get_run_logger()
    started = time.perf_counter()
    source = source_for(params.source)
    destination = destination_for(params.destination)
    options = params.options

    refs = list_items(params.source, params.item_filter, params.updated_since)
    batches = chunk(refs, params.batch_size)
    logger.info("%d items from %s in %d batches", len(refs), params.source, len(batches))

    found: set[str] = set()
    if not params.labels:
        for labels in collect_labels.map(params.source, batches, options.max_pixels).result():
            found.update(labels)
    declared = source.labels()
    label_map = resolve_label_map(params.labels, destination, found, declared)
    publish_label_map(params.destination, label_map)
    colours = dict(declared) if declared else None

    previous = previous_outputs(destination)
    futures = [
        burn_batch.submit(
            params.source,
            params.destination,
            batch,
            options,
            label_map,
            colours,
            {ref.path: previous[ref.path] for ref in batch if ref.path in previous},
        )
        for batch in batches
    ]
    records: list[dict] = []
    progress.report(0, len(refs))
    for future in as_completed(futures):
        records.extend(future.result())
        progress.report(len(records), len(refs))

    publish_manifest(params.destination, records)
    summary = summarize(records, time.perf_counter() - started)
    summary["label_map"] = label_map
    logger.info(
        "%d items: %d ok, %d failed; %d annotations, %d repairs, %d rejected",
        summary["items"],
        summary["ok"],
        summary["failed"],
        summary["annotations"],
        summary["repairs"],
        summary["rejected"],
    )
    for failure in summary["failures"][:20]:
        logger.warning("failed: %s", failure["error"])
    if summary["failed"] and params.strict:
        return Failed(message=f"{summary['failed']} item(s) failed", data=summary)
    message = f"{summary['ok']} ok, {summary['failed']} failed"
    return Completed(message=message, data=summary)
