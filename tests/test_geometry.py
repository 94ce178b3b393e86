"""Validate-and-repair: every change recorded, every rejection explained, nothing crashes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import shapely

from polyburn.geometry import repair_item
from polyburn.model import Annotation, Item


def item_of(*rings_per_annotation, width=100, height=100) -> Item:
    return Item(
        "i",
        "p",
        width,
        height,
        [
            Annotation(f"a{i}", "x", "segment", i, rings=[np.asarray(r, float) for r in rings])
            for i, rings in enumerate(rings_per_annotation)
        ],
    )


def kinds(repairs):
    return [r.kind for r in repairs]


def test_cleaning_drops_nan_duplicates_and_closing_vertex_silently():
    ring = [(0, 0), (0, 0), (4, 0), (math.nan, 1), (4, 4), (0, 4), (0, 0)]
    shapes, repairs, problems = repair_item(item_of([ring]))
    assert not problems
    assert [(r.kind, r.detail) for r in repairs] == [
        ("non_finite_vertices", "ring 0: dropped 1 NaN/inf vertices"),
        ("duplicate_vertices", "ring 0: dropped 1"),
    ]
    assert shapes[0].geometry.area == 16
    assert len(shapes[0].geometry.exterior.coords) == 5  # 4 distinct + closing


def test_rings_of_many_annotations_are_cleaned_independently():
    a = [(0, 0), (4, 0), (4, 4), (0, 4)]
    b = [(0, 4), (0, 4), (4, 4), (4, 8)]  # starts where a ends: not a duplicate across rings
    shapes, repairs, problems = repair_item(item_of([a], [b], [a, [(1, 1), (1, 2), (2, 2)]]))
    assert not problems
    assert [(r.kind, r.annotation_id) for r in repairs] == [("duplicate_vertices", "a1")]
    assert [s.area for s in shapes] == [16, 8, 15.5]


def test_valid_polygon_needs_no_repair_and_is_oriented():
    shapes, repairs, problems = repair_item(item_of([[(0, 0), (0, 10), (10, 10), (10, 0)]]))
    assert not repairs and not problems
    assert shapes[0].geometry.exterior.is_ccw
    assert shapes[0].area == 100


def test_nan_vertex_is_dropped_and_reported_with_ring_number():
    shapes, repairs, problems = repair_item(
        item_of([[(0, 0), (10, 0), (math.inf, 5), (10, 10), (0, 10)]])
    )
    assert kinds(repairs) == ["non_finite_vertices"]
    assert repairs[0].detail.startswith("ring 0") and repairs[0].annotation_id == "a0"
    assert shapes[0].area == 100


def test_bowtie_is_made_valid_with_even_odd_faces():
    shapes, repairs, _ = repair_item(item_of([[(0, 0), (10, 10), (10, 0), (0, 10)]]))
    assert kinds(repairs) == ["made_valid"]
    assert repairs[0].area_before == 0 and repairs[0].area_after == pytest.approx(50)
    assert "Self-intersection" in repairs[0].detail
    assert isinstance(shapes[0].geometry, shapely.MultiPolygon)


def test_spike_is_removed_without_changing_area():
    shapes, repairs, _ = repair_item(
        item_of([[(10, 10), (50, 10), (50, 40), (90, 40), (50, 40), (10, 40)]])
    )
    assert kinds(repairs) == ["made_valid"]
    assert repairs[0].area_after == pytest.approx(1200)
    assert shapes[0].geometry.is_valid


def test_hole_crossing_the_exterior_is_filled_even_odd():
    shapes, repairs, _ = repair_item(
        item_of([[(0, 0), (40, 0), (40, 40), (0, 40)], [(30, 10), (60, 10), (60, 30), (30, 30)]])
    )
    assert kinds(repairs) == ["made_valid"]
    # even-odd: the part of the "hole" outside the exterior is covered, the part inside is not
    assert shapes[0].area == pytest.approx(1600 - 200 + 400)


def test_clipping_is_recorded_and_wholly_outside_is_rejected():
    shapes, repairs, problems = repair_item(
        item_of(
            [[(-10, -10), (20, -10), (20, 20), (-10, 20)]], [[(200, 200), (300, 200), (300, 300)]]
        )
    )
    assert kinds(repairs) == ["clipped"]
    assert (repairs[0].area_before, repairs[0].area_after) == (900, 400)
    assert [p.annotation_id for p in problems] == ["a1"]
    assert "outside the image" in problems[0].reason
    assert len(shapes) == 1


def test_clipped_areas_match_the_exact_intersection_with_the_image():
    """The record's clipped area comes from GEOS's rectangle clipping: it must agree with the
    general overlay (shapely.intersection) for valid polygons, holes included, and a polygon
    touching the image only along an edge or at a corner has no area inside: rejected."""
    rng = np.random.default_rng(7)
    rings = []
    for _ in range(60):
        cx, cy = rng.uniform(-30, 130, 2)
        angles = np.sort(rng.uniform(0, 2 * np.pi, 24))
        radii = rng.uniform(10, 40, 24)
        exterior = np.c_[cx + radii * np.cos(angles), cy + radii * np.sin(angles)]
        hole = np.c_[cx + 4 * np.cos(angles[::3]), cy + 4 * np.sin(angles[::3])]
        rings.append([exterior, hole])
    edge = [(100, 10), (120, 10), (120, 30), (100, 30)]  # shares the image's right edge
    corner = [(100, 100), (120, 100), (120, 120)]  # touches the corner (100, 100) only
    shapes, repairs, problems = repair_item(item_of(*rings, [edge], [corner]))
    image = shapely.box(0, 0, 100, 100)
    expected = {}
    for k, (exterior, hole) in enumerate(rings):
        polygon = shapely.make_valid(shapely.Polygon(exterior, [hole]))
        if not image.contains(polygon):
            expected[f"a{k}"] = (polygon.area, polygon.intersection(image).area)
    clipped = {
        r.annotation_id: (r.area_before, r.area_after) for r in repairs if r.kind == "clipped"
    }
    assert set(clipped) == {aid for aid, (_, after) in expected.items() if after > 0}
    for aid, areas in clipped.items():
        assert areas == pytest.approx(expected[aid], rel=1e-9)
    outside = {aid for aid, (_, after) in expected.items() if after == 0}
    assert {p.annotation_id for p in problems} == outside | {"a60", "a61"}
    assert 10 < len(clipped) < len(expected)  # the draw has both kinds and some inside
    assert len(shapes) == 62 - len(outside) - 2


def test_every_broken_annotation_is_reported_and_the_rest_survive():
    shapes, repairs, problems = repair_item(
        item_of(
            [[(math.nan, math.nan), (math.nan, 1), (1, math.nan)]],
            [[(1, 1)]],
            [],
            [[(0, 0), (10, 0), (10, 10)]],
        )
    )
    assert [p.annotation_id for p in problems] == ["a0", "a1", "a2"]
    assert len(shapes) == 1 and shapes[0].annotation.annotation_id == "a3"
    assert kinds(repairs) == ["non_finite_vertices"]


def test_repair_record_serialises():
    _, repairs, _ = repair_item(item_of([[(0, 0), (10, 10), (10, 0), (0, 10)]]))
    record = repairs[0].as_dict()
    assert set(record) == {"kind", "annotation", "area_before", "area_after", "detail"}
