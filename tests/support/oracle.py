"""Independent oracles for the tests: they read the raw JSON with ``json`` and burn with rasterio
or a brute-force even-odd crossing test, sharing no code with polyburn's parser or burner."""

from __future__ import annotations

import base64
import io
import json
import math
from pathlib import Path

import numpy as np
import shapely
from affine import Affine
from PIL import Image
from rasterio import features

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


def raw_rings(annotation: dict) -> list[np.ndarray]:
    """The rings of a segment annotation with non-finite/missing vertices dropped."""
    coordinates = annotation["coordinates"]
    if coordinates and isinstance(coordinates[0], dict):
        coordinates = [coordinates]
    rings = []
    for ring in coordinates:
        points = []
        for p in ring:
            x, y = p.get("x"), p.get("y")
            numeric = isinstance(x, int | float) and isinstance(y, int | float)
            if numeric and math.isfinite(x) and math.isfinite(y):
                points.append((float(x), float(y)))
        if len(set(points)) >= 3:
            rings.append(np.array(points))
    return rings


def rasterio_oracle(rings: list[np.ndarray], height: int, width: int) -> np.ndarray:
    """bool mask: rasterio's fill of the raw rings (even-odd over all rings, no repair)."""
    polygon = shapely.Polygon(rings[0], rings[1:])
    return features.rasterize(
        [(polygon, 1)], out_shape=(height, width), transform=Affine.identity(), dtype="uint8"
    ).astype(bool)


def crossing_oracle(rings: list[np.ndarray], height: int, width: int) -> np.ndarray:
    """bool mask: pixel (r, c) is set iff its centre has an odd crossing number over all rings.

    Only meaningful when no pixel centre lies exactly on an edge (then every rule agrees).
    """
    cy, cx = np.mgrid[0:height, 0:width].astype(np.float64) + 0.5
    inside = np.zeros((height, width), dtype=bool)
    for ring in rings:
        x0, y0 = ring[:, 0], ring[:, 1]
        x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
        for a, b, c, d in zip(x0, y0, x1, y1, strict=True):
            if b == d:
                continue
            straddle = (b > cy) != (d > cy)
            x_at = a + (cy - b) * (c - a) / (d - b)
            inside ^= straddle & (cx < x_at)
    return inside


def min_centre_edge_distance(rings: list[np.ndarray], height: int, width: int) -> float:
    """Smallest distance from any pixel centre to any ring edge (0 means a tie exists)."""
    centres = shapely.points(
        (np.mgrid[0:height, 0:width][::-1].reshape(2, -1).T + 0.5).astype(np.float64)
    )
    boundary = shapely.Polygon(rings[0], rings[1:]).boundary
    return float(shapely.distance(centres, boundary).min())


def decode_binary(uri: str) -> np.ndarray:
    png = base64.b64decode(uri.split(",", 1)[1])
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGBA"))[:, :, 3] > 127


def expected_semantic(item_json: dict, label_map: dict[str, int]) -> np.ndarray:
    """The semantic mask of an exported item, in file order, from the raw JSON."""
    system = item_json["metadata"]["system"]
    h, w = system["height"], system["width"]
    out = np.zeros((h, w), dtype=np.uint8)
    for annotation in item_json["annotations"]:
        if annotation["type"] == "segment":
            rings = raw_rings(annotation)
            if not rings:
                continue
            mask = rasterio_oracle(rings, h, w)
        elif annotation["type"] == "binary":
            mask = decode_binary(annotation["coordinates"])
        else:
            continue
        out[mask] = label_map[annotation["label"]]
    return out


def load_export(folder: Path, frames: bool = False) -> dict[str, dict]:
    """item path → raw item JSON for every file under ``folder/json``; with ``frames``, a video
    item is replaced by one image item per frame it has masks for (:func:`video_frames`), at
    ``<path>/<frame:06d>``."""
    root = folder / "json"
    items = {
        p.relative_to(root).as_posix()[:-5]: json.loads(p.read_text())
        for p in sorted(root.rglob("*.json"))
    }
    if not frames:
        return items
    out = {}
    for path, item in items.items():
        if "video" in item["metadata"]["system"].get("mimetype", ""):
            for frame, image in video_frames(item).items():
                out[f"{path}/{frame:06d}"] = image
        else:
            out[path] = item
    return out


