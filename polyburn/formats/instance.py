"""``instance``: one object-id mask per item, with its id table."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence

from polyburn.encode import CONTENT_TYPES, EXTENSIONS, JSON_CONTENT_TYPE, encode_mask
from polyburn.formats import MaskAnnotation, OutputFile, OutputFormat
from polyburn.masks import ItemMasks
from polyburn.model import Item


class Instance(OutputFormat):
    name = "instance"
    summary = (
        "object ids: uint16, each pixel holds the instance id of the last shape drawn over it "
        "(see `instance_id`), with the id table (id, objectId, label, annotations) beside it"
    )
    order = 20
    layers = frozenset({"instance"})
    destinations = frozenset({"folder", "s3", "dataloop"})
    writes = "`instance/<path><ext>`, `instance/<path>.json`; Dataloop: one annotation per object"

    def files(
        self, masks: ItemMasks, item: Item, fmt: str, palette: Sequence[int] | None, path: str
    ) -> list[OutputFile]:
        if masks.instance is None:
            return []
        table = json.dumps(
            {"item": item.item_id, "instances": masks.instance_table}, ensure_ascii=False, indent=1
        )
        return [
            OutputFile(
                f"instance/{path}{EXTENSIONS[fmt]}",
                encode_mask(masks.instance, fmt),
                CONTENT_TYPES[fmt],
            ),
            OutputFile(f"instance/{path}.json", table.encode("utf-8"), JSON_CONTENT_TYPE),
        ]

    def annotations(
        self, masks: ItemMasks, item: Item, label_map: Mapping[str, int] | None
    ) -> Iterator[MaskAnnotation]:
        """One per instance, ``objectId`` its id, with the annotations it was made of."""
        if masks.instance is None:
            return
        for entry in masks.instance_table:
            k = int(entry["id"])
            extra = {
                "sourceAnnotations": list(entry["annotations"]),
                "sourceObjectId": entry.get("object_id"),
            }
            yield MaskAnnotation(str(k), str(entry["label"]), masks.instance == k, k, extra)


FORMAT = Instance()
