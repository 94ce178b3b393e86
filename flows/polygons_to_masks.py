"""The main flow: list items → label map → burn and publish per batch → report."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

from prefect import State, flow, get_run_logger
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.futures import as_completed
from prefect.runtime import flow_run
from prefect.states import Completed, Failed
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.utilities.annotations import quote
from prefect.variables import Variable

from flows.shards import not_processed, run_shards
from polyburn import progress, version
from polyburn.batching import batches_of
from polyburn.destinations import resolve_destination_uri
from polyburn.destinations.base import MANIFEST_KEY
from polyburn.instances import InstanceIds
from polyburn.manifest import RecordSpool, output_keys, unpack_lines
from polyburn.model import ItemRef
from polyburn.params import (
    FLAT_FIELDS,
    DrawOrder,
    Format,
    Frames,
    Mode,
    RunParameters,
    TaskRunner,
    flat_parameter_fields,
)
from polyburn.records import BatchResult, ItemRecord, RunSummary
from polyburn.report import failures_markdown, previews_markdown, summary_table
from polyburn.state import (
    attach_snapshot,
    clear_failed_marks,
    create_record,
    destination_clock,
    failed_marks,
    find_records,
    forget_items,
    read_records,
    stale_record_keys,
    unfinished_items,
)
from tasks.common import destination_for, source_for
from tasks.items import collect_labels, list_items
from tasks.masks import burn_task
from tasks.publish import migrate_state, publish_label_map, publish_manifest

PREVIEW_ITEMS = 4
BATCH_THREADS = 4  # batches in flight; each may use the whole process pool
AUTO_WORKERS_FROM = 100  # items; below, a process pool's start-up costs more than it saves
DESTINATION_TOKEN_KEY = ".polyburn/destination-id"


def watermark_name(source: str, destination: str) -> str:
    """The Prefect Variable holding the incremental watermark of a source → destination pair."""
    digest = hashlib.sha256(f"{source}\n{destination}".encode()).hexdigest()[:16]
    return f"polyburn-watermark-{digest}"


def _item_filter(params: RunParameters) -> str | None:
    """The DQL filter of a Dataloop run, with ``item_ids`` folded in as ``id $in [...]``."""
    if not params.item_ids or not params.source.startswith("dataloop://"):
        return params.item_filter
    by_id = {"id": {"$in": list(params.item_ids)}}
    if not params.item_filter:
        return json.dumps(by_id)
    return json.dumps({"$and": [json.loads(params.item_filter), by_id]})


def _destination_token(destination) -> str:
    """A random id stored in the destination; a wiped destination gets a new one, so cached
    batches are not taken for outputs that no longer exist."""
    token = (destination.read_text(DESTINATION_TOKEN_KEY) or "").strip()
    if not token:
        token = uuid.uuid4().hex
        destination.write_text(DESTINATION_TOKEN_KEY, token + "\n")
    return token


def workers_for(params: RunParameters, items: int) -> int:
    """Burn processes of a run: ``params.workers``, else one per core from
    ``AUTO_WORKERS_FROM`` items on (below, a pool's start-up costs more than it saves)."""
    return params.workers or (os.cpu_count() or 1 if items >= AUTO_WORKERS_FROM else 1)


def previews_per_batch(batches: list[list[ItemRef]], wanted: int = PREVIEW_ITEMS) -> list[int]:
    """How many of each batch's first items get a preview: the run's first ``wanted`` items,
    however small its first batches are."""
    counts = []
    for batch in batches:
        counts.append(min(len(batch), wanted))
        wanted -= counts[-1]
    return counts


def unwalked(refs: list[ItemRef], params: RunParameters) -> list[ItemRef] | quote:
    """``refs`` as a task parameter that Prefect passes on without walking it: Prefect visits
    every element of a parameter, several times per task run, looking for futures (~40 µs per
    ref in the flow's process, 0.1-0.2 ms per burned item). Its ``quote`` annotation skips
    that; Dask's runner takes tuples apart, and a quote is one, so there the list goes as is."""
    return quote(refs) if params.task_runner == "threads" else refs


def submit_batches(
    params: RunParameters,
    batches: list[list[ItemRef]],
    label_map: dict[str, int],
    colours: dict[str, tuple[int, int, int]] | None,
    token: str,
    unfinished: list[str],
    workers: int,
    take: Callable[[BatchResult, bool], None] | None = None,
    fresh: bool = False,
) -> list[tuple[BatchResult, bool]]:
    """Submit one ``burn-batch`` task per batch on the current flow's task runner, each burning
    with ``workers`` processes, and hand each :class:`~polyburn.records.BatchResult` (with
    whether Prefect's cache served it) to ``take`` as it finishes, updating a progress artifact;
    without ``take`` (a subflow, whose parameters must serialize) the results are returned.
    ``fresh`` runs every batch (no cache). The records go to the run's spool; what Prefect keeps
    of each batch is its small packed result."""
    total = sum(len(b) for b in batches)
    artifact_id = create_progress_artifact(
        progress=0.0, key="polyburn-progress", description=f"{total} items"
    )
    burn = burn_task()
    if fresh:
        burn = burn.with_options(refresh_cache=True)
    previews = previews_per_batch(batches)
    futures = [
        burn.submit(
            params.source,
            params.destination,
            unwalked(batch, params),
            params.options,
            label_map,
            colours,
            previews[k],
            token,
            workers,
            sorted({ref.path for ref in batch} & set(unfinished)),
        )
        for k, batch in enumerate(batches)
    ]
    done, kept = 0, []
    progress.report(0, total)
    for future in as_completed(futures):
        result = future.result()
        cached = future.state.name == "Cached"
        if take is None:
            kept.append((result, cached))
        else:
            take(result, cached)
        done += result.items
        progress.report(done, total)
        update_progress_artifact(artifact_id, 100.0 * done / max(total, 1))
    return kept


burn_batches = flow(name="burn-batches", log_prints=False)(submit_batches)


def _task_runner(params: RunParameters):
    if params.task_runner == "dask":
        from prefect_dask import DaskTaskRunner

        if params.dask_address:
            return DaskTaskRunner(address=params.dask_address)
        return DaskTaskRunner(cluster_kwargs={"n_workers": 2, "threads_per_worker": 1})
    return ThreadPoolTaskRunner()


def run_polygons_to_masks(params: RunParameters) -> State:
    """Turn the polygon and binary annotations of every item of ``params.source`` into masks at
    ``params.destination``, with a label map beside them, a record per item and, for a full
    run (or with ``refresh_dataset_files``), the dataset files and the manifest written last.

    Items are processed in batches of about ``params.batch_size`` (one task run each; batch
    boundaries follow the item paths, :mod:`polyburn.batching`). An item whose record has the
    recipe digest it has now is not burned again (:mod:`polyburn.recipe`); a batch whose
    items, options and label map did not change is taken from Prefect's cache, a fast path
    whose outputs are checked for presence after the batches. Each batch holds its items under
    one claim, so any number of runs may write one destination at once (:mod:`polyburn.state`).
    A failed item is reported in its record, the summary and the artifacts; the run fails only
    in ``strict`` mode. With ``incremental``, only items changed since the last incremental run
    are processed, and the watermark (a Prefect
    Variable) advances past failed items: they are marked failed at the destination and every
    later incremental run tries them again until they succeed (it stays put for a failed item
    whose record or mark could not be stored).
    """
    params = _resolved(params)
    run = start_run(params)
    refs = list_run_items(params, run)
    labels = settle_labels(params, refs, run)
    with _run_spool() as (spool, scratch):
        burned = burn_and_publish(params, run, refs, labels, spool, scratch)
        dataset = write_dataset_state(params, run, refs, spool, scratch)
        summary = summarize(params, run, spool, labels, burned, dataset)
    _report(summary, params, burned.tally, get_run_logger())
    advance_watermark(params, run, dataset)
    return _final_state(summary, params)


def _final_state(summary: RunSummary, params: RunParameters):
    """Completed, or Failed when an item failed in ``strict`` mode; the summary as its data."""
    data = summary.as_dict()
    if summary.failed and params.strict:
        return Failed(message=f"{summary.failed} item(s) failed", data=data)
    return Completed(message=f"{summary.ok} ok, {summary.failed} failed", data=data)


@dataclass(frozen=True)
class RunStart:
    """What a run settles before it lists its items."""

    destination: Any
    """The opened destination (:func:`~polyburn.destinations.open_destination`)."""
    item_filter: str | None
    since: datetime | None
    clock: float | None
    """The destination's clock at the start of a full run (None: not a full run)."""
    started: float = field(default_factory=time.perf_counter)
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))


