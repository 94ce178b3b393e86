"""The destination contract and the shared logic of file-like destinations (folder, S3)."""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from polyburn.encode import JSON_CONTENT_TYPE
from polyburn.formats import in_order
from polyburn.keys import safe_relpath
from polyburn.masks import ItemMasks
from polyburn.model import Item
from polyburn.records import ItemRecord

KnownBytes = Callable[[str, str], "bytes | None"]
"""``known(key, tag)``: the bytes of ``key`` when they are known for that stored tag, else None."""

LABEL_MAP_KEY = "label_map.json"
MANIFEST_KEY = "manifest.jsonl"


@dataclass(frozen=True, order=True)
class StoredEntry:
    """One stored object as a listing shows it: ``tag`` is what :meth:`FileDestination.replace`
    and :meth:`FileDestination.remove_if` compare (an S3 ETag, a file's inode-size-mtime)."""

    key: str
    tag: str
    modified: float  # seconds since the epoch
    size: int


@dataclass(frozen=True)
class OutputRecord:
    """One object written (or found already identical) for an item."""

    key: str
    sha256: str
    size: int
    written: bool

    def as_dict(self) -> dict[str, Any]:
        return {"key": self.key, "sha256": self.sha256, "bytes": self.size, "written": self.written}


class Destination(ABC):
    """Receives each item's masks, the label map and, last, the run manifest."""

    uri: str
    takes_video_frames: bool = True
    """Whether a video item's per-frame masks can be published here (one image item per frame,
    ``<item path>/<frame:06d>``)."""

    @abstractmethod
    def publish_item(
        self,
        item: Item,
        masks: ItemMasks,
        fmt: str,
        palette: Sequence[int] | None,
        known: Mapping[str, tuple[str, int]] | None = None,
    ) -> list[OutputRecord]:
        """Store the masks of one item idempotently; returns what is stored for it.

        ``known`` is what the item's record says is stored for this revision (key → sha256 and
        size), trusted instead of asking the store: an output listed with the same sha256 and
        size is not sent again, any other is sent without comparing first. None means nothing
        is known (no record to trust, or the run verifies): each output is compared with what
        is stored."""

    @abstractmethod
    def read_text(self, key: str) -> str | None:
        """A small text object (label map, manifest) of an earlier run, or None."""

    @abstractmethod
    def write_text(self, key: str, text: str) -> OutputRecord:
        """Store a small text object atomically."""

    def read_file(self, key: str, target: Path) -> bool:
        """Copy a run-level object (the manifest) to the local file ``target``; False when
        there is none. Destinations that can stream override this."""
        text = self.read_text(key)
        if text is None:
            return False
        target.write_bytes(text.encode("utf-8"))
        return True

    def write_file(self, key: str, source: Path) -> OutputRecord:
        """Store the local file ``source`` as a run-level object, atomically. Destinations that
        can stream override this."""
        return self.write_text(key, source.read_bytes().decode("utf-8"))

    def missing(self, keys: Sequence[str]) -> set[str]:
        """The ``keys`` (outputs of earlier runs) no longer stored. Destinations that cannot
        check cheaply answer an empty set (nothing known missing)."""
        return set()

    def keys(self, prefix: str) -> list[str] | None:
        """The stored keys that start with ``prefix``, or None when this destination cannot
        list them."""
        return None

    def retries_in_this_thread(self) -> int:
        """Requests the destination's client retried so far in the calling thread (a running
        count; callers take differences around one item's work)."""
        return 0

    def take_cleanup(self, path: str) -> Any:
        """Work :meth:`publish_item` left for :meth:`finish_batch` for the item at ``path``
        (popped; None when there is none). :func:`~polyburn.pipeline.process_item` puts it in the
        item's record as ``cleanup`` (never stored), so it reaches the process that runs the
        batch."""
        return None

    def finish_batch(self, records: list[ItemRecord]) -> None:  # noqa: B027 - optional
        """After every item of a batch was published: do the ``cleanup`` the records carry (and
        clear it); an item whose cleanup failed gets ``status`` "failed"."""

    def recover(self) -> None:  # noqa: B027 - optional for destinations
        """Clean up what a killed earlier run left behind (temp files, unfinished uploads)."""

    def remove(self, keys: Sequence[str]) -> None:  # noqa: B027 - optional for destinations
        """Delete outputs an item no longer produces (e.g. a label removed from it)."""

    def close(self) -> None:  # noqa: B027 - optional for destinations
        """Release connections."""

    @property
    @abstractmethod
    def state(self) -> FileDestination:
        """Where this destination keeps its run state (item records, leases, label map,
        manifest): the destination itself for a folder or S3, a state folder for Dataloop."""


