"""Output formats as plug-ins: one module per format in this package.

A format module defines ``FORMAT``, an instance of an :class:`OutputFormat` subclass. The
package finds them itself (:func:`registry`): adding a format is adding a module here. From the
registry come the ``modes`` choices of :class:`~polyburn.params.RunParameters` (and so the
Prefect UI's form), the CLI's ``--mode`` help, which destinations accept each format, and the
formats table of the docs (``docs/formats.md``, checked by a test).

A format sees an item once it is burned (:class:`~polyburn.masks.ItemMasks`: the shapes in
draw order, their instance ids, and the raster layers the formats asked for) and says:

* :meth:`OutputFormat.prepare`: per-item data it derives from them (kept in ``masks.extras``);
* :meth:`OutputFormat.files`: the files it writes for the item, or for one frame of a video
  item (the frame's item path is ``<video path>/<frame:06d>``);
* :meth:`OutputFormat.annotations`: the masks it stores as Dataloop annotations;
* :meth:`OutputFormat.dataset_files`: the dataset-level files it assembles from the records
  (every format's, at each snapshot, whether or not the run asked for it: the destination may
  hold its files from earlier runs).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import numpy as np

    from polyburn.destinations.base import FileDestination
    from polyburn.manifest import RecordSpool
    from polyburn.masks import ItemMasks
    from polyburn.model import Item

LAYERS = ("semantic", "instance", "binary")
"""The raster layers :func:`~polyburn.masks.build_masks` can burn. A layer is kept in the
item's masks (written, previewed, published) only when the format of the same name is asked
for; other formats may still have it burned for them (``OutputFormat.layers``)."""

DESTINATION_KINDS = ("folder", "s3", "dataloop")


@dataclass(frozen=True)
class OutputFile:
    """A file a format writes for an item: its key at the destination, bytes, content type."""

    key: str
    data: bytes
    content_type: str


@dataclass(frozen=True)
class MaskAnnotation:
    """A mask a format stores as one Dataloop ``binary`` annotation of the item: ``name``
    is unique within the format for the item; ``extra`` goes into the annotation's polyburn
    metadata."""

    name: str
    label: str
    mask: np.ndarray
    object_id: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class OutputFormat:
    """One output format (module docstring). Subclasses set the class attributes and override
    what they produce; the defaults produce nothing."""

    name: ClassVar[str]
    """The mode's name, as users write it (``--mode``, ``modes``)."""
    summary: ClassVar[str]
    """One sentence for the CLI, the UI form and the docs."""
    order: ClassVar[int] = 100
    """Where its files come in an item's outputs (lower first)."""
    layers: ClassVar[frozenset[str]] = frozenset()
    """The raster layers (:data:`LAYERS`) it needs burned."""
    destinations: ClassVar[frozenset[str]] = frozenset({"folder", "s3"})
    """The destination kinds (:data:`DESTINATION_KINDS`) that accept it."""
    writes: ClassVar[str] = ""
    """Where its files go, for the docs (``semantic/<path><ext>``...)."""

    def prepare(self, masks: ItemMasks, item: Item, label_map: Mapping[str, int]) -> None:  # noqa: B027
        """Derive per-item data from the burned item into ``masks.extras[self.name]``."""

    def files(
        self, masks: ItemMasks, item: Item, fmt: str, palette: Sequence[int] | None, path: str
    ) -> list[OutputFile]:
        """The files of the item (``path``: its item path made safe for keys; ``fmt``: the
        raster encoding, png/tif/npy; ``palette``: the semantic PNG palette)."""
        return []

    def annotations(
        self, masks: ItemMasks, item: Item, label_map: Mapping[str, int] | None
    ) -> Iterator[MaskAnnotation]:
        """The masks to store as Dataloop annotations (formats that accept ``dataloop``)."""
        return iter(())

    def dataset_files(
        self, store: FileDestination, spool: RecordSpool, scratch: Path
    ) -> dict[str, int]:
        """Write its dataset-level files from the records in ``spool`` (the destination's
        current records, sorted by path); returns how many items each file lists."""
        return {}


@cache
def registry() -> dict[str, OutputFormat]:
    """Every format of this package, by name, in output order."""
    found: list[OutputFormat] = []
    for module in pkgutil.iter_modules(__path__):
        if module.name.startswith("_"):
            continue
        loaded = importlib.import_module(f"{__name__}.{module.name}")
        fmt = getattr(loaded, "FORMAT", None)
        if isinstance(fmt, OutputFormat):
            found.append(fmt)
    found.sort(key=lambda f: (f.order, f.name))
    return {f.name: f for f in found}


def names() -> tuple[str, ...]:
    """The format names, in output order."""
    return tuple(registry())


def get(name: str) -> OutputFormat:
    """The format called ``name``; ValueError naming the known ones otherwise."""
    try:
        return registry()[name]
    except KeyError:
        raise ValueError(f"unknown mode {name!r}; known: {', '.join(names())}") from None


def in_order(modes: Iterable[str]) -> list[OutputFormat]:
    """The formats of ``modes``, in output order."""
    wanted = set(modes)
    return [f for name, f in registry().items() if name in wanted]


def destination_kind(uri: str) -> str:
    """``dataloop``, ``s3`` or ``folder``: which kind of destination ``uri`` names."""
    if uri.startswith("dataloop://"):
        return "dataloop"
    return "s3" if uri.startswith("s3://") else "folder"


def reference_table() -> str:
    """The formats table of the docs (markdown), from the registry."""
    rows = ["| mode | writes | destinations | what |", "|---|---|---|---|"]
    for f in registry().values():
        kinds = ", ".join(k for k in DESTINATION_KINDS if k in f.destinations)
        rows.append(f"| `{f.name}` | {f.writes} | {kinds} | {f.summary} |")
    return "\n".join(rows) + "\n"
