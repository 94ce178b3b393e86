"""Burn items on every core of this machine: a process pool shared by all batches of a process.

Threads alone cannot keep two cores busy: JSON decoding and the per-annotation Python of the
parser hold the GIL. Worker processes are started with ``spawn`` (no fork of a process that
runs Prefect's threads), once per process, and reuse their sources and destinations (clients,
connections) across items. A dead worker breaks the pool: that raises TransientError (the batch
is retried by Prefect) and the next call starts a new pool.
"""

from __future__ import annotations

import atexit
import ctypes
import multiprocessing
import os
import random
import signal
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from polyburn.destinations import Destination, open_destination
from polyburn.errors import TransientError
from polyburn.model import ItemRef
from polyburn.params import MaskOptions
from polyburn.pipeline import process_item
from polyburn.sources import Source, open_source

ITEM_RETRIES = 3
ITEM_RETRY_DELAY = float(os.environ.get("POLYBURN_ITEM_RETRY_DELAY", "1.0"))  # seconds
_PR_SET_PDEATHSIG = 1
_pool: ProcessPoolExecutor | None = None
_pool_size = 0
_lock = threading.Lock()
_worker_sources: dict[str, Source] = {}
_worker_destinations: dict[str, Destination] = {}


def process_items(
    refs: Sequence[ItemRef],
    source: Source,
    destination: Destination,
    options: MaskOptions,
    label_map: Mapping[str, int],
    colours: Mapping[str, tuple[int, int, int]] | None = None,
    previous: Mapping[str, Sequence[str]] | None = None,
    previews: int = 0,
    workers: int = 1,
) -> list[dict[str, Any]]:
    """:func:`~polyburn.pipeline.process_item` over ``refs``, in order.

    With ``workers`` > 1 the items go to a pool of that many processes, which open the source and
    destination from their URIs (``source.uri``, ``destination.uri``); otherwise they run here.
    Items that failed with a transient error (throttling, 5xx, resets, timeouts that outlasted
    the client's own retries) are tried again up to ``ITEM_RETRIES`` times with exponential
    backoff and jitter; their records then carry ``retries``.
    """
    previous = previous or {}
    jobs = [
        (
            ref,
            source.uri,
            destination.uri,
            options,
            dict(label_map),
            colours,
            tuple(previous.get(ref.path, ())),
            k < previews,
        )
        for k, ref in enumerate(refs)
    ]
    records = _run_jobs(jobs, source, destination, workers)
    for attempt in range(1, ITEM_RETRIES + 1):
        again = [k for k, record in enumerate(records) if record.get("transient")]
        if not again:
            break
        time.sleep(ITEM_RETRY_DELAY * 2 ** (attempt - 1) * random.uniform(0.5, 1.5))
        redone = _run_jobs([jobs[k] for k in again], source, destination, workers)
        for k, record in zip(again, redone, strict=True):
            record["retries"] = attempt
            records[k] = record
    for record in records:
        record.pop("transient", None)
    return records


def _run_jobs(
    jobs: list[tuple], source: Source, destination: Destination, workers: int
) -> list[dict[str, Any]]:
    if workers <= 1 or len(jobs) < 2:
        return [_work(job, source, destination) for job in jobs]
    pool = _shared_pool(workers)
    try:
        return list(pool.map(_work, jobs, chunksize=max(1, len(jobs) // (4 * workers))))
    except BrokenProcessPool as exc:
        _discard_pool(pool)
        raise TransientError(f"a burn worker process died: {exc}") from None


def _work(
    job: tuple, source: Source | None = None, destination: Destination | None = None
) -> dict[str, Any]:
    """One item. In a worker process the source and destination are opened from their URIs
    once and reused."""
    ref, source_uri, destination_uri, options, label_map, colours, previous, preview = job
    if source is None:
        source = _worker_sources.get(source_uri)
        if source is None:
            source = _worker_sources[source_uri] = open_source(source_uri)
    if destination is None:
        destination = _worker_destinations.get(destination_uri)
        if destination is None:
            destination = _worker_destinations[destination_uri] = open_destination(destination_uri)
    return process_item(
        ref, source, destination, options, label_map, colours, previous, preview=preview
    )


def _die_with_parent(parent: int) -> None:
    """Worker initializer: a killed run must not leave its workers behind (Linux: the kernel
    sends SIGTERM to the worker when its parent dies)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: workers exit when the pool's pipe closes
        pass
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(0)


def _shared_pool(workers: int) -> ProcessPoolExecutor:
    global _pool, _pool_size
    with _lock:
        if _pool is None or _pool_size != workers:
            if _pool is not None:
                _pool.shutdown(wait=False, cancel_futures=True)
            _pool = ProcessPoolExecutor(
                workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_die_with_parent,
                initargs=(os.getpid(),),
            )
            _pool_size = workers
        return _pool


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
