"""``coco``: COCO instance JSON, a fragment per item assembled into dataset files."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from polyburn.coco import frame_image, instance_regions, item_fragment
from polyburn.encode import JSON_CONTENT_TYPE
from polyburn.formats import OutputFile, OutputFormat
from polyburn.masks import ItemMasks
from polyburn.model import Item

if TYPE_CHECKING:
    from polyburn.destinations.base import FileDestination
    from polyburn.manifest import RecordSpool

COCO_FRAGMENTS = "coco/items/"


def coco_fragment_key(path: str) -> str:
    """The key of an item's COCO fragment (``path`` already made safe)."""
    return f"{COCO_FRAGMENTS}{path}.json"


class Coco(OutputFormat):
    name = "coco"
    summary = (
        "COCO instance JSON with RLE masks, one annotation per instance, assembled into "
        "`coco/instances.json` and one file per ML subset"
    )
    order = 40
    layers = frozenset({"instance"})
    writes = "COCO JSON files (`coco/items/<path>.json`, `coco/instances[_<subset>].json`)"

    def prepare(self, masks: ItemMasks, item: Item, label_map: Mapping[str, int]) -> None:
        """The item's COCO fragment (:func:`polyburn.coco.item_fragment`); a video frame's
        image is the frame (:func:`polyburn.coco.frame_image`)."""
        h, w = item.height, item.width
        regions = instance_regions(masks.shapes, masks.instance_values, h, w)
        fragment = item_fragment(item, masks.instance, masks.instance_table, label_map, regions)
        if masks.frame is not None:
            fragment["image"].update(frame_image(*masks.frame))
        masks.extras[self.name] = fragment

    def files(
        self, masks: ItemMasks, item: Item, fmt: str, palette: Sequence[int] | None, path: str
    ) -> list[OutputFile]:
        fragment = json.dumps(masks.extras[self.name], ensure_ascii=False, separators=(",", ":"))
        return [OutputFile(coco_fragment_key(path), fragment.encode("utf-8"), JSON_CONTENT_TYPE)]

    def dataset_files(
        self, store: FileDestination, spool: RecordSpool, scratch: Path
    ) -> dict[str, int]:
        from polyburn.dataset import write_coco

        return write_coco(store, spool, scratch)


FORMAT = Coco()
