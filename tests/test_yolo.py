"""polyburn.formats.yolo: label lines parsed back, burned with polyburn's own burn, against the
instance mask ``build_masks`` burns for the same item (pure; no Prefect)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import shapely
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from polyburn.dataloop_json import parse_item
from polyburn.formats.yolo import (
    MIN_PART_AREA,
    class_names,
    data_yaml,
    label_lines,
    mask_region,
    single_ring,
    visible_regions,
)
from polyburn.geometry import repair_item
from polyburn.instances import number_instances
from polyburn.masks import build_masks
from polyburn.model import Annotation
from polyburn.raster import burn_geometries, order_shapes
from tests.support.generate import LABELS as GENERATED_LABELS
from tests.support.generate import make_item, star_ring
from tests.support.oracle import crossing_oracle
from tests.test_masks import item_with

LABELS = {"building": 1, "car": 2, "tree": 3}
ENGINES = ("kernel", "rasterio")
TIE = 1e-3  # px: a centre this close to a region's boundary is a tie (6-decimal rounding moves
# a vertex by at most 0.5e-6 x the image side)
COVERAGE: dict[str, list[float]] = {}  # per test: each object's covered fraction (summary)


@pytest.fixture(scope="module", autouse=True)
def _coverage_summary():
    yield
    for test, fractions in sorted(COVERAGE.items()):
        print(f"\n{test}: {len(fractions)} object burns, min coverage {min(fractions):.6f}", end="")


def box(x0, y0, x1, y1):
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


def yolo_of(item, label_map=LABELS, instance_ids="object", order="file"):
    """The item's instance masks, its visible regions and its label file text."""
    shapes, _, _ = repair_item(item)
    masks = build_masks(
        item, shapes, ["instance"], label_map, np.dtype(np.uint8), order, instance_ids
    )
    ordered = order_shapes(shapes, order)
    ids, _, _ = number_instances(ordered, instance_ids)
    regions = visible_regions(ordered, ids)
    text = label_lines(regions, masks.instance_table, label_map, item.width, item.height)
    return masks, regions, text


def parse(text, width, height):
    """(class index, (N, 2) ring in pixels) per line."""
    lines = []
    for line in text.splitlines():
        class_index, *numbers = line.split(" ")
        ring = np.array(numbers, dtype=np.float64).reshape(-1, 2) * [width, height]
        lines.append((int(class_index), ring))
    return lines


def burn_ring(ring, height, width, engine):
    out = np.zeros((height, width), np.uint8)
    burn_geometries(out, [(shapely.Polygon(ring), 1)], engine)
    return out.astype(bool)


def centres(pixels):
    rows, cols = np.nonzero(pixels)
    return shapely.points(cols + 0.5, rows + 0.5)


def check(
    item, label_map=LABELS, instance_ids="object", order="file", exact=True, min_coverage=0.0
):
    """Every line burned back covers its object's instance pixels and nothing else; returns
    {instance id: ring}. ``exact``: no pixel may differ at all; otherwise only pixels whose
    centre is within TIE of the region's boundary (ties) may, and the line must still cover
    ``min_coverage`` of the object's pixels."""
    masks, regions, text = yolo_of(item, label_map, instance_ids, order)
    h, w = item.height, item.width
    image = shapely.box(0, 0, w, h)  # a region may lie outside the image: no line
    visible = [i for i in sorted(regions) if regions[i].intersection(image).area >= MIN_PART_AREA]
    lines = parse(text, w, h)
    assert len(lines) == len(visible)
    assert set(np.unique(masks.instance).tolist()) - {0} <= set(visible)
    names = class_names(label_map)
    label_of = {row["id"]: row["label"] for row in masks.instance_table}
    rings = {}
    for (class_index, ring), instance in zip(lines, visible, strict=True):
        assert names[class_index] == label_of[instance]
        mine = masks.instance == instance
        for engine in ENGINES:
            burned = burn_ring(ring, h, w, engine)
            missing, spill = mine & ~burned, burned & ~mine
            if mine.any():
                test = os.environ["PYTEST_CURRENT_TEST"].split("::")[-1].split(" ")[0]
                fraction = float((mine & burned).sum() / mine.sum())
                COVERAGE.setdefault(test.split("[")[0] + grid_of(item), []).append(fraction)
            if exact:
                assert not missing.any() and not spill.any(), (instance, engine)
                continue
            boundary = regions[instance].boundary
            for wrong in (missing, spill):
                untied = shapely.distance(centres(wrong), boundary) >= TIE
                assert not untied.any(), (instance, engine, np.argwhere(wrong)[untied])
            if mine.any():
                assert (mine & burned).sum() >= min_coverage * mine.sum(), (instance, engine)
        rings[instance] = ring
    return rings


