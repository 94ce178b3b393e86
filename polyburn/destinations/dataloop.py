"""A Dataloop dataset as a destination: ``dataloop://<dataset-id>``, or ``dataloop://`` for the
source's own dataset.

Each item's masks become ``binary`` annotations on the item (the destination item is the source
item itself when it lives in the destination dataset, else the destination's item with the same
``filename``):

* ``semantic``: one annotation per label of the item (the pixels whose semantic id is the label's);
* ``instance``: one per instance, ``objectId`` = the instance id of the instance mask: with the
  default ``instance_id="object"`` one per Dataloop object (its parts together), carrying the
  object's own objectId (a fresh id for annotations without a usable one,
  :mod:`polyburn.instances`);
* ``binary``: one per label (the union of that label's shapes, overlaps kept).

The PNG is what dtlpy writes (``dl.Segmentation`` → RGBA, RGB the label colour of the palette,
alpha 255 on the mask), built offline with ``dl.Annotation.new(...).to_json()`` and no item, so no
ontology look-up per annotation. ``fmt`` does not apply: binary annotations are always PNG.

**Marker.** Every annotation polyburn writes carries ``metadata.user.polyburn`` =
``{"tool": "polyburn", "version", "run", "mode", "key", "sha256", "revision", "bytes", "batch",
"sourceItem", ...}``. ``metadata.user`` is stored by Dataloop as given and kept by the SDK. Input
parsing skips any annotation with that key (:data:`polyburn.dataloop_json.POLYBURN_MARKER`), and
only annotations with ``tool == "polyburn"`` are ever updated or deleted: human annotations are
never touched.

**Replace, never duplicate.** :meth:`DataloopDestination.publish_item` takes the item's polyburn
annotations (from the item when the source read them with it, else one query), keeps those whose
``(key, sha256)`` equal a mask to write (so a re-run with nothing changed writes nothing), and
uploads the others in one call per item (up to 100 masks per call, as dtlpy does). The reply must
list exactly what was sent, else the item fails and this call's new annotations are deleted
again. An upload whose connection broke after the server stored it is found again by its
``batch`` marker and not re-sent. The old annotations it no longer needs are removed only after
that, for a whole batch of items at once: :meth:`publish_item` leaves their ids to
:meth:`take_cleanup` (the record carries them to the process that ran the batch) and
:meth:`finish_batch` deletes them with one query-based bulk delete per 1,000 ids
(``POST /datasets/{id}/query`` with ``"delete": true``, limited to polyburn's ``binary``
annotations). When the server deletes fewer than asked, the ids still there are looked up and
exactly the items holding them fail. A crash at any point leaves the old masks (possibly next to
some new ones, which the next run reconciles), never an item without masks.

**Run state** (:attr:`DataloopDestination.state`: item records, item leases, label map and
manifest, as for a folder destination) lives in a local state folder,
``$POLYBURN_STATE_DIR/dataloop/<dataset-id>/`` (default ``$XDG_CACHE_HOME/polyburn`` or
``~/.cache/polyburn``), written atomically. It does not decide what is replaced in Dataloop (the
markers on the server do), so losing the folder loses the history and the ids of a semantic label
map, never masks; point ``POLYBURN_STATE_DIR`` at shared storage when several machines run the
same destination.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import logging
import os
import threading
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import polyburn
from polyburn import dataloop_api as api
from polyburn import settings as config
from polyburn.destinations.base import LABEL_MAP_KEY, Destination, OutputRecord
from polyburn.destinations.local import LocalDestination
from polyburn.errors import ConfigError, ItemError, PolyburnError, TransientError
from polyburn.formats import in_order
from polyburn.keys import safe_relpath, safe_segment
from polyburn.labels import parse_label_map
from polyburn.masks import ItemMasks
from polyburn.model import Item
from polyburn.records import ItemRecord
from polyburn.sources.dataloop import DEFAULT_COLOUR, get_dataset, parse_dataset_uri

log = logging.getLogger("polyburn.dataloop")

TOOL = "polyburn"
UPLOAD_BATCH = 100
DELETE_BATCH = 1000  # ids in one bulk delete


@dataclass
class _Planned:
    """One mask to store as a binary annotation."""

    mode: str
    name: str
    label: str
    mask: np.ndarray
    colour: tuple[int, int, int]
    object_id: int | None
    digest: str
    extra: dict[str, Any]

    @property
    def key(self) -> str:
        return f"{self.mode}/{self.name}"


def state_dir(dataset_id: str) -> Path:
    """Where the label map and manifest of a Dataloop destination are kept."""
    return config.settings().dataloop_state_root / "dataloop" / dataset_id


class DataloopDestination(Destination):
    """Masks as polyburn-marked ``binary`` annotations of a Dataloop dataset (module docstring)."""

    takes_video_frames = False  # a video item fails with one line (docs/outputs.md, Video items)

    def __init__(
        self,
        dataset: Mapping[str, Any],
        state: str | os.PathLike | None = None,
        source_dataset: str | None = None,
    ) -> None:
        self.dataset = dict(dataset)
        self.dataset_id: str = self.dataset["id"]
        self.uri = f"dataloop://{self.dataset_id}"
        self.source_dataset = source_dataset
        self._state = LocalDestination(state if state is not None else state_dir(self.dataset_id))
        self._label_map: dict[str, int] | None = None
        self._user_email: str | None = None
        self._cleanup: dict[str, list[str]] = {}
        self._cleanup_lock = threading.Lock()
        self.concurrent_items = api.concurrency()

    @classmethod
    def from_uri(cls, uri: str, source_dataset: str | None = None) -> DataloopDestination:
        """``dataloop://<id>``, or ``dataloop://`` with ``source_dataset`` (an id or a
        ``dataloop://<id>`` URI) for "the source's dataset". Logs in and checks the dataset.

        Raises ConfigError for a bare ``dataloop://`` without a Dataloop source, a malformed URI,
        a missing dataset or a rejected key.
        """
        dataset_id = parse_dataset_uri(uri, allow_empty=True)
        if source_dataset and source_dataset.startswith("dataloop://"):
            source_dataset = parse_dataset_uri(source_dataset)
        if dataset_id is None:
            if not source_dataset:
                raise ConfigError(
                    "destination dataloop:// means the source's dataset, but the source is not "
                    "a Dataloop dataset; use dataloop://<dataset-id>"
                )
            dataset_id = source_dataset
        return cls(get_dataset(dataset_id), source_dataset=source_dataset)

    # ------------------------------------------------------------------------- run-level text
    @property
    def state(self) -> LocalDestination:
        return self._state

    def read_text(self, key: str) -> str | None:
        return self._state.read_text(key)

    def write_text(self, key: str, text: str) -> OutputRecord:
        record = self._state.write_text(key, text)
        if key == LABEL_MAP_KEY:
            self._label_map = parse_label_map(text, f"{self._state.uri}/{key}")
        return record

    def read_file(self, key: str, target: Path) -> bool:
        return self._state.read_file(key, target)

    def write_file(self, key: str, source: Path) -> OutputRecord:
        return self._state.write_file(key, source)

    def remove(self, keys: Sequence[str]) -> None:
        """Nothing to do: :meth:`finish_batch` deletes every polyburn annotation of the item that
        the new outputs do not include."""

    def take_cleanup(self, path: str) -> list[str] | None:
        """The annotation ids :meth:`publish_item` replaced for the item at ``path`` (once)."""
        with self._cleanup_lock:
            return self._cleanup.pop(path, None)

    def finish_batch(self, records: list[ItemRecord]) -> None:
        """Delete the replaced annotations the records carry (``cleanup``), one bulk delete per
        :data:`DELETE_BATCH` ids; an item whose old annotations are not all gone fails (its
        new masks stay; the next run removes the old ones)."""
        owners: dict[str, ItemRecord] = {}
        for record in records:
            for annotation_id in record.cleanup or ():
                owners[annotation_id] = record
            record.cleanup = None
        failed: dict[int, tuple[ItemRecord, str, bool]] = {}
        ids = sorted(owners)
        for start in range(0, len(ids), DELETE_BATCH):
            chunk = ids[start : start + DELETE_BATCH]
            try:
                left = self._bulk_delete(chunk)
                reason, transient = f"{len(left)} of {len(chunk)} still there", False
            except PolyburnError as exc:
                left, reason, transient = chunk, str(exc), isinstance(exc, TransientError)
            for annotation_id in left:
                record = owners[annotation_id]
                failed.setdefault(id(record), (record, reason, transient))
        for record, reason, transient in failed.values():
            record.status = "failed"
            record.error = (
                f"{record.path}: Dataloop did not delete the masks it replaced ({reason}); the "
                "next run removes them"
            )
            if transient:
                record.transient = True

    def _bulk_delete(self, ids: list[str]) -> list[str]:
        """Delete polyburn's annotations ``ids`` in one query; returns the ids still there."""
        query = {
            "filter": {
                "$and": [
                    {"id": {"$in": ids}},
                    {"type": "binary"},
                    {"metadata.user.polyburn.tool": TOOL},
                ]
            },
            "resource": "annotations",
            "page": 0,
            "pageSize": api.PAGE_SIZE_MAX,
        }
        what = f"delete {len(ids)} replaced masks in dataset {self.dataset_id}"
        count = api.delete_query(self.dataset_id, query, what)
        if count == len(ids):
            return []
        # fewer than asked (a partial delete, or a retried request whose first try applied):
        # what is still there decides
        check = {"filter": {"$and": [{"id": {"$in": ids}}]}, "resource": "annotations"}
        what = f"check {len(ids)} deleted masks in dataset {self.dataset_id}"
        asked = set(ids)
        return [
            a["id"]
            for page in api.query_pages(self.dataset_id, check, what)
            for a in page
            if isinstance(a, Mapping) and a.get("id") in asked
        ]

    # ------------------------------------------------------------------------- items
    def publish_item(
        self,
        item: Item,
        masks: ItemMasks,
        fmt: str,
        palette: Sequence[int] | None,
        known: Mapping[str, tuple[str, int]] | None = None,
    ) -> list[OutputRecord]:
        """Make the item's polyburn annotations equal to ``masks`` (see the module docstring).
        ``known`` is not used: the item's annotations are compared with what it has.

        The replaced annotations are deleted later, by :meth:`finish_batch` (their ids wait in
        :meth:`take_cleanup`). Raises ItemError (upload incomplete, no destination item) or the
        Dataloop errors of :mod:`polyburn.dataloop_api`; the item then keeps its previous masks.
        """
        target = self._target_item(item)
        planned = self._plan(item, masks, palette)
        if item.own_outputs is not None and target == item.item_id:
            existing = [a for a in item.own_outputs if _is_ours(a, target)]
        else:
            existing = self._existing(target)
        pool: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for annotation in existing:
            marker = annotation["metadata"]["user"]["polyburn"]
            pool.setdefault((str(marker.get("key")), str(marker.get("sha256"))), []).append(
                annotation
            )
        kept: dict[int, dict[str, Any]] = {}
        to_upload: list[_Planned] = []
        for index, plan in enumerate(planned):
            matches = pool.get((plan.key, plan.digest))
            if matches:
                kept[index] = matches.pop(0)
            else:
                to_upload.append(plan)
        stale = [a for group in pool.values() for a in group]

        sizes = self._upload(target, item, to_upload) if to_upload else {}
        if stale:
            with self._cleanup_lock:
                self._cleanup[item.path] = [a["id"] for a in stale]

        path = safe_relpath(item.path)
        records = []
        for index, plan in enumerate(planned):
            key = f"{plan.mode}/{path}/{safe_segment(plan.name)}"
            if index in kept:
                size = kept[index]["metadata"]["user"]["polyburn"].get("bytes", 0)
                records.append(OutputRecord(key, plan.digest, int(size or 0), False))
            else:
                records.append(OutputRecord(key, plan.digest, sizes[plan.key], True))
        return records

    def _target_item(self, item: Item) -> str:
        """The destination item id: the item itself when it is in this dataset, else by name."""
        if item.item_id and (
            self.source_dataset == self.dataset_id
            or api.dataset_of(item.item_id) == self.dataset_id
        ):
            return item.item_id
        if not item.filename:
            raise ItemError(item.path, f"no filename to find the item in dataset {self.dataset_id}")
        query = {
            "filter": {"$and": [{"filename": item.filename}, {"type": "file"}]},
            "resource": "items",
        }
        what = f"find {item.filename} in dataset {self.dataset_id}"
        for page in api.query_pages(self.dataset_id, query, what, page_size=2):
            for raw in page:
                if isinstance(raw, Mapping) and raw.get("filename") == item.filename:
                    return str(raw["id"])
        raise ItemError(item.path, f"dataset {self.dataset_id} has no item {item.filename}")

    def _labels(self, needed: set[str]) -> dict[str, int] | None:
        """The run's label map: as last written by this object, else from the state folder
        (read again when it lacks a label, e.g. extended by a later run in a long-lived worker).
        """
        if self._label_map is None or not needed <= self._label_map.keys():
            text = self.read_text(LABEL_MAP_KEY)
            if text:
                self._label_map = parse_label_map(text, f"{self._state.uri}/{LABEL_MAP_KEY}")
        return self._label_map

    def _plan(self, item: Item, masks: ItemMasks, palette: Sequence[int] | None) -> list[_Planned]:
        label_map = self._labels({a.label for a in item.annotations})

        def colour(label: str) -> tuple[int, int, int]:
            index = (label_map or {}).get(label)
            if palette is not None and index is not None and 0 < index < 256:
                return (
                    int(palette[3 * index]),
                    int(palette[3 * index + 1]),
                    int(palette[3 * index + 2]),
                )
            return DEFAULT_COLOUR

        planned: list[_Planned] = []

        def add(mode, name, label, mask, object_id=None, **extra) -> None:
            if not mask.any():
                return
            rgb = colour(label)
            digest = _digest(mode, label, object_id, rgb, mask)
            planned.append(_Planned(mode, name, label, mask, rgb, object_id, digest, extra))

        for output_format in in_order(masks.modes):
            try:
                for m in output_format.annotations(masks, item, label_map):
                    add(output_format.name, m.name, m.label, m.mask, m.object_id, **m.extra)
            except LookupError:
                raise ItemError(
                    item.path,
                    f"{output_format.name} masks need the run's label map, not found in "
                    f"{self._state.uri}",
                ) from None
        return planned

    def _existing(self, target: str) -> list[dict[str, Any]]:
        """The item's annotations written by polyburn (checked again client-side)."""
        query = {
            "filter": {
                "$and": [
                    {"itemId": target},
                    {"type": "binary"},
                    {"metadata.user.polyburn.tool": TOOL},
                ]
            },
            "resource": "annotations",
        }
        found = []
        what = f"list polyburn annotations of item {target}"
        for page in api.query_pages(self.dataset_id, query, what):
            found.extend(a for a in page if _is_ours(a, target))
        return found

    def _upload(self, target: str, item: Item, plans: list[_Planned]) -> dict[str, int]:
        """Upload ``plans``; returns key → PNG size. All or nothing (best effort rollback)."""
        dl = api.dtlpy()
        run = api.run_id()
        created: list[str] = []
        batches: list[str] = []
        sizes: dict[str, int] = {}
        try:
            for start in range(0, len(plans), UPLOAD_BATCH):
                batch_id = uuid.uuid4().hex
                batches.append(batch_id)
                batch = plans[start : start + UPLOAD_BATCH]
                payload = []
                for plan in batch:
                    body = _annotation_json(dl, plan, item, target, self.dataset_id, run, batch_id)
                    sizes[plan.key] = body["metadata"]["user"]["polyburn"]["bytes"]
                    payload.append(body)
                what = f"upload {len(payload)} masks to item {target}"
                result = api.request(
                    "POST",
                    f"/items/{target}/annotations",
                    what=what,
                    json_body=payload,
                    recover=functools.partial(self._recover, target, batch_id, len(payload)),
                )
                ids = _created_ids(result)
                created.extend(ids)
                if len(ids) != len(payload):
                    raise ItemError(
                        item.path,
                        f"Dataloop stored {len(ids)} of {len(payload)} masks sent to item "
                        f"{target}; the item keeps its previous masks",
                    )
        except PolyburnError:
            self._roll_back(target, item.path, created, batches)
            raise
        return sizes

    def _roll_back(self, target: str, where: str, created: list[str], batches: list[str]) -> None:
        """Best effort: delete what this publish created (by id, and by batch marker for what
        the server stored without listing it)."""
        doomed = set(created)
        for batch_id in batches:
            try:
                doomed.update(a["id"] for a in self._batch(target, batch_id))
            except PolyburnError as exc:
                log.warning("cannot list upload batch %s of %s: %s", batch_id, where, exc)
        for annotation_id in sorted(doomed):
            try:
                self._delete(annotation_id, where)
            except PolyburnError as exc:
                log.warning("cannot roll back annotation %s of %s: %s", annotation_id, where, exc)

    def _batch(self, target: str, batch_id: str) -> list[dict[str, Any]]:
        """The polyburn annotations of ``target`` uploaded in batch ``batch_id``."""
        query = {
            "filter": {"$and": [{"itemId": target}, {"metadata.user.polyburn.batch": batch_id}]},
            "resource": "annotations",
        }
        what = f"find upload batch {batch_id}"
        return [
            a
            for page in api.query_pages(self.dataset_id, query, what)
            for a in page
            if _is_ours(a, target)
        ]

    def _recover(self, target: str, batch_id: str, expected: int) -> list[dict[str, Any]] | None:
        """After a broken upload: the batch's annotations if all were stored, else None (and
        the partial ones deleted) so the batch is sent again."""
        try:
            found = self._batch(target, batch_id)
            if len(found) == expected:
                return found
            for annotation in found:
                self._delete(annotation["id"], target)
        except PolyburnError as exc:
            log.info("cannot check upload batch %s: %s", batch_id, exc)
        return None

    def _delete(self, annotation_id: str, where: str) -> None:
        body = {"username": self._email()} if self._email() else None
        with contextlib.suppress(api.DataloopNotFound):  # already gone
            api.request(
                "DELETE",
                f"/annotations/{annotation_id}",
                what=f"delete annotation {annotation_id} of {where}",
                json_body=body,
            )

    def _email(self) -> str:
        if self._user_email is None:
            try:
                info = api.session().client.info(with_token=False)
                self._user_email = str(info.get("user_email") or "")
            except Exception:  # noqa: BLE001 - the body is optional
                self._user_email = ""
        return self._user_email


