"""``binary``: one 0/1 mask per label of the item."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

from polyburn.encode import BINARY_PALETTE, CONTENT_TYPES, EXTENSIONS, encode_mask
from polyburn.formats import MaskAnnotation, OutputFile, OutputFormat
from polyburn.keys import safe_segment
from polyburn.masks import ItemMasks
from polyburn.model import Item


class Binary(OutputFormat):
    name = "binary"
    summary = (
        "per label, 1 where any shape of that label covers the pixel (holes respected, other "
        "labels ignored), 0 elsewhere"
    )
    order = 30
    layers = frozenset({"binary"})
    destinations = frozenset({"folder", "s3", "dataloop"})
    writes = "`binary/<label>/<path><ext>`; Dataloop: one annotation per label"

    def files(
        self, masks: ItemMasks, item: Item, fmt: str, palette: Sequence[int] | None, path: str
    ) -> list[OutputFile]:
        return [
            OutputFile(
                f"binary/{safe_segment(label)}/{path}{EXTENSIONS[fmt]}",
                encode_mask(mask, fmt, BINARY_PALETTE),
                CONTENT_TYPES[fmt],
            )
            for label, mask in masks.binary.items()
        ]

    def annotations(
        self, masks: ItemMasks, item: Item, label_map: Mapping[str, int] | None
    ) -> Iterator[MaskAnnotation]:
        for label, mask in masks.binary.items():
            yield MaskAnnotation(label, label, mask.astype(bool))


FORMAT = Binary()
