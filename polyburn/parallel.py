"""Burn items on every core of this machine: a process pool shared by all batches of a process.

Threads alone cannot keep two cores busy: JSON decoding and the per-annotation Python of the
parser hold the GIL. Worker processes are started with ``spawn`` (no fork of a process that
runs Prefect's threads), once per process, and reuse their sources and destinations (clients,
connections) across items. A dead worker breaks the pool: that raises TransientError (the batch
is retried by Prefect) and the next call starts a new pool.

Workers stay lean: they do not re-import the parent's ``__main__`` (for the ``polyburn`` command
that is the CLI, hence Prefect; jobs hold nothing defined there), and the modules they import
defer rasterio and PIL to the code paths that use them (pydantic comes with the parent's
:mod:`polyburn.settings`, handed to each worker as it starts, so a worker sees the parent's
values). They also keep glibc's large blocks on the heap (see :func:`_steady_malloc`).
"""

from __future__ import annotations

import atexit
import ctypes
import dataclasses
import multiprocessing.context
import multiprocessing.spawn
import os
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import TYPE_CHECKING, Any, NamedTuple

from polyburn import settings as config
from polyburn.destinations import Destination, open_destination
from polyburn.errors import TransientError
from polyburn.labels import semantic_dtype
from polyburn.model import ItemRef
from polyburn.pipeline import ClaimedItem, process_item, scan_labels, store_failed_record
from polyburn.recipe import item_recipe, run_recipe
from polyburn.records import ItemRecord
from polyburn.sources import Source, open_source
from polyburn.state import BatchClaim, batch_claim, records_of

if TYPE_CHECKING:
    from polyburn.params import MaskOptions

ITEM_RETRIES = 3
PARENT_CHECK_SECONDS = 0.5
_pool: ProcessPoolExecutor | None = None
_pool_size = 0
_lock = threading.Lock()
_worker_sources: dict[str, Source] = {}
_worker_destinations: dict[str, Destination] = {}
_opening = threading.Lock()


def process_items(
    refs: Sequence[ItemRef],
    source: Source,
    destination: Destination,
    options: MaskOptions,
    label_map: Mapping[str, int],
    colours: Mapping[str, tuple[int, int, int]] | None = None,
    previews: int = 0,
    workers: int = 1,
) -> BatchRecords:
    """:func:`~polyburn.pipeline.process_item` over ``refs``, in order.

    With ``workers`` > 1 the items go to a pool of that many processes, which open the source and
    destination from their URIs (``source.uri``, ``destination.uri``); otherwise they run here.
    Items that failed with a transient error (throttling, 5xx, resets, timeouts that outlasted
    the client's own retries) are tried again up to ``ITEM_RETRIES`` times with exponential
    backoff and jitter; their records then carry ``retries``.

    The items are written under one :class:`~polyburn.state.BatchClaim`, and their stored
    records are read together before any is burned (:func:`~polyburn.state.records_of`), so the
    batch's state costs a few requests, not several per item. Items another run kept writing
    past the wait are left out of the claim and take their own lease.

    An item whose stored record has the recipe digest the item has now
    (:mod:`polyburn.recipe`) is not burned: its record is returned as is, outputs marked not
    written (``BatchRecords.unchanged`` counts them). Never with ``options.verify``, for an item
    a writer left unfinished, or for a failed record; such an item asked for a preview gets an
    empty one. Previews come apart from the records (``BatchRecords.previews``). A failed
    item's record says ``transient: true`` when its failure was worth another try (throttling,
    5xx, resets, timeouts) and the retries here did not help.
    """
    # What process_item reads of the options, as a plain tuple: workers need no pydantic.
    plain = _Options(
        list(options.modes),
        options.format,
        options.draw_order,
        options.max_pixels,
        options.skip_empty,
        options.instance_id,
        options.frames,
        options.verify,
        run_recipe(options.model_dump(mode="json"), semantic_dtype(label_map).name),
    )
    with batch_claim(destination.state, [ref.path for ref in refs]) as claim:
        previous = records_of(destination.state, claim.paths)
        held = set(claim.paths)
        records: list[ItemRecord | None] = [
            _unchanged(ref, previous.get(ref.path), claim, plain, label_map, colours, k < previews)
            if ref.path in held
            else None
            for k, ref in enumerate(refs)
        ]
        jobs = [
            (
                ref,
                source.uri,
                destination.uri,
                plain,
                dict(label_map),
                colours,
                k < previews,
                0,
                _claimed(claim, previous, ref.path) if ref.path in held else None,
            )
            for k, ref in enumerate(refs)
        ]
        todo = [k for k, record in enumerate(records) if record is None]
        burned = _run_jobs([jobs[k] for k in todo], source, destination, workers) if todo else []
        for k, record in zip(todo, burned, strict=True):
            records[k] = record
        for attempt in range(1, ITEM_RETRIES + 1):
            again = [k for k, record in enumerate(records) if record.transient]
            if not again:
                break
            delay = config.settings().item_retry_delay
            time.sleep(delay * 2 ** (attempt - 1) * random.uniform(0.5, 1.5))
            redo = [_again(jobs[k], attempt) for k in again]
            redone = _run_jobs(redo, source, destination, workers)
            for k, record in zip(again, redone, strict=True):
                records[k] = record
    previews = {}
    for record in records:
        if record.preview is not None:
            previews[record.path], record.preview = record.preview, None
    return BatchRecords(records, unchanged=len(refs) - len(todo), previews=previews)


