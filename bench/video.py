"""Video items, run by hand: ``python bench/video.py`` (writes ``bench/results/video.json``).

A synthetic video item of 320x240 with 20 objects (12-vertex polygons moving across the frame,
a snapshot every EVERY frames, as key frames; some objects hidden for a stretch) is burned
by :func:`polyburn.pipeline.process_item` into a fresh local folder (semantic and instance
masks), with 1,000 frames and 10,000 frames (a key frame every 5 frames), and 10,000 frames with
a key frame every 50 (the same JSON size as 1,000 every 5), each in a fresh process, which
reports:

* ``peak_rss_after_load_mb``: the peak RSS once the item was loaded (read, decoded, parsed)
  once on its own, before the burn; ``peak_rss_mb``: the peak after the burn as well (the burn
  loads the item again); ``rss_before_burn_mb`` / ``rss_after_burn_mb``: RSS around the burn;
* ``ms_per_frame``: the item's wall time over its frames (mean), and ``frames``, ``files``;
* ``record_bytes``: the size of the item's stored record (``.polyburn/records``), which lists
  every output with its sha256;
* ``image_ms_median``: in the same process, the median wall time of ``process_item`` over 300
  image items of the same size, each holding one frame's 20 polygons (the same masks an image
  run burns), and ``ratio`` = ms_per_frame / image_ms_median; the ``cpu_`` figures are the same
  in CPU time of the process (less sensitive to other load on the machine).
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _measure import record_dict  # bench/ is the script's folder, first on sys.path

ROOT = Path(__file__).resolve().parents[1]
W, H, OBJECTS = 320, 240, 20


def star(cx: float, cy: float, r: float, n: int = 6) -> list[list[dict]]:
    points = []
    for k in range(2 * n):
        radius = r if k % 2 == 0 else r * 0.55
        a = math.pi * k / n
        points.append(
            {"x": round(cx + radius * math.cos(a), 3), "y": round(cy + radius * math.sin(a), 3)}
        )
    return [points]


def position(obj: int, frame: int) -> tuple[float, float]:
    x = (17 * obj + 0.7 * frame) % (W + 40) - 20
    y = 12 + (obj * 11) % (H - 24)
    return x, y


def video_item(frames: int, every: int) -> dict:
    annotations = []
    for obj in range(OBJECTS):
        snapshots = []
        for frame in range(every, frames, every):
            hidden = (frame // every) % 25 == obj % 25 and obj % 4 == 0
            snapshots.append(
                {
                    "frame": frame,
                    "fixed": True,
                    "objectVisible": not hidden,
                    "label": "car" if obj % 2 else "person",
                    "type": "segment",
                    "data": star(*position(obj, frame), 9),
                }
            )
        annotations.append(
            {
                "id": f"a{obj}",
                "type": "segment",
                "label": "car" if obj % 2 else "person",
                "coordinates": star(*position(obj, 0), 9),
                "metadata": {
                    "system": {
                        "frame": 0,
                        "endFrame": frames - 1,
                        "objectId": obj + 1,
                        "snapshots_": snapshots,
                    }
                },
            }
        )
    return {
        "id": "video",
        "filename": "/bench/video.webm",
        "metadata": {
            "fps": 25,
            "system": {"width": W, "height": H, "mimetype": "video/webm", "nb_frames": frames},
        },
        "annotations": annotations,
    }


def image_item(frame: int, every: int) -> dict:
    """The state the video shows at ``frame`` (held from the last key frame), as an image."""
    key = frame - frame % every
    return {
        "id": f"img{frame}",
        "filename": f"/bench/img_{frame}.jpg",
        "metadata": {"system": {"width": W, "height": H, "mimetype": "image/jpeg"}},
        "annotations": [
            {
                "id": f"a{obj}",
                "type": "segment",
                "label": "car" if obj % 2 else "person",
                "coordinates": star(*position(obj, key), 9),
                "metadata": {"system": {"objectId": obj + 1}},
            }
            for obj in range(OBJECTS)
        ],
    }


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def measure(frames: int, every: int) -> dict:
    """In this process: the video item, then 300 image items."""
    sys.path.insert(0, str(ROOT))
    from polyburn.destinations.local import LocalDestination
    from polyburn.params import MaskOptions
    from polyburn.pipeline import process_item
    from polyburn.sources.local import LocalSource

    options = MaskOptions(modes=["semantic", "instance"])
    labels = {"car": 1, "person": 2}
    with tempfile.TemporaryDirectory(prefix="polyburn-bench-video-") as folder:
        root = Path(folder)
        (root / "video" / "json").mkdir(parents=True)
        file = root / "video" / "json" / "clip.json"
        file.write_text(json.dumps(video_item(frames, every)))
        (root / "images" / "json").mkdir(parents=True)
        for frame in range(300):
            (root / "images" / "json" / f"img_{frame:03d}.json").write_text(
                json.dumps(image_item(frame * 7 % frames, every))
            )
        images = LocalSource(root / "images")
        destination = LocalDestination(root / "image-masks")
        image_ms, image_cpu_ms = [], []
        for ref in images.list_items():  # images first: warms imports; their RSS is small
            started, cpu = time.perf_counter(), time.process_time()
            process_item(ref, images, destination, options, labels)
            image_ms.append(1000 * (time.perf_counter() - started))
            image_cpu_ms.append(1000 * (time.process_time() - cpu))
        source = LocalSource(root / "video")
        (ref,) = list(source.list_items())
        source.load(ref, options.max_pixels)  # decoded once: what the input alone takes
        before = rss_mb()
        peak_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        destination = LocalDestination(root / "video-masks")
        started, cpu = time.perf_counter(), time.process_time()
        record = process_item(ref, source, destination, options, labels)
        record = record_dict(record)
        wall, cpu = time.perf_counter() - started, time.process_time() - cpu
        stored = next((root / "video-masks" / ".polyburn" / "records").rglob("*.json"))
        assert record["status"] == "ok", record["error"]
        median, cpu_median = statistics.median(image_ms), statistics.median(image_cpu_ms)
        return {
            "frames": frames,
            "snapshot_every": every,
            "input_json_mb": round(file.stat().st_size / 2**20, 2),
            "files": len(record["outputs"]),
            "seconds": round(wall, 2),
            "ms_per_frame": round(1000 * wall / frames, 3),
            "image_ms_median": round(median, 3),
            "ratio": round(1000 * wall / frames / median, 3),
            "cpu_ms_per_frame": round(1000 * cpu / frames, 3),
            "image_cpu_ms_median": round(cpu_median, 3),
            "cpu_ratio": round(1000 * cpu / frames / cpu_median, 3),
            "rss_before_burn_mb": round(before, 1),
            "peak_rss_after_load_mb": round(peak_load, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "rss_after_burn_mb": round(rss_mb(), 1),
            "record_bytes": stored.stat().st_size,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--runs",
        nargs="+",
        default=["1000:5", "10000:5", "10000:50"],
        help="FRAMES:EVERY pairs, EVERY the frames between key frames",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        frames, every = map(int, args.child.split(":"))
        print(json.dumps(measure(frames, every)))
        return
    runs = []
    for run in args.runs:
        out = subprocess.run(
            [sys.executable, __file__, "--child", run],
            check=True,
            capture_output=True,
            text=True,
        )
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(runs[-1]))
    result = {"objects": OBJECTS, "size": f"{W}x{H}", "modes": "semantic,instance", "runs": runs}
    target = ROOT / "bench" / "results" / "video.json"
    target.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
