"""What a run shows a person: summary tables, failure lists and mask previews (pure functions)."""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

PREVIEW_WIDTH = 320


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
        *((f"skipped: {kind}", n) for kind, n in summary["skipped_by_type"].items()),
        ("files written", summary["outputs_written"]),
        ("batches from cache", summary.get("cached_batches", 0)),
        ("task retries", summary.get("retries", 0)),
        ("item retries (transient errors)", summary.get("item_retries", 0)),
        ("client retries (destination requests)", summary.get("io_retries", 0)),
        ("duration (s)", summary["seconds"]),
    ]
    return [{"metric": metric, "value": value} for metric, value in rows]


def failures_markdown(summary: Mapping[str, Any], manifest: str, limit: int = 200) -> str:
    """A markdown report of failed items with their one-line reasons, linking the manifest."""
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
            error = str(failure["error"]).replace("|", "\\|")
            lines.append(f"| `{failure['path']}` | {error} |")
        if len(failures) > limit:
            lines.append(f"\n… and {len(failures) - limit} more in the manifest.")
    return "\n".join(lines) + "\n"


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
