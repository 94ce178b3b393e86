"""What a run shows a person: summary tables, failure lists and mask previews (pure functions)."""

from __future__ import annotations

import base64
import colorsys
import io
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TextIO

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from polyburn.masks import ItemMasks
    from polyburn.records import RunSummary

PREVIEW_WIDTH = 320
LISTED_LOSSES = 20
"""Rejected annotations and items with nothing to burn named in a summary; the rest are
counted, and all of them are in the manifest."""


def summary_table(summary: RunSummary) -> list[dict[str, Any]]:
    """Rows of (metric, value) for a Prefect table artifact; a run-level count the run did not
    have shows 0 (the version: empty)."""
    rows = [
        ("items", summary.items),
        ("items ok", summary.ok),
        ("items failed", summary.failed),
        ("annotations", summary.annotations),
        ("shapes burned", summary.shapes),
        ("repairs", summary.repairs),
        *((f"repairs: {kind}", n) for kind, n in summary.repairs_by_kind.items()),
        ("annotations rejected", summary.rejected),
        ("items with nothing to burn", summary.empty_items),
        ("items left without masks (skip_empty)", summary.empty_items_skipped),
        *((f"skipped: {kind}", n) for kind, n in summary.skipped_by_type.items()),
        ("files written", summary.outputs_written),
        ("batches from cache", _or(summary.cached_batches, 0)),
        ("task retries", _or(summary.retries, 0)),
        ("item retries (transient errors)", summary.item_retries),
        ("client retries (destination requests)", summary.io_retries),
        ("duration (s)", summary.seconds),
        ("polyburn version", _or(summary.polyburn_version, "")),
    ]
    return [{"metric": metric, "value": value} for metric, value in rows]


def _or(value: Any, unset: Any) -> Any:
    """``value``, or ``unset`` when it is None (a run-level field the run did not set)."""
    return unset if value is None else value


def at_frame(entry: Mapping[str, Any]) -> str:
    """`` frame N`` for a repair or rejection of a video item's frame, else empty."""
    return f" frame {entry['frame']}" if entry.get("frame") is not None else ""


def rejection_line(rejection: Mapping[str, Any]) -> str:
    """One line naming a rejected annotation: item path, annotation id, label, field, reason
    (a problem of the item itself, such as two ML subsets, has no annotation id)."""
    label = f" ({rejection['label']})" if rejection.get("label") else ""
    field = f" [{rejection['field']}]" if rejection.get("field") else ""
    what = (
        "item" if rejection.get("annotation") is None else f"annotation {rejection['annotation']}"
    )
    return f"{rejection['path']} {what}{label}{at_frame(rejection)}{field}: {rejection['reason']}"


def empty_line(entry: Mapping[str, Any]) -> str:
    """An item with nothing to burn and what it had instead (``box 2, point 1``, rejected
    annotations, or no annotation at all)."""
    had = [f"{kind} {count}" for kind, count in sorted(entry.get("skipped", {}).items())]
    if entry.get("rejected"):
        had.append(f"{entry['rejected']} rejected")
    return f"{entry['path']} ({', '.join(had) or 'no annotation'})"


def losses_text(summary: RunSummary, manifest: str, limit: int = LISTED_LOSSES) -> list[str]:
    """The summary's lines naming each rejected annotation (the first ``limit``, then how many
    more) and the items with nothing to burn (the first ``limit``)."""
    lines = [f"REJECTED {rejection_line(r)}" for r in summary.rejections[:limit]]
    more = summary.rejected - min(limit, len(summary.rejections))
    if more > 0:
        lines.append(f"... and {more} more rejected annotations, see the manifest {manifest}")
    empty = summary.empty_items
    if empty:
        names = ", ".join(empty_line(e) for e in summary.empty[:limit])
        rest = empty - min(limit, len(summary.empty))
        tail = f" and {rest} more" if rest > 0 else ""
        skipped = summary.empty_items_skipped
        if not skipped:
            what = "all-background masks written; --skip-empty leaves them out"
        elif skipped >= empty:
            what = "no masks written (skip-empty)"
        else:  # a video with nothing to burn writes no frame, whatever --skip-empty says
            what = f"{skipped} left without masks (videos, or skip-empty), the rest all-background"
        lines.append(f"NOTHING TO BURN in {empty} item(s), {what}: {names}{tail}")
    return lines