def grid_of(item):
    """What the item's vertices are, for the summary."""
    rings = [r for a in item.annotations for r in a.rings]
    if all((np.round(r) == r).all() for r in rings):
        return " (integer vertices)"
    if all((np.round(2 * r) == 2 * r).all() for r in rings):
        return " (half-integer vertices)"
    return " (float vertices)"


def winding_oracle(ring, height, width):
    """bool mask: the pixel centres with a nonzero winding number around the ring."""
    cy, cx = np.mgrid[0:height, 0:width].astype(np.float64) + 0.5
    winding = np.zeros((height, width), dtype=np.int64)
    x0, y0 = ring[:, 0], ring[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    for a, b, c, d in zip(x0, y0, x1, y1, strict=True):
        if b == d:
            continue
        x_at = a + (cy - b) * (c - a) / (d - b)
        up = (b <= cy) & (cy < d) & (cx < x_at)
        down = (d <= cy) & (cy < b) & (cx < x_at)
        winding += up.astype(np.int64) - down
    return winding != 0


# ------------------------------------------------------------------------------ objects
def test_a_donut_is_one_ring_through_a_bridge_and_keeps_its_hole():
    item = item_with(("building", [box(2, 2, 18, 16), box(6, 5, 12, 11)], 1), width=40, height=30)
    ring = check(item)[1]
    assert len(ring) == 4 + 4 + 2  # exterior, hole, and the bridge's two returns
    hole = np.zeros((30, 40), bool)
    hole[5:11, 6:12] = True
    for engine in ENGINES:
        assert not (burn_ring(ring, 30, 40, engine) & hole).any()
    # the ring fills the same pixels by even-odd and by nonzero winding
    expected = np.zeros((30, 40), bool)
    expected[2:16, 2:18] = True
    expected &= ~hole
    assert (crossing_oracle([ring], 30, 40) == expected).all()
    assert (winding_oracle(ring, 30, 40) == expected).all()


def test_a_two_part_object_is_one_line():
    item = item_with(
        ("car", [box(22, 3, 27, 9)], 2),
        ("car", [box(31, 3, 38, 9)], 2),
        ("tree", [box(1, 1, 5, 5)], 3),
        width=40,
        height=30,
    )
    rings = check(item)
    assert sorted(rings) == [2, 3]
    assert shapely.Polygon(rings[2]).area == pytest.approx(30 + 42, rel=1e-4)


def test_an_occluded_object_loses_what_later_objects_draw_over_it():
    item = item_with(
        ("building", [box(2, 2, 18, 16)], 1),
        ("tree", [box(14, 12, 26, 24)], 5),  # over the building's corner
        width=40,
        height=30,
    )
    rings = check(item)
    assert shapely.Polygon(rings[1]).area == pytest.approx(16 * 14 - 4 * 4, rel=1e-4)
    assert shapely.Polygon(rings[5]).area == pytest.approx(12 * 12, rel=1e-4)


def test_an_object_cut_in_two_by_an_occluder_is_one_line_of_two_parts():
    item = item_with(
        ("car", [box(2, 4, 30, 12)], 2),
        ("tree", [box(14, 0, 17, 30)], 3),  # a pole across the car
        width=40,
        height=30,
    )
    masks, regions, _ = yolo_of(item)
    assert regions[2].geom_type == "MultiPolygon" and len(regions[2].geoms) == 2
    rings = check(item)
    assert shapely.Polygon(rings[2]).area == pytest.approx((28 - 3) * 8, rel=1e-4)


def test_a_hidden_object_gets_no_line():
    item = item_with(
        ("car", [box(5, 5, 10, 10)], 2),
        ("building", [box(2, 2, 8, 20)], 1),  # two later shapes that hide it together
        ("tree", [box(8, 2, 20, 20)], 3),
        width=40,
        height=30,
    )
    masks, regions, text = yolo_of(item)
    assert regions[2].is_empty and 2 not in masks.instance
    assert [line.split()[0] for line in text.splitlines()] == ["0", "2"]
    assert sorted(check(item)) == [1, 3]


def test_later_parts_of_the_same_object_add_to_it_and_shape_ids_split_them():
    # car 5 = A and C (drawn first and last), tree 3 between them, over A's middle
    a, b, c = box(0, 0, 12, 12), box(4, 4, 16, 16), box(6, 6, 9, 9)
    item = item_with(("car", [a], 5), ("tree", [b], 3), ("car", [c], 5), width=20, height=20)
    by_object = check(item, instance_ids="object")
    assert sorted(by_object) == [3, 5]
    assert shapely.Polygon(by_object[5]).area == pytest.approx(144 - 64 + 9, rel=1e-4)
    assert shapely.Polygon(by_object[3]).area == pytest.approx(144 - 9, rel=1e-4)
    by_shape = check(item, instance_ids="shape")
    assert sorted(by_shape) == [1, 2, 3]
    assert shapely.Polygon(by_shape[1]).area == pytest.approx(144 - 64, rel=1e-4)
    assert shapely.Polygon(by_shape[3]).area == pytest.approx(9, rel=1e-4)


def test_area_draw_order_is_followed():
    item = item_with(("car", [box(3, 3, 5, 5)], 1), ("tree", [box(0, 0, 10, 10)], 2))
    assert sorted(check(item, order="file")) == [2]
    assert sorted(check(item, order="area")) == [1, 2]


def test_bitmap_annotations_are_traced_exactly_and_occlude_like_shapes():
    ring_mask = np.zeros((30, 40), bool)
    ring_mask[4:20, 10:30] = True
    ring_mask[8:12, 14:18] = False  # a hole
    ring_mask[25, 0] = ring_mask[26, 1] = True  # pixels touching diagonally only
    item = item_with(("car", [box(0, 0, 24, 14)], 2), width=40, height=30)
    item.annotations.append(Annotation("b", "tree", "binary", 1, 7, mask=ring_mask))
    item.annotations.append(
        Annotation("c", "building", "segment", 2, 9, rings=[np.array(box(26, 0, 40, 30), float)])
    )
    rings = check(item)
    assert sorted(rings) == [2, 7, 9]
    assert (mask_region(ring_mask).area, mask_region(np.zeros((3, 3), bool)).is_empty) == (
        ring_mask.sum(),
        True,
    )


def test_objects_reaching_outside_the_image_are_clipped_to_it():
    item = item_with(
        ("car", [[(-5, -3), (20, -8), (46, 12), (10, 40)]], 2),
        ("tree", [box(30, 20, 60, 50)], 3),
        width=40,
        height=30,
    )
    masks, _, text = yolo_of(item)
    numbers = np.array([float(v) for line in text.splitlines() for v in line.split()[1:]])
    assert numbers.min() == 0.0 and numbers.max() == 1.0
    check(item, exact=False)


def test_the_ring_fills_the_region_under_both_rules_with_islands_and_many_holes():
    outer = shapely.Polygon(box(1, 1, 39, 29), [box(3, 3, 15, 15), box(20, 4, 25, 9)])
    island = shapely.Polygon(box(5, 5, 13, 13), [box(7, 7, 9, 9)])  # inside the first hole
    far = shapely.Polygon([(41, 2), (47, 2), (44, 28)])
    region = shapely.MultiPolygon([outer, island, far])
    ring = single_ring(region)
    expected = np.zeros((30, 50), np.uint8)
    burn_geometries(expected, [(region, 1)], "rasterio")
    for engine in ENGINES:
        assert (burn_ring(ring, 30, 50, engine) == expected.astype(bool)).all()
    assert (crossing_oracle([ring], 30, 50) == expected.astype(bool)).all()
    assert (winding_oracle(ring, 30, 50) == expected.astype(bool)).all()
    assert shapely.Polygon(ring).area == pytest.approx(region.area)  # signed: holes negative


@pytest.mark.parametrize("layout", ["speckle", "row"])
def test_a_bitmap_of_many_parts_is_one_ring_that_burns_back_exactly(layout):
    if layout == "speckle":  # hundreds of parts, some touching at corners
        mask = np.random.default_rng(3).random((60, 80)) < 0.15
    else:  # collinear centroids: no Delaunay triangle, the chain connects them
        mask = np.zeros((60, 80), bool)
        mask[30, ::2] = True
    region = mask_region(mask)
    assert len(shapely.get_parts(region)) > 32
    ring = single_ring(region)
    for engine in ENGINES:
        assert (burn_ring(ring, 60, 80, engine) == mask).all()
    assert (crossing_oracle([ring], 60, 80) == mask).all()
    assert (winding_oracle(ring, 60, 80) == mask).all()


def test_no_bridge_lies_on_a_row_of_pixel_centres():
    # the closest vertices of exterior and hole are level on y = 5.5: a horizontal bridge there
    # would be painted by GDAL's horizontal-edge rule
    region = shapely.Polygon(
        [(1, 5.5), (2, 1), (20, 1), (20, 10), (2, 10)], [[(4, 5.5), (8, 3), (12, 5.2), (8, 8)]]
    )
    ring = single_ring(region)
    expected = np.zeros((12, 22), np.uint8)
    burn_geometries(expected, [(region, 1)], "rasterio")
    for engine in ENGINES:
        assert (burn_ring(ring, 12, 22, engine) == expected.astype(bool)).all()
    bridge = [
        (p, q)
        for p, q in zip(ring, np.roll(ring, -1, axis=0), strict=True)
        if (p == (4, 5.5)).all()
    ]
    assert all(p[1] != q[1] for p, q in bridge)


@pytest.mark.parametrize("seed", [0, 1])
def test_a_realistic_item_covers_every_object_to_99_9_percent(seed):
    # 50 star polygons (every tenth with a hole) at 1920 x 1080, overlapping, some reaching out
    data = make_item(np.random.default_rng(seed), seed)
    item = parse_item(data, "d/item")
    label_map = {label: k for k, label in enumerate(GENERATED_LABELS, start=1)}
    rings = check(item, label_map, exact=False, min_coverage=0.999)
    assert len(rings) >= 45


def test_known_limit_a_hole_top_edge_on_a_row_of_centres():
    # GDAL (and the kernel) paints the centres on a hole's horizontal top edge when that edge
    # lies exactly on a row of centres (y = 2.5 here); the ring walks the hole the other way
    # round (so that nonzero winding leaves it empty) and leaves those centres out. Documented
    # in single_ring; 6-decimal rounding usually moves such an edge off the row anyway.
    region = shapely.Polygon(box(1, 1, 12, 9), [box(3.2, 2.5, 8.7, 6.2)])
    ring = single_ring(region)
    expected = np.zeros((10, 14), np.uint8)
    burn_geometries(expected, [(region, 1)], "rasterio")
    top_edge = np.zeros((10, 14), bool)
    top_edge[2, 3:9] = True  # centres (3.5 .. 8.5, 2.5)
    for engine in ENGINES:
        assert (burn_ring(ring, 10, 14, engine) == (expected.astype(bool) & ~top_edge)).all()
    assert (winding_oracle(ring, 10, 14) == crossing_oracle([ring], 10, 14)).all()


OBJECT_IDS = st.sampled_from([1, 2, 3, None])


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),
    specs=st.lists(
        st.tuples(st.sampled_from(sorted(LABELS)), OBJECT_IDS, st.booleans()),
        min_size=1,
        max_size=7,
    ),
    grid=st.sampled_from([0.0, 1.0, 0.5]),
    instance_ids=st.sampled_from(["object", "shape"]),
)
def test_random_items_burn_back_to_their_instance_masks(seed, specs, grid, instance_ids):
    rng = np.random.default_rng(seed)
    width, height = 64, 48
    annotations = []
    for label, object_id, holed in specs:
        cx, cy = rng.uniform(-5, width + 5), rng.uniform(-5, height + 5)
        radius = rng.uniform(3, 24)
        rings = [star_ring(rng, cx, cy, radius, int(rng.integers(3, 13)))]
        if holed:
            rings.append((cx, cy) + (rings[0] - (cx, cy)) * 0.4)
        if grid:  # vertices on a grid: ties, shared edges, degenerate rings to repair
            rings = [np.round(r / grid) * grid for r in rings]
        annotations.append((label, rings, object_id))
    item = item_with(*annotations, width=width, height=height)
    if not repair_item(item)[0]:
        return
    check(item, instance_ids=instance_ids, exact=False)