def _is_ours(annotation: Any, item_id: str) -> bool:
    if not isinstance(annotation, Mapping) or annotation.get("itemId") != item_id:
        return False
    user = (annotation.get("metadata") or {}).get("user") or {}
    marker = user.get("polyburn") if isinstance(user, Mapping) else None
    return (
        isinstance(marker, Mapping)
        and marker.get("tool") == TOOL
        and annotation.get("type") == "binary"
        and isinstance(annotation.get("id"), str)
    )


def _digest(
    mode: str, label: str, object_id: int | None, colour: tuple[int, int, int], mask: np.ndarray
) -> str:
    """sha256 of what the annotation shows: mode, label, objectId, colour and the mask bits."""
    h = hashlib.sha256()
    h.update(repr((mode, label, object_id, tuple(colour), mask.shape)).encode("utf-8"))
    h.update(np.packbits(mask.astype(bool, copy=False)).tobytes())
    return h.hexdigest()


def _annotation_json(
    dl: Any,
    plan: _Planned,
    item: Item,
    target: str,
    dataset_id: str,
    run: str,
    batch_id: str,
) -> dict[str, Any]:
    marker: dict[str, Any] = {
        "tool": TOOL,
        "version": polyburn.__version__,
        "run": run,
        "mode": plan.mode,
        "key": plan.key,
        "sha256": plan.digest,
        "revision": item.revision,
        "sourceItem": item.item_id,
        "batch": batch_id,
        **{k: v for k, v in plan.extra.items() if v is not None},
    }
    segmentation = dl.Segmentation(
        geo=plan.mask.astype(np.uint8), label=plan.label, color=plan.colour
    )
    annotation = dl.Annotation.new(
        annotation_definition=segmentation,
        object_id=plan.object_id,
        metadata={"user": {"polyburn": marker}},
    )
    body = annotation.to_json()
    body["itemId"] = target
    body["datasetId"] = dataset_id
    coordinates = body.get("coordinates")
    png = coordinates.split(",", 1)[1] if isinstance(coordinates, str) else ""
    marker["bytes"] = len(base64.b64decode(png)) if png else 0
    body["metadata"]["user"]["polyburn"] = marker
    return body


def _created_ids(result: Any) -> list[str]:
    if isinstance(result, Mapping):
        result = [result]
    if not isinstance(result, list):
        return []
    return [a["id"] for a in result if isinstance(a, Mapping) and isinstance(a.get("id"), str)]
