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
from math import ceil, floor
from typing import Any

import numpy as np
import shapely

from polyburn.model import Item, Shape

COCO_FRAGMENTS = "coco/items/"


def coco_fragment_key(path: str) -> str:
    """The key of an item's COCO fragment (``path`` already made safe for keys)."""
    return f"{COCO_FRAGMENTS}{path}.json"


def file_name(item: Item) -> str:
    """The item's path as in Dataloop (``street/scene_001.jpg``): its ``filename`` without the
    leading slash, or the item path when the source gave no filename."""
    return item.filename.replace("\\", "/").lstrip("/") or item.path


def frame_image(video: Item, frame: int) -> dict[str, Any]:
    """The COCO image fields of one frame of a video item: ``file_name``
    ``<dir>/<video stem>/<frame:06d>.jpg`` (where ``ffmpeg -i <video> -start_number 0
    <dir>/<video stem>/%06d.jpg`` puts the frame), ``video`` (the video's own file name) and
    ``frame_index`` (0-based)."""
    return {
        "file_name": f"{video.path}/{frame:06d}.jpg",
        "video": file_name(video),
        "frame_index": frame,
    }


Box = tuple[int, int, int, int]
"""``(top, left, bottom, right)`` in pixels, bottom and right exclusive."""


def item_fragment(
    item: Item,
    instance_mask: np.ndarray,
    instance_table: Sequence[Mapping[str, Any]],
    label_map: Mapping[str, int],
    regions: Mapping[int, Box] | None = None,
) -> dict[str, Any]:
    """The COCO fragment of one item (see the module docstring); ``instance_mask`` is the
    item's uint16 instance mask (H, W), ``instance_table`` its rows (``id``, ``object_id``,
    ``label``), whose labels must all be in ``label_map`` (KeyError otherwise), and
    ``regions`` what :func:`instance_regions` gives (a box holding each instance's pixels;
    without it every instance is looked for in the whole image)."""
    return {
        "image": {
            "path": item.path,
            "file_name": file_name(item),
            "width": item.width,
            "height": item.height,
            "dataloop_id": item.item_id,
        },
        "subset": item.subset,
        "annotations": instance_annotations(instance_mask, instance_table, label_map, regions),
    }


def instance_regions(
    shapes: Sequence[Shape], ids: Sequence[int], height: int, width: int
) -> dict[int, Box]:
    """For each instance id, a box that holds every pixel its shapes can set: the union of the
    pixel-rounded bounds of its shapes (``shapes[k]`` burned with ``ids[k]``), clipped to the
    image. A pixel is set only when its centre is inside the shape, so the shape's bounds
    rounded outwards hold it."""
    regions: dict[int, Box] = {}
    for shape, value in zip(shapes, ids, strict=True):
        if shape.geometry is not None:
            x0, y0, x1, y1 = shapely.bounds(shape.geometry)
            if not np.isfinite([x0, y0, x1, y1]).all():
                continue  # empty geometry: no pixel
            box = (floor(y0), floor(x0), ceil(y1), ceil(x1))
        else:
            box = (0, 0, height, width)
        top, left, bottom, right = regions.get(value, box)
        regions[value] = (
            max(0, min(top, box[0])),
            max(0, min(left, box[1])),
            min(height, max(bottom, box[2])),
            min(width, max(right, box[3])),
        )
    return regions


def instance_annotations(
    instance_mask: np.ndarray,
    instance_table: Sequence[Mapping[str, Any]],
    label_map: Mapping[str, int],
    regions: Mapping[int, Box] | None = None,
) -> list[dict[str, Any]]:
    """The COCO annotations of the instances of ``instance_table`` that have pixels in
    ``instance_mask``, in id order (see the module docstring). Each instance is looked for in
    its box of ``regions`` only (the whole image without one), so an item costs the size of its
    objects, not its number of objects times the image."""
    from pycocotools import mask as coco_mask  # only runs with --mode coco import it

    height, width = instance_mask.shape
    annotations = []
    for row in sorted(instance_table, key=lambda r: r["id"]):
        top, left, bottom, right = (regions or {}).get(row["id"], (0, 0, height, width))
        crop = instance_mask[top:bottom, left:right] == row["id"]
        rows, cols = np.flatnonzero(crop.any(axis=1)), np.flatnonzero(crop.any(axis=0))
        if rows.size == 0:
            continue  # drawn over entirely by later objects (or outside the image)
        crop = crop[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
        top, left = top + int(rows[0]), left + int(cols[0])
        counts = rle_counts(crop, top, left, height, width)
        rle = coco_mask.frPyObjects({"size": [height, width], "counts": counts}, height, width)
        annotations.append(
            {
                "instance_id": int(row["id"]),
                "object_id": row.get("object_id"),
                "label": row["label"],
                "category_id": int(label_map[row["label"]]),
                "segmentation": {"size": [height, width], "counts": rle["counts"].decode("ascii")},
                "area": int(np.count_nonzero(crop)),
                "bbox": [left, top, crop.shape[1], crop.shape[0]],
                "iscrowd": 0,
            }
        )
    return annotations


def rle_counts(crop: np.ndarray, top: int, left: int, height: int, width: int) -> list[int]:
    """COCO's uncompressed RLE counts (column-major runs, starting with a run of zeros) of a
    ``height`` x ``width`` image whose set pixels are those of the bool ``crop``, placed with
    its top-left pixel at (``top``, ``left``). Costs the crop's size, not the image's; what
    ``pycocotools.mask.frPyObjects`` then compresses into exactly the string
    ``pycocotools.mask.encode`` gives for the whole image."""
    # Where each column (top to bottom) switches between unset and set: the runs' bounds.
    edges = np.diff(crop.T, axis=1, prepend=False, append=False)
    cols, rows = np.nonzero(edges)  # column-major order; each column's runs start, end, ...
    if cols.size == 0:
        return [height * width]
    index = (cols + left).astype(np.int64) * height + (rows + top)
    starts, ends = index[0::2], index[1::2]
    joined = starts[1:] == ends[:-1]  # a run that goes on at the top of the next column
    if joined.any():
        starts, ends = starts[np.r_[True, ~joined]], ends[np.r_[~joined, True]]
    counts = np.empty(2 * starts.size + 1, dtype=np.int64)
    counts[0:-1:2] = starts - np.r_[0, ends[:-1]]
    counts[1::2] = ends - starts
    counts[-1] = height * width - ends[-1]
    if counts[-1] == 0:  # the image ends on a set pixel: no last run of zeros
        counts = counts[:-1]
    return counts.tolist()
