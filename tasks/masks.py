"""Burning a batch of items: one task run for many items (Prefect's per-task cost stays small)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from prefect import task
from prefect.runtime import task_run
from prefect.tasks import exponential_backoff

from polyburn.manifest import pack_records
from polyburn.model import ItemRef
from polyburn.parallel import process_items
from polyburn.params import MaskOptions
from polyburn.recipe import code_version
from polyburn.records import BatchResult
from tasks.common import destination_for, retry_if_transient, source_for


def batch_cache_key(context: Any, parameters: dict[str, Any]) -> str | None:
    """Cache key of a batch: what its output depends on — the items' revisions, the options,
    the label map, the source and destination (with the destination's identity token, so a
    wiped destination is refilled), the code version, and which of its items a killed or failed
    writer left unfinished at the destination (those are never taken from the cache). None (no
    caching) when an item's revision is unknown."""
    refs: list[ItemRef] = parameters["refs"]
    if not refs or any(not ref.revision for ref in refs):
        return None
    payload = {
        "code": code_version(),
        "source": parameters["source_uri"],
        "destination": parameters["destination_uri"],
        "token": parameters.get("destination_token"),
        "items": [(ref.item_id, ref.path, ref.revision) for ref in refs],
        "options": parameters["options"].model_dump(mode="json"),
        "labels": sorted(parameters["label_map"].items()),
        "colours": sorted((parameters.get("colours") or {}).items()),
        "previews": parameters.get("previews", 0),
        "unfinished": sorted(parameters.get("unfinished") or ()),
    }
    text = json.dumps(payload, sort_keys=True, default=str)
    return "polyburn-batch-" + hashlib.sha256(text.encode()).hexdigest()


@task(
    name="burn-batch",
    retries=2,
    retry_delay_seconds=exponential_backoff(backoff_factor=2),
    retry_jitter_factor=0.5,
    retry_condition_fn=retry_if_transient,
    cache_key_fn=batch_cache_key,
    persist_result=True,
    cache_result_in_memory=False,
)
def burn_batch(
    source_uri: str,
    destination_uri: str,
    refs: list[ItemRef],
    options: MaskOptions,
    label_map: dict[str, int],
    colours: dict[str, tuple[int, int, int]] | None = None,
    previews: int = 0,
    destination_token: str | None = None,
    workers: int = 1,
    unfinished: list[str] | None = None,
) -> BatchResult:
    """Process each item of the batch; an item's failure is in its record, not an exception.

    Each item's record is stored at the destination as the item is done
    (:func:`~polyburn.pipeline.process_item`). Returns a
    :class:`~polyburn.records.BatchResult` for the run's summary. The first ``previews`` items
    also get a small preview PNG in their record. ``workers`` > 1 spreads the items over that
    many processes. ``unfinished`` (the batch's items that the destination marks unfinished)
    only enters the cache key.
    """
    records = process_items(
        refs,
        source_for(source_uri),
        destination_for(destination_uri),
        options,
        label_map,
        colours,
        previews,
        workers,
    )
    return BatchResult(
        records=pack_records(records),
        items=len(records),
        attempts=task_run.run_count or 1,
        unchanged=records.unchanged,
        previews=records.previews,
    )


BURN_TAG = "polyburn-burn"


def burn_task():
    """``burn_batch``, tagged ``polyburn-burn`` only when a concurrency limit on that tag exists.

    A tagged task asks the server for a concurrency slot (with a lease) at every start; that
    costs nothing useful without a limit and stalled all batches for ~1 s every few seconds in
    our measurements. So the operator's knob stays (``prefect concurrency-limit create
    polyburn-burn 2`` caps burn batches across runs, seen by the next run) and its price is paid
    only when it is used.
    """
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    try:
        with get_client(sync_client=True) as client:
            client.read_concurrency_limit_by_tag(BURN_TAG)
    except ObjectNotFound:
        return burn_batch
    return burn_batch.with_options(tags=[BURN_TAG])