def failures_markdown(
    summary: RunSummary, manifest: str, limit: int = 200, listed: int = LISTED_LOSSES
) -> str:
    """A markdown report of failed items with their one-line reasons, every rejected annotation
    (the first ``listed``, then how many more) and the items with nothing to burn, linking the
    manifest."""
    lines = [
        f"# polyburn: {summary.ok} ok, {summary.failed} failed of {summary.items} items",
        "",
        f"Manifest (every item, repair and rejection): `{manifest}`",
        "",
    ]
    failures = summary.failures
    if not failures:
        lines.append("No item failed.")
    else:
        lines += ["| item | error |", "|---|---|"]
        for failure in failures[:limit]:
            lines.append(f"| `{failure['path']}` | {_cell(failure['error'])} |")
        if len(failures) > limit:
            lines.append(f"\n… and {len(failures) - limit} more in the manifest.")
    lines += ["", f"## Rejected annotations: {summary.rejected}", ""]
    if summary.rejections:
        lines += ["| item | annotation | label | reason |", "|---|---|---|---|"]
        for r in summary.rejections[:listed]:
            field = f" [{r['field']}]" if r.get("field") else ""
            lines.append(
                f"| `{r['path']}` | `{r['annotation']}`{at_frame(r)} | "
                f"{_cell(r.get('label') or '')} | {_cell(r['reason'])}{_cell(field)} |"
            )
    more = summary.rejected - min(listed, len(summary.rejections))
    if more > 0:
        lines.append(f"\n… and {more} more, see the manifest.")
    empty = summary.empty_items
    lines += ["", f"## Items with nothing to burn: {empty}", ""]
    if empty:
        skipped = summary.empty_items_skipped
        if not skipped:
            lines.append("All-background masks written for them; skip_empty leaves them out.")
        elif skipped >= empty:
            lines.append("No masks written for them (skip_empty).")
        else:
            lines.append(
                f"{skipped} left without masks (videos, or skip_empty), the rest all-background."
            )
        lines.append("")
        lines += [f"* `{_cell(empty_line(e))}`" for e in summary.empty[:listed]]
        rest = empty - min(listed, len(summary.empty))
        if rest > 0:
            lines.append(f"\n… and {rest} more, see the manifest.")
    return "\n".join(lines) + "\n"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|")


def write_json_summary(
    summary: Mapping[str, Any], rejections: Iterable[Mapping[str, Any]], out: TextIO
) -> None:
    """Write ``summary`` (:meth:`RunSummary.as_dict <polyburn.records.RunSummary.as_dict>`, the
    CLI's ``--json``) as one indented JSON object whose ``rejections`` is every entry of
    ``rejections``, streamed one at a time (a run's rejections need not fit in memory)."""
    head = {key: value for key, value in summary.items() if key != "rejections"}
    fields = json.dumps(head, indent=2)[1:-1].rstrip()
    out.write("{" + fields + ("," if head else "") + '\n  "rejections": [')
    for k, rejection in enumerate(rejections):
        out.write(("," if k else "") + "\n    " + json.dumps(rejection))
    out.write("\n  ]\n}\n")


def colourise(mask: np.ndarray, palette: Sequence[int]) -> np.ndarray:
    """An (H, W, 3) uint8 RGB image of a label mask through a 768-entry palette."""
    lut = np.asarray(palette, dtype=np.uint8).reshape(256, 3)
    return lut[np.asarray(mask) & 0xFF]


def object_colours(mask: np.ndarray) -> np.ndarray:
    """An (H, W, 3) uint8 RGB image of an instance mask: black background, and each id its own
    colour, hues spread by the golden ratio in the order of the ids (objectIds can be far
    apart or differ by 256, which a 256-entry palette would show alike)."""
    ids, position = np.unique(np.asarray(mask), return_inverse=True)
    hues = (np.arange(len(ids)) * 0.618034) % 1.0
    colours = np.stack([_hue_rgb(h) for h in hues]) if len(ids) else np.zeros((0, 3), np.uint8)
    colours[ids == 0] = 0
    return colours[position.reshape(np.shape(mask))]


def _hue_rgb(hue: float, saturation: float = 0.7, value: float = 0.95) -> np.ndarray:
    return np.array(
        [round(255 * c) for c in colorsys.hsv_to_rgb(hue, saturation, value)], dtype=np.uint8
    )


