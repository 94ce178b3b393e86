"""Dataset-level files assembled from the items' records and COCO fragments, never by burning.

``splits/train.txt``, ``splits/validation.txt``, ``splits/test.txt``, ``splits/unassigned.txt``
    One item path per line, sorted (PASCAL VOC's ``ImageSets/Segmentation`` style): every item
    whose record is ``ok`` is in exactly one of them, by the ``subset`` its record holds (an
    item with none, or tagged with several, is unassigned). Failed items are in none.
``coco/instances.json`` and ``coco/instances_<subset>.json``
    COCO instance JSON assembled from the ``coco/items/…`` fragments the ``ok`` records list
    (:mod:`polyburn.coco`), one file for every item and one per subset present; a video item
    is one image per frame written. Image ids are 1-based positions in path order (then frame
    order), annotation ids consecutive in that order; a subset file keeps the ids of the whole
    file. Written only when some record lists a fragment; otherwise
    (and for subsets no longer present) earlier ``coco/instances*.json`` files are removed.

Each file is a snapshot like ``manifest.jsonl``: written to a local temporary file, then stored
in one atomic write. Memory stays flat: the records are read back one at a time from the spool
(sorted by path), fragments are read a chunk at a time and streamed into per-file parts on disk.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any, BinaryIO

from polyburn.coco import COCO_FRAGMENTS
from polyburn.dataloop_json import ML_SUBSETS
from polyburn.destinations.base import LABEL_MAP_KEY, FileDestination
from polyburn.formats import registry
from polyburn.labels import parse_label_map
from polyburn.manifest import RecordSpool
from polyburn.records import ItemRecord

log = logging.getLogger("polyburn.dataset")

SPLITS = "splits/"
UNASSIGNED = "unassigned"
COCO_FILES = "coco/instances"
CHUNK = 1000


def subset_of(record: ItemRecord) -> str:
    """The split an ``ok`` record goes to: its ``subset``, else ``unassigned``."""
    subset = record.subset
    return subset if subset in ML_SUBSETS else UNASSIGNED


def fragment_keys(record: ItemRecord) -> list[str]:
    """The keys of the COCO fragments a record lists among its outputs, sorted: one for an
    image item, one per frame for a video item (``coco/items/<path>/<frame:06d>.json``)."""
    return sorted(key for key in record.output_keys() if str(key).startswith(COCO_FRAGMENTS))


def write_dataset_files(
    store: FileDestination, spool: RecordSpool, scratch: Path
) -> dict[str, int]:
    """Write the splits and every output format's dataset files (:mod:`polyburn.formats`: the
    COCO files when fragments exist...) of ``store`` from the records in ``spool`` (the
    destination's current records); returns how many items each file lists
    (``splits/train.txt``: n, ..., ``coco/instances.json``: images)."""
    counts = write_splits(store, spool, scratch)
    for output_format in registry().values():
        counts.update(output_format.dataset_files(store, spool, scratch))
    return counts


def write_splits(store: FileDestination, spool: RecordSpool, scratch: Path) -> dict[str, int]:
    """``splits/<subset>.txt`` for train, validation, test and unassigned (each written, empty
    or not)."""
    names = [*ML_SUBSETS, UNASSIGNED]
    counts = dict.fromkeys(names, 0)
    with ExitStack() as stack:
        files = {n: stack.enter_context(open(scratch / f"split-{n}.txt", "wb")) for n in names}
        for record in spool.records():
            if record.ok:
                subset = subset_of(record)
                files[subset].write(record.path.encode("utf-8") + b"\n")
                counts[subset] += 1
    written = {}
    for name in names:
        local = scratch / f"split-{name}.txt"
        store.write_file(f"{SPLITS}{name}.txt", local)
        local.unlink()
        written[f"{SPLITS}{name}.txt"] = counts[name]
    return written


def write_coco(store: FileDestination, spool: RecordSpool, scratch: Path) -> dict[str, int]:
    """``coco/instances.json`` and one ``coco/instances_<subset>.json`` per subset present, from
    the fragments the ``ok`` records list; stale ``coco/instances*.json`` files are removed."""
    label_map = parse_label_map(store.read_text(LABEL_MAP_KEY) or "{}", LABEL_MAP_KEY)
    categories = [
        {"id": i, "name": label, "supercategory": ""}
        for label, i in sorted(label_map.items(), key=lambda kv: kv[1])
    ]
    writers: dict[str, _CocoWriter] = {}
    try:
        annotation_id = 0
        for image_id, (record, fragment) in enumerate(_fragments(store, spool), start=1):
            subset = subset_of(record)
            targets = [_writer(writers, "", scratch)]
            if subset != UNASSIGNED:
                targets.append(_writer(writers, subset, scratch))
            image = dict(fragment["image"], id=image_id)
            image["dataloop_subset"] = None if subset == UNASSIGNED else subset
            annotations = []
            for part in fragment.get("annotations", []):
                annotation_id += 1
                annotations.append(dict(part, id=annotation_id, image_id=image_id))
            for writer in targets:
                writer.add(image, annotations)
        written = {}
        for name, writer in sorted(writers.items()):
            key = f"{COCO_FILES}{'_' + name if name else ''}.json"
            store.write_file(key, writer.finish(categories))
            written[key] = writer.images
    finally:
        for writer in writers.values():
            writer.close()
    stale = [
        e.key
        for e in store.entries(COCO_FILES)
        if e.key.endswith(".json") and "/" not in e.key[len("coco/") :] and e.key not in written
    ]
    if stale:
        store.remove(stale)
    return written


def _writer(writers: dict[str, _CocoWriter], name: str, scratch: Path) -> _CocoWriter:
    if name not in writers:
        writers[name] = _CocoWriter(scratch / f"coco-{name or 'all'}")
    return writers[name]


def _fragments(
    store: FileDestination, spool: RecordSpool
) -> Iterator[tuple[ItemRecord, dict[str, Any]]]:
    """``(record, fragment)`` for each COCO fragment the ``ok`` records list, by path; the
    fragments are read ``CHUNK`` at a time (:meth:`FileDestination.get_many`). A fragment that
    is gone or does not parse is logged and left out (its item is not in the COCO files)."""
    pending: list[tuple[ItemRecord, str]] = []
    for record in _with_fragment(spool):
        pending.append(record)
        if len(pending) == CHUNK:
            yield from _read_chunk(store, pending)
            pending = []
    yield from _read_chunk(store, pending)


def _with_fragment(spool: RecordSpool) -> Iterator[tuple[ItemRecord, str]]:
    for record in spool.records(mentioning=COCO_FRAGMENTS):
        if record.ok:
            for key in fragment_keys(record):
                yield record, key


def _read_chunk(store: FileDestination, pending: list[tuple[ItemRecord, str]]):
    found = store.get_many([key for _, key in pending])
    for record, key in pending:
        data = found.get(key)
        try:
            fragment = json.loads(data) if data is not None else None
        except (json.JSONDecodeError, UnicodeDecodeError):
            fragment = None
        if not isinstance(fragment, dict) or not isinstance(fragment.get("image"), dict):
            log.warning("%s: COCO fragment %s is missing or unreadable; left out", record.path, key)
            continue
        yield record, fragment


class _CocoWriter:
    """One COCO file being assembled: images and annotations streamed to two part files, joined
    with the categories by :meth:`finish`."""

    def __init__(self, stem: Path) -> None:
        self.stem = stem
        self._images: BinaryIO = open(f"{stem}-images.part", "wb")  # noqa: SIM115
        self._annotations: BinaryIO = open(f"{stem}-annotations.part", "wb")  # noqa: SIM115
        self.images = 0
        self.annotations = 0

    def add(self, image: Mapping[str, Any], annotations: list[Mapping[str, Any]]) -> None:
        self._images.write((b",\n" if self.images else b"\n") + _dumps(image))
        self.images += 1
        for annotation in annotations:
            self._annotations.write((b",\n" if self.annotations else b"\n") + _dumps(annotation))
            self.annotations += 1

    def finish(self, categories: list[dict[str, Any]]) -> Path:
        """The assembled file (``<stem>.json``)."""
        self.close()
        target = Path(f"{self.stem}.json")
        with open(target, "wb") as out:
            out.write(b'{"info": {"description": "polyburn COCO instances"},\n"images": [')
            _copy(Path(f"{self.stem}-images.part"), out)
            out.write(b"\n],\n" + b'"categories": ' + _dumps(categories) + b",\n")
            out.write(b'"annotations": [')
            _copy(Path(f"{self.stem}-annotations.part"), out)
            out.write(b"\n]}\n")
        return target

    def close(self) -> None:
        self._images.close()
        self._annotations.close()


def _copy(part: Path, out: BinaryIO) -> None:
    with open(part, "rb") as handle:
        while block := handle.read(1 << 20):
            out.write(block)
    part.unlink()


def _dumps(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
