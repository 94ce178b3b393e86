"""Validate and repair annotation geometry with shapely, reporting every change.

The contract (per annotation, in this order):

1. non-finite vertices (NaN, ±inf) are dropped — repair ``non_finite_vertices``; so are vertices
   beyond ±``MAX_COORDINATE`` (garbage such as 1e308, whose products overflow) — repair
   ``out_of_range_vertices``;
2. consecutive duplicate vertices are dropped — repair ``duplicate_vertices`` (the closing
   duplicate of a closed ring is the normal form and is not reported);
3. a ring with fewer than 3 distinct vertices or zero area is degenerate: an exterior rejects the
   annotation, a hole is dropped — repair ``degenerate_hole``;
4. rings are oriented (exterior counter-clockwise in x/y, holes clockwise) and assembled into one
   polygon, ring 0 the exterior;
5. an invalid polygon (self-intersection, bowtie, spike, ring touching itself, hole crossing the
   exterior) goes through ``shapely.make_valid(method="linework")``, which assigns faces even-odd,
   exactly as every scanline rasterizer fills the raw rings; only polygonal parts are kept —
   repair ``made_valid`` with the validity reason;
6. a polygon reaching outside the image is clipped for the record — repair ``clipped``; an
   annotation with no area inside the image is rejected.

Areas are in square pixels. Pixels are not affected by step 6: the burn only touches pixels inside
the image, so the unclipped polygon is burned (clipping adds new vertices that can move a pixel
centre lying exactly on an edge). Only coordinates beyond ``SAFE_COORDINATE`` are replaced by the
clipped polygon.
"""

from __future__ import annotations

import numpy as np
import shapely
from shapely.geometry.polygon import orient

from polyburn.model import Annotation, Item, Problem, Repair, Shape

SAFE_COORDINATE = float(2**24)
MAX_COORDINATE = float(2**30)


def repair_item(item: Item) -> tuple[list[Shape], list[Repair], list[Problem]]:
    """Repair every annotation of an item; returns shapes in file order, repairs and rejections.

    Never raises for bad geometry: a broken annotation becomes a :class:`Problem`.
    """
    shapes: list[Shape] = []
    repairs: list[Repair] = []
    problems: list[Problem] = []
    pending: list[tuple[Annotation, shapely.Polygon]] = []
    for annotation in item.annotations:
        if annotation.type == "binary":
            if annotation.mask is None or not annotation.mask.any():
                problems.append(Problem("binary mask is empty", annotation.annotation_id))
            else:
                shapes.append(Shape(annotation, mask=annotation.mask))
            continue
        try:
            polygon = _assemble(annotation, repairs)
        except _Rejected as rejected:
            problems.append(Problem(str(rejected), annotation.annotation_id, "coordinates"))
            continue
        pending.append((annotation, polygon))
        shapes.append(Shape(annotation))

    if pending:
        polygons = np.array([polygon for _, polygon in pending], dtype=object)
        valid = shapely.is_valid(polygons)
        by_annotation = {id(annotation): i for i, (annotation, _) in enumerate(pending)}
        image = shapely.box(0, 0, item.width, item.height)
        kept: list[Shape] = []
        for shape in shapes:
            i = by_annotation.get(id(shape.annotation))
            if i is None:
                kept.append(shape)
                continue
            try:
                shape.geometry = _finish(
                    polygons[i], bool(valid[i]), shape.annotation, image, repairs
                )
            except _Rejected as rejected:
                problems.append(
                    Problem(str(rejected), shape.annotation.annotation_id, "coordinates")
                )
                continue
            kept.append(shape)
        shapes = kept
    return shapes, repairs, problems


class _Rejected(Exception):
    pass


def clean_ring(ring: np.ndarray) -> tuple[np.ndarray, int, int, int]:
    """Drop non-finite, out-of-range and consecutive duplicate vertices and the closing duplicate.

    Returns the open ring and the numbers of non-finite, out-of-range and duplicate vertices
    dropped.
    """
    finite = np.isfinite(ring).all(axis=1)
    non_finite = int(len(ring) - finite.sum())
    with np.errstate(invalid="ignore"):
        in_range = finite & (np.abs(ring) <= MAX_COORDINATE).all(axis=1)
    out_of_range = int(finite.sum() - in_range.sum())
    if non_finite or out_of_range:
        ring = ring[in_range]
    if len(ring) > 1:
        keep = np.ones(len(ring), dtype=bool)
        keep[1:] = (ring[1:] != ring[:-1]).any(axis=1)
        duplicates = int(len(ring) - keep.sum())
        ring = ring[keep]
    else:
        duplicates = 0
    if len(ring) > 1 and (ring[0] == ring[-1]).all():
        ring = ring[:-1]
    return ring, non_finite, out_of_range, duplicates


