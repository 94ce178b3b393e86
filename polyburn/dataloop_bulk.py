"""Dataloop items and their pixel annotations, a page at a time instead of an item at a time.

* :func:`listing_data` keeps what a listing page says about an item (``id``, ``datasetId``,
  ``filename``, ``metadata.system`` width/height/mimetype/tags) as the compact JSON carried by
  :attr:`polyburn.model.ItemRef.data`: the item is never asked for again.
* :func:`preload` fetches the raw ``segment``/``binary`` annotation JSON of many items with one
  paged annotation query per 1,000 items (``itemId $in [...]``, keyset-paged by annotation id,
  1,000 annotations per page) and returns the refs with the item JSON and its annotations in
  ``data``. An item whose annotations span two pages gets both parts, in id order (the order of
  the per-item query). Items whose listing data is missing are read with one item query per
  1,000 ids. When a query fails (after :mod:`polyburn.dataloop_api`'s retries), the refs of that
  query carry the error instead, so exactly those items fail, named, when they are loaded.
* :func:`unpack` turns a ref's ``data`` back into the item JSON and its annotations (when
  preloaded), or raises the recorded error.

Memory: one chunk of refs and their annotations at a time (the caller's batch).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

from polyburn import dataloop_api as api
from polyburn.errors import ItemError, PolyburnError, TransientError
from polyburn.model import ItemRef

PIXEL_TYPES = ["segment", "binary"]
IDS_PER_QUERY = 1000  # ids in one ``$in`` list
ANNOTATIONS_PER_PAGE = api.PAGE_SIZE_MAX


def listing_data(raw: Mapping[str, Any]) -> str:
    """The compact JSON of the fields of a listed item that loading needs."""
    system = ((raw.get("metadata") or {}).get("system")) or {}
    kept_system = {
        k: system[k]
        for k in ("width", "height", "mimetype", "tags")
        if isinstance(system, Mapping) and k in system
    }
    item = {
        "id": raw.get("id"),
        "datasetId": raw.get("datasetId"),
        "filename": raw.get("filename"),
        "metadata": {"system": kept_system},
    }
    return json.dumps({"item": item}, separators=(",", ":"))


def unpack(ref: ItemRef) -> tuple[dict[str, Any] | None, list[Any] | None, float | None]:
    """The item JSON and the raw annotations ``ref.data`` carries (None for what it lacks), and
    when the annotations were read (seconds since the epoch, this host's clock). Raises the error
    a failed preload recorded for this item."""
    if not ref.data:
        return None, None, None
    data = json.loads(ref.data)
    error = data.get("error")
    if error:
        if data.get("transient"):
            raise TransientError(error)
        raise ItemError(ref.path, error)
    annotations = data.get("annotations")
    if not isinstance(annotations, list):
        return dict(data["item"]), None, None
    return dict(data["item"]), annotations, data.get("read_at")


def preload(dataset_id: str, refs: Sequence[ItemRef]) -> list[ItemRef]:
    """``refs`` with each item's JSON and raw pixel annotations in ``data`` (see the module
    docstring); never raises for a failed query, the refs of that query carry the error."""
    out: list[ItemRef] = []
    for start in range(0, len(refs), IDS_PER_QUERY):
        out.extend(_preload_chunk(dataset_id, refs[start : start + IDS_PER_QUERY]))
    return out


def _preload_chunk(dataset_id: str, refs: Sequence[ItemRef]) -> list[ItemRef]:
    ids = [ref.locator for ref in refs]
    span = f"{len(ids)} items {ids[0]}..{ids[-1]}" if ids else "no items"
    read_at = time.time()
    try:
        items = _items_json(dataset_id, refs)
        annotations = annotations_by_item(dataset_id, ids)
    except TransientError as exc:
        return [
            _failed(ref, f"reading the annotations of {span} failed: {exc}", True) for ref in refs
        ]
    except PolyburnError as exc:
        return [
            _failed(ref, f"reading the annotations of {span} failed: {exc}", False) for ref in refs
        ]
    out = []
    for ref in refs:
        item = items.get(ref.locator)
        if item is None:
            out.append(_failed(ref, f"item {ref.locator} no longer exists in Dataloop", False))
            continue
        payload = {
            "item": item,
            "annotations": annotations.get(ref.locator, []),
            "read_at": read_at,
        }
        out.append(dataclasses.replace(ref, data=json.dumps(payload, separators=(",", ":"))))
    return out


def _failed(ref: ItemRef, message: str, transient: bool) -> ItemRef:
    return dataclasses.replace(ref, data=json.dumps({"error": message, "transient": transient}))


def _items_json(dataset_id: str, refs: Sequence[ItemRef]) -> dict[str, dict[str, Any]]:
    """Item JSON by id: from the listing when the refs carry it, else one query per chunk."""
    found: dict[str, dict[str, Any]] = {}
    missing = []
    for ref in refs:
        data = json.loads(ref.data) if ref.data else {}
        item = data.get("item") if isinstance(data, Mapping) else None
        if isinstance(item, Mapping) and item.get("id") == ref.locator:
            found[ref.locator] = dict(item)
        else:
            missing.append(ref.locator)
    if missing:
        query = {"filter": {"$and": [{"id": {"$in": missing}}]}, "resource": "items"}
        what = f"get {len(missing)} items of dataset {dataset_id}"
        for page in api.query_pages(dataset_id, query, what):
            for raw in page:
                if isinstance(raw, Mapping) and isinstance(raw.get("id"), str):
                    found[raw["id"]] = json.loads(listing_data(raw))["item"]
    return found


def annotations_by_item(
    dataset_id: str, item_ids: Sequence[str]
) -> dict[str, list[dict[str, Any]]]:
    """Raw ``segment``/``binary`` annotation JSON of ``item_ids``, per item in id order; one
    paged query (``itemId $in``) per :data:`IDS_PER_QUERY` items."""
    grouped: dict[str, list[dict[str, Any]]] = {}
    wanted = set(item_ids)
    for start in range(0, len(item_ids), IDS_PER_QUERY):
        chunk = list(item_ids[start : start + IDS_PER_QUERY])
        query = {
            "filter": {"$and": [{"type": {"$in": PIXEL_TYPES}}, {"itemId": {"$in": chunk}}]},
            "resource": "annotations",
        }
        what = f"list annotations of {len(chunk)} items of dataset {dataset_id}"
        for page in api.query_pages(dataset_id, query, what, ANNOTATIONS_PER_PAGE):
            for raw in page:
                item_id = raw.get("itemId") if isinstance(raw, Mapping) else None
                if item_id in wanted:
                    grouped.setdefault(item_id, []).append(raw)
    return grouped