class RunLabels(NamedTuple):
    label_map: dict[str, int]
    colours: dict[str, tuple[int, int, int]] | None


@dataclass
class Burned:
    """What burning and publishing left: the run's tally, and the shards of a sharded run."""

    tally: RunTally
    shards: list[dict] | None = None


@dataclass
class DatasetState:
    """What the dataset step did: ``removed_items`` (an item-id run), and the failed items
    without a failure mark (an incremental run's watermark stays put for them)."""

    removed_items: list[str] | None = None
    unmarked_failures: list[str] = field(default_factory=list)


def _resolved(params: RunParameters) -> RunParameters:
    """``params`` with a bare ``dataloop://`` destination made the source's dataset."""
    destination = resolve_destination_uri(params.destination, params.source)
    return params.model_copy(update={"destination": destination})


def start_run(params: RunParameters) -> RunStart:
    """The run's destination (recovered and migrated), item filter, watermark and clock."""
    destination = _prepare_destination(params)
    clock = destination_clock(destination.state) if _is_full_run(params) else None
    return RunStart(destination, _item_filter(params), _since(params), clock)


def list_run_items(params: RunParameters, run: RunStart) -> list[ItemRef]:
    """The items the run processes: the source's (filtered, changed since), plus for an
    incremental run the items earlier runs left failed."""
    refs = list_items(params.source, run.item_filter, run.since, _local_item_ids(params))
    refs = _with_failed_earlier(params, run.destination, refs)
    get_run_logger().info("%d items from %s", len(refs), params.source)
    return refs


