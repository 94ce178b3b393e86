"""polyburn.kernel: hand-computed masks and pixel-for-pixel agreement with rasterio/GDAL."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import shapely
from affine import Affine
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rasterio import features
from rasterio.enums import MergeAlg

from polyburn import kernel

INT_DTYPES = [np.uint8, np.uint16, np.int32, np.int16, np.int64]


@pytest.fixture(scope="module", autouse=True)
def _compiled():
    kernel.warm_up()


def rasterio_burn(polygons, values, shape, dtype=np.uint8) -> np.ndarray:
    out = np.zeros(shape, dtype)
    if not len(polygons):
        return out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # empty shapes are skipped with a warning
        features.rasterize(
            [(p, int(v)) for p, v in zip(polygons, values, strict=True)],
            out=out,
            transform=Affine.identity(),
            all_touched=False,
            merge_alg=MergeAlg.replace,
        )
    return out


def kernel_burn(polygons, values, shape, dtype=np.uint8) -> np.ndarray:
    out = np.zeros(shape, dtype)
    coords, rings, polys = kernel.polygons_to_arrays(polygons)
    result = kernel.burn_polygons(out, coords, rings, polys, np.asarray(values))
    assert result is out
    return out


def mask_of(polygon, shape) -> np.ndarray:
    return kernel_burn([polygon], [1], shape).astype(bool)


def grid(rows: list[str]) -> np.ndarray:
    """Mask from a picture: '#' set, '.' clear."""
    return np.array([[c == "#" for c in row] for row in rows])


def assert_same_as_rasterio(polygons, values, shape, dtype=np.uint8):
    ours = kernel_burn(polygons, values, shape, dtype)
    ref = rasterio_burn(polygons, values, shape, dtype)
    if not np.array_equal(ours, ref):
        bad = np.argwhere(ours != ref)
        raise AssertionError(
            f"{len(bad)} px differ (first at row/col {bad[0].tolist()}): "
            f"{[p.wkt for p in polygons]} values={list(values)} shape={shape} dtype={dtype}"
        )


def box(x0, y0, x1, y1, holes=()):
    return shapely.Polygon([(x0, y0), (x1, y0), (x1, y1), (x0, y1)], holes)


# --------------------------------------------------------------------------------------------
# Hand-computed masks
# --------------------------------------------------------------------------------------------


def test_square_at_integer_corners_is_16_px():
    m = mask_of(box(1, 1, 5, 5), (8, 8))
    expected = np.zeros((8, 8), bool)
    expected[1:5, 1:5] = True
    assert m.sum() == 16
    np.testing.assert_array_equal(m, expected)


def test_square_at_half_pixel_offsets_follows_the_tie_rule():
    # Edges run through pixel centres: left (x=0.5) out, right (x=4.5) in,
    # top (y=0.5) in, bottom (y=4.5) out.
    m = mask_of(box(0.5, 0.5, 4.5, 4.5), (6, 6))
    expected = grid(
        [
            ".####.",
            ".####.",
            ".####.",
            ".####.",
            "......",
            "......",
        ]
    )
    np.testing.assert_array_equal(m, expected)
    # Orientation and starting vertex do not matter.
    ring = [(0.5, 4.5), (4.5, 4.5), (4.5, 0.5), (0.5, 0.5)]
    np.testing.assert_array_equal(mask_of(shapely.Polygon(ring), (6, 6)), expected)
    np.testing.assert_array_equal(mask_of(shapely.Polygon(ring[::-1]), (6, 6)), expected)


def test_polygon_with_hole():
    m = mask_of(box(0, 0, 8, 8, [[(2, 2), (6, 2), (6, 6), (2, 6)]]), (8, 8))
    expected = np.ones((8, 8), bool)
    expected[2:6, 2:6] = False
    assert m.sum() == 48
    np.testing.assert_array_equal(m, expected)


def test_hole_top_edge_on_a_centre_row_is_painted():
    # GDAL fills a horizontal edge on a centre row separately when it is the top edge of the
    # ring's interior; for a hole that is the hole's top edge (y=1.5), so row 1 stays painted
    # and the hole (y 1.5..4.5) only clears rows 2 and 3.
    polygon = box(0, 0, 6, 6, [[(1, 1.5), (5, 1.5), (5, 4.5), (1, 4.5)]])
    expected = grid(
        [
            "######",
            "######",
            "#....#",
            "#....#",
            "######",
            "######",
        ]
    )
    np.testing.assert_array_equal(mask_of(polygon, (6, 6)), expected)
    assert_same_as_rasterio([polygon], [1], (6, 6))


def test_bowtie_is_filled_even_odd():
    bowtie = shapely.Polygon([(0, 0), (4, 4), (4, 0), (0, 4)])
    expected = grid(
        [
            "#...",
            "##.#",
            "##.#",
            "#...",
        ]
    )
    np.testing.assert_array_equal(mask_of(bowtie, (4, 4)), expected)
    assert_same_as_rasterio([bowtie], [1], (4, 4))


def test_pentagram_centre_is_empty():
    angles = np.pi / 2 + np.arange(5) * 4 * np.pi / 5
    star = shapely.Polygon(np.c_[20 + 18 * np.cos(angles), 20 + 18 * np.sin(angles)])
    m = mask_of(star, (40, 40))
    assert not m[20, 20]
    assert m[20 - 14, 20] or m[20 + 14, 20] or m[20, 20 - 14] or m[20, 20 + 14]
    assert_same_as_rasterio([star], [1], (40, 40))


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (box(0, 0, 3.5, 6), box(3.5, 0, 7, 6)),  # shared vertical edge on centres
        (box(0, 0, 7, 2.5), box(0, 2.5, 7, 6)),  # shared horizontal edge on a centre row
        (box(0, 0, 3, 6), box(3, 0, 7, 6)),  # shared edge on pixel boundaries
        (  # shared diagonal through pixel centres
            shapely.Polygon([(0.5, 0.5), (6.5, 0.5), (6.5, 5.5)]),
            shapely.Polygon([(0.5, 0.5), (6.5, 5.5), (0.5, 5.5)]),
        ),
        (  # shared diagonal, irrational slope
            shapely.Polygon([(0, 0), (7, 0), (7, 6), (0.3, 0.2)]),
            shapely.Polygon([(0, 0), (0.3, 0.2), (7, 6), (0, 6)]),
        ),
    ],
)
def test_touching_polygons_partition_exactly(a, b):
    shape = (6, 7)
    ma = mask_of(a, shape)
    mb = mask_of(b, shape)
    assert not (ma & mb).any(), "a pixel was painted by both polygons"
    np.testing.assert_array_equal(ma | mb, mask_of(shapely.union(a, b), shape))
    painted = kernel_burn([a, b], [1, 2], shape)
    np.testing.assert_array_equal(painted, ma * 1 + mb * 2)
    assert_same_as_rasterio([a, b], [1, 2], shape)


def test_out_of_bounds_and_negative_coordinates():
    m = mask_of(box(-10, -10, 3, 2), (4, 4))
    expected = np.zeros((4, 4), bool)
    expected[0:2, 0:3] = True
    np.testing.assert_array_equal(m, expected)
    assert not mask_of(box(-10, -10, -1, 3), (4, 4)).any()  # left of the image
    assert not mask_of(box(5, 0, 9, 3), (4, 4)).any()  # right of the image
    assert not mask_of(box(0, 4, 4, 9), (4, 4)).any()  # below the image
    assert mask_of(box(-1e6, -1e6, 1e6, 1e6), (4, 4)).all()
    far = shapely.Polygon([(-1e6, -1e6), (1e6, -3e5), (2e5, 1e6)])
    assert_same_as_rasterio([far], [1], (12, 12))


def test_triangle_with_vertices_on_pixel_centres():
    tri = shapely.Polygon([(0.5, 0.5), (6.5, 0.5), (0.5, 6.5)])
    expected = grid(
        [
            ".######.",
            ".#####..",
            ".####...",
            ".###....",
            ".##.....",
            ".#......",
            "........",
            "........",
        ]
    )
    m = mask_of(tri, (8, 8))
    assert m.sum() == 21
    np.testing.assert_array_equal(m, expected)
    assert_same_as_rasterio([tri], [1], (8, 8))


def test_thin_and_degenerate_polygons():
    shape = (6, 6)
    # A sliver narrower than a pixel between two centres paints nothing.
    assert not mask_of(box(1.6, 0, 2.4, 6), shape).any()
    # A sliver covering one column of centres paints exactly that column.
    np.testing.assert_array_equal(mask_of(box(1.4, 0, 1.6, 6), shape)[:, 1], np.ones(6, bool))
    # Zero-area rings paint nothing and match GDAL.
    for polygon in [
        shapely.Polygon([(0, 0), (4, 4), (2, 2)]),
        shapely.Polygon([(0.5, 2.5), (4.5, 2.5), (2.5, 2.5)]),
        shapely.Polygon([(2.5, 0.5), (2.5, 4.5), (2.5, 2)]),
    ]:
        assert_same_as_rasterio([polygon], [1], shape)


@pytest.mark.parametrize(
    "wkt",
    [
        # The lowest-rightmost vertex occurs twice, so OGR's isClockwise falls back to the
        # shoelace sum; the orientation decides which horizontal centre-row edges GDAL fills.
        "POLYGON ((4 3.5, 5.5 4.5, 0.5 0, 5 2, 0.5 0, 0 2.5, 2 2.5, 2.5 1.5, 4 3.5))",
        "POLYGON ((5 3, 3 4, 3 4, 1 4.5, 3 4.5, 3 1.5, 0.5 3, 3 1.5, 5 3))",
        "POLYGON ((1.5 1, 4 4, 1.5 1, 3 5.5, 5 5.5, 1.5 1))",
    ],
)
def test_degenerate_orientation_pivot_matches_gdal(wkt):
    assert_same_as_rasterio([shapely.from_wkt(wkt)], [1], (7, 7))


def test_orientation_pivot_with_a_neighbour_closer_than_ogr_epsilon_matches_gdal():
    # A neighbour within 1e-5 of the lowest-rightmost vertex also forces the shoelace fallback.
    ring = [
        (5.5, 3.5), (4.0, 3.5), (1.5, 0.0), (1.4999900797677141, 9.237453573751813e-06),
        (3.5, 1.0), (0.5, 3.0), (3.5, 2.0), (5.5, 3.5),
    ]  # fmt: skip
    assert_same_as_rasterio([shapely.Polygon(ring)], [1], (7, 7))


def test_later_polygons_win_and_values_are_kept():
    shape = (8, 8)
    polys = [box(0, 0, 6, 6), box(2, 2, 8, 8), box(3, 0, 5, 8)]
    for dtype, values in [
        (np.uint8, [1, 200, 255]),
        (np.uint16, [300, 65535, 7]),
        (np.int32, [-5, 2**31 - 1, 70000]),
        (np.int16, [-32768, 5, 32767]),
        (np.int64, [2**40, -(2**40), 1]),
    ]:
        out = kernel_burn(polys, values, shape, dtype)
        assert out.dtype == dtype
        assert out[1, 1] == values[0]
        assert out[7, 7] == values[1]
        assert out[4, 4] == values[2]
        assert out[0, 7] == 0
        np.testing.assert_array_equal(out, rasterio_burn(polys, values, shape, dtype))


def test_unclosed_rings_equal_closed_rings():
    rng = np.random.default_rng(7)
    for _ in range(50):
        pts = rng.uniform(-3, 20, (rng.integers(3, 9), 2))
        snap = rng.random(len(pts)) < 0.5
        pts[snap] = np.round(pts[snap] * 2) / 2
        closed = np.vstack([pts, pts[:1]])
        a = np.zeros((16, 16), np.uint8)
        b = np.zeros((16, 16), np.uint8)
        kernel.burn_polygons(a, pts, [0, len(pts)], [0, 1], [1])
        kernel.burn_polygons(b, closed, [0, len(closed)], [0, 1], [1])
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(b, rasterio_burn([shapely.Polygon(pts)], [1], (16, 16)))


# --------------------------------------------------------------------------------------------
# Randomised comparison with rasterio (seeded)
# --------------------------------------------------------------------------------------------


def star(rng, cx, cy, rmin, rmax, n) -> np.ndarray:
    angles = np.sort(rng.uniform(0, 2 * np.pi, n))
    radii = rng.uniform(rmin, rmax, n)
    return np.c_[cx + radii * np.cos(angles), cy + radii * np.sin(angles)]


def snap(pts, step):
    return np.round(pts / step) * step


def rectilinear(rng, n, step=0.5, lo=-3.0, hi=20.0) -> np.ndarray:
    """Axis-parallel random walk on a grid: many horizontal edges on centre rows, often
    self-overlapping (edges traversed twice, rings touching themselves)."""
    pts = [snap(rng.uniform(lo, hi, 2), step)]
    for i in range(n):
        p = pts[-1].copy()
        p[i % 2] = snap(rng.uniform(lo, hi), step)
        pts.append(p)
    pts.append(np.array([pts[0][0], pts[-1][1]]))
    return np.array(pts)


def make_scene(kind: str, rng, h: int, w: int):
    """A few polygons of one kind; coordinates reach past every border."""
    polys = []
    for _ in range(int(rng.integers(1, 5))):
        cx, cy = rng.uniform(-4, w + 4), rng.uniform(-4, h + 4)
        n = int(rng.integers(3, 16))
        if kind == "star":
            ring = star(rng, cx, cy, 0.5, 0.6 * max(h, w), n)
        elif kind == "centres":  # vertices on pixel centres (k + 0.5)
            ring = np.floor(star(rng, cx, cy, 1, 0.6 * max(h, w), n)) + 0.5
        elif kind == "half_grid":  # vertices on the k/2 grid: centres, edges and corners
            ring = snap(star(rng, cx, cy, 1, 0.6 * max(h, w), n), 0.5)
        elif kind == "quarter_grid":
            ring = snap(rng.uniform(-3, max(h, w) + 3, (n, 2)), 0.25)
        elif kind == "self_intersecting":
            ring = rng.uniform(-5, max(h, w) + 5, (n, 2))
            if rng.random() < 0.5:
                ring = snap(ring, 0.5)
        elif kind == "rectilinear":
            ring = rectilinear(rng, n, lo=-3, hi=max(h, w) + 3)
        elif kind == "holes":
            r_out = rng.uniform(4, 0.6 * max(h, w))
            ext = star(rng, cx, cy, 0.6 * r_out, r_out, n)
            holes = [star(rng, cx, cy, 0.05 * r_out, 0.5 * r_out, int(rng.integers(3, 9)))]
            if rng.random() < 0.5:
                ext, holes = snap(ext, 0.5), [snap(holes[0], 0.5)]
            if rng.random() < 0.3:  # a second, possibly overlapping, hole
                holes.append(snap(star(rng, cx + 1, cy, 0.05 * r_out, 0.4 * r_out, 5), 0.5))
            polys.append(shapely.Polygon(ext, holes))
            continue
        elif kind == "rectilinear_holes":
            ext = rectilinear(rng, n, lo=-3, hi=max(h, w) + 3)
            holes = [rectilinear(rng, int(rng.integers(3, 7)), lo=0, hi=max(h, w))]
            polys.append(shapely.Polygon(ext, holes))
            continue
        else:
            raise AssertionError(kind)
        if rng.random() < 0.5:
            ring = ring[::-1]
        if rng.random() < 0.3:
            ring = np.roll(ring, int(rng.integers(0, len(ring))), axis=0)
        polys.append(shapely.Polygon(ring))
    return polys


KINDS = {
    # kind: number of scenes (each 1-4 polygons; ~2,500 polygons in all)
    "star": 150,
    "centres": 150,
    "half_grid": 200,
    "quarter_grid": 150,
    "self_intersecting": 150,
    "rectilinear": 200,
    "holes": 150,
    "rectilinear_holes": 150,
}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_random_polygons_match_rasterio(kind):
    rng = np.random.default_rng(sorted(KINDS).index(kind) + 1000)
    n_polygons = 0
    for i in range(KINDS[kind]):
        h, w = int(rng.integers(8, 40)), int(rng.integers(8, 40))
        polys = make_scene(kind, rng, h, w)
        dtype = INT_DTYPES[i % len(INT_DTYPES)]
        hi = min(int(np.iinfo(dtype).max), 60000)
        values = rng.integers(1, hi, len(polys))
        assert_same_as_rasterio(polys, values, (h, w), dtype)
        n_polygons += len(polys)
    assert n_polygons >= KINDS[kind]


def test_random_scenes_with_many_overlapping_polygons():
    rng = np.random.default_rng(99)
    for _ in range(20):
        h, w = 64, 96
        polys = [
            shapely.Polygon(snap(star(rng, *rng.uniform(0, [w, h]), 1, 30, 12), 0.5))
            for _ in range(25)
        ]
        assert_same_as_rasterio(polys, 1 + np.arange(25), (h, w))


def test_large_polygon_many_vertices_matches_rasterio():
    rng = np.random.default_rng(5)
    polys = [shapely.Polygon(star(rng, 150, 100, 20, 120, 3000)) for _ in range(2)]
    assert_same_as_rasterio(polys, [3, 9], (200, 300))


coordinate = st.integers(-8, 72).map(lambda v: v / 4)  # quarter grid: exact ties everywhere


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rings=st.lists(
        st.lists(st.tuples(coordinate, coordinate), min_size=3, max_size=9),
        min_size=1,
        max_size=3,
    )
)
def test_property_any_ring_set_matches_rasterio(rings):
    polygon = shapely.Polygon(rings[0], rings[1:])
    assert_same_as_rasterio([polygon], [1], (16, 16))


@settings(max_examples=60, deadline=None)
@given(
    ring=st.lists(st.tuples(coordinate, coordinate), min_size=3, max_size=8),
    dx=st.integers(-5, 5),
    dy=st.integers(-5, 5),
)
def test_property_integer_translation_shifts_the_mask(ring, dx, dy):
    big = (40, 40)
    base = np.array(ring) + 12
    a = mask_of(shapely.Polygon(base), big)
    b = mask_of(shapely.Polygon(base + [dx, dy]), big)
    np.testing.assert_array_equal(np.roll(a, (dy, dx), axis=(0, 1)), b)


# --------------------------------------------------------------------------------------------
# API
# --------------------------------------------------------------------------------------------


def test_polygons_to_arrays_layout():
    polys = [
        box(0, 0, 4, 4),
        shapely.Polygon(),
        box(0, 0, 9, 9, [[(1, 1), (2, 1), (2, 2)], [(5, 5), (6, 5), (6, 6), (5, 6)]]),
    ]
    coords, rings, polygons = kernel.polygons_to_arrays(polys)
    assert coords.dtype == np.float64 and coords.shape == (5 + 5 + 4 + 5, 2)
    assert rings.dtype == np.int64 and rings.tolist() == [0, 5, 10, 14, 19]
    assert polygons.dtype == np.int64 and polygons.tolist() == [0, 1, 1, 4]
    np.testing.assert_array_equal(coords[10:14], [(1, 1), (2, 1), (2, 2), (1, 1)])
    # without holes (fast path) and from an ndarray
    coords, rings, polygons = kernel.polygons_to_arrays(np.array(polys[:2], dtype=object))
    assert rings.tolist() == [0, 5] and polygons.tolist() == [0, 1, 1]
    coords, rings, polygons = kernel.polygons_to_arrays([])
    assert coords.shape == (0, 2) and rings.tolist() == [0] and polygons.tolist() == [0]
    with pytest.raises(TypeError):
        kernel.polygons_to_arrays([shapely.MultiPolygon([box(0, 0, 1, 1)])])
    with pytest.raises(TypeError):
        kernel.polygons_to_arrays([shapely.Point(0, 0)])


def test_polygons_to_arrays_drops_z():
    poly = shapely.Polygon([(0, 0, 5), (4, 0, 5), (4, 4, 5)])
    coords, _, _ = kernel.polygons_to_arrays([poly])
    assert coords.shape == (4, 2)


def test_burn_polygons_validates_its_arguments():
    coords = np.array([[0, 0], [4, 0], [4, 4]], np.float64)
    rings, polys = np.array([0, 3]), np.array([0, 1])
    with pytest.raises(TypeError):
        kernel.burn_polygons(np.zeros((4, 4), np.float32), coords, rings, polys, [1])
    with pytest.raises(ValueError):
        kernel.burn_polygons(np.zeros(4, np.uint8), coords, rings, polys, [1])
    with pytest.raises(ValueError):
        kernel.burn_polygons(np.zeros((4, 4), np.uint8).T, coords, rings, polys, [1])
    with pytest.raises(ValueError):
        kernel.burn_polygons(np.zeros((4, 4), np.uint8), coords, rings, polys, [1, 2])
    with pytest.raises(ValueError):
        kernel.burn_polygons(np.zeros((4, 4), np.uint8), coords, [0, 9], polys, [1])
    with pytest.raises(ValueError):
        kernel.burn_polygons(np.zeros((4, 4), np.uint8), coords, rings, [0, 2], [1])
    with pytest.raises(ValueError):
        kernel.burn_polygons(np.zeros((4, 4), np.uint8), coords[:, :1], rings, polys, [1])
    out = np.zeros((4, 4), np.uint8)
    assert kernel.burn_polygons(out, coords[:0], [0], [0], []) is out
    assert not out.any()


def test_row_bands_compose_to_the_full_burn():
    rng = np.random.default_rng(3)
    polys = make_scene("half_grid", rng, 30, 30) + make_scene("rectilinear", rng, 30, 30)
    coords, rings, pro = kernel.polygons_to_arrays(polys)
    values = np.arange(1, len(polys) + 1, dtype=np.uint8)
    full = kernel_burn(polys, values, (30, 30))
    banded = np.zeros((30, 30), np.uint8)
    for a, b in [(0, 7), (7, 8), (8, 21), (21, 30)]:
        kernel._burn_kernel(banded, coords, rings, pro, values, a, b, 0)
    np.testing.assert_array_equal(banded, full)


@pytest.mark.parametrize("offset", [1, 3])
def test_column_offset_burns_the_image_beside_the_row_prefix(offset):
    """With column_offset k the image is out[:, k:], pixel for pixel the plain burn, clipped
    at the same edges, and the k prefix columns keep what they held."""
    rng = np.random.default_rng(5)
    polys = make_scene("half_grid", rng, 30, 30) + make_scene("rectilinear", rng, 30, 30)
    polys.append(shapely.box(-5, 2, 40, 6))  # reaches past both sides
    coords, rings, pro = kernel.polygons_to_arrays(polys)
    values = np.arange(1, len(polys) + 1, dtype=np.uint8)
    full = kernel_burn(polys, values, (30, 30))
    padded = np.zeros((30, 30 + offset), np.uint8)
    padded[:, :offset] = 77
    kernel.burn_polygons(padded, coords, rings, pro, values, column_offset=offset)
    np.testing.assert_array_equal(padded[:, offset:], full)
    assert (padded[:, :offset] == 77).all()
    with pytest.raises(ValueError, match="column_offset"):
        kernel.burn_polygons(padded, coords, rings, pro, values, column_offset=31 + offset)


def test_needs_reference():
    assert not kernel.needs_reference(np.array([[0.0, 0.0], [1e9, -1e9]]))
    assert not kernel.needs_reference(np.empty((0, 2)))
    assert kernel.needs_reference(np.array([[0.0, 3e9]]))
    assert kernel.needs_reference(np.array([[-(2.0**31), 0.0]]))
    assert kernel.needs_reference(np.array([[np.nan, 0.0]]))
    assert kernel.needs_reference(np.array([[np.inf, 0.0]]))


def test_huge_coordinates_are_flagged_where_gdal_overflows():
    # GDAL skips this polygon (its max row overflows a C int); the kernel paints it.
    poly = shapely.Polygon([(2, 2), (10, 3e9), (1, 9)])
    coords, _, _ = kernel.polygons_to_arrays([poly])
    assert kernel.needs_reference(coords)
    assert not rasterio_burn([poly], [1], (12, 12)).any()
    assert mask_of(poly, (12, 12)).any()


def test_warm_up_compiles_common_dtypes():
    kernel.warm_up()
    for dtype in (np.uint8, np.uint16, np.int32):
        sigs = [s[0].dtype for s in kernel._burn_kernel.signatures]
        assert np.dtype(dtype) in [np.dtype(str(t)) for t in sigs]


def test_concurrent_calls_from_threads_are_independent():
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(11)
    scenes = [make_scene("holes", rng, 64, 64) for _ in range(8)]
    expected = [kernel_burn(polys, np.arange(1, len(polys) + 1), (64, 64)) for polys in scenes]
    with ThreadPoolExecutor(4) as pool:
        got = list(
            pool.map(lambda ps: kernel_burn(ps, np.arange(1, len(ps) + 1), (64, 64)), scenes * 4)
        )
    for i, out in enumerate(got):
        np.testing.assert_array_equal(out, expected[i % len(scenes)])
