"""A bound on requests in flight that shrinks when the store pushes back and grows back after.

Additive increase, multiplicative decrease (as TCP does, and as botocore's adaptive retry mode
does for its send rate): each congestion signal (a throttled, failed or reset request) halves the
window, at most once per ``cooldown`` seconds so that one burst of errors counts once; each
request that succeeds adds ``1 / window``, so the window grows by about one request per window of
successes until it is back at its ceiling. Thread-safe; Prefect-free.
"""

from __future__ import annotations

import threading
import time
from types import TracebackType


class InFlightWindow:
    """At most ``window`` (rounded down, at least 1) holders at once; ``ceiling`` at most.

    Use as a context manager around one request. ``lowest`` and ``cuts`` say how far and how
    often it shrank (for tests and benchmarks).
    """

    def __init__(self, ceiling: int, cooldown: float = 0.2) -> None:
        if ceiling < 1:
            raise ValueError(f"ceiling must be >= 1, not {ceiling}")
        self.ceiling = ceiling
        self.cooldown = cooldown
        self.window = float(ceiling)
        self.lowest = float(ceiling)
        self.cuts = 0
        self._active = 0
        self._last_cut = -float("inf")
        self._changed = threading.Condition()

    def __enter__(self) -> InFlightWindow:
        with self._changed:
            while self._active >= max(1, int(self.window)):
                self._changed.wait()
            self._active += 1
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        with self._changed:
            self._active -= 1
            self._changed.notify()

    def congested(self) -> None:
        """The store pushed back: halve the window (once per ``cooldown``)."""
        with self._changed:
            now = time.monotonic()
            if now - self._last_cut < self.cooldown:
                return
            self._last_cut = now
            self.window = max(1.0, self.window / 2)
            self.lowest = min(self.lowest, self.window)
            self.cuts += 1

    def succeeded(self) -> None:
        """A request went through at once: grow the window towards its ceiling."""
        with self._changed:
            if self.window < self.ceiling:
                self.window = min(float(self.ceiling), self.window + 1 / self.window)
                self._changed.notify_all()


__all__ = ["InFlightWindow"]