def collinear(ring: np.ndarray) -> bool:
    """True when every vertex lies on one line, so the ring encloses no area at all.

    (A zero *signed* area is not enough: a symmetric bowtie has one and covers pixels.)
    """
    d = ring - ring[0]
    far = int(np.argmax(np.abs(d).sum(axis=1)))
    cross = d[:, 0] * d[far, 1] - d[:, 1] * d[far, 0]
    return not np.any(cross)


def _assemble(annotation: Annotation, repairs: list[Repair]) -> shapely.Polygon:
    aid = annotation.annotation_id
    if not annotation.rings:
        raise _Rejected("polygon has no rings")
    cleaned = []
    for r, raw in enumerate(annotation.rings):
        ring, non_finite, out_of_range, duplicates = clean_ring(raw)
        if non_finite:
            repairs.append(
                Repair(
                    "non_finite_vertices",
                    aid,
                    detail=f"ring {r}: dropped {non_finite} NaN/inf vertices",
                )
            )
        if out_of_range:
            repairs.append(
                Repair(
                    "out_of_range_vertices",
                    aid,
                    detail=f"ring {r}: dropped {out_of_range} vertices beyond ±{MAX_COORDINATE:g}",
                )
            )
        if duplicates:
            repairs.append(
                Repair("duplicate_vertices", aid, detail=f"ring {r}: dropped {duplicates}")
            )
        distinct = len(np.unique(ring, axis=0)) if len(ring) else 0
        degenerate = None
        if distinct < 3:
            degenerate = f"ring {r} has {distinct} distinct vertices (needs 3)"
        elif collinear(ring):
            degenerate = f"ring {r} has zero area (all vertices on one line)"
        if degenerate:
            if r == 0:
                raise _Rejected(f"exterior {degenerate}")
            repairs.append(Repair("degenerate_hole", aid, detail=f"dropped: {degenerate}"))
            continue
        cleaned.append(ring)
    return shapely.Polygon(cleaned[0], cleaned[1:])


def _finish(
    polygon: shapely.Polygon,
    valid: bool,
    annotation: Annotation,
    image: shapely.Polygon,
    repairs: list[Repair],
) -> shapely.Geometry:
    aid = annotation.annotation_id
    if valid:
        geometry: shapely.Geometry = orient(polygon, sign=1.0)
    else:
        reason = shapely.is_valid_reason(polygon)
        area_before = float(polygon.area)
        geometry = _polygonal(shapely.make_valid(polygon, method="linework"))
        if geometry.is_empty:
            raise _Rejected(f"no area left after make_valid ({reason})")
        geometry = shapely.orient_polygons(geometry)
        repairs.append(Repair("made_valid", aid, area_before, float(geometry.area), reason))

    if not image.contains(geometry):
        inside = _polygonal(shapely.intersection(geometry, image))
        if inside.is_empty:
            raise _Rejected("polygon lies entirely outside the image")
        repairs.append(Repair("clipped", aid, float(geometry.area), float(inside.area)))
        xmin, ymin, xmax, ymax = geometry.bounds
        if max(abs(xmin), abs(ymin), abs(xmax), abs(ymax)) > SAFE_COORDINATE:
            geometry = inside
    return geometry


def _polygonal(geometry: shapely.Geometry) -> shapely.Geometry:
    """Keep only the Polygon parts of a geometry (make_valid may add lines and points)."""
    if isinstance(geometry, shapely.Polygon | shapely.MultiPolygon):
        return geometry
    parts = [
        part
        for part in shapely.get_parts(geometry)
        if isinstance(part, shapely.Polygon | shapely.MultiPolygon) and not part.is_empty
    ]
    flat = [p for part in parts for p in shapely.get_parts(part)]
    if not flat:
        return shapely.Polygon()
    return flat[0] if len(flat) == 1 else shapely.MultiPolygon(flat)
