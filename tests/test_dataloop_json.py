"""Parsing the Dataloop JSON variants into items and annotations."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from polyburn.dataloop_json import decode_json, object_id, parse_item
from polyburn.errors import ItemError


def item_json(annotations, width=10, height=8, **extra):
    data = {
        "id": "i1",
        "filename": "/d/a.jpg",
        "metadata": {"system": {"width": width, "height": height}},
    }
    data["annotations"] = annotations
    data.update(extra)
    return data


def seg(label="car", rings=None, **extra):
    rings = rings if rings is not None else [[(1, 1), (5, 1), (5, 5)]]
    return {
        "id": f"a-{label}",
        "type": "segment",
        "label": label,
        "coordinates": [[{"x": x, "y": y, "z": 0} for x, y in r] for r in rings],
        **extra,
    }


def png_uri(mask: np.ndarray, mode="RGBA") -> str:
    if mode == "RGBA":
        rgba = np.zeros(mask.shape + (4,), np.uint8)
        rgba[mask] = (10, 200, 30, 255)
        image = Image.fromarray(rgba, "RGBA")
    else:
        image = Image.fromarray(mask.astype(np.uint8) * 255, "L")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_rings_are_all_kept_ring_zero_exterior():
    item = parse_item(
        item_json([seg(rings=[[(0, 0), (9, 0), (9, 7)], [(5, 1), (8, 1), (8, 4)]])]), "d/a"
    )
    (a,) = item.annotations
    assert len(a.rings) == 2
    assert a.rings[0].tolist() == [[0, 0], [9, 0], [9, 7]]
    assert a.rings[1].shape == (3, 2)


def test_id_and_underscore_id_and_legacy_flat_coordinates():
    legacy = {
        "_id": "old",
        "type": "segment",
        "label": "car",
        "coordinates": [{"x": 1, "y": 1}, {"x": 4, "y": 1}, {"x": 4, "y": 4}],
    }
    data = item_json([legacy])
    data["_id"] = data.pop("id")
    item = parse_item(data, "d/a")
    assert item.item_id == "i1"
    assert item.annotations[0].annotation_id == "old"
    assert item.annotations[0].rings[0].shape == (3, 2)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (3, 3),
        ("7", 7),
        (" 12 ", 12),
        (None, None),
        ("abc", None),
        (True, None),
        (2.0, 2),
        (2.5, None),
    ],
)
def test_object_id_forms(raw, expected):
    assert object_id(raw) == expected


def test_object_id_read_from_metadata_system():
    annotations = [
        seg(metadata={"system": {"objectId": "5"}}),
        seg("b"),
        seg("c", metadata={"system": {"objectId": 9}}),
    ]
    item = parse_item(item_json(annotations), "d/a")
    assert [a.object_id for a in item.annotations] == [5, None, 9]


def test_an_object_id_that_is_no_whole_number_is_kept_as_text_not_rejected():
    annotations = [
        seg("a", metadata={"system": {"objectId": "car-1"}}),
        seg("b", metadata={"system": {"objectId": 2.5}}),
        seg("c", metadata={"system": {"objectId": {"id": "x" * 50}}}),
        seg("d", metadata={"system": {"objectId": -3}}),
        seg("e", metadata={"system": {"objectId": None}}),
    ]
    item = parse_item(item_json(annotations), "d/a")
    assert not item.problems and len(item.annotations) == 5
    assert [a.object_id for a in item.annotations] == [None, None, None, -3, None]
    assert [a.bad_object_id for a in item.annotations] == [
        '"car-1"',
        "2.5",
        '{"id": "' + "x" * 31 + "…",  # 40 characters
        None,
        None,
    ]


def test_other_types_are_skipped_and_counted():
    annotations = [
        seg(),
        {"type": "box", "label": "car", "coordinates": []},
        {"type": "box", "label": "car"},
        {"type": "class", "label": "x"},
        {"type": "point", "label": "p", "coordinates": {"x": 1, "y": 1}},
    ]
    item = parse_item(item_json(annotations), "d/a")
    assert len(item.annotations) == 1
    assert item.skipped == {"box": 2, "class": 1, "point": 1}


def test_polyburn_output_is_never_read_back():
    mine = {
        "type": "binary",
        "label": "car",
        "coordinates": png_uri(np.ones((8, 10), bool)),
        "metadata": {"user": {"polyburn": {"run": "x"}}},
    }
    item = parse_item(item_json([seg(), mine]), "d/a")
    assert len(item.annotations) == 1
    assert item.skipped == {"binary (written by polyburn)": 1}


def test_binary_png_alpha_threshold_and_size():
    mask = np.zeros((8, 10), bool)
    mask[2:4, 3:6] = True
    item = parse_item(
        item_json([{"type": "binary", "label": "car", "id": "b", "coordinates": png_uri(mask)}]),
        "d/a",
    )
    assert (item.annotations[0].mask == mask).all()
    dict_form = {"type": "binary", "label": "car", "coordinates": {"data": png_uri(mask, "L")}}
    item = parse_item(item_json([dict_form]), "d/a")
    assert (item.annotations[0].mask == mask).all()


def test_broken_annotations_become_problems_not_exceptions():
    annotations = [
        "not an object",
        {"type": "segment", "coordinates": [[{"x": 1, "y": 1}]]},  # no label
        {"type": "segment", "label": "car", "coordinates": "nope"},
        {"type": "segment", "label": "car", "coordinates": [[1, 2, 3]]},
        {"type": "binary", "label": "car", "coordinates": "data:image/png;base64,AAAA"},
        {"type": "binary", "label": "car", "coordinates": png_uri(np.ones((3, 3), bool))},
        {"label": "car"},
        seg(),
    ]
    item = parse_item(item_json(annotations), "d/a")
    assert len(item.annotations) == 1
    reasons = [p.reason for p in item.problems]
    assert len(reasons) == 7
    assert "must be an object" in reasons[0]
    assert "label" in reasons[1]
    assert "no coordinates" in reasons[2]
    assert "not an {x, y} object" in reasons[3]
    assert "cannot be decoded" in reasons[4]
    assert "3x3" in reasons[5] and "10x8" in reasons[5]
    assert "type" in reasons[6]


def test_non_numeric_vertices_become_nan_for_the_repair_step():
    item = parse_item(
        item_json([seg(rings=[[(1, 1), (None, 2), ("x", 3), (5, 5), (1, 5)]])]), "d/a"
    )
    ring = item.annotations[0].rings[0]
    assert np.isnan(ring[1:3]).any(axis=1).all() and np.isfinite(ring[[0, 3, 4]]).all()


@pytest.mark.parametrize(
    ("system", "message"),
    [
        ({"height": 8}, "width is missing"),
        ({"width": 0, "height": 8}, "positive integer"),
        ({"width": -3, "height": 8}, "positive integer"),
        ({"width": 2.5, "height": 8}, "integer"),
        ({"width": "abc", "height": 8}, "number"),
        ({"width": [1], "height": 8}, "number"),
        ({"width": 20000, "height": 20000}, "exceeds max_pixels"),
    ],
)
def test_item_size_problems_fail_the_item_with_the_field(system, message):
    data = item_json([seg()])
    data["metadata"]["system"] = system
    with pytest.raises(ItemError) as info:
        parse_item(data, "d/a", max_pixels=100_000_000)
    assert message in str(info.value)
    assert str(info.value).startswith("d/a [metadata.system")


def test_sizes_as_digit_strings_are_accepted():
    data = item_json([seg()])
    data["metadata"]["system"] = {"width": "10", "height": 8.0}
    item = parse_item(data, "d/a")
    assert (item.width, item.height) == (10, 8)


def test_decode_json_errors_are_one_line():
    with pytest.raises(ItemError, match=r"^x: invalid or truncated JSON"):
        decode_json(b'{"id": "a", "annotations": [', "x")
    with pytest.raises(ItemError, match="not UTF-8"):
        decode_json(b'{"id": "\xff"}', "x")
    assert decode_json("\ufeff{}".encode(), "x") == {}
    with pytest.raises(ItemError, match="must be an object"):
        parse_item(json.loads("[1, 2]"), "x")


def test_revision_changes_with_annotations_only():
    a = parse_item(item_json([seg()]), "d/a")
    b = parse_item(item_json([seg()], extra_field=1), "d/a")
    c = parse_item(item_json([seg(rings=[[(1, 1), (5, 1), (5, 6)]])]), "d/a")
    assert a.revision == b.revision != c.revision