def settle_labels(params: RunParameters, refs: list[ItemRef], run: RunStart) -> RunLabels:
    """The run's label map and colours (:func:`_label_map`)."""
    source = source_for(params.source, run.item_filter, run.since)
    return RunLabels(*_label_map(params, refs, source))


@contextmanager
def _run_spool() -> Iterator[tuple[RecordSpool, Path]]:
    """The run's record spool, in a scratch folder that goes with it."""
    with (
        tempfile.TemporaryDirectory(prefix="polyburn-run-") as folder,
        RecordSpool(folder) as spool,
    ):
        yield spool, Path(folder)


def burn_and_publish(
    params: RunParameters,
    run: RunStart,
    refs: list[ItemRef],
    labels: RunLabels,
    spool: RecordSpool,
    scratch: Path,
) -> Burned:
    """Every item burned and published, in batches on this machine, or by shard runs; each
    item's record goes into ``spool``. The batches read the records the last snapshot holds
    from a copy of it, not one by one (:func:`~polyburn.state.attach_snapshot`)."""
    tally = RunTally(spool)
    if params.shards > 1 and refs:
        shards = _run_sharded(params, refs, labels.label_map, run.destination, spool)
        return Burned(tally, shards)
    batches = batches_of(refs, params.batch_size)
    with attach_snapshot(run.destination.state, scratch, len(refs)):
        _burn_all(params, batches, labels.label_map, labels.colours, run.destination, tally)
    return Burned(tally)


def write_dataset_state(
    params: RunParameters, run: RunStart, refs: list[ItemRef], spool, scratch: Path
) -> DatasetState:
    """The destination's dataset-level state after the items (:func:`_dataset_state`), and
    its failure marks settled."""
    removed = _dataset_state(params, run.destination, refs, run.clock, spool, scratch)
    unmarked = _settle_failure_marks(params, run.destination, spool)
    return DatasetState(removed.get("removed_items"), unmarked)


def summarize(
    params: RunParameters,
    run: RunStart,
    spool: RecordSpool,
    labels: RunLabels,
    burned: Burned,
    dataset: DatasetState,
) -> RunSummary:
    """The run summary: the records' counts, plus the label map, retries, cached batches,
    unchanged items, shards, removed items and the polyburn version."""
    if params.shard_of is None:  # every rejection, for the CLI's --json
        progress.report_records(spool.records_with_problems())
    summary = spool.counts.summary(time.perf_counter() - run.started)
    summary.label_map = labels.label_map
    summary.retries = burned.tally.retries
    summary.cached_batches = burned.tally.cached
    summary.unchanged_items = burned.tally.unchanged
    summary.polyburn_version = version()
    summary.shards, summary.removed_items = burned.shards, dataset.removed_items
    return summary