class FileDestination(Destination):
    """A destination that stores bytes under keys mirroring the item path."""

    snapshot: KnownBytes | None = None
    """Records known from the last snapshot while a run burns
    (:func:`polyburn.state.attach_snapshot`), for :func:`polyburn.state.records_of`."""

    @abstractmethod
    def put(self, key: str, data: bytes, content_type: str, metadata: Mapping[str, str]) -> bool:
        """Store ``data`` at ``key`` unless identical content is already there.

        Returns True when bytes were written, False when the stored object already had them.
        """

    @abstractmethod
    def get(self, key: str) -> bytes | None:
        """The bytes at ``key``, or None when absent."""

    @property
    def state(self) -> FileDestination:
        return self

    def put_record(self, key: str, data: bytes) -> None:
        """Store a small state object (an item record) atomically, without comparing first."""
        self.put(key, data, JSON_CONTENT_TYPE, {})

    # Conditional writes: what per-item leases and the label map's compare-and-swap stand on.
    @abstractmethod
    def get_tagged(self, key: str) -> tuple[bytes, str] | None:
        """The bytes at ``key`` and their version tag, or None when absent."""

    @abstractmethod
    def create(self, key: str, data: bytes) -> str | None:
        """Store ``data`` at ``key`` if nothing is stored there and return its tag; None
        (nothing written) if something is. Atomic between concurrent writers."""

    @abstractmethod
    def replace(self, key: str, data: bytes, tag: str) -> str | None:
        """Store ``data`` at ``key`` if the stored version still has ``tag`` and return the new
        tag; None (nothing written) otherwise. Atomic between concurrent writers."""

    @abstractmethod
    def remove_if(self, key: str, tag: str) -> bool:
        """Delete ``key`` if the stored version still has ``tag``; False otherwise."""

    @abstractmethod
    def entries(self, prefix: str) -> list[StoredEntry]:
        """Every stored object whose key starts with ``prefix``, sorted by key."""

    def read_text(self, key: str) -> str | None:
        data = self.get(key)
        return None if data is None else data.decode("utf-8")

    def write_text(self, key: str, text: str) -> OutputRecord:
        data = text.encode("utf-8")
        written = self.put(key, data, text_content_type(key), {})
        return OutputRecord(key, sha256(data), len(data), written)

    def put_new(
        self, key: str, data: bytes, content_type: str, metadata: Mapping[str, str]
    ) -> None:
        """Store ``data`` at ``key`` without comparing with what is stored (the caller knows it
        differs). Stores that compare cheaply may keep comparing."""
        self.put(key, data, content_type, metadata)

    def get_many(self, keys: Sequence[str], known: KnownBytes | None = None) -> dict[str, bytes]:
        """The bytes of those ``keys`` that are stored (absent keys are left out). Stores that
        answer with latency read many at once, and may take from ``known(key, tag)`` the bytes
        of a key whose listed tag it knows, instead of reading them."""
        found = {}
        for key in keys:
            data = self.get(key)
            if data is not None:
                found[key] = data
        return found

    def content_tag(self, data: bytes) -> str | None:
        """The tag (:attr:`StoredEntry.tag`) this store gives an object holding ``data``, when
        it follows from the bytes alone (an S3 ETag of a single-part upload is their MD5); None
        when it does not (a folder's tags are inode, size and time)."""
        return None

    def publish_item(
        self,
        item: Item,
        masks: ItemMasks,
        fmt: str,
        palette: Sequence[int] | None,
        known: Mapping[str, tuple[str, int]] | None = None,
    ) -> list[OutputRecord]:
        records = []
        for key, data, content_type in mask_files(item, masks, fmt, palette):
            digest = sha256(data)
            metadata = {"item-id": item.item_id, "revision": item.revision, "sha256": digest}
            if known is None:
                written = self.put(key, data, content_type, metadata)
            elif known.get(key) == (digest, len(data)):
                written = False
            else:
                self.put_new(key, data, content_type, metadata)
                written = True
            records.append(OutputRecord(key, digest, len(data), written))
        return records


def mask_files(
    item: Item, masks: ItemMasks, fmt: str, palette: Sequence[int] | None
) -> list[tuple[str, bytes, str]]:
    """(key, bytes, content type) of every file an item's masks make: each asked format's
    (:meth:`polyburn.formats.OutputFormat.files`), in output order, e.g.
    ``semantic/<path><ext>``, ``instance/<path><ext>`` with ``instance/<path>.json`` (the id
    table), ``binary/<label>/<path><ext>``, ``coco/items/<path>.json`` (the COCO fragment).
    """
    path = safe_relpath(item.path)
    return [
        (f.key, f.data, f.content_type)
        for output_format in in_order(masks.modes)
        for f in output_format.files(masks, item, fmt, palette, path)
    ]


def text_content_type(key: str) -> str:
    """Content type of a run-level text object (JSON lines for the manifest, plain text for the
    splits, else JSON)."""
    if key.endswith(".txt"):
        return "text/plain"
    return "application/x-ndjson" if key.endswith(".jsonl") else JSON_CONTENT_TYPE


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a local file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
