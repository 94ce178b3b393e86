"""Seeded synthetic Dataloop exports for tests and benchmarks (star polygons, some with holes)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

LABELS = ("car", "person", "road", "building", "tree")


def star_ring(rng: np.random.Generator, cx: float, cy: float, radius: float, n: int) -> np.ndarray:
    angles = np.sort(rng.uniform(0, 2 * np.pi, n))
    radii = radius * rng.uniform(0.4, 1.0, n)
    return np.c_[cx + radii * np.cos(angles), cy + radii * np.sin(angles)]


def make_item(
    rng: np.random.Generator,
    index: int,
    width: int = 1920,
    height: int = 1080,
    polygons: int = 50,
    vertices: int = 30,
) -> dict:
    annotations = []
    for k in range(polygons):
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        radius = rng.uniform(0.02, 0.15) * min(width, height)
        rings = [star_ring(rng, cx, cy, radius, vertices)]
        if k % 10 == 3:  # a hole: the exterior shrunk towards its centre
            centre = np.array([cx, cy])
            rings.append(centre + (rings[0] - centre) * 0.3)
        annotations.append(
            {
                "id": f"{index:08x}{k:04x}",
                "type": "segment",
                "label": LABELS[k % len(LABELS)],
                "coordinates": [
                    [{"x": round(float(x), 3), "y": round(float(y), 3), "z": 0} for x, y in ring]
                    for ring in rings
                ],
                "metadata": {"system": {"objectId": k + 1}},
            }
        )
    return {
        "id": f"item{index:08d}",
        "filename": f"/batch{index // 100:03d}/img_{index:06d}.jpg",
        "metadata": {"system": {"width": width, "height": height}},
        "annotations": annotations,
    }


def write_export(root: Path, count: int, seed: int = 0, **item_options) -> Path:
    """Write ``count`` items as ``root/json/batchNNN/img_NNNNNN.json``; returns ``root``."""
    rng = np.random.default_rng(seed)
    for index in range(count):
        item = make_item(rng, index, **item_options)
        path = root / "json" / (item["filename"].lstrip("/").rsplit(".", 1)[0] + ".json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(item))
    return root
