"""Benchmark ``polyburn dataset`` (COCO files, splits and manifest from records and fragments)
at 10,000 and 100,000 items: its time and peak RSS must stay flat while the items grow.

Run by hand from the repository root (about 3 min, most of it writing the synthetic
destinations)::

    .venv/bin/python bench/coco_assembly.py [--sizes 10000,100000] [--keep DIR]

For each size it writes a synthetic folder destination the way runs leave one: a label map,
one record per item (``.polyburn/records/…``, with the item's outputs and ML subset) and one
COCO fragment per item (``coco/items/…``: a 640 x 480 image with 6 instances, real RLE from
pycocotools), then runs ``polyburn manifest DEST --compact`` (the manifest alone, which full
runs already write) and ``polyburn dataset DEST`` (manifest, splits and COCO files), each in a
fresh process (``bench/_measure.py``), and reads their wall time and peak RSS. Writes
``bench/results/coco_assembly.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _measure import write_results  # noqa: E402

from polyburn.coco import instance_annotations  # noqa: E402
from polyburn.destinations.base import LABEL_MAP_KEY  # noqa: E402
from polyburn.labels import dump_label_map  # noqa: E402
from polyburn.manifest import manifest_line  # noqa: E402
from polyburn.records import ItemRecord  # noqa: E402
from polyburn.state import LAYOUT, LAYOUT_KEY, record_key  # noqa: E402

LABELS = {"building": 1, "car": 2, "person": 3, "road": 4, "tree": 5}
SUBSETS = ["train", "train", "train", "validation", "test", None]


def template_annotations() -> list[dict]:
    """Six instances of a 640 x 480 item (ellipses, one with a hole), as fragments hold them."""
    rng = np.random.default_rng(0)
    mask = np.zeros((480, 640), np.uint16)
    yy, xx = np.mgrid[0:480, 0:640]
    table = []
    for k in range(1, 7):
        cy, cx, ry, rx = rng.uniform(60, 420), rng.uniform(60, 580), *rng.uniform(20, 90, 2)
        inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        if k == 1:
            inside &= ((yy - cy) / (ry / 3)) ** 2 + ((xx - cx) / (rx / 3)) ** 2 > 1
        mask[inside] = k
        label = sorted(LABELS)[k % len(LABELS)]
        table.append({"id": k, "object_id": k, "label": label})
    return instance_annotations(mask, table, LABELS)


def build(dest: Path, items: int) -> float:
    """A synthetic destination of ``items`` items; returns the seconds it took."""
    started = time.perf_counter()
    annotations = template_annotations()
    (dest / ".polyburn/records").mkdir(parents=True)
    (dest / LABEL_MAP_KEY).write_text(dump_label_map(LABELS))
    (dest / LAYOUT_KEY).write_text(f"{LAYOUT}\n")
    for i in range(items):
        path = f"folder{i % 100:02d}/item_{i:06d}"
        subset = SUBSETS[i % len(SUBSETS)]
        fragment = {
            "image": {
                "path": path,
                "file_name": f"{path}.jpg",
                "width": 640,
                "height": 480,
                "dataloop_id": f"{i:024x}",
            },
            "subset": subset,
            "annotations": annotations,
        }
        data = json.dumps(fragment, separators=(",", ":")).encode()
        fragment_file = dest / f"coco/items/{path}.json"
        fragment_file.parent.mkdir(parents=True, exist_ok=True)
        fragment_file.write_bytes(data)
        record = {
            "item": f"{i:024x}",
            "path": path,
            "status": "ok",
            "error": None,
            "subset": subset,
            "annotations": 6,
            "shapes": 6,
            "repairs": [],
            "problems": [],
            "outputs": [{"key": f"coco/items/{path}.json", "sha256": "0" * 64, "bytes": len(data)}],
        }
        record_file = dest / record_key(path)
        record_file.parent.mkdir(parents=True, exist_ok=True)
        record_file.write_bytes(manifest_line(ItemRecord.from_dict(record)))
    return time.perf_counter() - started


def measure(*args: str) -> dict:
    """Wall, CPU and peak RSS of ``polyburn ARGS`` in a fresh process."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        subprocess.run(
            [sys.executable, str(ROOT / "bench/_measure.py"), out.name, "polyburn", *args],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        result = json.loads(Path(out.name).read_text())
    return {
        "seconds": round(result["wall"], 2),
        "cpu_seconds": round(result["cpu_main"], 2),
        "peak_rss_mb": round(result["peak_rss_mb"], 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--keep", type=Path, help="build the destinations here and keep them")
    args = parser.parse_args()
    runs = []
    base = args.keep or Path(tempfile.mkdtemp(prefix="polyburn-coco-bench-"))
    try:
        for items in (int(s) for s in args.sizes.split(",")):
            dest = base / f"dest-{items}"
            built = build(dest, items)
            result = {"items": items, "build_seconds": round(built, 1)}
            # the manifest alone (what every full run already does), then everything
            result["manifest_only"] = measure("manifest", str(dest), "--compact", "-o", os.devnull)
            result["dataset"] = measure("dataset", str(dest))
            result["dataset"]["seconds_per_1000_items"] = round(
                1000 * result["dataset"]["seconds"] / items, 3
            )
            coco = dest / "coco/instances.json"
            result["instances_json_mb"] = round(coco.stat().st_size / 1e6, 1)
            runs.append(result)
            print(json.dumps(result))
    finally:
        if args.keep is None:
            shutil.rmtree(base, ignore_errors=True)
    write_results(
        "coco_assembly",
        "polyburn dataset DEST: manifest.jsonl, splits/*.txt, coco/instances*.json from per-item "
        "records and COCO fragments (640x480 items, 6 instances each), folder destination, one "
        "fresh process per size",
        runs,
        cpus=os.cpu_count(),
    )


if __name__ == "__main__":
    main()
