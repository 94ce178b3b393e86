"""What the tasks share: cached sources/destinations and the transient-only retry condition."""

from __future__ import annotations

import threading
from datetime import datetime
from functools import lru_cache

from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from polyburn.destinations import Destination, open_destination
from polyburn.errors import TransientError
from polyburn.sources import Source, open_source

_lock = threading.Lock()


@lru_cache(maxsize=16)
def _source(uri: str, item_filter: str | None, updated_since: datetime | None) -> Source:
    return open_source(uri, item_filter, updated_since)


@lru_cache(maxsize=16)
def _destination(uri: str) -> Destination:
    return open_destination(uri)


def source_for(
    uri: str, item_filter: str | None = None, updated_since: datetime | None = None
) -> Source:
    """One source object per URI (and filter) and process; clients are reused across batches."""
    with _lock:
        return _source(uri, item_filter, updated_since)


def destination_for(uri: str) -> Destination:
    """One destination object per URI and process."""
    with _lock:
        return _destination(uri)


TRANSIENT_EXCEPTIONS: tuple[type[BaseException], ...] = (
    TransientError,
    ConnectionError,
    TimeoutError,
)


def retry_if_transient(task, task_run, state) -> bool:
    """Prefect ``retry_condition_fn``: retry only timeouts, resets, throttling and 5xx."""
    try:
        state.result()
    except TRANSIENT_EXCEPTIONS:
        return True
    except Exception:  # noqa: BLE001 - anything else is a bug or bad input: fail fast
        return False
    return False


IO_TASK_OPTIONS = dict(
    retries=3,
    retry_delay_seconds=exponential_backoff(backoff_factor=2),
    retry_jitter_factor=0.5,
    retry_condition_fn=retry_if_transient,
    cache_policy=NO_CACHE,
)
"""Options of the I/O tasks (list, collect labels, publish): exponential backoff with jitter,
on transient errors only; never cached (they read or write external state)."""
