"""Parse Dataloop item JSON (export files and API responses) into :class:`~polyburn.model.Item`.

Accepted shapes (see ``shared/docs/dataloop.md`` §2–3):

* item ``id`` or ``_id``; ``filename``; ``metadata.system.width`` / ``height`` (required, positive
  integers); ``annotations`` as a list of annotation objects (missing means none);
* the item's ML subset from ``metadata.system.tags`` (``{"train": true}``, ``{"validation":
  true}`` or ``{"test": true}``; other tags are ignored); an item tagged with more than one
  subset gets none and an item-level problem saying so (it is still burned);
* annotation ``id`` or ``_id``; ``type``; ``label``; ``metadata.system.objectId`` as int, digit
  string or missing (any other value is kept as text in ``Annotation.bad_object_id``, and never
  rejects the annotation);
* ``segment`` coordinates as a list of rings of ``{"x", "y"}`` points (ring 0 the exterior, the
  rest holes), or the legacy flat list of points (one ring);
* ``binary`` coordinates as a ``data:image/png;base64,...`` URI (or ``{"data": uri}``); a pixel is
  set where alpha > 127 (RGBA/LA), or where the value is non-zero for images without alpha.

Other annotation types are counted in ``Item.skipped``. Annotations written by polyburn itself
(``metadata.user.polyburn`` present) are never read back as input.

Item-level problems raise :class:`~polyburn.errors.ItemError` (except conflicting ML subset
tags, which are reported and burn on); annotation-level problems become
:class:`~polyburn.model.Problem` records on the item, so one broken annotation never takes its item
down.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from collections.abc import Mapping
from itertools import chain
from typing import Any

import numpy as np

from polyburn.dataloop_annotation import (
    _XY,
    BINARY,
    PIXEL_TYPES,
    POLYBURN_MARKER,
    POLYGON,
    AnnotationRejected,
    _mapping,
    _PerPoint,
    _ring_lists,
    _text,
    annotation_head,
    object_id,
    set_coordinates,
)
from polyburn.errors import ItemError
from polyburn.model import Annotation, Item, Problem
from polyburn.video import is_video, parse_video

ML_SUBSETS = ("train", "validation", "test")
DEFAULT_MAX_PIXELS = 100_000_000

try:  # several times faster than the json module; used where it decodes to the same values
    import orjson as _orjson
except ImportError:  # pragma: no cover - orjson is a dependency
    _orjson = None
_BOM = b"\xef\xbb\xbf"
# orjson turns integers outside [-2**63, 2**64) into floats where json keeps them exact: bytes
# with a run of 19 or more digits go to the json module (digits become "1", the rest "0").
_DIGITS = bytes(49 if 48 <= b <= 57 else 48 for b in range(256))
_LONG_NUMBER = b"1" * 19


def decode_json(raw: bytes, item: str) -> Any:
    """Decode UTF-8 JSON bytes; a truncated, invalid or non-UTF-8 file raises ItemError."""
    if _orjson is not None and _LONG_NUMBER not in raw.translate(_DIGITS):
        try:
            return _orjson.loads(raw[3:] if raw.startswith(_BOM) else raw)
        except _orjson.JSONDecodeError:
            pass  # the json module's messages, and its extensions (NaN, lone surrogates, ...)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ItemError(item, f"file is not UTF-8 (byte {exc.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ItemError(
            item, f"invalid or truncated JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
        ) from None
    except RecursionError:
        raise ItemError(item, "JSON nested too deeply") from None


def parse_item(
    data: Any,
    path: str,
    *,
    revision: str | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Item:
    """Turn one item's JSON into an :class:`Item`.

    Parameters
    ----------
    data : Any
        The decoded JSON of one item.
    path : str
        The item's path (no extension, no leading slash); used in every error message.
    revision : str, optional
        A content hash of the item's annotations; computed from ``data`` when omitted.
    max_pixels : int
        Largest ``width * height`` accepted, to bound the memory a mask may take.

    Raises
    ------
    ItemError
        The item is not an object, or its size is missing, not a positive integer, or too large.
    """
    if not isinstance(data, Mapping):
        raise ItemError(path, f"item JSON must be an object, not {type(data).__name__}")
    item_id = _text(data.get("id")) or _text(data.get("_id")) or path
    system = _mapping(_mapping(data.get("metadata")).get("system"))
    width = _dimension(system, "width", path)
    height = _dimension(system, "height", path)
    if width * height > max_pixels:
        raise ItemError(
            path,
            f"image of {width}x{height} = {width * height} pixels exceeds max_pixels={max_pixels}",
            "metadata.system",
        )
    raw_annotations = data.get("annotations", [])
    if raw_annotations is None:
        raw_annotations = []
    if not isinstance(raw_annotations, list):
        raise ItemError(
            path,
            f"'annotations' must be a list, not {type(raw_annotations).__name__}",
            "annotations",
        )
    if revision is None:
        revision = annotations_revision(raw_annotations)
    subsets = ml_subsets(system.get("tags"))

    video = None
    if is_video(_mapping(data.get("metadata")), raw_annotations):  # tracks, burned per frame
        video, problems, skipped = parse_video(raw_annotations, _mapping(data.get("metadata")))
        annotations = []
    else:
        try:
            annotations, problems, skipped = _parse_annotations(
                raw_annotations, width, height, True
            )
        except _PerPoint:  # an odd point or ring somewhere: the careful per-ring path
            annotations, problems, skipped = _parse_annotations(
                raw_annotations, width, height, False
            )
    if len(subsets) > 1:
        problems.insert(0, subset_problem(subsets))
    return Item(
        item_id=item_id,
        path=path,
        width=width,
        height=height,
        annotations=annotations,
        skipped=dict(skipped),
        problems=problems,
        revision=revision,
        filename=_text(data.get("filename")),
        video=video,
        subset=subsets[0] if len(subsets) == 1 else None,
    )


def ml_subsets(tags: Any) -> list[str]:
    """The ML subsets ``metadata.system.tags`` marks (those set to ``true``), in the order
    train, validation, test; other tags and other values are ignored."""
    if not isinstance(tags, Mapping):
        return []
    return [subset for subset in ML_SUBSETS if tags.get(subset) is True]


def subset_problem(subsets: list[str]) -> Problem:
    """The item-level report of an item tagged with several ML subsets."""
    return Problem(
        f"item is tagged with ML subsets {' and '.join(subsets)}: it is put in none of them "
        "(splits/unassigned.txt) until it has one",
        None,
        "metadata.system.tags",
    )


def annotations_revision(raw_annotations: Any) -> str:
    """A stable sha256 of the annotations' JSON (key order does not matter)."""
    canonical = json.dumps(raw_annotations, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _parse_annotations(
    raw_annotations: list, width: int, height: int, batched: bool
) -> tuple[list[Annotation], list[Problem], Counter[str]]:
    """Parse every annotation. ``batched``: the rings of all polygons are converted to floats in
    one numpy call at the end (raises _PerPoint when some ring is not a list of {x, y} numbers:
    the caller then parses again with ``batched=False``, which handles and reports those)."""
    annotations: list[Annotation] = []
    problems: list[Problem] = []
    skipped: Counter[str] = Counter()
    pending: list[tuple[Annotation, list[list]]] | None = [] if batched else None
    for index, raw in enumerate(raw_annotations):
        try:
            parsed = _parse_annotation(raw, index, width, height, pending)
        except AnnotationRejected as rejected:
            if rejected.problem.label is None and isinstance(raw, Mapping):
                label = raw.get("label")
                rejected.problem.label = label if isinstance(label, str) and label else None
            problems.append(rejected.problem)
            continue
        if isinstance(parsed, str):
            skipped[parsed] += 1
        else:
            annotations.append(parsed)
    if pending:
        _convert_rings(pending)
    return annotations, problems, skipped


def _convert_rings(pending: list[tuple[Annotation, list[list]]]) -> None:
    """Set the rings of all pending polygons from one flat float64 conversion of their points
    (each ring a view of it); exactly what :func:`_ring_array`'s first attempt gives per ring."""
    rings = [ring for _, annotation_rings in pending for ring in annotation_rings]
    sizes = [len(ring) for ring in rings]
    total = sum(sizes)
    try:
        flat = np.fromiter(
            chain.from_iterable(map(_XY, chain.from_iterable(rings))),
            dtype=np.float64,
            count=2 * total,
        )
    except (TypeError, KeyError, ValueError, OverflowError):
        raise _PerPoint from None
    coords = flat.reshape(-1, 2)
    start = 0
    k = 0
    for annotation, annotation_rings in pending:
        converted = []
        for _ in annotation_rings:
            end = start + sizes[k]
            converted.append(coords[start:end])
            start = end
            k += 1
        annotation.rings = converted


def _parse_annotation(
    raw: Any,
    index: int,
    width: int,
    height: int,
    pending: list[tuple[Annotation, list[list]]] | None = None,
) -> Annotation | str:
    annotation = annotation_head(raw, index)
    if isinstance(annotation, str):
        return annotation
    coordinates = raw.get("coordinates")
    if annotation.type == POLYGON and pending is not None:
        pending.append((annotation, _ring_lists(coordinates)))
    else:
        set_coordinates(annotation, coordinates, width, height)
    return annotation


def _dimension(system: Mapping, name: str, path: str) -> int:
    value = system.get(name)
    field = f"metadata.system.{name}"
    if value is None:
        raise ItemError(path, f"image {name} is missing", field)
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ItemError(path, f"image {name} must be a number, not {value!r:.40}", field)
    try:
        number = float(value)
    except ValueError:
        raise ItemError(path, f"image {name} must be a number, not {value!r:.40}", field) from None
    if not math.isfinite(number) or not number.is_integer() or number <= 0:
        raise ItemError(path, f"image {name} must be a positive integer, not {value!r:.40}", field)
    return int(number)


__all__ = [  # the annotation-level names are defined in polyburn.dataloop_annotation
    "BINARY",
    "DEFAULT_MAX_PIXELS",
    "ML_SUBSETS",
    "PIXEL_TYPES",
    "POLYBURN_MARKER",
    "POLYGON",
    "AnnotationRejected",
    "annotation_head",
    "annotations_revision",
    "decode_json",
    "ml_subsets",
    "object_id",
    "parse_item",
    "set_coordinates",
    "subset_problem",
]
