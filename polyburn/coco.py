"""COCO instance annotations of one item, from its instance mask (pure, no I/O).

An item's COCO *fragment* is what the dataset file ``coco/instances.json`` needs of it, without
the dataset-wide integer ids (those are assigned when the fragments are assembled, see
:mod:`polyburn.dataset`)::

    {"image": {"path", "file_name", "width", "height", "dataloop_id"},
     "subset": "train" | "validation" | "test" | null,
     "annotations": [{"instance_id", "object_id", "label", "category_id",
                      "segmentation": {"size": [h, w], "counts": "..."},
                      "area", "bbox": [x, y, w, h], "iscrowd": 0}, ...]}

One annotation per instance of the instance table that has pixels in the instance mask, in id
order: ``segmentation`` is COCO's compressed RLE (column-major, as ``pycocotools.mask.encode``
writes it) of exactly the pixels holding that id, so holes stay holes and the parts of a
multi-part object are one annotation; ``area`` is their count and ``bbox`` their pixel-edge
bounding box (``x, y`` of the top-left pixel's corner, width and height in pixels). An
instance drawn over entirely by later objects has no pixel, hence no annotation (it stays in
the instance table).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from polyburn.model import Item


def file_name(item: Item) -> str:
    """The item's path as in Dataloop (``street/scene_001.jpg``): its ``filename`` without the
    leading slash, or the item path when the source gave no filename."""
    return item.filename.replace("\\", "/").lstrip("/") or item.path


def item_fragment(
    item: Item,
    instance_mask: np.ndarray,
    instance_table: Sequence[Mapping[str, Any]],
    label_map: Mapping[str, int],
) -> dict[str, Any]:
    """The COCO fragment of one item (see the module docstring); ``instance_mask`` is the
    item's uint16 instance mask (H, W) and ``instance_table`` its rows (``id``, ``object_id``,
    ``label``), whose labels must all be in ``label_map`` (KeyError otherwise)."""
    return {
        "image": {
            "path": item.path,
            "file_name": file_name(item),
            "width": item.width,
            "height": item.height,
            "dataloop_id": item.item_id,
        },
        "subset": item.subset,
        "annotations": instance_annotations(instance_mask, instance_table, label_map),
    }


def instance_annotations(
    instance_mask: np.ndarray,
    instance_table: Sequence[Mapping[str, Any]],
    label_map: Mapping[str, int],
) -> list[dict[str, Any]]:
    """The COCO annotations of the instances of ``instance_table`` that have pixels in
    ``instance_mask``, in id order (see the module docstring)."""
    from pycocotools import mask as coco_mask  # only runs with --mode coco import it

    boxes = pixel_boxes(instance_mask)
    height, width = instance_mask.shape
    annotations = []
    for row in sorted(instance_table, key=lambda r: r["id"]):
        box = boxes.get(row["id"])
        if box is None:
            continue
        top, left, bottom, right, area = box
        # Only the columns the instance spans are compared; the rest of the (column-major)
        # Fortran-ordered mask is zeros, so its RLE is the image's.
        binary = np.zeros((height, width), dtype=np.uint8, order="F")
        binary[top:bottom, left:right] = instance_mask[top:bottom, left:right] == row["id"]
        rle = coco_mask.encode(binary)
        annotations.append(
            {
                "instance_id": int(row["id"]),
                "object_id": row.get("object_id"),
                "label": row["label"],
                "category_id": int(label_map[row["label"]]),
                "segmentation": {"size": [height, width], "counts": rle["counts"].decode("ascii")},
                "area": area,
                "bbox": [left, top, right - left, bottom - top],
                "iscrowd": 0,
            }
        )
    return annotations


def pixel_boxes(mask: np.ndarray) -> dict[int, tuple[int, int, int, int, int]]:
    """For each non-zero value of ``mask``: ``(top, left, bottom, right, count)`` of its pixels,
    bottom and right exclusive; one pass over the mask's non-zero pixels."""
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return {}
    values = mask[rows, cols]
    order = np.argsort(values, kind="stable")
    values, rows, cols = values[order], rows[order], cols[order]
    starts = np.flatnonzero(np.r_[True, values[1:] != values[:-1]])
    counts = np.diff(np.r_[starts, values.size])
    top = np.minimum.reduceat(rows, starts)
    bottom = np.maximum.reduceat(rows, starts) + 1
    left = np.minimum.reduceat(cols, starts)
    right = np.maximum.reduceat(cols, starts) + 1
    return {
        int(v): (int(t), int(lf), int(b), int(r), int(n))
        for v, t, lf, b, r, n in zip(values[starts], top, left, bottom, right, counts, strict=True)
    }