def preview_png(
    mask: np.ndarray,
    palette: Sequence[int] | None,
    image: np.ndarray | None = None,
    width: int = PREVIEW_WIDTH,
) -> bytes:
    """A PNG of the colourised mask (through ``palette``, or with :func:`object_colours` when
    it is None), blended half-and-half over ``image`` (H, W, 3) where the mask is set when the
    image is given; scaled down to ``width`` pixels, or up by a whole factor when it is at most
    half as wide (each mask pixel a square of pixels)."""
    rgb = colourise(mask, palette) if palette is not None else object_colours(mask)
    if image is not None and image.shape[:2] == mask.shape:
        base = image[:, :, :3].astype(np.uint16)
        blended = ((base + rgb) // 2).astype(np.uint8)
        rgb = np.where((mask > 0)[:, :, None], blended, image[:, :, :3])
    picture = Image.fromarray(rgb, "RGB")
    if picture.width > width:
        height = max(1, round(picture.height * width / picture.width))
        picture = picture.resize((width, height), Image.Resampling.NEAREST)
    elif picture.width * 2 <= width:  # a small mask (a thumbnail-sized video): whole pixels
        scale = width // picture.width
        picture = picture.resize(
            (picture.width * scale, picture.height * scale), Image.Resampling.NEAREST
        )
    return _png(picture)


def _png(picture: Image.Image) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def mask_previews(
    masks: ItemMasks,
    palette: Sequence[int],
    label_names: Mapping[int, str],
    image: np.ndarray | None = None,
) -> dict[str, Any]:
    """The previews of one item's (or video frame's) written masks, PNGs in base64, for the
    preview artifact: ``semantic`` (colours of the label palette, over ``image`` when given)
    with its ``legend`` (``[id, label, "#rrggbb"]`` of each label it shows), ``instance`` (a
    colour per object, :func:`object_colours`), and, when neither mode was written,
    ``binary``: ``[label, png]`` of the item's first label mask."""
    previews: dict[str, Any] = {}
    if masks.semantic is not None:
        previews["semantic"] = _base64(preview_png(masks.semantic, palette, image))
        lut = np.asarray(palette, dtype=np.uint8).reshape(256, 3)
        previews["legend"] = [
            [int(i), label_names.get(int(i), "?"), "#{:02x}{:02x}{:02x}".format(*lut[i & 0xFF])]
            for i in np.unique(masks.semantic)
            if i
        ]
    if masks.instance is not None:
        previews["instance"] = _base64(preview_png(masks.instance, None, image))
    if not previews and masks.binary:
        label, mask = next(iter(masks.binary.items()))
        previews["binary"] = [label, _base64(preview_png(mask, palette, image))]
    return previews


def _base64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _swatch(colour: str, size: int = 12) -> str:
    """A ``size``-pixel square of ``colour`` (``#rrggbb``) as a markdown image."""
    rgb = tuple(int(colour[k : k + 2], 16) for k in (1, 3, 5))
    data = _base64(_png(Image.new("RGB", (size, size), rgb)))
    return f"![{colour}](data:image/png;base64,{data})"


def _picture(alt: str, png: str) -> str:
    return f"![{_cell(alt)}](data:image/png;base64,{png})"


def previews_markdown(previews: Sequence[tuple[str, Mapping[str, Any], str | None]]) -> str:
    """Markdown with the preview PNGs inline (data URIs): for each ``(path, previews, note)``
    (``previews`` from :func:`mask_previews`, with ``frame`` for a video item) a heading and a
    table of the pictures side by side, the semantic one with its label legend; ``note`` says
    why an item has no picture (failed, nothing to burn)."""
    lines = ["# Mask previews", ""]
    for path, shown, note in previews:
        frame = f" (frame {shown['frame']})" if shown.get("frame") is not None else ""
        lines += [f"### `{path}`{frame}", ""]
        columns: list[tuple[str, str]] = []
        if "semantic" in shown:
            columns.append(("semantic", _picture(f"{path} semantic", shown["semantic"])))
            legend = " · ".join(
                f"{_swatch(colour)} {_cell(label)} ({i})" for i, label, colour in shown["legend"]
            )
            columns.append(("labels", legend or "background only"))
        if "instance" in shown:
            columns.append(("instance", _picture(f"{path} instance", shown["instance"])))
        if "binary" in shown:
            label, png = shown["binary"]
            columns.append((f"binary: {_cell(label)}", _picture(f"{path} binary", png)))
        if columns:
            lines += [
                "| " + " | ".join(name for name, _ in columns) + " |",
                "|" + "---|" * len(columns),
                "| " + " | ".join(cell for _, cell in columns) + " |",
                "",
            ]
        else:
            lines += [note or "No preview.", ""]
    if not previews:
        lines.append("No item was burned.")
    return "\n".join(lines)