# ------------------------------------------------------------------------------ text
def test_class_indices_follow_label_map_ids_not_names():
    label_map = {"zebra": 1, "apple": 7, "mango": 3}
    assert class_names(label_map) == ["zebra", "mango", "apple"]
    item = item_with(("apple", [box(0, 0, 4, 4)], 1), ("zebra", [box(5, 5, 9, 9)], 2))
    _, _, text = yolo_of(item, label_map)
    assert [line.split()[0] for line in text.splitlines()] == ["2", "0"]


def test_coordinates_are_normalised_with_six_decimals():
    item = item_with(("car", [[(1, 2), (7.3333333, 2), (5, 6.1234567)]], 1), width=9, height=7)
    _, _, text = yolo_of(item)
    assert text.endswith("\n") and text.count("\n") == 1
    class_index, *numbers = text.split()
    assert class_index == "1"
    assert all(re.fullmatch(r"[01]\.\d{6}", n) for n in numbers)
    values = np.array(numbers, float).reshape(-1, 2)
    assert ((values >= 0) & (values <= 1)).all()
    expected = {(round(1 / 9, 6), round(2 / 7, 6)), (round(7.3333333 / 9, 6), round(2 / 7, 6))}
    assert expected <= {tuple(v) for v in values.tolist()}
    assert label_lines({}, [], LABELS, 9, 7) == ""