def advance_watermark(params: RunParameters, run: RunStart, dataset: DatasetState) -> None:
    """An incremental run moves its watermark to its start, past items that failed with a
    failure mark (later runs try them again), not past a failure without one."""
    if params.incremental and params.shard_of is None and not dataset.unmarked_failures:
        name = watermark_name(params.source, params.destination)
        Variable.set(name, run.started_at.isoformat(), overwrite=True)


FLOW_NAME = "polygons-to-masks"
FLOW_DESCRIPTION = (
    "Burn the polygon and binary annotations of a Dataloop export or dataset into segmentation "
    "masks and labels (the formats in modes) at a folder, s3:// or Dataloop destination."
)
#: What both entry points of the flow share: one flow, two ways to pass its parameters.
_FLOW_OPTIONS: dict[str, Any] = {
    "name": FLOW_NAME,
    "description": FLOW_DESCRIPTION,
    "log_prints": False,
    "validate_parameters": True,
    "task_runner": ThreadPoolTaskRunner(max_workers=BATCH_THREADS),
}
#: The models' fields as the public flow's parameter defaults (default, description, limits).
_FIELD = flat_parameter_fields()


@flow(**_FLOW_OPTIONS)
def polygons_to_masks(
    source: str,
    destination: str,
    labels: str | None = _FIELD["labels"],
    modes: list[Mode] = _FIELD["modes"],
    format: Format = _FIELD["format"],
    draw_order: DrawOrder = _FIELD["draw_order"],
    instance_id: InstanceIds = _FIELD["instance_id"],
    max_pixels: int = _FIELD["max_pixels"],
    skip_empty: bool = _FIELD["skip_empty"],
    verify: bool = _FIELD["verify"],
    frames: Frames = _FIELD["frames"],
    item_filter: str | None = _FIELD["item_filter"],
    updated_since: datetime | None = _FIELD["updated_since"],
    item_ids: list[str] | None = _FIELD["item_ids"],
    incremental: bool = _FIELD["incremental"],
    refresh_dataset_files: bool = _FIELD["refresh_dataset_files"],
    task_runner: TaskRunner = _FIELD["task_runner"],
    dask_address: str | None = _FIELD["dask_address"],
    workers: int | None = _FIELD["workers"],
    batch_size: int = _FIELD["batch_size"],
    strict: bool = _FIELD["strict"],
    shards: int = _FIELD["shards"],
    shard_fallback: bool = _FIELD["shard_fallback"],
) -> State:
    """The public flow: every user-settable field of :class:`RunParameters` is a parameter of
    its own (``options`` spread out; :data:`polyburn.params.FLAT_FIELDS`), so a deployment run
    that overrides one of them (``prefect deployment run --param``, the UI form, a trigger)
    keeps the deployment's values of the others: Prefect merges run parameters into a
    deployment's at the top level only. Defaults, limits and the descriptions the UI form
    shows are the models' own; source and destination have no default, so no choice in the
    form can drop them. Internal fields (:data:`polyburn.params.INTERNAL_FIELDS`) are not
    parameters: shard runs use :func:`polygons_to_masks_params`.

    Args:
        source: A local Dataloop JSON export folder, or dataloop://DATASET_ID.
        destination: A local folder, s3://bucket/prefix, or dataloop://[DATASET_ID] (without
            DATASET_ID: the source's dataset).
    """
    parameters = {name: value for name, value in locals().items() if name in FLAT_FIELDS}
    return run_polygons_to_masks(RunParameters.from_flat(parameters))


@flow(**_FLOW_OPTIONS)
def polygons_to_masks_params(params: RunParameters) -> State:
    """The same flow with the whole :class:`RunParameters` as one parameter, internal fields
    included: what ``polyburn run``, the ``shard`` deployment and a parent run's fallback for
    an unstarted shard start. Not for deployments a user runs (a run overriding ``params``
    replaces all of it)."""
    return run_polygons_to_masks(params)


