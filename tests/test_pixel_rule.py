"""Conformance suite for the pixel rule, through polyburn's repair + burn path.

Rule: (0, 0) is the top-left corner of pixel (0, 0); a pixel is set iff its centre is inside;
ties: a centre on a left or bottom edge is out, on a right or top edge is in (GDAL/rasterio).
Expected masks below are written by hand; the randomized part uses independent oracles.
"""

from __future__ import annotations

import numpy as np
import pytest

from polyburn.geometry import repair_item
from polyburn.masks import build_masks
from polyburn.model import Annotation, Item
from polyburn.raster import ENGINES, burn
from tests.support.oracle import (
    crossing_oracle,
    min_centre_edge_distance,
    rasterio_oracle,
)


def item_of(*polygons, width=8, height=8) -> Item:
    annotations = [
        Annotation(
            annotation_id=f"a{i}",
            label="x",
            type="segment",
            index=i,
            rings=[np.asarray(r, dtype=float) for r in rings],
        )
        for i, rings in enumerate(polygons)
    ]
    return Item("item", "item", width, height, annotations)


def burned(*polygons, width=8, height=8, values=None, engine="rasterio") -> np.ndarray:
    item = item_of(*polygons, width=width, height=height)
    shapes, _, problems = repair_item(item)
    assert not problems, problems
    values = values or [1] * len(shapes)
    return burn(shapes, values, height, width, np.uint8, engine=engine)


def grid(text: str) -> np.ndarray:
    return np.array([[int(c) for c in row.strip()] for row in text.strip().splitlines()])


@pytest.fixture(params=ENGINES)
def engine(request):
    return request.param


def test_square_on_integer_corners_covers_exactly_its_pixels(engine):
    mask = burned([[(1, 1), (5, 1), (5, 5), (1, 5)]], engine=engine)
    expected = np.zeros((8, 8), int)
    expected[1:5, 1:5] = 1
    assert (mask == expected).all()
    assert mask.sum() == 16


def test_half_pixel_square_takes_right_and_top_ties(engine):
    # Centres on x=0.5 (left edge) are out, on x=4.5 (right edge) in; y=0.5 (top) in, 4.5 out.
    mask = burned(
        [[(0.5, 0.5), (4.5, 0.5), (4.5, 4.5), (0.5, 4.5)]], width=6, height=6, engine=engine
    )
    assert (
        mask
        == grid("""
        011110
        011110
        011110
        011110
        000000
        000000""")
    ).all()


def test_triangle_hypotenuse_through_centres_is_a_right_edge(engine):
    mask = burned([[(0, 0), (4, 0), (0, 4)]], width=5, height=5, engine=engine)
    assert (
        mask
        == grid("""
        11110
        11100
        11000
        10000
        00000""")
    ).all()


def test_hole_stays_a_hole(engine):
    mask = burned(
        [[(0, 0), (8, 0), (8, 8), (0, 8)], [(2, 2), (6, 2), (6, 6), (2, 6)]], engine=engine
    )
    expected = np.ones((8, 8), int)
    expected[2:6, 2:6] = 0
    assert (mask == expected).all()


def test_bowtie_fills_both_lobes_even_odd(engine):
    # Lobes left and right of the crossing; no pixel centre lies on an edge.
    rings = [[(0.2, 0.1), (7.9, 7.7), (7.8, 0.3), (0.1, 7.9)]]
    mask = burned(rings, engine=engine)
    assert min_centre_edge_distance([np.array(rings[0])], 8, 8) > 1e-3
    expected = crossing_oracle([np.array(rings[0])], 8, 8)
    assert (mask.astype(bool) == expected).all()
    assert mask[4, 0] == 1 and mask[4, 7] == 1  # both lobes
    assert mask[0, 4] == 0 and mask[7, 4] == 0  # top and bottom wedges are outside


def test_touching_squares_partition_the_shared_edge():
    for engine in ENGINES:
        left = burned([[(0, 0), (4, 0), (4, 8), (0, 8)]], engine=engine)
        right = burned([[(4, 0), (8, 0), (8, 8), (4, 8)]], engine=engine)
        assert not (left & right).any()
        assert (left | right).all()
        assert left.sum() == 32


def test_touching_diagonal_triangles_partition_exactly(engine):
    a = burned([[(0, 0), (8, 0), (0, 8)]], engine=engine)
    b = burned([[(8, 0), (8, 8), (0, 8)]], engine=engine)
    assert not (a & b).any()
    assert (a | b).all()


