"""Where items come from. :func:`open_source` picks the source from a URI."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import Protocol

from polyburn.errors import ConfigError
from polyburn.model import Item, ItemRef


class Source(Protocol):
    """Lists items cheaply and loads one item (with its annotations) at a time.

    A source whose items sit behind a remote API may also offer ``preload(refs) -> refs``: the
    same refs carrying what :meth:`load` needs, read in bulk (see
    :meth:`polyburn.sources.dataloop.DataloopSource.preload`); callers use it when present.
    """

    uri: str

    def list_items(self) -> Iterator[ItemRef]:
        """Every item of the source, in a stable order."""

    def load(self, ref: ItemRef, max_pixels: int) -> Item:
        """The item with parsed annotations; raises ItemError when it cannot be read."""

    def labels(self) -> dict[str, tuple[int, int, int]] | None:
        """The labels the source declares (with colours), or None when it declares none."""


def open_source(
    uri: str, item_filter: str | None = None, updated_since: datetime | None = None
) -> Source:
    """``dataloop://<dataset-id>`` → Dataloop; anything else → a local export folder.

    ``item_filter`` (a DQL JSON string) is for Dataloop only; ``updated_since`` keeps the items
    whose annotations changed after that time (file modification time for a local export).
    """
    if uri.startswith("dataloop://"):
        from polyburn.sources.dataloop import DataloopSource

        return DataloopSource.from_uri(uri, item_filter=item_filter, updated_since=updated_since)
    if item_filter:
        raise ConfigError("--filter applies to dataloop:// sources only")
    from polyburn.sources.local import LocalSource

    return LocalSource(uri, updated_since=updated_since)


__all__ = ["Source", "open_source"]