def _dataset_state(params, destination, refs, clock, spool: RecordSpool, folder: Path) -> dict:
    """After the batches: a full run (``clock`` set) forgets the records of items gone from the
    source and writes the dataset files and the manifest; a run by item ids removes the items
    the source no longer has (their paths, as ``removed_items``); ``refresh_dataset_files``
    rewrites the dataset files. The run's own records are handed over as a file, so the
    snapshot reads from the store only what this run did not write."""
    written = str(spool.write_manifest(folder / "written.jsonl"))
    if clock is not None:  # a full run
        gone = stale_record_keys(destination.state, refs, clock)
        publish_manifest(params.destination, gone, written)
        return {}
    extra = {}
    if params.item_ids:
        extra["removed_items"] = _remove_vanished(destination, params, refs)
    if params.refresh_dataset_files and refs and params.shard_of is None:
        publish_manifest(params.destination, [], written)
    return extra


def _with_failed_earlier(params: RunParameters, destination, refs: list[ItemRef]) -> list[ItemRef]:
    """An incremental run's items: the changed ones, plus the items an earlier run left failed
    (marked at the destination, :func:`~polyburn.state.mark_failed`) that the source still has,
    so that a failure never depends on the watermark to be tried again."""
    if not params.incremental or params.shard_of is not None:
        return refs
    marks = failed_marks(destination.state)
    listed = {ref.path for ref in refs}
    wanted = [p for p in marks if p not in listed]
    if not wanted:
        return refs
    if params.source.startswith("dataloop://"):
        ids = sorted({marks[p] for p in wanted if marks[p]})
        by_id = params.model_copy(update={"item_ids": ids, "incremental": False})
        found = list_items(params.source, _item_filter(by_id), None, None) if ids else []
    else:
        found = list_items(params.source, params.item_filter, None, sorted(wanted))
    get_run_logger().info("%d item(s) failed in earlier runs: tried again", len(found))
    return sorted([*refs, *(r for r in found if r.path not in listed)], key=lambda r: r.path)


def _settle_failure_marks(params: RunParameters, destination, spool: RecordSpool) -> list[str]:
    """After the run: the failure marks of items that are ``ok`` now are removed; returns the
    failed items that have no mark (their record could not be stored, or their shard never
    ran): an incremental run's watermark stays put for them."""
    if params.shard_of is not None:
        return []
    marks = failed_marks(destination.state)
    ok = [path for path in marks if path in spool and spool.get(path).ok]
    if ok:
        clear_failed_marks(destination.state, ok)
    if not spool.counts.totals["failed"]:
        return []
    failed = (r.path for r in spool.records() if not r.ok)
    return [path for path in failed if path not in marks]


def _since(params: RunParameters) -> datetime | None:
    """``updated_since``, or for an incremental run the later of it and the watermark."""
    since = params.updated_since
    if params.incremental:
        stored = Variable.get(watermark_name(params.source, params.destination), default=None)
        if stored:
            stored_at = datetime.fromisoformat(stored)
            since = max(since, stored_at) if since else stored_at
        get_run_logger().info("incremental run: items changed since %s", since or "the beginning")
    return since


def _prepare_destination(params: RunParameters):
    """The run's destination, with what killed runs of this host left cleaned up and a
    destination of an earlier polyburn given its per-item records (a shard leaves both to its
    parent)."""
    destination = destination_for(params.destination)
    if params.shard_of is None:
        destination.recover()
        created = migrate_state(params.destination)
        if created:
            get_run_logger().info(
                "gave %d items of the earlier manifest records of their own", created
            )
    return destination


def _local_item_ids(params: RunParameters) -> list[str] | None:
    """``item_ids`` for the listing; a Dataloop source has them in its filter already."""
    return None if params.source.startswith("dataloop://") else params.item_ids


def _is_full_run(params: RunParameters) -> bool:
    """A run over every item of its source: it writes the manifest and forgets vanished items."""
    return params.shard_of is None and not (
        params.item_ids or params.item_filter or params.updated_since or params.incremental
    )


def _label_map(params: RunParameters, refs: list[ItemRef], source):
    """(label map, colours) of the run: a shard's from its parent, else settled at the
    destination with the labels found in ``refs`` (unless a label map file is given)."""
    declared = source.labels()
    colours = dict(declared) if declared else None
    if params.shard_of is not None:
        return dict(params.shard_of.label_map), colours
    found: list[str] = []
    if not params.labels and refs:
        workers = workers_for(params, len(refs))
        found = collect_labels(
            params.source, unwalked(refs, params), params.options.max_pixels, workers
        )
    label_map = publish_label_map(
        params.destination, params.labels, found, dict(declared) if declared else None
    )
    return label_map, colours