def test_overlap_later_wins(engine):
    mask = burned(
        [[(0, 0), (6, 0), (6, 6), (0, 6)]],
        [[(3, 3), (8, 3), (8, 8), (3, 8)]],
        values=[1, 2],
        engine=engine,
    )
    assert mask[1, 1] == 1 and mask[4, 4] == 2 and mask[7, 7] == 2 and mask[7, 0] == 0
    assert (mask == 2).sum() == 25 and (mask == 1).sum() == 36 - 9


def test_out_of_bounds_and_negative_coordinates(engine):
    mask = burned([[(-3.2, -7), (3, -7), (3, 2), (-3.2, 2)]], width=5, height=4, engine=engine)
    assert (
        mask
        == grid("""
        11100
        11100
        00000
        00000""")
    ).all()


def test_far_away_coordinates_do_not_overflow(engine):
    mask = burned(
        [[(-1e8, -1e8), (1e8, -1e8), (1e8, 4), (-1e8, 4)]], width=5, height=8, engine=engine
    )
    assert mask[:4].all() and not mask[4:].any()


def test_absurd_coordinates_are_dropped_and_reported():
    item = item_of([[(1, 1), (1e308, 1), (6, 1), (6, 6), (1, 6)]])
    shapes, repairs, problems = repair_item(item)
    assert not problems and len(shapes) == 1
    assert [r.kind for r in repairs] == ["out_of_range_vertices"]
    mask = burn(shapes, [1], 8, 8, np.uint8)
    assert mask[1:6, 1:6].all() and mask.sum() == 25


def test_degenerate_rings_are_rejected_not_burned():
    item = item_of(
        [[(1, 1), (5, 5), (3, 3)]],  # collinear
        [[(1, 1), (1, 1), (4, 4)]],  # two distinct vertices
        [[(1, 1), (4, 1), (4, 4), (1, 4)], [(2, 2), (2, 2), (3, 2)]],  # degenerate hole only
    )
    shapes, repairs, problems = repair_item(item)
    assert [p.annotation_id for p in problems] == ["a0", "a1"]
    assert "zero area" in problems[0].reason and "2 distinct" in problems[1].reason
    assert [s.annotation.annotation_id for s in shapes] == ["a2"]
    assert [r.kind for r in repairs] == [
        "duplicate_vertices",
        "duplicate_vertices",
        "degenerate_hole",
    ]


def test_sliver_thinner_than_a_pixel_between_centres_burns_nothing(engine):
    mask = burned([[(0, 1.6), (8, 1.6), (8, 1.9), (0, 1.9)]], engine=engine)
    assert mask.sum() == 0


def _star(rng, cx, cy, n, r_min, r_max):
    angles = np.sort(rng.uniform(0, 2 * np.pi, n))
    radii = rng.uniform(r_min, r_max, n)
    return np.c_[cx + radii * np.cos(angles), cy + radii * np.sin(angles)]


@pytest.mark.parametrize("seed", range(6))
def test_random_polygons_match_rasterio_and_the_crossing_oracle(seed, engine):
    """Random stars, holes, self-intersecting rings; generic (tie-free) and snapped (tie-heavy)."""
    rng = np.random.default_rng(seed)
    h, w = 40, 48
    checked = 0
    for case in range(60):
        kind = case % 4
        exterior = _star(
            rng, rng.uniform(-5, w + 5), rng.uniform(-5, h + 5), rng.integers(3, 14), 2, 25
        )
        if kind == 1:  # snapped to the half-pixel grid: vertices on centres and on edges
            exterior = np.round(exterior * 2) / 2
        rings = [exterior]
        if kind == 2:  # a hole inside
            c = exterior.mean(axis=0)
            rings.append(c + (exterior - c) * 0.4)
        if kind == 3:  # a self-intersecting ring
            rings = [rng.permutation(exterior)]
        item = item_of(rings, width=w, height=h)
        shapes, _, problems = repair_item(item)
        if problems:  # degenerate after snapping, or outside: nothing to burn
            continue
        got = burn(shapes, [1] * len(shapes), h, w, np.uint8, engine=engine).astype(bool)
        raw = rings
        assert (got == rasterio_oracle(raw, h, w)).all(), f"seed {seed} case {case}"
        if min_centre_edge_distance(raw, h, w) > 1e-9:
            assert (got == crossing_oracle(raw, h, w)).all(), f"seed {seed} case {case}"
        checked += 1
    assert checked > 40


