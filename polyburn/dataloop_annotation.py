"""One Dataloop annotation's JSON into an :class:`~polyburn.model.Annotation`: its head (id,
type, label, objectId) and its coordinates (polygon rings or a binary mask).

The accepted shapes are those of :mod:`polyburn.dataloop_json`, which parses whole items with
these functions; :mod:`polyburn.video` builds a video's tracks with them. A problem with one
annotation raises :class:`AnnotationRejected`, whose ``problem`` the item reports.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
from collections.abc import Mapping
from operator import itemgetter
from typing import Any

import numpy as np

from polyburn.model import Annotation, Problem

POLYGON = "segment"
BINARY = "binary"
POLYBURN_MARKER = "polyburn"
PIXEL_TYPES = (POLYGON, BINARY)
_PNG_URI_PREFIX = "data:image/png;base64,"
_XY = itemgetter("x", "y")


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


def _mapping(value: Any) -> Mapping:
    return value if isinstance(value, Mapping) else {}


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return ""