class BatchRecords(list):
    """The records of a batch, in the order of its items; how many of them were taken
    unchanged from the destination (their recipe digest had not changed: not burned); and the
    previews of the items asked for one (path → :func:`polyburn.report.mask_previews`, empty
    when there is no picture), which are not part of any record."""

    def __init__(
        self,
        records: Sequence[ItemRecord] = (),
        unchanged: int = 0,
        previews: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(records)
        self.unchanged = unchanged
        self.previews = previews or {}


def _unchanged(
    ref: ItemRef,
    previous: ItemRecord | None,
    claim: BatchClaim,
    options: _Options,
    label_map: Mapping[str, int],
    colours: Mapping[str, tuple[int, int, int]] | None,
    preview: bool = False,
) -> ItemRecord | None:
    """The item's stored record, as this run's, when burning the item again would change
    nothing: an ``ok`` record with the recipe digest the item has now (:mod:`polyburn.recipe`),
    not left unfinished by a writer, and no ``verify`` asked. None: burn it."""
    if options.verify or previous is None or not previous.ok:
        return None
    if ref.path in claim.leases or not previous.recipe:
        return None
    digest = item_recipe(options.recipe, ref.revision, previous.labels or (), label_map, colours)
    if digest != previous.recipe:
        return None
    return dataclasses.replace(
        previous,
        outputs=[dict(o, written=False) for o in previous.outputs or ()],
        retries=None,
        io_retries=None,
        preview={} if preview else None,  # asked for: none, nothing was burned
    )


def _claimed(claim: BatchClaim, previous: Mapping[str, ItemRecord], path: str) -> ClaimedItem:
    key, owner = claim.handle()
    return ClaimedItem(key, owner, previous.get(path), claim.leases.get(path))


def _again(job: tuple, attempt: int) -> tuple:
    """A job run once more: an earlier attempt may have left the item an abandoned lease."""
    claimed = job[8]
    if claimed is not None and not claimed.stale_lease:
        claimed = claimed._replace(stale_lease="?")
    return (*job[:7], attempt, claimed)


class _Options(NamedTuple):
    """The fields of :class:`~polyburn.params.MaskOptions` that :func:`process_item` uses."""

    modes: list[str]
    format: str
    draw_order: str
    max_pixels: int
    skip_empty: bool
    instance_id: str
    frames: str = "span"
    verify: bool = False
    recipe: str = ""
    """The run's part of every item's recipe digest (:func:`polyburn.recipe.run_recipe`)."""


SCAN_CHUNK = 50  # items per job of a label scan


def collect_labels(
    refs: Sequence[ItemRef], source: Source, max_pixels: int, workers: int = 1
) -> set[str]:
    """:func:`~polyburn.pipeline.scan_labels` over ``refs``; with ``workers`` > 1 in the burn
    pool (which the burn then reuses), ``SCAN_CHUNK`` items per job."""
    if workers <= 1 or len(refs) <= SCAN_CHUNK:
        labels: set[str] = set()
        for k in range(0, len(refs), SCAN_CHUNK):
            labels |= scan_labels(_preload(refs[k : k + SCAN_CHUNK], source), source, max_pixels)
        return labels
    jobs = [
        (refs[k : k + SCAN_CHUNK], source.uri, max_pixels) for k in range(0, len(refs), SCAN_CHUNK)
    ]
    return set().union(*_pool_map(_scan, jobs, workers))


def _scan(job: tuple) -> set[str]:
    refs, source_uri, max_pixels = job
    source = _worker_source(source_uri)
    return scan_labels(_preload(refs, source), source, max_pixels)


def _preload(refs: Sequence[ItemRef], source: Source) -> list[ItemRef]:
    """``refs`` as the source's ``preload`` returns them (items and annotations read in bulk,
    e.g. Dataloop), or unchanged for sources that load item by item."""
    preload = getattr(source, "preload", None)
    return preload(list(refs)) if preload is not None else list(refs)


def _worker_source(uri: str) -> Source:
    return _opened(_worker_sources, uri, open_source)


def _worker_destination(uri: str) -> Destination:
    """The process's one destination for ``uri``: its threads share its client, connection pool
    and in-flight window."""
    return _opened(_worker_destinations, uri, open_destination)


def _opened(cache: dict[str, Any], uri: str, open_uri: Callable[[str], Any]) -> Any:
    """``cache[uri]``, opened once per process under a lock (the item threads start together)."""
    with _opening:
        if uri not in cache:
            cache[uri] = open_uri(uri)
        return cache[uri]


def _run_jobs(
    jobs: list[tuple], source: Source, destination: Destination, workers: int
) -> list[ItemRecord]:
    """The jobs' records: refs preloaded in bulk first (when the source can), items run
    ``destination.concurrent_items`` at a time per process (threads, for destinations that
    wait on the network), then ``destination.finish_batch`` on all the records."""
    refs = _preload([job[0] for job in jobs], source)
    jobs = [(ref, *job[1:]) for ref, job in zip(refs, jobs, strict=True)]
    threads = max(1, int(getattr(destination, "concurrent_items", 1)))
    if workers <= 1 or len(jobs) < 2:
        records = _work_all(jobs, threads, source, destination)
    else:
        # enough groups to balance the processes, each big enough for its threads
        size = max(1, len(jobs) // (4 * workers), min(threads, len(jobs) // workers))
        groups = [(jobs[k : k + size], threads) for k in range(0, len(jobs), size)]
        records = [r for group in _pool_map(_work_group, groups, workers) for r in group]
    _finish_batch(destination, records)
    return records


def _finish_batch(destination: Destination, records: list[ItemRecord]) -> None:
    """``destination.finish_batch`` on the batch's records (their items still held); an item it
    failed (Dataloop: the masks its new ones replaced were not all deleted) gets that failed
    record stored over its ``ok`` one: a record never says ``ok`` for an item the run reports
    failed."""
    was_ok = [record.ok for record in records]
    destination.finish_batch(records)
    for ok, record in zip(was_ok, records, strict=True):
        if ok and not record.ok:
            store_failed_record(destination.state, record)


def _work_group(job: tuple) -> list[ItemRecord]:
    """A worker's share of a batch: ``(jobs, threads)``."""
    jobs, threads = job
    return _work_all(jobs, threads)


def _work_all(
    jobs: list[tuple],
    threads: int,
    source: Source | None = None,
    destination: Destination | None = None,
) -> list[ItemRecord]:
    if threads <= 1 or len(jobs) < 2:
        return [_work(job, source, destination) for job in jobs]
    with ThreadPoolExecutor(min(threads, len(jobs)), thread_name_prefix="polyburn-item") as pool:
        return list(pool.map(lambda job: _work(job, source, destination), jobs))


def _pool_map(fn, jobs: list[tuple], workers: int, chunksize: int = 1) -> list:
    """``fn`` over ``jobs`` in the shared pool, in order. A dead worker breaks the pool: it is
    discarded (the next call starts a new one) and TransientError is raised."""
    pool = _shared_pool(workers)
    try:
        return list(pool.map(fn, jobs, chunksize=chunksize))
    except BrokenProcessPool as exc:
        _discard_pool(pool)
        raise TransientError(f"a burn worker process died: {exc}") from None


def _work(
    job: tuple, source: Source | None = None, destination: Destination | None = None
) -> ItemRecord:
    """One item. In a worker process the source and destination are opened from their URIs
    once and reused."""
    ref, source_uri, destination_uri, options, label_map, colours, preview, retries, claimed = job
    if source is None:
        source = _worker_source(source_uri)
    if destination is None:
        destination = _worker_destination(destination_uri)
    return process_item(
        ref,
        source,
        destination,
        options,
        label_map,
        colours,
        preview=preview,
        retries=retries,
        claimed=claimed,
    )


def _init_worker(parent: int, settings: config.Settings) -> None:
    """Worker initializer: the parent's settings (not those of the environment it inherited,
    which :func:`polyburn.settings.override` may have changed since)."""
    config.use(settings)
    _die_with_parent(parent)
    _steady_malloc()


# glibc mallopt parameters
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_HEAP_BLOCKS = 64 << 20  # blocks up to this size come from the heap, not from mmap
_HEAP_KEEP = 256 << 20  # free memory at the top of the heap kept for the next item


def _steady_malloc() -> None:
    """Keep the per-item buffers (masks, PNG rows: 2-4 MB for 1920x1080) on glibc's heap.

    By default glibc serves them with mmap, or trims the heap once two are freed, so every item
    page-faults its buffers afresh: about 2 ms of kernel time per W1 item, a third of its cost.
    A worker's footprint is bounded by its largest item either way.
    """
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(_M_MMAP_THRESHOLD, _HEAP_BLOCKS)
        libc.mallopt(_M_TRIM_THRESHOLD, _HEAP_KEEP)
    except (OSError, AttributeError):  # not glibc
        pass


def _die_with_parent(parent: int) -> None:
    """A killed run must not leave its workers behind: a daemon thread of the worker exits it
    within ``PARENT_CHECK_SECONDS`` of its parent process going away.

    Not ``PR_SET_PDEATHSIG``: Linux sends that signal when the *thread* that spawned the worker
    ends, and a flow's task threads end while the shared pool lives on for later batches.
    """

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_CHECK_SECONDS)
        os._exit(0)

    threading.Thread(target=watch, name="polyburn-parent-watch", daemon=True).start()


def _shared_pool(workers: int) -> ProcessPoolExecutor:
    global _pool, _pool_size
    with _lock:
        if _pool is None or _pool_size != workers:
            if _pool is not None:
                _pool.shutdown(wait=False, cancel_futures=True)
            _pool = ProcessPoolExecutor(
                workers,
                mp_context=_WorkerContext(),
                initializer=_init_worker,
                initargs=(os.getpid(), config.settings()),
            )
            _pool_size = workers
        return _pool


class _WorkerProcess(multiprocessing.context.SpawnProcess):
    """A spawned process that does not re-import the parent's ``__main__``."""

    @staticmethod
    def _Popen(process_obj):  # noqa: N802 - multiprocessing's name
        _without_main.active = True
        try:
            return multiprocessing.context.SpawnProcess._Popen(process_obj)
        finally:
            _without_main.active = False


class _WorkerContext(multiprocessing.context.SpawnContext):
    Process = _WorkerProcess


_without_main = threading.local()  # set while this thread starts a burn worker
_preparation_data = multiprocessing.spawn.get_preparation_data


def _preparation_data_without_main(name: str) -> dict[str, Any]:
    """multiprocessing's data for a new process; for burn workers (only in the thread starting
    one), without the instruction to re-run the parent's main module."""
    data = _preparation_data(name)
    if getattr(_without_main, "active", False):
        data.pop("init_main_from_path", None)
        data.pop("init_main_from_name", None)
    return data


multiprocessing.spawn.get_preparation_data = _preparation_data_without_main


def _discard_pool(pool: ProcessPoolExecutor) -> None:
    global _pool
    with _lock:
        if _pool is pool:
            _pool = None
    pool.shutdown(wait=False, cancel_futures=True)


@atexit.register
def _shutdown() -> None:
    if _pool is not None:
        _pool.shutdown(wait=True, cancel_futures=True)
