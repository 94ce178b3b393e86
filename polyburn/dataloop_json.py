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

import base64
import binascii
import hashlib
import io
import json
import math
from collections import Counter
from collections.abc import Mapping
from itertools import chain
from operator import itemgetter
from typing import Any

import numpy as np

from polyburn.errors import ItemError
from polyburn.model import Annotation, Item, Problem

POLYGON = "segment"
BINARY = "binary"
PIXEL_TYPES = (POLYGON, BINARY)
POLYBURN_MARKER = "polyburn"
ML_SUBSETS = ("train", "validation", "test")
DEFAULT_MAX_PIXELS = 100_000_000
_PNG_URI_PREFIX = "data:image/png;base64,"

try:  # several times faster than the json module; used where it decodes to the same values
    import orjson as _orjson
except ImportError:  # pragma: no cover - orjson is a dependency
    _orjson = None
_BOM = b"\xef\xbb\xbf"
# orjson turns integers outside [-2**63, 2**64) into floats where json keeps them exact: bytes
# with a run of 19 or more digits go to the json module (digits become "1", the rest "0").
_DIGITS = bytes(49 if 48 <= b <= 57 else 48 for b in range(256))
_LONG_NUMBER = b"1" * 19
_XY = itemgetter("x", "y")


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

    from polyburn.video import is_video, parse_video  # it builds on this module

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


def object_id(value: Any) -> int | None:
    """``metadata.system.objectId`` as an int, or None when missing or not a whole number."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    return None


def _json_text(value: Any) -> str:
    """A JSON value as short text for a report (at most 40 characters)."""
    try:
        text = json.dumps(value, ensure_ascii=False, default=str)
    except (ValueError, RecursionError):
        text = repr(value)
    return text if len(text) <= 40 else text[:39] + "…"


class AnnotationRejected(Exception):
    """An annotation that cannot be read; ``problem`` says why."""

    def __init__(self, problem: Problem) -> None:
        super().__init__(problem.reason)
        self.problem = problem


class _PerPoint(Exception):
    """The item's rings cannot all be converted in one go: parse it ring by ring."""


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


def annotation_head(raw: Any, index: int) -> Annotation | str:
    """An annotation's id, type, label and objectId, without its coordinates; the type name
    (for ``Item.skipped``) when it is not a pixel type or was written by polyburn.

    Raises AnnotationRejected (its ``problem``) for an annotation that is not an object or has
    no string type, or a pixel annotation without a label.
    """
    if not isinstance(raw, Mapping):
        raise AnnotationRejected(
            Problem(f"annotation must be an object, not {type(raw).__name__}", f"#{index}")
        )
    annotation_id = _text(raw.get("id")) or _text(raw.get("_id")) or f"#{index}"
    kind = raw.get("type")
    if not isinstance(kind, str):
        raise AnnotationRejected(Problem("missing or non-string 'type'", annotation_id, "type"))
    metadata = _mapping(raw.get("metadata"))
    if POLYBURN_MARKER in _mapping(metadata.get("user")):
        return f"{kind} (written by polyburn)"
    if kind not in PIXEL_TYPES:
        return kind
    label = raw.get("label")
    if not isinstance(label, str) or not label:
        raise AnnotationRejected(Problem("missing or empty 'label'", annotation_id, "label"))
    raw_object_id = _mapping(metadata.get("system")).get("objectId")
    annotation = Annotation(
        annotation_id=annotation_id,
        label=label,
        type=kind,
        index=index,
        object_id=object_id(raw_object_id),
    )
    if annotation.object_id is None and raw_object_id is not None:
        annotation.bad_object_id = _json_text(raw_object_id)
    return annotation


def set_coordinates(annotation: Annotation, coordinates: Any, width: int, height: int) -> None:
    """Parse ``coordinates`` (polygon rings or a binary mask, by ``annotation.type``) into
    ``annotation``; raises AnnotationRejected when they cannot be read."""
    if annotation.type == POLYGON:
        annotation.rings = _parse_rings(coordinates, annotation.annotation_id)
    else:
        annotation.mask = _decode_binary(coordinates, annotation.annotation_id, width, height)


