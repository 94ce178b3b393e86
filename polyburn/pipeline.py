"""One item from source to destination, and the run-level steps around it. Prefect-free."""

from __future__ import annotations

import base64
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from polyburn.destinations import Destination
from polyburn.destinations.base import LABEL_MAP_KEY
from polyburn.errors import ConfigError, ItemError, PolyburnError, TransientError
from polyburn.geometry import repair_item
from polyburn.labels import (
    dump_label_map,
    extend_label_map,
    load_label_map,
    palette,
    parse_label_map,
    semantic_dtype,
)
from polyburn.masks import build_masks
from polyburn.model import Item, ItemRef
from polyburn.sources import Source

if TYPE_CHECKING:  # burn workers import this module: no pydantic, no PIL there
    from polyburn.params import MaskOptions

log = logging.getLogger("polyburn")


def process_item(
    ref: ItemRef,
    source: Source,
    destination: Destination | None,
    options: MaskOptions,
    label_map: Mapping[str, int],
    colours: Mapping[str, tuple[int, int, int]] | None = None,
    previous_keys: Sequence[str] = (),
    preview: bool = False,
) -> dict[str, Any]:
    """Load, repair, burn and publish one item; never raises for a problem of this item.

    Returns the item's manifest record: ``status`` ("ok" or "failed"), ``error`` (one line),
    counts, every repair and rejected annotation, and the outputs with their sha256; with
    ``options.skip_empty``, an item with no shape to burn gets no outputs and
    ``skipped_empty: true`` (status "ok"). With
    ``destination=None`` nothing is burned (validation only). Outputs listed in
    ``previous_keys`` that the item no longer produces are removed. With ``preview``, the record
    also holds ``preview``: a small colourised PNG (base64) of the item's first mask, over the
    image when the source has it; callers remove it before writing the manifest.
    """
    record: dict[str, Any] = {
        "item": ref.item_id,
        "path": ref.path,
        "status": "ok",
        "error": None,
    }
    started = time.perf_counter()
    try:
        item = source.load(ref, options.max_pixels)
        record.update(_describe(item))
        shapes, repairs, problems = repair_item(item)
        record["repairs"] = [r.as_dict() for r in repairs]
        record["problems"] += [p.as_dict() for p in problems]
        record["shapes"] = len(shapes)
        if destination is not None and not shapes and options.skip_empty:
            record.update(skipped_empty=True, outputs=[])  # nothing to burn: no mask at all
            if previous_keys:
                destination.remove(sorted(previous_keys))
        elif destination is not None:
            masks = build_masks(
                item,
                shapes,
                options.modes,
                label_map,
                semantic_dtype(label_map),
                options.draw_order,
            )
            pal = palette(label_map, colours)
            retried = destination.retries_in_this_thread()
            outputs = destination.publish_item(item, masks, options.format, pal)
            if destination.retries_in_this_thread() > retried:
                record["io_retries"] = destination.retries_in_this_thread() - retried
            record["outputs"] = [o.as_dict() for o in outputs]
            stale = sorted(set(previous_keys) - {o.key for o in outputs})
            if stale:
                destination.remove(stale)
            if preview:
                record["preview"] = _preview(ref, source, masks, pal)
    except TransientError as exc:  # worth another try: the caller decides
        record.update(status="failed", error=f"{ref.path}: {exc}", transient=True)
    except ItemError as exc:
        record.update(status="failed", error=str(exc))
    except PolyburnError as exc:
        record.update(status="failed", error=f"{ref.path}: {exc}")
    except Exception as exc:  # noqa: BLE001 - one item never takes the run down
        log.debug("unexpected error on %s", ref.path, exc_info=True)
        record.update(status="failed", error=f"{ref.path}: {type(exc).__name__}: {exc}")
    record["seconds"] = round(time.perf_counter() - started, 4)
    return record


def _preview(ref: ItemRef, source: Source, masks, pal) -> str | None:
    mask = masks.semantic if masks.semantic is not None else masks.instance
    if mask is None and masks.binary:
        mask = next(iter(masks.binary.values()))
    if mask is None:
        return None
    from polyburn.report import preview_png

    image_of = getattr(source, "image", None)
    try:
        image = image_of(ref) if image_of else None
        return base64.b64encode(preview_png(mask, pal, image)).decode("ascii")
    except Exception:  # noqa: BLE001 - a preview never fails an item
        log.debug("no preview for %s", ref.path, exc_info=True)
        return None


def _describe(item: Item) -> dict[str, Any]:
    return {
        "item": item.item_id,
        "revision": item.revision,
        "width": item.width,
        "height": item.height,
        "annotations": len(item.annotations),
        "skipped": item.skipped,
        "problems": [p.as_dict() for p in item.problems],
    }


def scan_labels(refs: Iterable[ItemRef], source: Source, max_pixels: int) -> set[str]:
    """Labels of the pixel annotations of the given items (unreadable items are skipped here and
    reported when they are processed)."""
    labels: set[str] = set()
    for ref in refs:
        try:
            item = source.load(ref, max_pixels)
        except PolyburnError:
            continue
        labels.update(a.label for a in item.annotations)
    return labels


def resolve_label_map(
    labels_file: str | None,
    destination: Destination,
    found: Iterable[str] | None,
    declared: Mapping[str, Any] | None = None,
) -> dict[str, int]:
    """The label map of a run.

    A user file wins. Otherwise the map already at the destination is reused and extended with
    labels it lacks (declared by the source, e.g. a Dataloop ontology, or ``found`` in the items),
    so ids never change for a destination.
    """
    if labels_file:
        return load_label_map(labels_file)
    existing_text = destination.read_text(LABEL_MAP_KEY)
    existing = (
        parse_label_map(existing_text, f"{destination.uri}/{LABEL_MAP_KEY}")
        if existing_text
        else {}
    )
    wanted = set(found or ()) | set(declared or ())
    label_map = extend_label_map(existing, wanted)
    if not label_map:
        raise ConfigError("no labels found in the source and no label map given")
    return label_map


def write_label_map(destination: Destination, label_map: Mapping[str, int]) -> None:
    destination.write_text(LABEL_MAP_KEY, dump_label_map(label_map))
