"""What the tasks share: cached sources/destinations and the transient-only retry condition."""

from __future__ import annotations

import threading
from functools import lru_cache

from polyburn.destinations import Destination, open_destination
from polyburn.errors import TransientError
from polyburn.sources import Source, open_source

_lock = threading.Lock()


@lru_cache(maxsize=16)
def _source(uri: str) -> Source:
    return open_source(uri)


@lru_cache(maxsize=16)
def _destination(uri: str) -> Destination:
    return open_destination(uri)


def source_for(uri: str) -> Source:
    """One source object per URI and process (clients are reused across batches)."""
    with _lock:
        return _source(uri)


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