def video_frames(item_json: dict) -> dict[int, dict]:
    """A video item as image items, one per frame from its first object's first frame to its
    last object's last frame: each holds the annotations visible in that frame with that
    frame's coordinates and label (the issue's frame model, read naively: for every frame, the
    latest state at or before it; no polyburn code)."""
    tracks = []
    for annotation in item_json["annotations"]:
        system = annotation["metadata"]["system"]
        states = {system.get("frame") or 0: (annotation["coordinates"], annotation["label"], True)}
        for snapshot in system.get("snapshots_") or []:
            states[snapshot["frame"]] = (
                snapshot["data"],
                snapshot.get("label", annotation["label"]),
                snapshot.get("objectVisible", True),
            )
        end = max(system.get("endFrame") or 0, *states)
        tracks.append((annotation, states, min(states), end))
    first = min(t[2] for t in tracks)
    last = max(t[3] for t in tracks)
    out = {}
    for frame in range(first, last + 1):
        visible = []
        for annotation, states, start, end in tracks:
            if not start <= frame <= end:
                continue
            coordinates, label, shown = states[max(k for k in states if k <= frame)]
            if shown:
                visible.append({**annotation, "coordinates": coordinates, "label": label})
        out[frame] = {**item_json, "annotations": visible}
    return out


def same_output(key: str, got: bytes, want: bytes) -> bool:
    """Equal files; a PNG also counts as equal when it holds the same mask (decoded with PIL).

    The masks are the contract, not their deflate stream: ISA-L's deflate has been seen to
    compress the same rows into a different (valid) stream, rarely and only under load.
    """
    if got == want:
        return True
    if not key.endswith(".png"):
        return False
    try:
        with Image.open(io.BytesIO(got)) as a, Image.open(io.BytesIO(want)) as b:
            return (
                a.mode == b.mode
                and a.size == b.size
                and np.array_equal(np.asarray(a), np.asarray(b))
            )
    except (OSError, SyntaxError, ValueError):  # PIL on a truncated or broken PNG: not equal
        return False


def describe_difference(got: dict[str, bytes], want: dict[str, bytes]) -> str:
    """Which keys are missing, extra or different (empty when equal): a short message where a
    dict diff of file contents would be thousands of lines."""
    missing = sorted(want.keys() - got.keys())
    extra = sorted(got.keys() - want.keys())
    changed = sorted(k for k in want.keys() & got.keys() if not same_output(k, got[k], want[k]))
    parts = [
        f"{name} ({len(keys)}): {keys[:10]}"
        for name, keys in (("missing", missing), ("extra", extra), ("changed", changed))
        if keys
    ]
    return "; ".join(parts)


def raw_object_id(annotation: dict) -> int | None:
    """``metadata.system.objectId`` read from the raw JSON as an instance id: an int, an integral
    float or a digit string from 1 to 65535; None otherwise."""
    value = ((annotation.get("metadata") or {}).get("system") or {}).get("objectId")
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 65535:
        return value
    return None


def expected_instance(item_json: dict) -> tuple[np.ndarray, dict[int, list[str]]]:
    """The instance mask of an exported item with objectId ids, in file order, from the raw
    JSON: (uint16 mask, id → annotation ids). Same objectId and label: one id; an objectId used
    by several labels: a fresh id per label; no usable objectId: a fresh id each. Fresh ids count
    up from the largest usable objectId."""
    system = item_json["metadata"]["system"]
    h, w = system["height"], system["width"]
    burned = []
    for annotation in item_json["annotations"]:
        if annotation["type"] == "segment":
            rings = raw_rings(annotation)
            if rings:
                burned.append((annotation, rasterio_oracle(rings, h, w)))
        elif annotation["type"] == "binary":
            burned.append((annotation, decode_binary(annotation["coordinates"])))
    labels: dict[int, set[str]] = {}
    for annotation, _ in burned:
        if (oid := raw_object_id(annotation)) is not None:
            labels.setdefault(oid, set()).add(annotation["label"])
    fresh = max(labels, default=0)
    per_label: dict[tuple[int, str], int] = {}
    out = np.zeros((h, w), dtype=np.uint16)
    members: dict[int, list[str]] = {}
    for annotation, mask in burned:
        oid = raw_object_id(annotation)
        if oid is not None and len(labels[oid]) == 1:
            k = oid
        elif oid is not None:
            if (oid, annotation["label"]) not in per_label:
                fresh += 1
                per_label[(oid, annotation["label"])] = fresh
            k = per_label[(oid, annotation["label"])]
        else:
            fresh += 1
            k = fresh
        out[mask] = k
        members.setdefault(k, []).append(annotation.get("id", annotation.get("_id")))
    return out, members
