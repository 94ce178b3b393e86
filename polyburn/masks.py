"""Turn an item's repaired shapes into the requested masks (pure, no I/O)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from polyburn.errors import ItemError
from polyburn.model import Item, Shape
from polyburn.raster import DrawOrder, burn, order_shapes

MODES = ("semantic", "instance", "binary")
INSTANCE_DTYPE = np.dtype(np.uint16)


@dataclass
class ItemMasks:
    """The masks of one item. ``binary`` maps label → 0/1 uint8 mask, for labels in the item."""

    semantic: np.ndarray | None = None
    instance: np.ndarray | None = None
    instance_table: list[dict[str, Any]] = field(default_factory=list)
    binary: dict[str, np.ndarray] = field(default_factory=dict)


def build_masks(
    item: Item,
    shapes: Sequence[Shape],
    modes: Sequence[str],
    label_map: Mapping[str, int],
    semantic_dtype: np.dtype,
    draw_order: DrawOrder = "file",
) -> ItemMasks:
    """Burn the masks of one item.

    * ``semantic``: each pixel holds the label-map id of the last shape drawn over it, 0 elsewhere.
    * ``instance``: uint16; shape k in draw order (1-based) burns id k; ``instance_table`` maps
      each id to its annotation id, label and objectId.
    * ``binary``: per label, 1 where any shape of that label covers the pixel (holes respected,
      other labels ignored).

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
    if "instance" in modes:
        if len(ordered) > np.iinfo(INSTANCE_DTYPE).max:
            raise ItemError(
                item.path, f"{len(ordered)} instances do not fit uint16 instance ids", "annotations"
            )
        values = list(range(1, len(ordered) + 1))
        masks.instance = _burn(item, ordered, values, h, w, INSTANCE_DTYPE, "instance id")
        masks.instance_table = [
            {
                "id": k,
                "annotation": s.annotation.annotation_id,
                "label": s.annotation.label,
                "object_id": s.annotation.object_id,
            }
            for k, s in enumerate(ordered, start=1)
        ]
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
