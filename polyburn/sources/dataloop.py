"""A Dataloop dataset as a source: ``dataloop://<dataset-id>``.

* :meth:`DataloopSource.list_items` asks ``POST /datasets/{id}/query`` for the dataset's visible
  files that have at least one ``segment`` (polygon) or ``binary`` annotation (a ``dl.Filters``
  join), keyset-paged as dtlpy pages (sorted by id, ``id > last id`` from the second page on), and
  yields each page's items before asking for the next: memory holds one page whatever the dataset
  size. ``--filter`` (a DQL filter object, or a query object with a ``filter`` key) and
  ``--updated-since`` (item ``updatedAt`` after that instant) are ANDed in.
* :meth:`DataloopSource.preload` reads the annotations of a whole batch of listed items at once
  (:mod:`polyburn.dataloop_bulk`: one paged ``itemId $in`` annotation query per 1,000 items) and
  returns refs that carry them; :meth:`DataloopSource.load` then asks nothing. For a ref that was
  not preloaded, ``load`` takes the item JSON from the listing (``GET /items/{id}`` only when the
  ref has none) and asks for the item's raw ``segment``/``binary`` annotation JSON (the same query
  endpoint, ``resource: annotations``). Either way the JSON is parsed with
  :func:`polyburn.dataloop_json.parse_item`. Raw JSON and not dtlpy entities:
  ``dl.Polygon`` keeps ring 0 only, so holes would be lost; and unparsable entities are dropped by
  the SDK with only a log line. Annotations written by polyburn are skipped by ``parse_item``.
* :meth:`DataloopSource.labels` reads the dataset's first recipe's first ontology (the one
  ``dataset.labels`` uses) and flattens it the way Dataloop names child labels (``parent.child``),
  parsing ``#rrggbb`` / ``#rgb`` / ``rgb(r, g, b)`` colours here (``dl.Label.rgb`` uses ``eval``).

Every request goes through :mod:`polyburn.dataloop_api` (retries, throttling, clear errors); a
400 on a query (a bad ``--filter``) is an error, never "0 items".
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from typing import Any

from polyburn import dataloop_api as api
from polyburn import dataloop_bulk as bulk
from polyburn import settings as config
from polyburn.dataloop_json import BINARY, DEFAULT_MAX_PIXELS, POLYBURN_MARKER, POLYGON, parse_item
from polyburn.errors import ConfigError, ItemError
from polyburn.keys import item_path_from_filename
from polyburn.model import Item, ItemRef

SCHEME = "dataloop://"
PIXEL_TYPES = [POLYGON, BINARY]
_DATASET_ID = re.compile(r"[A-Za-z0-9_-]{1,64}\Z")
_HEX = re.compile(r"#?([0-9a-fA-F]{6}|[0-9a-fA-F]{3})\Z")
_RGB = re.compile(r"rgba?\(\s*(\d{1,3})\s*,\s*(\d{1,3})\s*,\s*(\d{1,3})\s*(?:,[^)]*)?\)\Z")
DEFAULT_COLOUR = (255, 255, 255)


def parse_dataset_uri(uri: str, *, allow_empty: bool = False) -> str | None:
    """The dataset id of ``dataloop://<id>`` (None for a bare ``dataloop://`` when allowed)."""
    if not uri.startswith(SCHEME):
        raise ConfigError(f"not a Dataloop URI: {uri!r}")
    dataset_id = uri[len(SCHEME) :].strip("/")
    if not dataset_id:
        if allow_empty:
            return None
        raise ConfigError(f"{uri!r}: give the dataset id, as in dataloop://<dataset-id>")
    if not _DATASET_ID.match(dataset_id):
        raise ConfigError(f"{uri!r}: {dataset_id!r} is not a Dataloop dataset id")
    return dataset_id


def get_dataset(dataset_id: str) -> dict[str, Any]:
    """The dataset JSON; a missing dataset is a ConfigError (nothing can run without it)."""
    try:
        dataset = api.request("GET", f"/datasets/{dataset_id}", what=f"get dataset {dataset_id}")
    except api.DataloopNotFound:
        raise ConfigError(
            f"Dataloop dataset {dataset_id} not found (or not visible to this API key)"
        ) from None
    if not isinstance(dataset, Mapping) or dataset.get("id") != dataset_id:
        raise api.DataloopError(f"Dataloop get dataset {dataset_id}: unexpected response")
    return dict(dataset)


