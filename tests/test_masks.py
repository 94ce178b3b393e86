"""Mask modes, draw order and id ranges (pure; no Prefect)."""

from __future__ import annotations

import numpy as np
import pytest

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


def test_instance_ids_and_table():
    item = item_with(("car", [SQUARE_A], 7), ("car", [SQUARE_B]), ("person", [TINY], 3))
    m = masks_of(item, ["instance"], {"car": 1, "person": 2})
    assert m.instance.dtype == np.uint16
    assert m.instance[0, 0] == 1 and m.instance[7, 7] == 2 and m.instance[3, 3] == 3
    assert m.instance_table == [
        {"id": 1, "annotation": "a0", "label": "car", "object_id": 7},
        {"id": 2, "annotation": "a1", "label": "car", "object_id": None},
        {"id": 3, "annotation": "a2", "label": "person", "object_id": 3},
    ]


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
    assert m.instance[9, 9] == 2


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
