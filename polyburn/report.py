"""What a run shows a person: summary tables, failure lists and mask previews (pure functions)."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TextIO

import numpy as np
from PIL import Image

PREVIEW_WIDTH = 320
LISTED_LOSSES = 20
"""Rejected annotations and items with nothing to burn named in a summary; the rest are
counted, and all of them are in the manifest."""


def summary_table(summary: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Rows of (metric, value) for a Prefect table artifact."""
    rows = [
        ("items", summary["items"]),
        ("items ok", summary["ok"]),
        ("items failed", summary["failed"]),
        ("annotations", summary["annotations"]),
        ("shapes burned", summary["shapes"]),
        ("repairs", summary["repairs"]),
        *((f"repairs: {kind}", n) for kind, n in summary["repairs_by_kind"].items()),
        ("annotations rejected", summary["rejected"]),
        ("items with nothing to burn", summary.get("empty_items", 0)),
        ("items left without masks (skip_empty)", summary.get("empty_items_skipped", 0)),
        *((f"skipped: {kind}", n) for kind, n in summary["skipped_by_type"].items()),
        ("files written", summary["outputs_written"]),
        ("batches from cache", summary.get("cached_batches", 0)),
        ("task retries", summary.get("retries", 0)),
        ("item retries (transient errors)", summary.get("item_retries", 0)),
        ("client retries (destination requests)", summary.get("io_retries", 0)),
        ("duration (s)", summary["seconds"]),
        ("polyburn version", summary.get("polyburn_version", "")),
    ]
    return [{"metric": metric, "value": value} for metric, value in rows]


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


def losses_text(summary: Mapping[str, Any], manifest: str, limit: int = LISTED_LOSSES) -> list[str]:
    """The summary's lines naming each rejected annotation (the first ``limit``, then how many
    more) and the items with nothing to burn (the first ``limit``)."""
    lines = [f"REJECTED {rejection_line(r)}" for r in summary["rejections"][:limit]]
    more = summary["rejected"] - min(limit, len(summary["rejections"]))
    if more > 0:
        lines.append(f"... and {more} more rejected annotations, see the manifest {manifest}")
    empty = summary.get("empty_items", 0)
    if empty:
        names = ", ".join(empty_line(e) for e in summary["empty"][:limit])
        rest = empty - min(limit, len(summary["empty"]))
        tail = f" and {rest} more" if rest > 0 else ""
        skipped = summary.get("empty_items_skipped", 0)
        if not skipped:
            what = "all-background masks written; --skip-empty leaves them out"
        elif skipped >= empty:
            what = "no masks written (skip-empty)"
        else:  # a video with nothing to burn writes no frame, whatever --skip-empty says
            what = f"{skipped} left without masks (videos, or skip-empty), the rest all-background"
        lines.append(f"NOTHING TO BURN in {empty} item(s), {what}: {names}{tail}")
    return lines


def failures_markdown(
    summary: Mapping[str, Any], manifest: str, limit: int = 200, listed: int = LISTED_LOSSES
) -> str:
    """A markdown report of failed items with their one-line reasons, every rejected annotation
    (the first ``listed``, then how many more) and the items with nothing to burn, linking the
    manifest."""
    lines = [
        f"# polyburn: {summary['ok']} ok, {summary['failed']} failed of {summary['items']} items",
        "",
        f"Manifest (every item, repair and rejection): `{manifest}`",
        "",
    ]
    failures = summary["failures"]
    if not failures:
        lines.append("No item failed.")
    else:
        lines += ["| item | error |", "|---|---|"]
        for failure in failures[:limit]:
            lines.append(f"| `{failure['path']}` | {_cell(failure['error'])} |")
        if len(failures) > limit:
            lines.append(f"\n… and {len(failures) - limit} more in the manifest.")
    lines += ["", f"## Rejected annotations: {summary['rejected']}", ""]
    if summary["rejections"]:
        lines += ["| item | annotation | label | reason |", "|---|---|---|---|"]
        for r in summary["rejections"][:listed]:
            field = f" [{r['field']}]" if r.get("field") else ""
            lines.append(
                f"| `{r['path']}` | `{r['annotation']}`{at_frame(r)} | "
                f"{_cell(r.get('label') or '')} | {_cell(r['reason'])}{_cell(field)} |"
            )
    more = summary["rejected"] - min(listed, len(summary["rejections"]))
    if more > 0:
        lines.append(f"\n… and {more} more, see the manifest.")
    empty = summary.get("empty_items", 0)
    lines += ["", f"## Items with nothing to burn: {empty}", ""]
    if empty:
        skipped = summary.get("empty_items_skipped", 0)
        if not skipped:
            lines.append("All-background masks written for them; skip_empty leaves them out.")
        elif skipped >= empty:
            lines.append("No masks written for them (skip_empty).")
        else:
            lines.append(
                f"{skipped} left without masks (videos, or skip_empty), the rest all-background."
            )
        lines.append("")
        lines += [f"* `{_cell(empty_line(e))}`" for e in summary["empty"][:listed]]
        rest = empty - min(listed, len(summary["empty"]))
        if rest > 0:
            lines.append(f"\n… and {rest} more, see the manifest.")
    return "\n".join(lines) + "\n"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|")


def write_json_summary(
    summary: Mapping[str, Any], rejections: Iterable[Mapping[str, Any]], out: TextIO
) -> None:
    """Write ``summary`` as one indented JSON object whose ``rejections`` is every entry of
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


def preview_png(
    mask: np.ndarray,
    palette: Sequence[int],
    image: np.ndarray | None = None,
    width: int = PREVIEW_WIDTH,
) -> bytes:
    """A small PNG of the colourised mask, blended half-and-half over ``image`` (H, W, 3) where
    the mask is set when the image is given."""
    rgb = colourise(mask, palette)
    if image is not None and image.shape[:2] == mask.shape:
        base = image[:, :, :3].astype(np.uint16)
        blended = ((base + rgb) // 2).astype(np.uint8)
        rgb = np.where((mask > 0)[:, :, None], blended, image[:, :, :3])
    picture = Image.fromarray(rgb, "RGB")
    if picture.width > width:
        height = max(1, round(picture.height * width / picture.width))
        picture = picture.resize((width, height), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def previews_markdown(previews: Sequence[tuple[str, bytes]]) -> str:
    """Markdown with the preview PNGs inline (data URIs), one heading per item."""
    lines = ["# Mask previews", ""]
    for path, png in previews:
        data = base64.b64encode(png).decode("ascii")
        lines += [f"**{path}**", "", f"![{path}](data:image/png;base64,{data})", ""]
    if not previews:
        lines.append("No item produced a mask.")
    return "\n".join(lines)