def _burn_all(params, batches, label_map, colours, destination, tally: RunTally) -> None:
    """Burn and publish every batch (threads in this flow, or a Dask subflow), then burn again,
    the same way, the items whose outputs this run did not write and are gone, and the failed
    items of batches Prefect's cache served."""
    if not batches:
        return
    token = _destination_token(destination)
    unfinished = unfinished_items(destination.state)
    if unfinished:
        get_run_logger().warning(
            "%d item(s) were left unfinished by runs that died or failed while writing them; "
            "they are burned again",
            len(unfinished),
        )
    refs = [ref for batch in batches for ref in batch]
    workers = workers_for(params, len(refs))
    _submit(params, tally, batches, label_map, colours, token, sorted(unfinished), workers)
    again = _burn_again(params, tally, destination, refs)
    if again:  # their records are wrong or their outputs gone: compare every output
        verify = params.options.model_copy(update={"verify": True})
        batches = batches_of(again, params.batch_size)
        redo = params.model_copy(update={"options": verify})
        _submit(redo, tally, batches, label_map, colours, token, [], workers, fresh=True)


def _submit(params: RunParameters, tally: RunTally, *batches_args, fresh: bool = False) -> None:
    """:func:`submit_batches` on this flow's threads, each result taken as it finishes, or in a
    subflow on another task runner (a task runner is per flow), its results taken at its end."""
    if params.task_runner == "threads":
        submit_batches(params, *batches_args, take=tally.take, fresh=fresh)
        return
    subflow = burn_batches.with_options(task_runner=_task_runner(params))
    for result, cached in subflow(params, *batches_args, fresh=fresh):
        tally.take(result, cached)


def _run_sharded(params, refs, label_map, destination, spool: RecordSpool) -> list[dict]:
    """Run the shards and put every item's record (as the shards stored it) into ``spool``;
    the items of a shard that never completed are counted failed. Returns what the summary
    shows of each shard (:meth:`~polyburn.records.ShardOutcome.summary`)."""
    shard_runs = run_shards(
        params,
        refs,
        label_map,
        str(flow_run.get_id() or uuid.uuid4()),
        _shard_progress(len(refs), params.shards),
        get_run_logger(),
        _run_shard_here if params.shard_fallback else None,
    )
    for outcome in shard_runs:
        pieces = outcome.refs
        if outcome.completed:
            for record in read_records(destination.state, [ref.path for ref in pieces]):
                spool.add(record)
        why = not_processed(outcome)
        for ref in pieces:
            if ref.path not in spool:  # its shard failed, or left it without a record
                failed = ItemRecord(
                    ref.path,
                    ref.item_id,
                    status="failed",
                    error=f"{ref.path}: {why}",
                    polyburn_version=version(),
                )
                spool.add(failed)
                # An item never processed anywhere gets this record; a stored one still holds.
                create_record(destination.state, failed)
    return [outcome.summary() for outcome in shard_runs]


def _remove_vanished(destination, params: RunParameters, refs: list[ItemRef]) -> list[str]:
    """Requested items the source no longer has: their outputs and records are removed;
    returns their paths. (Dataloop items are asked for by id, which the records are not kept
    by: finding a deleted one reads every record, which only item deletions pay.)"""
    listed = {ref.path for ref in refs} | {ref.item_id for ref in refs if ref.item_id}
    missing = [item for item in params.item_ids or () if item not in listed]
    if params.source.startswith("dataloop://"):
        records = find_records(destination.state, item_ids=missing)
    else:
        records = find_records(destination.state, paths=missing)
    gone = []
    for record in records:
        destination.remove(output_keys(record))
        gone.append(record.path)
    forget_items(destination.state, gone)
    return sorted(gone)


def _report(summary: RunSummary, params: RunParameters, tally: RunTally, logger) -> None:
    """The run's artifacts (summary table, failures, previews) and log lines."""
    previews = [tally.previews[p] for p in sorted(tally.previews)]
    _publish_artifacts(summary, params, previews)
    logger.info(
        "%d items: %d ok, %d failed; %d annotations, %d repairs, %d rejected; %d batches "
        "cached, %d items unchanged",
        summary.items,
        summary.ok,
        summary.failed,
        summary.annotations,
        summary.repairs,
        summary.rejected,
        tally.cached,
        tally.unchanged,
    )
    for failure in summary.failures[:20]:
        logger.warning("failed: %s", failure["error"])


