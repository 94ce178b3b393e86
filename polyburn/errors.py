"""Exceptions raised by the polyburn core.

Every message is a single line that names the item (and the annotation or field when there is
one), so a failed item can be reported without a stack trace.
"""

from __future__ import annotations


class PolyburnError(Exception):
    """Base class of every error polyburn raises on purpose."""


class ItemError(PolyburnError):
    """An item cannot be turned into masks; the other items of the run are unaffected.

    Parameters
    ----------
    item : str
        The item's id or path, as the user knows it.
    reason : str
        What is wrong, in one line.
    field : str, optional
        The JSON field (or annotation id) at fault.
    """

    def __init__(self, item: str, reason: str, field: str | None = None) -> None:
        self.item = item
        self.reason = " ".join(str(reason).split())
        self.field = field
        where = f" [{field}]" if field else ""
        super().__init__(f"{item}{where}: {self.reason}")


class ConfigError(PolyburnError):
    """The run's options or label map are wrong; nothing was processed."""


class TransientError(PolyburnError):
    """A failure of an external service that is worth retrying (timeouts, 429, 5xx, resets)."""