def test_data_yaml_reads_back_as_ultralytics_expects():
    names = ["car", "yes", "1", "a: b", 'say "hi"', "ünïcode", "tab\there", "#x", "\x7f\u2028"]
    splits = {"val": ["images/b.jpg"], "train": ["images/a.jpg", "images/c d.jpg"], "test": []}
    text = data_yaml(names, splits)
    data = yaml.safe_load(text)
    assert data == {
        "train": ["images/a.jpg", "images/c d.jpg"],
        "val": ["images/b.jpg"],
        "test": [],
        "names": dict(enumerate(names)),
    }
    assert list(data) == ["train", "val", "test", "names"]
    assert yaml.safe_load(data_yaml([], {"train": []})) == {"train": [], "names": {}}
    with pytest.raises(ValueError, match="validation"):
        data_yaml(names, {"validation": []})


@given(names=st.lists(st.text(), max_size=5), paths=st.lists(st.text(min_size=1), max_size=5))
def test_data_yaml_quotes_any_text(names, paths):
    data = yaml.safe_load(data_yaml(names, {"train": paths, "val": paths}))
    assert data["names"] == dict(enumerate(names))
    assert data["train"] == data["val"] == paths


# ------------------------------------------------------------------------ the format, end to end
@pytest.mark.usefixtures("prefect_api")
def test_a_yolo_run_writes_label_files_that_burn_back_to_its_instance_masks(tmp_path):
    """``--mode instance,yolo`` on the example export: a label file per image item and per
    written frame of the video, each line burning back (polyburn's rule) onto its object's
    pixels of the instance mask written in the same run, and data.yaml with the class names
    and the ML subsets' image lists."""
    from flows.polygons_to_masks import polygons_to_masks_params
    from polyburn.encode import decode_mask
    from polyburn.params import MaskOptions, RunParameters
    from tests.support.oracle import EXAMPLES

    dest = tmp_path / "masks"
    options = MaskOptions(modes=["instance", "yolo"])
    summary = polygons_to_masks_params(
        RunParameters(source=str(EXAMPLES / "export"), destination=str(dest), options=options)
    )
    assert summary["failed"] == 0
    label_map = json.loads((dest / "label_map.json").read_text())
    names = class_names(label_map)
    manifest = (dest / "manifest.jsonl").read_text().splitlines()
    records = {r["path"]: r for r in map(json.loads, manifest)}
    burned = 0
    for path, record in records.items():
        labels = sorted(o["key"] for o in record["outputs"] if o["key"].startswith("yolo/labels/"))
        masks = sorted(o["key"] for o in record["outputs"] if o["key"].startswith("instance/"))
        if record.get("video"):
            first, last = record["video"]["frames"]
            assert len(labels) == last - first + 1  # one per frame written
        else:
            assert labels == [f"yolo/labels/{path}.txt"]
        for label_key in labels:
            stem = label_key[len("yolo/labels/") : -len(".txt")]
            instance = decode_mask((dest / f"instance/{stem}.png").read_bytes(), "png")
            assert f"instance/{stem}.png" in masks
            table = json.loads((dest / f"instance/{stem}.json").read_text())["instances"]
            label_of = {row["id"]: row["label"] for row in table}
            lines = parse((dest / label_key).read_text(), instance.shape[1], instance.shape[0])
            present = [k for k in np.unique(instance) if k]
            assert len(lines) == len(present)  # an object with no visible pixel has no line
            for (class_index, ring), k in zip(lines, sorted(present), strict=True):
                assert names[class_index] == label_of[k]
                drawn = burn_ring(ring, *instance.shape, "kernel")
                pixels = instance == k
                boundary = shapely.Polygon(ring).boundary
                wrong = [  # centres on the ring (ties, the example's half-pixel edges) aside
                    (r, c)
                    for r, c in zip(*np.nonzero(drawn != pixels), strict=True)
                    if boundary.distance(shapely.Point(c + 0.5, r + 0.5)) > TIE
                ]
                missed = sum(1 for r, c in wrong if pixels[r, c])
                assert missed <= 0.001 * pixels.sum(), (stem, k)
                assert len(wrong) - missed <= 0.001 * pixels.sum(), (stem, k)
                burned += 1
    assert burned > 20

    data = yaml.safe_load((dest / "yolo/data.yaml").read_text())
    assert data["names"] == dict(enumerate(names))
    assert data["train"] == ["train.txt"] and data["val"] == ["val.txt"]
    for split, subset in (("train", "train"), ("val", "validation"), ("test", "test")):
        listed = (dest / f"yolo/{split}.txt").read_text().splitlines()
        wanted = []
        for path, record in sorted(records.items()):
            if record.get("subset") != subset:
                continue
            if record.get("video"):
                first, last = record["video"]["frames"]
                wanted += [f"./images/{path}/{f:06d}.jpg" for f in range(first, last + 1)]
            else:
                wanted.append(f"./images/{path}{Path(record['file_name']).suffix}")
        assert listed == wanted
    splits = ("train", "val", "test")
    assert sum(len((dest / f"yolo/{s}.txt").read_text().splitlines()) for s in splits) > 0
    assert summary["outputs_written"] > 0
