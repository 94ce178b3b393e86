"""YOLO segmentation labels of one item, from its shapes' geometry (pure, no I/O).

One label line per object (an instance of the instance mask, :func:`polyburn.masks.build_masks`):
``<class index> x1 y1 x2 y2 ...``, the class index 0-based in label-map order
(:func:`class_names`), then the object's polygon normalised to [0, 1] (x / width, y / height)
with 6 decimals. Lines are sorted by instance id; an object with nothing visible has no line.

The polygon is the object's *visible region* (:func:`visible_regions`): its shapes minus what
later shapes of other objects draw over them, computed on the geometry with shapely, not traced
from pixels. A region with holes or several parts is written as ONE ring
(:func:`single_ring`), its rings joined by zero-width bridges walked there and back, as
Ultralytics' own COCO converter joins the parts of an object.

Burned back with polyburn's pixel rule (a pixel is set iff its centre is inside, even-odd,
:mod:`polyburn.raster`), a line reproduces the object's pixels in the instance mask, except for
pixel centres lying exactly on its boundary (ties: a shared edge with another object, a
6-decimal rounding of a vertex, a hole's horizontal top edge exactly on a row of centres,
see :func:`single_ring`).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

import numpy as np
import shapely

from polyburn.formats import OutputFile, OutputFormat
from polyburn.masks import ItemMasks
from polyburn.model import Item, Shape

if TYPE_CHECKING:
    from polyburn.destinations.base import FileDestination
    from polyburn.manifest import RecordSpool
    from polyburn.records import ItemRecord

__all__ = [
    "DECIMALS",
    "FORMAT",
    "MIN_PART_AREA",
    "SPLITS",
    "class_names",
    "data_yaml",
    "label_lines",
    "mask_region",
    "single_ring",
    "visible_regions",
]

DECIMALS = 6
MIN_PART_AREA = 1e-6
"""Polygon parts of a visible region smaller than this (in pixels²) are numerical slivers of
the overlay (an edge shared with an occluder) and are dropped."""
SPLITS = ("train", "val", "test")

_EMPTY = shapely.Polygon()
_NUMBER = f" %.{DECIMALS}f"
_ALL_PAIRS = 32  # up to this many parts, the spanning tree considers every pair


# ------------------------------------------------------------------------------ regions
def mask_region(mask: np.ndarray) -> shapely.Geometry:
    """The pixels of a bool (H, W) mask as a (Multi)Polygon of pixel edges, exactly: pixel
    (r, c) is the square [c, c+1) x [r, r+1), so the centre rule burns back exactly ``mask``.

    For shapes with no geometry (``Shape.mask``, Dataloop binary annotations): traced with
    ``rasterio.features.shapes`` (4-connected components, holes kept). Empty Polygon when
    ``mask`` has no pixel set.
    """
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return _EMPTY
    from affine import Affine
    from rasterio import features
    from rasterio.errors import NotGeoreferencedWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        traced = features.shapes(
            mask.view(np.uint8), mask=mask, connectivity=4, transform=Affine.identity()
        )
        parts = [shapely.geometry.shape(geojson) for geojson, _ in traced]
    # 4-connected components only touch at corners: a valid MultiPolygon as they are
    return parts[0] if len(parts) == 1 else shapely.MultiPolygon(parts)


def visible_regions(
    ordered_shapes: Sequence[Shape], instance_ids: Sequence[int]
) -> dict[int, shapely.Geometry]:
    """The visible region of every instance: ``{instance id: Polygon | MultiPolygon}``.

    ``ordered_shapes`` are an item's shapes in draw order (:func:`polyburn.raster.order_shapes`),
    ``instance_ids[k]`` the instance id shape k burns in the instance mask (the first value of
    :func:`polyburn.instances.number_instances`). As in the instance mask, later shapes win: the
    region of an instance is the union, over its shapes, of each shape minus the union of all
    shapes drawn after it (a later shape of the same instance does not take anything away: what
    it covers is the instance's through that later shape).

    Shapes without geometry (bool masks) are vectorised first (:func:`mask_region`); they are
    part of their instance and hide earlier shapes like any other.

    Every id of ``instance_ids`` is a key; an instance drawn over entirely maps to an empty
    Polygon. Parts smaller than :data:`MIN_PART_AREA` are dropped. Cost: one STRtree query, one
    union of the overlapping later shapes per shape, one vectorised difference.
    """
    if len(ordered_shapes) != len(instance_ids):
        raise ValueError("shapes and instance ids differ in length")
    n = len(ordered_shapes)
    geometries = np.empty(n, dtype=object)
    geometries[:] = [
        s.geometry if s.geometry is not None else mask_region(s.mask) for s in ordered_shapes
    ]
    occluders = np.full(n, None, dtype=object)
    if n > 1:
        shape_index, later = shapely.STRtree(geometries).query(geometries, predicate="intersects")
        keep = later > shape_index
        shape_index, later = shape_index[keep], later[keep]
        if len(shape_index):
            order = np.argsort(shape_index, kind="stable")
            shape_index, later = shape_index[order], later[order]
            starts = np.flatnonzero(np.r_[True, shape_index[1:] != shape_index[:-1]])
            for first, group in zip(starts, np.split(later, starts[1:]), strict=True):
                occluders[shape_index[first]] = shapely.union_all(geometries[group])
    occluded = ~shapely.is_missing(occluders)
    pieces = geometries.copy()
    pieces[occluded] = shapely.difference(geometries[occluded], occluders[occluded])

    by_instance: dict[int, list[int]] = {}
    for k, value in enumerate(instance_ids):
        by_instance.setdefault(int(value), []).append(k)
    regions: dict[int, shapely.Geometry] = {}
    for value, members in by_instance.items():
        region = pieces[members[0]] if len(members) == 1 else shapely.union_all(pieces[members])
        regions[value] = _polygonal(region)
    return regions


def _polygonal(geometry: shapely.Geometry) -> shapely.Geometry:
    """The polygons of an overlay result with at least MIN_PART_AREA, as one geometry."""
    parts = shapely.get_parts(geometry)
    parts = parts[shapely.get_type_id(parts) == shapely.GeometryType.POLYGON]
    parts = parts[shapely.area(parts) >= MIN_PART_AREA]
    if len(parts) == 0:
        return _EMPTY
    return parts[0] if len(parts) == 1 else shapely.MultiPolygon(list(parts))


# ------------------------------------------------------------------------------ one ring
def single_ring(geometry: shapely.Geometry) -> np.ndarray:
    """One ring (float64 (N, 2) x, y; open: the first vertex is not repeated) whose filled area
    is ``geometry``'s, for a non-empty valid Polygon or MultiPolygon.

    Orientation: every exterior has positive signed (shoelace) area and every hole negative
    (``shapely.orient_polygons``; with y pointing down, exteriors run clockwise on screen), so
    the ring fills the region under the even-odd *and* the nonzero rule. Holes and further parts
    are attached by zero-width bridges: from a vertex of the ring they hang on, to a vertex of
    theirs, around them, and back to the same vertex. Each bridge is walked once each way, so it
    adds no crossing and no winding: a point not on a bridge is inside the ring iff it is inside
    ``geometry``. A hole hangs on its polygon's exterior, a part on another part (a spanning
    tree of the parts, minimum over the distances of candidate pairs: :func:`_spanning_tree`),
    so bridges stay short (renderers that draw outlines, as OpenCV's fillPoly does, draw them);
    the pair of vertices is the closest pair whose bridge is not level on a non-whole y, since
    GDAL (and polyburn's kernel) paints a horizontal edge lying exactly on a row of pixel
    centres (y = r + 0.5).

    No vertex is added or moved, so the pixel rule applied to the ring gives the region's pixels
    except at centres exactly on a bridge, and, for GDAL's horizontal-edge rule: a hole's
    horizontal edge exactly on a row of centres is its top edge in GDAL's separate-ring fill and
    its bottom edge in the ring (nonzero orientation), so the centres on such a top edge are out.

    Raises ValueError for an empty or non-polygonal geometry.
    """
    polygons = shapely.get_parts(geometry)
    polygons = polygons[shapely.get_type_id(polygons) == shapely.GeometryType.POLYGON]
    polygons = polygons[~shapely.is_empty(polygons)]
    if len(polygons) == 0:
        raise ValueError(f"no polygon to make a ring of: {geometry.geom_type}")
    polygons = shapely.orient_polygons(polygons, exterior_cw=False)
    # the largest part first: it is the root the others hang on
    polygons = polygons[np.argsort(-shapely.area(polygons), kind="stable")]

    rings: list[np.ndarray] = []
    hangs: list[tuple[int, int, int, int]] = []  # (parent ring, its vertex, child ring, vertex)
    exterior_of: list[int] = []
    for polygon in polygons:
        exterior = len(rings)
        exterior_of.append(exterior)
        rings.append(_open(polygon.exterior))
        for interior in polygon.interiors:
            hole = len(rings)
            rings.append(_open(interior))
            i, j = _closest_vertices(rings[exterior], rings[hole])
            hangs.append((exterior, i, hole, j))
    if len(polygons) > 1:
        for a, b in _spanning_tree(polygons):
            i, j = _closest_vertices(rings[exterior_of[a]], rings[exterior_of[b]])
            hangs.append((exterior_of[a], i, exterior_of[b], j))
    if not hangs:
        return rings[0]
    return _walk(rings, hangs)


def _open(ring: shapely.LinearRing) -> np.ndarray:
    """A ring's vertices without the closing repeat."""
    return shapely.get_coordinates(ring)[:-1]


def _closest_vertices(parent: np.ndarray, child: np.ndarray) -> tuple[int, int]:
    """Indices (in parent, in child) of the closest pair of vertices, leaving out bridges level
    on a y that is not a whole number (a row of pixel centres is at y = r + 0.5; pixel-edge
    outlines of bitmaps are level on whole numbers, harmlessly). O((n + m) log n)."""
    if len(parent) * len(child) <= _ALL_PAIRS**2:  # small rings: every pair, no tree
        y = parent[:, None, 1]
        d2 = ((parent[:, None, :] - child[None, :, :]) ** 2).sum(axis=2)
        level = (y == child[None, :, 1]) & (y != np.floor(y))
        if not level.all():
            d2[level] = np.inf
        i, j = np.unravel_index(np.argmin(d2), d2.shape)
        return int(i), int(j)
    tree = shapely.STRtree(shapely.points(parent))
    (child_index, parent_index), distance = tree.query_nearest(
        shapely.points(child), return_distance=True, all_matches=True
    )
    order = np.lexsort((parent_index, child_index, distance))
    parent_index, child_index = parent_index[order], child_index[order]
    y = parent[parent_index, 1]
    allowed = (y != child[child_index, 1]) | (y == np.floor(y))
    if allowed.any():
        best = int(np.argmax(allowed))
        return int(parent_index[best]), int(child_index[best])
    # every nearest pair is level off the whole numbers: from the closest parent vertex, the
    # closest child vertex off its level (a ring with an area has one)
    i = int(parent_index[0])
    d2 = ((child - parent[i]) ** 2).sum(axis=1)
    d2[child[:, 1] == parent[i, 1]] = np.inf
    return i, int(np.argmin(d2))


def _spanning_tree(parts: np.ndarray) -> list[tuple[int, int]]:
    """Edges (attached part, new part), root first, of a spanning tree of the parts that is a
    minimum one over the distances between their exteriors among candidate pairs: every pair
    for a few parts, else the Delaunay edges of their centroids plus a chain through them
    sorted by position (O(n log n) pairs; the chain keeps the graph connected when centroids
    coincide or are collinear)."""
    n = len(parts)
    if n <= _ALL_PAIRS:
        first, second = np.triu_indices(n, k=1)
    else:
        centroids = shapely.get_coordinates(shapely.centroid(parts))
        index = {tuple(c): k for k, c in reversed(list(enumerate(centroids.tolist())))}
        triangulation = shapely.delaunay_triangles(shapely.multipoints(centroids), only_edges=True)
        ends = shapely.get_coordinates(shapely.get_parts(triangulation)).reshape(-1, 2, 2)
        pairs = [(index[tuple(a)], index[tuple(b)]) for a, b in ends.tolist()]
        chain = np.lexsort((centroids[:, 1], centroids[:, 0]))
        pairs.extend(zip(chain[:-1].tolist(), chain[1:].tolist(), strict=True))
        first, second = np.array(pairs, dtype=np.int64).reshape(-1, 2).T
    exteriors = shapely.get_exterior_ring(parts)
    weights = shapely.distance(exteriors[first], exteriors[second])
    root = list(range(n))

    def find(k: int) -> int:
        while root[k] != k:
            root[k] = root[root[k]]
            k = root[k]
        return k

    neighbours: dict[int, list[int]] = {}
    for e in np.argsort(weights, kind="stable").tolist():
        a, b = int(first[e]), int(second[e])
        ra, rb = find(a), find(b)
        if ra != rb:
            root[ra] = rb
            neighbours.setdefault(a, []).append(b)
            neighbours.setdefault(b, []).append(a)
    edges, seen, queue = [], {0}, [0]
    for a in queue:  # breadth first from part 0: each edge from the attached side
        for b in neighbours.get(a, []):
            if b not in seen:
                seen.add(b)
                queue.append(b)
                edges.append((a, b))
    return edges


def _walk(rings: list[np.ndarray], hangs: list[tuple[int, int, int, int]]) -> np.ndarray:
    """Ring 0 from its vertex 0, detouring at each hanging vertex around the child ring (from
    the child's hanging vertex all the way round to it again, with the child's own children)
    and back to the hanging vertex. Iterative: deep trees do not hit the recursion limit."""
    children: dict[int, dict[int, list[tuple[int, int]]]] = {}
    for parent, i, child, j in hangs:
        children.setdefault(parent, {}).setdefault(i, []).append((child, j))

    def enter(ring: int, start: int) -> dict:
        coords = np.concatenate((rings[ring][start:], rings[ring][:start]))
        at = children.get(ring, {})
        steps = sorted(((v - start) % len(coords), list(kids)) for v, kids in at.items())
        return {"coords": coords, "steps": steps, "done": 0}

    out: list[np.ndarray] = []
    stack = [enter(0, 0)]
    while stack:
        frame = stack[-1]
        if frame["steps"]:
            step, kids = frame["steps"][0]
            if frame["done"] <= step:  # up to and including the hanging vertex
                out.append(frame["coords"][frame["done"] : step + 1])
                frame["done"] = step + 1
            if kids:
                child, j = kids.pop(0)
                stack.append(enter(child, j))
            else:
                frame["steps"].pop(0)
            continue
        out.append(frame["coords"][frame["done"] :])
        stack.pop()
        if stack:  # close the detour on the child's first vertex, back to the hanging vertex
            parent = stack[-1]
            out.append(frame["coords"][:1])
            out.append(parent["coords"][parent["done"] - 1 : parent["done"]])
    return np.concatenate(out)


# ------------------------------------------------------------------------------ text
def class_names(label_map: Mapping[str, int]) -> list[str]:
    """Label names by class index: the label map's labels sorted by id (ties by name)."""
    return [label for label, _ in sorted(label_map.items(), key=lambda kv: (kv[1], kv[0]))]


def label_lines(
    regions: Mapping[int, shapely.Geometry],
    instance_table: Sequence[Mapping[str, object]],
    label_map: Mapping[str, int],
    width: int,
    height: int,
) -> str:
    """The contents of an item's YOLO label file: one ``\\n``-terminated line per instance with a
    non-empty region, sorted by instance id; ``""`` when there is none.

    ``regions`` is :func:`visible_regions`' result, ``instance_table`` the item's instance rows
    (``id``, ``label``; :attr:`polyburn.masks.ItemMasks.instance_table`), ``label_map``
    ``{label: id}``. A line is the class index (:func:`class_names`) and the :func:`single_ring`
    of the region's part inside the image (shapes may reach outside it; a region with nothing
    inside gets no line), x / ``width`` and y / ``height`` written with 6 decimals. Vertices
    that rounding makes equal to the previous one are dropped, and a region that rounding leaves
    with no area (narrower than the 6-decimal grid) gets no line.

    Raises KeyError for an instance missing from the table or a label missing from the map.
    """
    index = {label: k for k, label in enumerate(class_names(label_map))}
    label_of = {int(row["id"]): row["label"] for row in instance_table}
    scale = np.array([width, height], dtype=np.float64)
    image = shapely.box(0, 0, width, height)
    lines = []
    for instance in sorted(regions):
        region = regions[instance]
        if region is None or region.is_empty:
            continue
        class_index = index[label_of[instance]]
        xmin, ymin, xmax, ymax = region.bounds
        if xmin < 0 or ymin < 0 or xmax > width or ymax > height:
            # shapes may reach outside the image (only pixels inside are burned)
            region = _polygonal(shapely.intersection(region, image))
            if region.is_empty:
                continue
        # clip: only against rounding past 0 or 1
        points = np.round(np.clip(single_ring(region) / scale, 0.0, 1.0), DECIMALS) + 0.0
        keep = np.ones(len(points), dtype=bool)
        keep[1:] = (points[1:] != points[:-1]).any(axis=1)
        points = points[keep]
        while len(points) > 1 and (points[-1] == points[0]).all():
            points = points[:-1]
        if len(points) < 3 or _shoelace(points) == 0:
            continue
        lines.append(f"{class_index}{_NUMBER * points.size}\n" % tuple(points.ravel().tolist()))
    return "".join(lines)


def _shoelace(points: np.ndarray) -> float:
    """Twice the signed area of a ring (the region's area for a :func:`single_ring`)."""
    x, y = points[:, 0], points[:, 1]
    return float(x[:-1] @ y[1:] - y[:-1] @ x[1:] + x[-1] * y[0] - y[-1] * x[0])


def data_yaml(names: Sequence[str], splits: Mapping[str, Sequence[str]]) -> str:
    """The text of ``yolo/data.yaml`` for Ultralytics: the image lists of the splits given
    (``train``, ``val``, ``test``, in that order; Ultralytics needs ``train`` and ``val``), each
    a list of image paths (relative paths are resolved against the file's folder), and
    ``names``, class index → name (``names[k]`` is class k, e.g. :func:`class_names`).

    Every string is written as a double-quoted YAML scalar (JSON's escapes, plus ``\\u``/``\\U``
    escapes for characters YAML does not allow raw), so names like ``yes``, ``1`` or ``a: b``
    stay strings. Raises ValueError for another split name.
    """
    unknown = sorted(set(splits) - set(SPLITS))
    if unknown:
        raise ValueError(f"YOLO splits are {', '.join(SPLITS)}, not {', '.join(unknown)}")
    lines = []
    for split in SPLITS:
        if split not in splits:
            continue
        paths = splits[split]
        if not paths:
            lines.append(f"{split}: []")
            continue
        lines.append(f"{split}:")
        lines.extend(f"  - {_yaml_string(path)}" for path in paths)
    lines.append("names:" if names else "names: {}")
    lines.extend(f"  {k}: {_yaml_string(name)}" for k, name in enumerate(names))
    return "\n".join(lines) + "\n"


def _yaml_string(text: str) -> str:
    """A double-quoted YAML scalar holding exactly ``text``."""
    quoted = json.dumps(str(text), ensure_ascii=False)
    return "".join(_yaml_char(c) for c in quoted)


def _yaml_char(c: str) -> str:
    code = ord(c)
    printable = (
        code in (0x09, 0x0A, 0x0D)
        or 0x20 <= code <= 0x7E
        or code == 0x85
        or 0xA0 <= code <= 0xD7FF
        or 0xE000 <= code <= 0xFFFD
        or 0x10000 <= code <= 0x10FFFF
    )
    if printable and code not in (0x2028, 0x2029, 0xFEFF, 0x85):
        return c
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


# ------------------------------------------------------------------------------ the format
LABELS = "yolo/labels/"
DATA_YAML = "yolo/data.yaml"
_SPLIT_OF = {"train": "train", "validation": "val", "test": "test"}  # polyburn's → YOLO's


class Yolo(OutputFormat):
    """Ultralytics YOLO segmentation labels (module docstring) and ``yolo/data.yaml``."""

    name = "yolo"
    summary = (
        "YOLO segmentation labels: a line per object, its class index (0-based, label-map "
        "order) and its visible region as one polygon normalised to [0, 1], with data.yaml"
    )
    order = 50
    layers = frozenset({"instance"})
    writes = "`yolo/labels/<path>.txt` per item (per frame of a video); `yolo/data.yaml`"

    def prepare(self, masks: ItemMasks, item: Item, label_map: Mapping[str, int]) -> None:
        regions = visible_regions(masks.shapes, masks.instance_values)
        text = label_lines(regions, masks.instance_table, label_map, item.width, item.height)
        masks.extras[self.name] = text

    def files(
        self, masks: ItemMasks, item: Item, fmt: str, palette: Sequence[int] | None, path: str
    ) -> list[OutputFile]:
        text = masks.extras[self.name].encode("utf-8")
        return [OutputFile(f"{LABELS}{path}.txt", text, "text/plain")]

    def dataset_files(
        self, store: FileDestination, spool: RecordSpool, scratch: Path
    ) -> dict[str, int]:
        """``yolo/data.yaml`` with the class names, and ``yolo/train.txt``, ``val.txt`` and
        ``test.txt`` listing the images of each ML subset (unassigned items are in none) where
        Ultralytics looks for them: ``yolo/images/<path><ext>``, beside ``yolo/labels/``. Written
        when some ``ok`` record lists a label file; otherwise earlier ones are removed."""
        from polyburn.dataset import subset_of
        from polyburn.destinations.base import LABEL_MAP_KEY
        from polyburn.labels import parse_label_map

        counts = dict.fromkeys(_SPLIT_OF.values(), 0)
        any_labels = False
        with ExitStack() as stack:
            lists = {
                s: stack.enter_context(open(scratch / f"yolo-{s}.txt", "w", encoding="utf-8"))
                for s in counts
            }
            for record in spool.records(mentioning=LABELS):
                images = _images(record) if record.ok else []
                any_labels = any_labels or bool(images)
                split = _SPLIT_OF.get(subset_of(record))
                if split:
                    lists[split].writelines(f"./images/{image}\n" for image in images)
                    counts[split] += len(images)
        keys = [f"yolo/{s}.txt" for s in counts]
        if not any_labels:
            stale = [e.key for e in store.entries("yolo/") if e.key in {DATA_YAML, *keys}]
            if stale:
                store.remove(stale)
            return {}
        for split, key in zip(counts, keys, strict=True):
            store.write_file(key, scratch / f"yolo-{split}.txt")
        label_map = parse_label_map(store.read_text(LABEL_MAP_KEY) or "{}", LABEL_MAP_KEY)
        lists_of = {split: [f"{split}.txt"] for split in counts}
        store.write_text(DATA_YAML, data_yaml(class_names(label_map), lists_of))
        return {f"yolo/{split}.txt": n for split, n in counts.items()}


def _images(record: ItemRecord) -> list[str]:
    """The image paths (under ``yolo/images/``) of the label files a record lists: the item's
    file's extension for an image item, ``.jpg`` for a video's frames (``ffmpeg`` names them
    ``<frame:06d>.jpg``, :func:`polyburn.coco.frame_image`)."""
    keys = [o["key"] for o in record.outputs or () if str(o.get("key", "")).startswith(LABELS)]
    suffix = PurePosixPath(str(record.file_name or "")).suffix or ".jpg"
    frames = record.video is not None
    return [key[len(LABELS) : -len(".txt")] + (".jpg" if frames else suffix) for key in keys]


FORMAT = Yolo()
