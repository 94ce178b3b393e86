"""Turn an item's repaired shapes into the requested masks (pure, no I/O)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from polyburn.coco import instance_regions, item_fragment
from polyburn.errors import ItemError
from polyburn.instances import InstanceIds, number_instances
from polyburn.model import Item, Repair, Shape
from polyburn.raster import DrawOrder, burn, order_shapes

MODES = ("semantic", "instance", "binary", "coco")
INSTANCE_DTYPE = np.dtype(np.uint16)


@dataclass
class ItemMasks:
    """The masks of one item. ``binary`` maps label → 0/1 uint8 mask, for labels in the item.
    ``repairs``: the objectIds the instance mask could not use as ids, per annotation.
    ``coco``: the item's COCO fragment (:func:`polyburn.coco.item_fragment`)."""

    semantic: np.ndarray | None = None
    instance: np.ndarray | None = None
    instance_table: list[dict[str, Any]] = field(default_factory=list)
    binary: dict[str, np.ndarray] = field(default_factory=dict)
    repairs: list[Repair] = field(default_factory=list)
    coco: dict[str, Any] | None = None


def build_masks(
    item: Item,
    shapes: Sequence[Shape],
    modes: Sequence[str],
    label_map: Mapping[str, int],
    semantic_dtype: np.dtype,
    draw_order: DrawOrder = "file",
    instance_ids: InstanceIds = "object",
) -> ItemMasks:
    """Burn the masks of one item.

    * ``semantic``: each pixel holds the label-map id of the last shape drawn over it, 0 elsewhere.
    * ``instance``: uint16; each pixel holds the instance id of the last shape drawn over it, 0
      elsewhere. With ``instance_ids="object"`` a shape's id is its Dataloop objectId, parts with
      the same objectId and label sharing it (:mod:`polyburn.instances`; objectIds it cannot use
      are reported in ``repairs``); with ``"shape"``, shape k in draw order (1-based) burns id k.
      ``instance_table`` lists each id with its objectId, label and annotation ids, sorted by id.
      Either way a pixel's instance has the label of the pixel's semantic id.
    * ``binary``: per label, 1 where any shape of that label covers the pixel (holes respected,
      other labels ignored).
    * ``coco``: the item's COCO fragment, one annotation per instance of the instance mask
      (burned for it when ``instance`` is not among the modes, and not kept then).

    Raises ItemError for a label missing from the label map or an id that does not fit.
    """
    unknown = sorted({s.annotation.label for s in shapes} - set(label_map))
    if unknown:
        raise ItemError(
            item.path,
            f"label(s) not in the label map: {', '.join(map(repr, unknown))}",
            "label",
        )
    ordered = order_shapes(shapes, draw_order)
    masks = ItemMasks()
    h, w = item.height, item.width
    if "semantic" in modes:
        values = [label_map[s.annotation.label] for s in ordered]
        masks.semantic = _burn(item, ordered, values, h, w, semantic_dtype, "label id")
    if "instance" in modes or "coco" in modes:
        try:
            values, instances, masks.repairs = number_instances(ordered, instance_ids)
        except ValueError as exc:
            raise ItemError(item.path, str(exc), "annotations") from None
        instance = _burn(item, ordered, values, h, w, INSTANCE_DTYPE, "instance id")
        table = [i.as_dict() for i in instances]
        if "instance" in modes:
            masks.instance, masks.instance_table = instance, table
        if "coco" in modes:
            regions = instance_regions(ordered, values, h, w)
            masks.coco = item_fragment(item, instance, table, label_map, regions)
    if "binary" in modes:
        for label in sorted({s.annotation.label for s in ordered}):
            of_label = [s for s in ordered if s.annotation.label == label]
            masks.binary[label] = burn(of_label, [1] * len(of_label), h, w, np.uint8)
    return masks


def _burn(item, shapes, values, h, w, dtype, what) -> np.ndarray:
    try:
        return burn(shapes, values, h, w, dtype)
    except ValueError as exc:
        raise ItemError(item.path, f"{what}: {exc}") from None