def _run_shard_here(parameters: dict[str, Any]):
    """A shard no worker took, run as a subflow of its parent, in this process."""
    return polygons_to_masks_params(
        params=RunParameters.model_validate(parameters), return_state=True
    )


def _shard_progress(items: int, shards: int):
    """A progress artifact (and CLI progress) of a sharded run, advanced per finished shard."""
    artifact_id = create_progress_artifact(
        progress=0.0, key="polyburn-progress", description=f"{items} items in {shards} shards"
    )

    def report(done: int, total: int) -> None:
        progress.report(done, total)
        update_progress_artifact(artifact_id, 100.0 * done / max(total, 1))

    return report


class RunTally:
    """What the flow keeps of each finished batch: its records go to the spool (with the outputs
    of a cached batch marked not written), plus retries, cached batches, items taken unchanged,
    failed items of cached batches, the outputs of ok items that this run did not write (to
    check they are still stored) and the previews."""

    def __init__(self, spool: RecordSpool) -> None:
        self.spool = spool
        self.retries = 0
        self.cached = 0
        self.unchanged = 0
        self.cached_failures: list[str] = []
        self.unwritten_outputs: dict[str, list[str]] = {}
        self.previews: dict[str, tuple[str, dict[str, Any], str | None]] = {}

    def take(self, result: BatchResult, cached: bool) -> None:
        self.retries += result.attempts - 1
        self.cached += cached
        self.unchanged += result.unchanged
        for line, record in unpack_lines(result.records):
            path = record.path
            if cached:
                line = None  # changed below: encoded again
                for output in record.outputs or ():
                    output["written"] = False
                if not record.ok:
                    self.cached_failures.append(path)
            kept = [o["key"] for o in record.outputs or () if not o.get("written")]
            if record.ok and kept:  # its record vouched for them: still there?
                self.unwritten_outputs[path] = kept
            else:
                self.unwritten_outputs.pop(path, None)
            if path in result.previews:  # the item's latest preview
                self.previews[path] = _preview_entry(record, result.previews[path])
            self.spool.add(record, line)


def _preview_entry(
    record: ItemRecord, preview: dict[str, Any]
) -> tuple[str, dict[str, Any], str | None]:
    """(path, previews, why there is no picture) of an item asked for a preview."""
    why = None
    if not record.ok:
        why = "Failed: no masks (see the polyburn-failures artifact)."
    elif record.skipped_empty:
        why = "Nothing to burn: no masks written."
    elif not preview and not any(o.get("written") for o in record.outputs or ()):
        why = "Unchanged since it was last burned: not burned again, no picture."
    return record.path, preview, why


def _burn_again(
    params: RunParameters, tally: RunTally, destination, refs: list[ItemRef]
) -> list[ItemRef]:
    """The items to burn once more after the batches: the failed items of batches Prefect's
    cache served (the failure may have been transient), and items of any batch with an output
    this run did not write (served from the cache, or trusted from the item's record) that is
    no longer at the destination (deleted by hand since). Previews first: they are made again."""
    wanted = set(tally.cached_failures)
    if tally.unwritten_outputs:
        gone = destination.missing([k for keys in tally.unwritten_outputs.values() for k in keys])
        lost = {path for path, keys in tally.unwritten_outputs.items() if gone.intersection(keys)}
        if lost:
            get_run_logger().warning(
                "%d item(s) lost outputs at the destination since they were written; burning "
                "them again",
                len(lost),
            )
        wanted |= lost
    tally.cached_failures.clear()
    again = [ref for ref in refs if ref.path in wanted]
    again.sort(key=lambda ref: ref.path not in tally.previews)
    return again


def _publish_artifacts(summary: RunSummary, params: RunParameters, previews) -> None:
    manifest = f"{params.destination.rstrip('/')}/{MANIFEST_KEY}"
    create_table_artifact(
        key="polyburn-summary", table=summary_table(summary), description="Run counts"
    )
    create_markdown_artifact(
        key="polyburn-failures",
        markdown=failures_markdown(summary, manifest),
        description="Failed items, rejected annotations, items with nothing to burn",
    )
    create_markdown_artifact(
        key="polyburn-preview", markdown=previews_markdown(previews), description="Mask previews"
    )
