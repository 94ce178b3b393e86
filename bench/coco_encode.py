"""Benchmark the COCO encoding of one item's instance mask (``--mode coco``'s cost per item).

Run by hand from the repository root (about 1 min)::

    .venv/bin/python bench/coco_encode.py

For 1920 x 1080 instance masks holding 10, 50, 200 and 1,000 instances (random ellipses,
objects of 20..130 px as in ``bench/burn_kernel.py``'s W1), it times:

* ``polyburn``: what ``--mode coco`` does per item: :func:`polyburn.coco.instance_regions`
  (a box per instance from its shapes' bounds) and :func:`polyburn.coco.instance_annotations`
  (per instance: the runs inside its box only, compressed by ``pycocotools.mask.frPyObjects``);
* ``naive``: per instance ``pycocotools.mask.encode(np.asfortranarray(mask == id))``, plus
  ``area`` and ``toBbox`` (the whole image compared per instance);
* ``burn``: burning the same number of 30-vertex polygons into the instance mask with
  :func:`polyburn.raster.burn` (what the item costs without COCO), for scale.

Median of 5 runs each. Writes ``bench/results/coco_encode.json``.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import shapely

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _measure import write_results  # noqa: E402
from pycocotools import mask as coco_mask  # noqa: E402

from polyburn.coco import instance_annotations, instance_regions  # noqa: E402
from polyburn.model import Annotation, Shape  # noqa: E402
from polyburn.raster import burn  # noqa: E402

H, W = 1080, 1920
REPEATS = 5


def polygons(n: int, rng: np.random.Generator) -> list[shapely.Polygon]:
    out = []
    for _ in range(n):
        cx, cy, r = rng.uniform(0, W), rng.uniform(0, H), rng.uniform(20, 130)
        angles = np.sort(rng.uniform(0, 2 * np.pi, 30))
        radii = rng.uniform(0.35 * r, r, 30)
        ring = np.c_[cx + radii * np.cos(angles), cy + radii * np.sin(angles)]
        out.append(shapely.make_valid(shapely.Polygon(ring)))
    return out


def naive(mask: np.ndarray, ids: list[int]) -> list[dict]:
    out = []
    for k in ids:
        rle = coco_mask.encode(np.asfortranarray(mask == k, dtype=np.uint8))
        out.append(
            {"counts": rle["counts"], "area": coco_mask.area(rle), "bbox": coco_mask.toBbox(rle)}
        )
    return out


def timed(fn, *args) -> float:
    runs = []
    for _ in range(REPEATS):
        started = time.perf_counter()
        fn(*args)
        runs.append(time.perf_counter() - started)
    return statistics.median(runs)


def main() -> None:
    rng = np.random.default_rng(1)
    rows = []
    for n in (10, 50, 200, 1000):
        shapes = [
            Shape(Annotation(f"a{k}", "x", "segment", k), geometry=g)
            for k, g in enumerate(polygons(n, rng))
        ]
        values = list(range(1, n + 1))
        mask = burn(shapes, values, H, W, np.uint16)
        ids = [int(v) for v in np.unique(mask) if v]
        table = [{"id": k, "object_id": k, "label": "x"} for k in values]

        def ours_of(mask=mask, shapes=shapes, values=values, table=table):
            regions = instance_regions(shapes, values, H, W)
            return instance_annotations(mask, table, {"x": 1}, regions)

        ours = ours_of()
        reference = naive(mask, ids)
        assert [a["segmentation"]["counts"].encode() for a in ours] == [
            r["counts"] for r in reference
        ]
        row = {
            "instances": n,
            "visible": len(ids),
            "polyburn_ms": 1000 * timed(ours_of),
            "naive_ms": 1000 * timed(naive, mask, ids),
            "burn_ms": 1000 * timed(burn, shapes, values, H, W, np.uint16),
        }
        row = {k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}
        row["polyburn_ms_per_instance"] = round(row["polyburn_ms"] / max(len(ids), 1), 3)
        rows.append(row)
        print(json.dumps(row))
    write_results(
        "coco_encode",
        "COCO RLE of every instance of a 1920x1080 uint16 instance mask; median of "
        f"{REPEATS} runs; same counts as the naive per-instance encode (checked)",
        rows,
    )


if __name__ == "__main__":
    main()