class DataloopSource:
    """Items of one Dataloop dataset (see the module docstring).

    Parameters
    ----------
    dataset : dict
        The dataset JSON (``GET /datasets/{id}``).
    item_filter : dict, optional
        A DQL filter ANDed with the item query.
    updated_since : datetime, optional
        Keep items whose ``updatedAt`` is after this instant (naive means UTC).
    page_size : int
        Items per query page (1..1000, dtlpy's cap).
    """

    def __init__(
        self,
        dataset: Mapping[str, Any],
        item_filter: Mapping[str, Any] | None = None,
        updated_since: datetime | None = None,
        page_size: int = api.PAGE_SIZE_MAX,
    ) -> None:
        self.dataset = dict(dataset)
        self.dataset_id: str = self.dataset["id"]
        self.uri = f"{SCHEME}{self.dataset_id}"
        self.item_filter = dict(item_filter) if item_filter else None
        self.updated_since = updated_since
        self.page_size = max(1, min(api.PAGE_SIZE_MAX, int(page_size)))
        self._labels: dict[str, tuple[int, int, int]] | None = None

    @classmethod
    def from_uri(
        cls,
        uri: str,
        item_filter: str | Mapping[str, Any] | None = None,
        updated_since: datetime | None = None,
        page_size: int | None = None,
    ) -> DataloopSource:
        """Log in (once per process), check the dataset exists and the filter is a JSON object.

        Raises ConfigError for a malformed URI or filter, a missing dataset or a rejected key.
        """
        dataset_id = parse_dataset_uri(uri)
        assert dataset_id is not None
        parsed_filter = parse_filter(item_filter)
        if page_size is None:
            page_size = config.settings().dataloop_page_size
        return cls(get_dataset(dataset_id), parsed_filter, updated_since, page_size)

    # -------------------------------------------------------------------------------- listing
    def items_query(self) -> dict[str, Any]:
        """The prepared DQL item query (before keyset paging adds its sort and cursor)."""
        dl = api.dtlpy()
        filters = dl.Filters()  # resource items; hidden: false, type: file
        filters.add_join(field="type", values={"$in": PIXEL_TYPES})
        if self.updated_since is not None:
            filters.add(
                field="updatedAt",
                values=iso_utc(self.updated_since),
                operator=dl.FiltersOperations.GREATER_THAN,
            )
        body = filters.prepare()
        if self.item_filter:
            body["filter"].setdefault("$and", []).append(self.item_filter)
        return body

    def list_items(self) -> Iterator[ItemRef]:
        """Every matching item, ordered by id, one page in memory at a time."""
        what = f"list items of dataset {self.dataset_id}"
        for page in api.query_pages(self.dataset_id, self.items_query(), what, self.page_size):
            for raw in page:
                item_id = raw.get("id") if isinstance(raw, Mapping) else None
                filename = raw.get("filename") if isinstance(raw, Mapping) else None
                if not isinstance(item_id, str) or not isinstance(filename, str):
                    raise api.DataloopError(f"Dataloop {what}: an item without id or filename")
                api.remember_item(item_id, self.dataset_id)
                yield ItemRef(
                    item_id=item_id,
                    path=item_path_from_filename(filename),
                    locator=item_id,
                    revision=_revision(raw),
                    data=bulk.listing_data(raw),
                )

    def check(self) -> None:
        """Ask for one item: a filter the server rejects fails here, with its message."""
        what = f"query items of dataset {self.dataset_id}"
        next(api.query_pages(self.dataset_id, self.items_query(), what, 1), None)

    # -------------------------------------------------------------------------------- loading
    def preload(self, refs: list[ItemRef]) -> list[ItemRef]:
        """``refs`` carrying their item JSON and annotations, read in bulk (one query per 1,000
        items); a ref whose query failed carries the error, raised by :meth:`load`."""
        return bulk.preload(self.dataset_id, refs)

    def load(self, ref: ItemRef, max_pixels: int = DEFAULT_MAX_PIXELS) -> Item:
        """The item with its polygon and binary annotations (all rings kept)."""
        item_id = ref.locator
        data, annotations, read_at = bulk.unpack(ref)
        if data is None:
            try:
                data = api.request("GET", f"/items/{item_id}", what=f"get item {item_id}")
            except api.DataloopNotFound:
                raise ItemError(ref.path, f"item {item_id} no longer exists in Dataloop") from None
        if not isinstance(data, Mapping):
            raise ItemError(ref.path, "Dataloop returned an item that is not a JSON object")
        if data.get("datasetId") not in (None, self.dataset_id):
            raise ItemError(ref.path, f"item {item_id} is not in dataset {self.dataset_id}")
        item = dict(data)
        item["annotations"] = self.annotations_json(item_id) if annotations is None else annotations
        api.remember_item(item_id, self.dataset_id)
        parsed = parse_item(item, ref.path, max_pixels=max_pixels)
        parsed.own_outputs = [a for a in item["annotations"] if _marked(a)]
        parsed.read_at = read_at
        return parsed

    def annotations_json(self, item_id: str) -> list[dict[str, Any]]:
        """Raw JSON of the item's ``segment`` and ``binary`` annotations, ordered by id."""
        dl = api.dtlpy()
        filters = dl.Filters(
            resource=dl.FiltersResource.ANNOTATION, field="type", values={"$in": PIXEL_TYPES}
        )
        filters.add(field="itemId", values=item_id)
        what = f"list annotations of item {item_id}"
        annotations: list[dict[str, Any]] = []
        for page in api.query_pages(self.dataset_id, filters.prepare(), what):
            annotations.extend(page)
        return annotations

    # -------------------------------------------------------------------------------- labels
    def labels(self) -> dict[str, tuple[int, int, int]] | None:
        """``{label: (r, g, b)}`` of the dataset's ontology, or None when it has no labels."""
        if self._labels is None:
            self._labels = ontology_labels(self.dataset)
        return dict(self._labels) or None


