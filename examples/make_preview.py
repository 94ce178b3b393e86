"""Draw docs/img/example-masks.png from `make demo`'s output: for a few items of the example
export, the polygons as annotated (outlines of the raw rings, broken ones included), the semantic
mask and the instance mask polyburn wrote, side by side, colourised through the run's palette.

    make demo && .venv/bin/python examples/make_preview.py masks docs/img/example-masks.png
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import shapely
from PIL import Image
from rasterio.features import rasterize

from polyburn.labels import palette, voc_colour
from polyburn.report import colourise

EXPORT = Path(__file__).resolve().parent / "export" / "json"
ITEMS = ("street/scene_001", "street/scene_002", "fields/plot_001")
GAP = 8
SCALE = 1


def outlines(item: dict, label_map: dict[str, int]) -> np.ndarray:
    """The item's polygon rings as 1-pixel outlines (every pixel a ring touches), valued by
    label id; vertices that are not finite numbers are left out, as the parser drops them."""
    lines = []
    for annotation in item["annotations"]:
        if annotation.get("type") != "segment" or annotation.get("label") not in label_map:
            continue
        for ring in annotation.get("coordinates") or []:
            points = [
                (p["x"], p["y"])
                for p in ring
                if isinstance(p, dict)
                and all(isinstance(p.get(k), int | float) and math.isfinite(p[k]) for k in "xy")
            ]
            if len(points) >= 2:
                line = shapely.LineString([*points, points[0]])
                lines.append((line, label_map[annotation["label"]]))
    height = item["metadata"]["system"]["height"]
    width = item["metadata"]["system"]["width"]
    if not lines:
        return np.zeros((height, width), np.uint8)
    return rasterize(lines, out_shape=(height, width), all_touched=True, dtype="uint8")


def instance_colours(mask: np.ndarray) -> np.ndarray:
    """An RGB image of a uint16 instance mask, one PASCAL VOC colour per instance id."""
    lut = np.array([voc_colour(i % 255 + 1 if i else 0) for i in range(int(mask.max()) + 1)])
    return lut[mask].astype(np.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("masks", type=Path, help="the destination folder of `make demo`")
    parser.add_argument("out", type=Path, help="the PNG to write")
    args = parser.parse_args()
    label_map = json.loads((args.masks / "label_map.json").read_text())
    pal = palette(label_map)
    rows = []
    for path in ITEMS:
        item = json.loads((EXPORT / f"{path}.json").read_text())
        semantic = np.asarray(Image.open(args.masks / "semantic" / f"{path}.png"))
        instance = np.asarray(Image.open(args.masks / "instance" / f"{path}.png"))
        panels = [
            colourise(outlines(item, label_map), pal),
            colourise(semantic, pal),
            instance_colours(instance),
        ]
        gap = np.full((semantic.shape[0], GAP, 3), 255, np.uint8)
        rows.append(np.hstack([panels[0], gap, panels[1], gap, panels[2]]))
    spacer = np.full((GAP, rows[0].shape[1], 3), 255, np.uint8)
    picture = np.vstack([part for row in rows for part in (row, spacer)][:-1])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(picture, "RGB").save(args.out, optimize=True)
    print(f"wrote {args.out} ({picture.shape[1]}x{picture.shape[0]})")


if __name__ == "__main__":
    main()
