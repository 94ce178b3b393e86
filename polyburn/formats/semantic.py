"""``semantic``: one class-id mask per item."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

from polyburn.encode import CONTENT_TYPES, EXTENSIONS, encode_mask
from polyburn.formats import MaskAnnotation, OutputFile, OutputFormat
from polyburn.masks import ItemMasks
from polyburn.model import Item


class Semantic(OutputFormat):
    name = "semantic"
    summary = (
        "class ids: each pixel holds the label-map id of the last shape drawn over it, 0 "
        "elsewhere (a palette PNG, uint8; uint16 when an id passes 255)"
    )
    order = 10
    layers = frozenset({"semantic"})
    destinations = frozenset({"folder", "s3", "dataloop"})
    writes = "`semantic/<path><ext>`; Dataloop: one annotation per label"

    def files(
        self, masks: ItemMasks, item: Item, fmt: str, palette: Sequence[int] | None, path: str
    ) -> list[OutputFile]:
        if masks.semantic is None:
            return []
        data = encode_mask(masks.semantic, fmt, palette)
        return [OutputFile(f"semantic/{path}{EXTENSIONS[fmt]}", data, CONTENT_TYPES[fmt])]

    def annotations(
        self, masks: ItemMasks, item: Item, label_map: Mapping[str, int] | None
    ) -> Iterator[MaskAnnotation]:
        """One per label of the item: the pixels whose id is the label's. Raises LookupError
        without the run's label map."""
        if masks.semantic is None:
            return
        if label_map is None:
            raise LookupError("the run's label map")
        for label in sorted({a.label for a in item.annotations}):
            label_id = label_map.get(label)
            if label_id:
                yield MaskAnnotation(
                    label, label, masks.semantic == label_id, None, {"labelId": label_id}
                )


FORMAT = Semantic()