def _object_item(rng, h, w, n, object_ids):
    """``n`` random stars (some with holes), labels "a"/"b", objectIds drawn from
    ``object_ids`` (None: no objectId)."""
    annotations = []
    for i in range(n):
        exterior = _star(rng, rng.uniform(0, w), rng.uniform(0, h), rng.integers(3, 10), 2, 14)
        if i % 3 == 1:  # tie-heavy: vertices on the half-pixel grid
            exterior = np.round(exterior * 2) / 2
        rings = [exterior]
        if i % 4 == 2:
            c = exterior.mean(axis=0)
            rings.append(c + (exterior - c) * 0.4)
        oid = object_ids[rng.integers(len(object_ids))]
        label = "ab"[rng.integers(2)]
        annotations.append(Annotation(f"a{i}", label, "segment", i, oid, rings=rings))
    return Item("item", "item", w, h, annotations)


@pytest.mark.parametrize("seed", range(4))
def test_distinct_object_ids_burn_what_dataloops_seed_loop_burns(seed):
    """For distinct objectIds, the instance mask is the seed loop of Dataloop's guide,
    ``image = np.where(seg.geo == 1, annotation.object_id, image)`` per annotation, with rasterio
    as ``seg.geo`` (the exact pixel rule instead of OpenCV's)."""
    rng = np.random.default_rng(100 + seed)
    h, w = 40, 48
    ids = [int(k) for k in rng.permutation(np.arange(1, 400))[:12]]
    item = _object_item(rng, h, w, 12, [None])
    for annotation, oid in zip(item.annotations, ids, strict=True):
        annotation.object_id = oid
    shapes, _, _ = repair_item(item)
    kept = {s.annotation.annotation_id for s in shapes}
    image = np.zeros((h, w), np.uint16)
    for annotation in item.annotations:
        if annotation.annotation_id in kept:
            geo = rasterio_oracle(annotation.rings, h, w)
            image = np.where(geo == 1, annotation.object_id, image)
    masks = build_masks(item, shapes, ["instance"], {"a": 1, "b": 2}, np.dtype(np.uint8))
    assert len(kept) >= 8 and masks.repairs == []
    assert (masks.instance == image).all()


@pytest.mark.parametrize("seed", range(4))
def test_shared_and_missing_object_ids_match_a_per_object_rasterio_oracle(
    seed, engine, monkeypatch
):
    """Parts sharing an objectId and label are one instance, other labels with that objectId get
    fresh ids per label, annotations without one a fresh id each; every part burned with its id by
    rasterio in draw order. The ids are worked out here from the annotations alone."""
    rng = np.random.default_rng(200 + seed)
    h, w = 40, 48
    item = _object_item(rng, h, w, 16, [None, 3, 3, 9, 9, 20, 70000])
    shapes, _, _ = repair_item(item)
    burned_annotations = [s.annotation for s in shapes]
    labels = {}
    for a in burned_annotations:
        if a.object_id is not None and 1 <= a.object_id <= 65535:
            labels.setdefault(a.object_id, set()).add(a.label)
    fresh = max(labels, default=0)
    given: dict[tuple, int] = {}
    expected = np.zeros((h, w), np.uint16)
    members: dict[int, list[str]] = {}
    for a in burned_annotations:
        if a.object_id in labels and len(labels[a.object_id]) == 1:
            k = a.object_id
        elif a.object_id in labels:
            if (a.object_id, a.label) not in given:
                fresh += 1
                given[(a.object_id, a.label)] = fresh
            k = given[(a.object_id, a.label)]
        else:
            fresh += 1
            k = fresh
        members.setdefault(k, []).append(a.annotation_id)
        expected[rasterio_oracle(a.rings, h, w)] = k
    monkeypatch.setenv("POLYBURN_ENGINE", engine)
    masks = build_masks(item, shapes, ["instance"], {"a": 1, "b": 2}, np.dtype(np.uint8))
    assert (masks.instance == expected).all()
    assert {row["id"]: row["annotations"] for row in masks.instance_table} == members
    assert len(members) < len(burned_annotations)  # some objects really have several parts