def _marked(annotation: Any) -> bool:
    """An annotation carrying polyburn's marker (an output of an earlier run)."""
    if not isinstance(annotation, Mapping):
        return False
    metadata = annotation.get("metadata")
    user = metadata.get("user") if isinstance(metadata, Mapping) else None
    return isinstance(user, Mapping) and POLYBURN_MARKER in user


def _revision(raw: Mapping[str, Any]) -> str:
    """The item's change marker: ``updatedAt`` (Dataloop bumps it when an annotation of the
    item changes) and the annotation count; empty when unknown (no caching then)."""
    updated = raw.get("updatedAt")
    if not isinstance(updated, str) or not updated:
        return ""
    return f"{updated}|{raw.get('annotationsCount', '')}"


def ontology_labels(dataset: Mapping[str, Any]) -> dict[str, tuple[int, int, int]]:
    """Flattened labels of the first ontology of the dataset's first recipe (``{}`` if none)."""
    recipes = ((dataset.get("metadata") or {}).get("system") or {}).get("recipes") or []
    if not recipes:
        return {}
    recipe = api.request("GET", f"/recipes/{recipes[0]}", what=f"get recipe {recipes[0]}")
    ontology_ids = (recipe or {}).get("ontologyIds") or []
    if not ontology_ids:
        return {}
    ontology = api.request(
        "GET", f"/ontologies/{ontology_ids[0]}", what=f"get ontology {ontology_ids[0]}"
    )
    labels: dict[str, tuple[int, int, int]] = {}
    _flatten((ontology or {}).get("roots") or [], "", labels)
    return labels


def _flatten(nodes: Any, prefix: str, out: dict[str, tuple[int, int, int]]) -> None:
    if not isinstance(nodes, list):
        return
    for node in nodes:
        if not isinstance(node, Mapping):
            continue
        value = node.get("value") if isinstance(node.get("value"), Mapping) else node
        tag = value.get("tag")
        if not isinstance(tag, str) or not tag:
            continue
        name = f"{prefix}.{tag}" if prefix else tag
        out[name] = parse_colour(value.get("color"))
        _flatten(node.get("children"), name, out)


def parse_colour(value: Any) -> tuple[int, int, int]:
    """``#rrggbb``, ``#rgb``, ``rgb(r, g, b)`` or an [r, g, b] list; white for anything else.

    Never evaluates the text (``dl.Label.rgb`` runs ``eval`` on ``rgb(...)`` strings).
    """
    if isinstance(value, list | tuple) and len(value) >= 3:
        try:
            return tuple(max(0, min(255, int(c))) for c in value[:3])  # type: ignore[return-value]
        except (TypeError, ValueError):
            return DEFAULT_COLOUR
    if not isinstance(value, str):
        return DEFAULT_COLOUR
    text = value.strip()
    match = _HEX.match(text)
    if match:
        digits = match.group(1)
        if len(digits) == 3:
            digits = "".join(c * 2 for c in digits)
        return (int(digits[0:2], 16), int(digits[2:4], 16), int(digits[4:6], 16))
    match = _RGB.match(text)
    if match:
        return tuple(min(255, int(g)) for g in match.groups())  # type: ignore[return-value]
    return DEFAULT_COLOUR


def parse_filter(item_filter: str | Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A ``--filter`` value as a DQL filter object: ``{"dir": "/a"}``, ``{"$and": [...]}`` or a
    query object ``{"filter": {...}}``. Raises ConfigError when it is not a JSON object."""
    if item_filter is None or (isinstance(item_filter, str) and not item_filter.strip()):
        return None
    if isinstance(item_filter, str):
        try:
            data = json.loads(item_filter)
        except json.JSONDecodeError as exc:
            raise ConfigError(
                f"--filter is not valid JSON: {exc.msg} (column {exc.colno})"
            ) from None
    else:
        data = item_filter
    if isinstance(data, Mapping) and isinstance(data.get("filter"), Mapping):
        data = data["filter"]
    if not isinstance(data, Mapping) or not data:
        raise ConfigError("--filter must be a non-empty JSON object (a DQL filter)")
    return dict(data)


def iso_utc(moment: datetime) -> str:
    """``2024-01-02T03:04:05.678Z`` (a naive datetime is taken as UTC)."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    moment = moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
