"""Mask modes, draw order and id ranges (pure; no Prefect)."""

from __future__ import annotations

import numpy as np
import pytest

from polyburn.dataloop_json import parse_item
from polyburn.errors import ItemError
from polyburn.geometry import repair_item
from polyburn.masks import build_masks
from polyburn.model import Annotation, Item

SQUARE_A = [(0, 0), (6, 0), (6, 6), (0, 6)]
SQUARE_B = [(2, 2), (8, 2), (8, 8), (2, 8)]  # overlaps A on [2,6)x[2,6)
TINY = [(3, 3), (5, 3), (5, 5), (3, 5)]


def item_with(*specs, width=10, height=10):
    annotations = []
    for i, (label, rings, *oid) in enumerate(specs):
        annotations.append(
            Annotation(
                f"a{i}",
                label,
                "segment",
                i,
                oid[0] if oid else None,
                rings=[np.asarray(r, float) for r in rings],
            )
        )
    return Item("item-1", "d/x", width, height, annotations)


def masks_of(item, modes, label_map, order="file", dtype=np.uint8):
    shapes, _, _ = repair_item(item)
    return build_masks(item, shapes, modes, label_map, np.dtype(dtype), order)


def test_semantic_later_wins_and_ignore_id():
    item = item_with(("car", [SQUARE_A]), ("void", [SQUARE_B]))
    m = masks_of(item, ["semantic"], {"car": 1, "void": 255}).semantic
    assert m.dtype == np.uint8
    assert m[0, 0] == 1 and m[3, 3] == 255 and m[7, 7] == 255 and m[9, 0] == 0
    assert (m == 1).sum() == 36 - 16


def test_area_order_keeps_small_objects_on_top():
    item = item_with(("small", [TINY]), ("big", [SQUARE_A]))
    file_order = masks_of(item, ["semantic"], {"small": 1, "big": 2}).semantic
    area_order = masks_of(item, ["semantic"], {"small": 1, "big": 2}, order="area").semantic
    assert (file_order == 1).sum() == 0  # the big square drawn later covers the small one
    assert (area_order == 1).sum() == 4


def masks_with_ids(item, modes, label_map, instance_ids, order="file"):
    shapes, _, _ = repair_item(item)
    return build_masks(item, shapes, modes, label_map, np.dtype(np.uint8), order, instance_ids)


def test_shape_instance_ids_number_shapes_in_draw_order():
    item = item_with(("car", [SQUARE_A], 7), ("car", [SQUARE_B]), ("person", [TINY], 3))
    m = masks_with_ids(item, ["instance"], {"car": 1, "person": 2}, "shape")
    assert m.instance.dtype == np.uint16
    assert m.instance[0, 0] == 1 and m.instance[7, 7] == 2 and m.instance[3, 3] == 3
    assert m.instance_table == [
        {"id": 1, "object_id": 7, "label": "car", "annotations": ["a0"]},
        {"id": 2, "object_id": None, "label": "car", "annotations": ["a1"]},
        {"id": 3, "object_id": 3, "label": "person", "annotations": ["a2"]},
    ]
    assert m.repairs == []


def test_object_ids_by_default_parts_of_one_object_share_its_id():
    # A car split in two by a pole is one car (objectId 7); a person without an objectId gets
    # the next id above the item's largest objectId.
    item = item_with(
        ("car", [[(0, 0), (3, 0), (3, 4), (0, 4)]], 7),
        ("pole", [[(3, 0), (4, 0), (4, 10), (3, 10)]], 2),
        ("car", [[(4, 0), (7, 0), (7, 4), (4, 4)]], 7),
        ("person", [[(7, 6), (9, 6), (9, 9), (7, 9)]]),
    )
    m = masks_of(item, ["instance"], {"car": 1, "pole": 2, "person": 3})
    expected = np.zeros((10, 10), np.uint16)
    expected[0:4, 0:3] = 7
    expected[:, 3] = 2
    expected[0:4, 4:7] = 7
    expected[6:9, 7:9] = 8
    assert m.instance.dtype == np.uint16
    assert (m.instance == expected).all()
    assert m.instance_table == [
        {"id": 2, "object_id": 2, "label": "pole", "annotations": ["a1"]},
        {"id": 7, "object_id": 7, "label": "car", "annotations": ["a0", "a2"]},
        {"id": 8, "object_id": None, "label": "person", "annotations": ["a3"]},
    ]
    assert m.repairs == []


def test_draw_order_decides_between_objects_not_within_one():
    # car 5 = SQUARE_A + TINY (drawn first and last), person 3 = SQUARE_B drawn between them
    item = item_with(("car", [SQUARE_A], 5), ("person", [SQUARE_B], 3), ("car", [TINY], 5))
    label_map = {"car": 1, "person": 2}
    m = masks_of(item, ["instance", "semantic"], label_map)
    expected = np.zeros((10, 10), np.uint16)
    expected[0:6, 0:6] = 5
    expected[2:8, 2:8] = 3
    expected[3:5, 3:5] = 5
    assert (m.instance == expected).all()
    # the instance of every pixel has the label of its semantic id
    label_of = {row["id"]: label_map[row["label"]] for row in m.instance_table}
    assert (np.vectorize(lambda k: label_of.get(k, 0))(m.instance) == m.semantic).all()


