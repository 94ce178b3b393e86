"""A process-wide hook through which a flow reports progress to whoever started it (the CLI's
progress bar); a no-op when nobody listens."""

from __future__ import annotations

from collections.abc import Callable

_listener: Callable[[int, int], None] | None = None


def set_listener(listener: Callable[[int, int], None] | None) -> None:
    """``listener(done, total)`` is called after each batch; None removes it."""
    global _listener
    _listener = listener


def report(done: int, total: int) -> None:
    if _listener is not None:
        _listener(done, total)