def _ring_lists(coordinates: Any) -> list[list]:
    """The rings of well-formed polygon coordinates, for the batched conversion; anything
    :func:`_parse_rings` would reject raises _PerPoint (so it is reported exactly as before)."""
    if not isinstance(coordinates, list) or not coordinates:
        raise _PerPoint
    if isinstance(coordinates[0], Mapping):  # legacy flat list of points: a single ring
        return [coordinates]
    for ring in coordinates:
        if not isinstance(ring, list):
            raise _PerPoint
    return coordinates


def _parse_rings(coordinates: Any, annotation_id: str) -> list[np.ndarray]:
    if not isinstance(coordinates, list) or not coordinates:
        raise AnnotationRejected(
            Problem("polygon has no coordinates", annotation_id, "coordinates")
        )
    if isinstance(coordinates[0], Mapping):  # legacy flat list of points: a single ring
        coordinates = [coordinates]
    rings = []
    for r, ring in enumerate(coordinates):
        if not isinstance(ring, list):
            raise AnnotationRejected(
                Problem(f"ring {r} is not a list of points", annotation_id, f"coordinates[{r}]")
            )
        rings.append(_ring_array(ring, annotation_id, r))
    return rings


def _ring_array(ring: list, annotation_id: str, r: int) -> np.ndarray:
    """(N, 2) float64 of x, y; a point whose x or y is not a number becomes NaN (repaired later)."""
    try:
        return np.array([(p["x"], p["y"]) for p in ring], dtype=np.float64).reshape(-1, 2)
    except (TypeError, KeyError, ValueError, OverflowError):
        pass
    out = np.empty((len(ring), 2), dtype=np.float64)
    for i, point in enumerate(ring):
        if isinstance(point, Mapping):
            out[i] = (_number(point.get("x")), _number(point.get("y")))
        elif isinstance(point, list | tuple) and len(point) >= 2:
            out[i] = (_number(point[0]), _number(point[1]))
        else:
            raise AnnotationRejected(
                Problem(
                    f"point {i} of ring {r} is not an {{x, y}} object",
                    annotation_id,
                    f"coordinates[{r}][{i}]",
                )
            )
    return out


def _number(value: Any) -> float:
    if isinstance(value, bool):
        return math.nan
    if isinstance(value, int | float):
        try:
            return float(value)
        except OverflowError:
            return math.nan
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return math.nan
    return math.nan


def _decode_binary(coordinates: Any, annotation_id: str, width: int, height: int) -> np.ndarray:
    if isinstance(coordinates, Mapping):
        coordinates = coordinates.get("data")
    if not isinstance(coordinates, str) or not coordinates.startswith(_PNG_URI_PREFIX):
        raise AnnotationRejected(
            Problem("binary mask is not a PNG data URI", annotation_id, "coordinates")
        )
    from PIL import Image  # only items with binary masks need it

    try:
        png = base64.b64decode(coordinates[len(_PNG_URI_PREFIX) :], validate=False)
        with Image.open(io.BytesIO(png)) as image:
            if image.format != "PNG":
                raise ValueError("not a PNG")
            if image.width * image.height > width * height:
                raise ValueError(f"{image.width}x{image.height} is larger than the item")
            image.load()
            mask = _alpha_mask(image)
    except (OSError, ValueError, binascii.Error, Image.DecompressionBombError) as exc:
        raise AnnotationRejected(
            Problem(f"binary mask cannot be decoded: {exc}", annotation_id, "coordinates")
        ) from None
    if mask.shape != (height, width):
        raise AnnotationRejected(
            Problem(
                f"binary mask is {mask.shape[1]}x{mask.shape[0]}, item is {width}x{height}",
                annotation_id,
                "coordinates",
            )
        )
    return mask


def _alpha_mask(image) -> np.ndarray:
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        return np.asarray(image.convert("RGBA"))[:, :, 3] > 127
    return np.asarray(image.convert("L")) > 0


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


def _mapping(value: Any) -> Mapping:
    return value if isinstance(value, Mapping) else {}


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return ""
