"""Turn an item's repaired shapes into the requested masks (pure, no I/O)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from polyburn.errors import ItemError
from polyburn.formats import get, in_order
from polyburn.instances import InstanceIds, number_instances
from polyburn.model import Item, Repair, Shape
from polyburn.raster import DrawOrder, burn, order_shapes

INSTANCE_DTYPE = np.dtype(np.uint16)


@dataclass
class ItemMasks:
    """An item once burned: what the output formats (:mod:`polyburn.formats`) make files of.

    Raster layers, each kept only when the format of its name is asked for: ``semantic``,
    ``instance`` (with ``instance_table``) and ``binary`` (label → 0/1 uint8 mask, for labels
    in the item). ``repairs``: the objectIds the instance mask could not use as ids, per
    annotation. ``shapes``: the item's shapes in draw order, and ``instance_values`` the
    instance id each burns (when the instance layer was burned). ``modes``: the formats asked
    for; ``extras``: what each derived in :meth:`~polyburn.formats.OutputFormat.prepare`, by
    name. ``frame``: (video item, frame) when this is one frame of a video item."""

    semantic: np.ndarray | None = None
    instance: np.ndarray | None = None
    instance_table: list[dict[str, Any]] = field(default_factory=list)
    binary: dict[str, np.ndarray] = field(default_factory=dict)
    repairs: list[Repair] = field(default_factory=list)
    modes: tuple[str, ...] = ()
    shapes: list[Shape] = field(default_factory=list)
    instance_values: list[int] = field(default_factory=list)
    extras: dict[str, Any] = field(default_factory=dict)
    frame: tuple[Item, int] | None = None

    @property
    def coco(self) -> dict[str, Any] | None:
        """The item's COCO fragment (:func:`polyburn.coco.item_fragment`), when asked for."""
        return self.extras.get("coco")


def build_masks(
    item: Item,
    shapes: Sequence[Shape],
    modes: Sequence[str],
    label_map: Mapping[str, int],
    semantic_dtype: np.dtype,
    draw_order: DrawOrder = "file",
    instance_ids: InstanceIds = "object",
    frame: tuple[Item, int] | None = None,
) -> ItemMasks:
    """Burn one item for the output formats ``modes`` (:mod:`polyburn.formats`): the raster
    layers they need, then each format's :meth:`~polyburn.formats.OutputFormat.prepare`.

    * ``semantic``: each pixel holds the label-map id of the last shape drawn over it, 0 elsewhere.
    * ``instance``: uint16; each pixel holds the instance id of the last shape drawn over it, 0
      elsewhere. With ``instance_ids="object"`` a shape's id is its Dataloop objectId, parts with
      the same objectId and label sharing it (:mod:`polyburn.instances`; objectIds it cannot use
      are reported in ``repairs``); with ``"shape"``, shape k in draw order (1-based) burns id k.
      ``instance_table`` lists each id with its objectId, label and annotation ids, sorted by id.
      Either way a pixel's instance has the label of the pixel's semantic id.
    * ``binary``: per label, 1 where any shape of that label covers the pixel (holes respected,
      other labels ignored).

    A layer burned only for another format (the instance layer of ``coco``) is not kept.
    Raises ItemError for a label missing from the label map or an id that does not fit, and
    ValueError for an unknown mode.
    """
    formats = in_order(modes)
    if len(formats) != len(set(modes)):
        get(next(m for m in modes if m not in {f.name for f in formats}))  # raises, naming it
    unknown = sorted({s.annotation.label for s in shapes} - set(label_map))
    if unknown:
        raise ItemError(
            item.path,
            f"label(s) not in the label map: {', '.join(map(repr, unknown))}",
            "label",
        )
    layers = set().union(*(f.layers for f in formats))
    ordered = order_shapes(shapes, draw_order)
    masks = ItemMasks(modes=tuple(f.name for f in formats), shapes=ordered, frame=frame)
    h, w = item.height, item.width
    if "semantic" in layers:
        values = [label_map[s.annotation.label] for s in ordered]
        masks.semantic = _burn(item, ordered, values, h, w, semantic_dtype, "label id")
    if "instance" in layers:
        try:
            values, instances, masks.repairs = number_instances(ordered, instance_ids)
        except ValueError as exc:
            raise ItemError(item.path, str(exc), "annotations") from None
        masks.instance = _burn(item, ordered, values, h, w, INSTANCE_DTYPE, "instance id")
        masks.instance_table = [i.as_dict() for i in instances]
        masks.instance_values = list(values)
    if "binary" in layers:
        for label in sorted({s.annotation.label for s in ordered}):
            of_label = [s for s in ordered if s.annotation.label == label]
            masks.binary[label] = burn(of_label, [1] * len(of_label), h, w, np.uint8)
    for fmt in formats:
        fmt.prepare(masks, item, label_map)
    _keep_asked_layers(masks)
    return masks


def _keep_asked_layers(masks: ItemMasks) -> None:
    """Drop the raster layers burned only for other formats."""
    if "semantic" not in masks.modes:
        masks.semantic = None
    if "instance" not in masks.modes:
        masks.instance, masks.instance_table = None, []
    if "binary" not in masks.modes:
        masks.binary = {}


def _burn(item, shapes, values, h, w, dtype, what) -> np.ndarray:
    try:
        return burn(shapes, values, h, w, dtype)
    except ValueError as exc:
        raise ItemError(item.path, f"{what}: {exc}") from None