def test_unusable_and_conflicting_object_ids_get_fresh_ids_and_are_reported():
    """Twelve 1-pixel-wide columns, one per annotation, so every id shows in row 0."""

    def column(x, label, *object_id):
        annotation = {
            "id": f"a{x}",
            "type": "segment",
            "label": label,
            "coordinates": [
                [{"x": x, "y": 0}, {"x": x + 1, "y": 0}, {"x": x + 1, "y": 3}, {"x": x, "y": 3}]
            ],
        }
        if object_id:
            annotation["metadata"] = {"system": {"objectId": object_id[0]}}
        return annotation

    data = {
        "metadata": {"system": {"width": 12, "height": 3}},
        "annotations": [
            column(0, "car", "abc"),
            column(1, "car", 3),  # objectId 3 is a car and a road: not merged across labels
            column(2, "car", 0),
            column(3, "road", "3"),
            column(4, "car", -4),
            column(5, "car", 3),  # the other car part of objectId 3: one instance with a1
            column(6, "car", 70000),
            column(7, "car", 2.5),
            column(8, "car", True),
            column(9, "person", "7"),
            column(10, "person"),
            column(11, "person", " 7 "),
        ],
    }
    item = parse_item(data, "d/bad")
    shapes, _, problems = repair_item(item)
    assert not problems and not item.problems and len(shapes) == 12  # nothing dropped
    m = build_masks(item, shapes, ["instance"], {"car": 1, "road": 2, "person": 3}, np.uint8)
    assert m.instance[0].tolist() == [8, 9, 10, 11, 12, 9, 13, 14, 15, 7, 16, 7]
    assert (m.instance == m.instance[0]).all()
    assert m.instance_table == [
        {"id": 7, "object_id": 7, "label": "person", "annotations": ["a9", "a11"]},
        {"id": 8, "object_id": None, "label": "car", "annotations": ["a0"]},
        {"id": 9, "object_id": 3, "label": "car", "annotations": ["a1", "a5"]},
        {"id": 10, "object_id": 0, "label": "car", "annotations": ["a2"]},
        {"id": 11, "object_id": 3, "label": "road", "annotations": ["a3"]},
        {"id": 12, "object_id": -4, "label": "car", "annotations": ["a4"]},
        {"id": 13, "object_id": 70000, "label": "car", "annotations": ["a6"]},
        {"id": 14, "object_id": None, "label": "car", "annotations": ["a7"]},
        {"id": 15, "object_id": None, "label": "car", "annotations": ["a8"]},
        {"id": 16, "object_id": None, "label": "person", "annotations": ["a10"]},
    ]
    unusable = "is not a whole number from 1 to 65535: instance id"
    conflict = "objectId 3 is used by labels 'car', 'road': instance id"
    assert [(r.kind, r.annotation_id, r.detail) for r in m.repairs] == [
        ("object_id_unusable", "a0", f'objectId "abc" {unusable} 8'),
        (
            "object_id_conflict",
            "a1",
            f"{conflict} 9, not merged with the other labels' annotations",
        ),
        ("object_id_unusable", "a2", f"objectId 0 {unusable} 10"),
        (
            "object_id_conflict",
            "a3",
            f"{conflict} 11, not merged with the other labels' annotations",
        ),
        ("object_id_unusable", "a4", f"objectId -4 {unusable} 12"),
        (
            "object_id_conflict",
            "a5",
            f"{conflict} 9, not merged with the other labels' annotations",
        ),
        ("object_id_unusable", "a6", f"objectId 70000 {unusable} 13"),
        ("object_id_unusable", "a7", f"objectId 2.5 {unusable} 14"),
        ("object_id_unusable", "a8", f"objectId true {unusable} 15"),
    ]


def test_fresh_ids_past_uint16_fail_the_item_clearly():
    item = item_with(("car", [SQUARE_A], 65535), ("car", [TINY]))
    with pytest.raises(ItemError, match=r"d/x \[annotations\]: annotation a1 needs a fresh "):
        masks_of(item, ["instance"], {"car": 1})
    m = masks_with_ids(item, ["instance"], {"car": 1}, "shape")
    assert m.instance.max() == 2


def test_binary_masks_are_per_label_unions_ignoring_other_labels():
    item = item_with(("car", [SQUARE_A]), ("person", [SQUARE_B]), ("car", [TINY]))
    m = masks_of(item, ["binary"], {"car": 1, "person": 2})
    assert sorted(m.binary) == ["car", "person"]
    assert m.binary["car"].sum() == 36 and m.binary["person"].sum() == 36
    assert set(np.unique(m.binary["car"])) == {0, 1}


def test_binary_annotation_is_painted_in_order():
    mask = np.zeros((10, 10), bool)
    mask[5:, 5:] = True
    item = item_with(("car", [SQUARE_A]))
    item.annotations.append(Annotation("b", "tree", "binary", 1, mask=mask))
    m = masks_of(item, ["semantic", "instance"], {"car": 1, "tree": 2})
    assert m.semantic[5, 5] == 2 and m.semantic[0, 0] == 1 and (m.semantic == 2).sum() == 25
    assert m.instance[9, 9] == 2  # no objectIds: ids 1, 2 in draw order either way


def test_unknown_label_fails_the_item_clearly():
    item = item_with(("car", [SQUARE_A]), ("spaceship", [TINY]))
    with pytest.raises(
        ItemError,
        match=r"d/x \[label\]: label\(s\) not in the label map: "
        r"'spaceship'",
    ):
        masks_of(item, ["semantic"], {"car": 1})


def test_ids_that_do_not_fit_are_errors_not_wraps():
    item = item_with(("car", [SQUARE_A]))
    with pytest.raises(ItemError, match="300 does not fit uint8"):
        masks_of(item, ["semantic"], {"car": 300}, dtype=np.uint8)
    m = masks_of(item, ["semantic"], {"car": 300}, dtype=np.uint16)
    assert m.semantic.max() == 300
