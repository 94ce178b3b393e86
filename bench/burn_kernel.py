"""Benchmark the numba polygon kernel against the floor, rasterio, the Dataloop pattern and cv2.

Run by hand from the repository root (about 30 s; the Dataloop pattern on W2 is ~10 s a run)::

    .venv/bin/python bench/burn_kernel.py [--quick] [--workloads W1,W2,W3,W2big] [--skip dataloop]

Writes ``bench/results/burn_kernel.json`` and prints one table per workload: median and min over
repeats in this one process, ratios to the floor and to the kernel, pixel differences against
rasterio, and the targets (kernel within 5x of the floor and >= 300x faster than the Dataloop
pattern and >= 5x faster than rasterio on W1/W2; within 1.5x of cv2 on W3).

Workloads (seeded star polygons: sorted random angles, radius uniform in [0.35 R, R] around a
centre anywhere in or slightly outside the image; values ``1 + i % 250``; uint8 masks):

* W1: 1920 x 1080, 50 polygons x 30 vertices, R uniform in 20..130 px (~20 % of pixels painted)
* W2: 4096 x 4096, 500 polygons x 30 vertices, same R (same object sizes and density as W1)
* W3: 1920 x 1080, 5 polygons x 5,000 vertices (jagged), R uniform in 160..380 px
* W2big (informational, no target, no Dataloop run): W2 with R in 80..490 px, scaled to the
  image side; the polygons cover the image ~3x over, so painting dominates

Methods (each timed end to end including ``np.zeros`` for the output; inputs are prepared
untimed in each method's natural format):

* ``floor``: ``np.zeros`` + one full write ``out[:] = 1``
* ``kernel``: :func:`polyburn.kernel.burn_polygons` on prepared arrays
* ``to_arrays``: :func:`polyburn.kernel.polygons_to_arrays` alone (shapely -> arrays)
* ``kernel+arrays``: the two together, from shapely polygons
* ``rasterio``: ``rasterio.features.rasterize`` with all (geometry, value) pairs in one call,
  ``out=`` a zeroed array, identity transform
* ``dataloop``: the Dataloop-documented pattern: ``dl.Segmentation.from_polygon`` per annotation
  (full-frame ``cv2.drawContours``) and ``np.where`` into the canvas inside the loop (needs
  opencv-python-headless)
* ``cv2``: ``cv2.fillPoly`` per polygon with rounded int32 vertices (speed reference; centre-int
  convention with the outline included, hence its pixel differences)

By default glibc malloc is tuned (see :func:`steady_malloc`) so that the 16 MB buffers of W2 are
reused instead of being mmap'ed and page-faulted afresh on some runs and not others; pass
``--default-malloc`` to measure without it. The VM is shared: compare within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import shapely

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _measure import scratch_folder  # noqa: E402  (bench/ is the script's folder)

from polyburn import kernel  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "burn_kernel.json"

WORKLOADS = {
    "W1": {"width": 1920, "height": 1080, "polygons": 50, "vertices": 30, "seed": 1},
    "W2": {"width": 4096, "height": 4096, "polygons": 500, "vertices": 30, "seed": 2},
    "W3": {
        "width": 1920,
        "height": 1080,
        "polygons": 5,
        "vertices": 5000,
        "seed": 3,
        "radius": (160.0, 380.0),
    },
    # Informational: W2 with radii scaled to the image side (~3x overdraw), no target.
    "W2big": {
        "width": 4096,
        "height": 4096,
        "polygons": 500,
        "vertices": 30,
        "seed": 2,
        "radius": (80.0, 490.0),
    },
}

# Targets: (metric, method, bound) -> kernel/other ratio must be <= bound (or >= for "faster").
TARGETS = {
    "W1": [("within_x_of", "floor", 5.0), ("faster_than", "dataloop", 300.0),
           ("faster_than", "rasterio", 5.0)],
    "W2": [("within_x_of", "floor", 5.0), ("faster_than", "dataloop", 300.0),
           ("faster_than", "rasterio", 5.0)],
    "W3": [("within_x_of", "cv2", 1.5)],
}  # fmt: skip


def make_workload(
    width: int,
    height: int,
    polygons: int,
    vertices: int,
    seed: int,
    radius: tuple[float, float] | None = None,
):
    """Seeded star polygons: sorted random angles, radius in [0.35 R, R] around a random centre
    (which may lie near or past the border), R uniform in ``radius`` (pixels)."""
    rng = np.random.default_rng(seed)
    if radius is None:
        radius = (20.0, 130.0)
    big = rng.uniform(radius[0], radius[1], polygons)
    cx = rng.uniform(-0.05, 1.05, polygons) * width
    cy = rng.uniform(-0.05, 1.05, polygons) * height
    ang = np.sort(rng.uniform(0.0, 2.0 * np.pi, (polygons, vertices)), axis=1)
    rad = rng.uniform(0.35, 1.0, (polygons, vertices)) * big[:, None]
    x = cx[:, None] + rad * np.cos(ang)
    y = cy[:, None] + rad * np.sin(ang)
    rings = np.stack([x, y], axis=-1)
    rings = np.concatenate([rings, rings[:, :1]], axis=1)  # closed, like shapely rings
    geoms = shapely.polygons(rings)
    values = (1 + np.arange(polygons) % 250).astype(np.uint8)
    return list(geoms), values, rings


def time_in_passes(methods: list[dict], budget_s: float, passes: int = 3) -> dict[str, list]:
    """Time the methods in ``passes`` sequential passes over the list. In each pass a method
    gets ``warmup`` untimed calls (its caches are hot, as in a loop), then its share of
    ``repeats`` timed calls, cut short once its pass time exceeds ``budget_s / passes`` with at
    least one call. Spreading every method over the whole run evens out load spikes on a shared
    machine. The last result is kept in ``method["result"]``."""
    times: dict[str, list[float]] = {m["name"]: [] for m in methods}
    for k in range(passes):
        for m in methods:
            t = times[m["name"]]
            share = -(-(m["repeats"] - len(t)) // (passes - k))  # ceil of what is left
            if share <= 0:
                continue
            for _ in range(m["warmup"]):
                m["result"] = m["fn"]()
            spent = 0.0
            for _ in range(share):
                t0 = time.perf_counter()
                m["result"] = m["fn"]()
                t.append(time.perf_counter() - t0)
                spent += t[-1]
                if spent > budget_s / passes:
                    break
    return times


def steady_malloc() -> bool:
    """Keep large buffers on glibc's heap (no mmap/munmap per np.zeros), so repeated full-frame
    allocations do not page-fault differently from run to run; applies to every method alike."""
    try:
        import ctypes  # noqa: PLC0415

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 1 << 30)) and bool(
            libc.mallopt(m_trim_threshold, 1 << 30)
        )
    except OSError:
        return False


def import_dtlpy():
    if "DATALOOP_PATH" not in os.environ:
        os.environ["DATALOOP_PATH"] = str(scratch_folder("dtlpy-bench-"))
    import dtlpy as dl  # noqa: PLC0415

    return dl


def run_workload(name: str, spec: dict, quick: bool, skip: set[str]) -> dict:
    geoms, values, rings = make_workload(**spec)
    h, w = spec["height"], spec["width"]
    coords, ring_offsets, poly_offsets = kernel.polygons_to_arrays(geoms)
    reps = 7 if quick else 30
    budget = 2.0 if quick else 6.0
    plan: list[dict] = []

    def add(method, fn, repeats=reps, warmup=1, keep=True):
        plan.append({"name": method, "fn": fn, "repeats": repeats, "warmup": warmup, "keep": keep})

    def floor():
        out = np.zeros((h, w), np.uint8)
        out[:] = 1
        return out

    def burn():
        out = np.zeros((h, w), np.uint8)
        return kernel.burn_polygons(out, coords, ring_offsets, poly_offsets, values)

    def to_arrays():
        return kernel.polygons_to_arrays(geoms)

    def burn_with_arrays():
        out = np.zeros((h, w), np.uint8)
        c, r, p = kernel.polygons_to_arrays(geoms)
        return kernel.burn_polygons(out, c, r, p, values)

    print(f"{name}: {w}x{h}, {spec['polygons']} polygons x {spec['vertices']} vertices", flush=True)
    add("floor", floor, keep=False)
    add("kernel", burn)
    add("to_arrays", to_arrays, keep=False)
    add("kernel+arrays", burn_with_arrays)

    if "rasterio" not in skip:
        from affine import Affine  # noqa: PLC0415
        from rasterio import features  # noqa: PLC0415
        from rasterio.enums import MergeAlg  # noqa: PLC0415

        pairs = [(g, int(v)) for g, v in zip(geoms, values, strict=True)]

        def rio():
            out = np.zeros((h, w), np.uint8)
            features.rasterize(
                pairs,
                out=out,
                transform=Affine.identity(),
                all_touched=False,
                merge_alg=MergeAlg.replace,
            )
            return out

        add("rasterio", rio, repeats=min(reps, 15))

    if "cv2" not in skip:
        import cv2  # noqa: PLC0415

        pts = [np.round(r[:-1]).astype(np.int32) for r in rings]

        def fill_poly():
            out = np.zeros((h, w), np.uint8)
            for p, v in zip(pts, values, strict=True):
                cv2.fillPoly(out, [p], int(v))
            return out

        add("cv2", fill_poly)

    if "dataloop" not in skip and name != "W2big":
        dl = import_dtlpy()
        geos = [r[:-1].tolist() for r in rings]  # Dataloop polygon geo: [[x, y], ...]

        def dataloop():
            mask = np.zeros((h, w), np.uint8)
            for geo, v in zip(geos, values, strict=True):
                seg = dl.Segmentation.from_polygon(geo=geo, label="x", shape=(h, w))
                mask = np.where(seg.geo > 0, v, mask).astype(np.uint8)
            return mask

        if h * w * spec["polygons"] > 1e9:  # W2: ~10 s a run
            add("dataloop", dataloop, repeats=1 if quick else 2, warmup=0)
        else:
            add("dataloop", dataloop, repeats=3 if quick else 7)

    times = time_in_passes(plan, budget)
    methods: dict[str, dict] = {}
    outputs: dict[str, np.ndarray] = {}
    for m in plan:
        t = times[m["name"]]
        med = statistics.median(t)
        methods[m["name"]] = {"median_ms": med * 1e3, "min_ms": min(t) * 1e3, "repeats": len(t)}
        if m["keep"]:
            outputs[m["name"]] = m["result"]
        print(f"  {m['name']:14s} {med * 1e3:10.3f} ms  (n={len(t)})", flush=True)

    ref = outputs.get("rasterio")
    for method, out in outputs.items():
        if ref is not None:
            diff = int(np.count_nonzero(out != ref))
            methods[method]["px_diff_vs_rasterio"] = diff
            methods[method]["px_diff_pct"] = 100.0 * diff / out.size
    methods["floor"]["px_diff_vs_rasterio"] = None

    k = methods["kernel"]["median_ms"]
    kc = methods["kernel+arrays"]["median_ms"]
    for m in methods.values():
        m["x_floor"] = m["median_ms"] / methods["floor"]["median_ms"]
        m["x_kernel"] = m["median_ms"] / k

    checks = []
    for kind, other, bound in TARGETS.get(name, []):
        if other not in methods:
            continue
        o = methods[other]["median_ms"]
        for label, ours in (("kernel", k), ("kernel+arrays", kc)):
            if kind == "within_x_of":
                ratio = ours / o
                ok = ratio <= bound
                text = f"{label} within {bound:g}x of {other}: {ratio:.2f}x"
            else:
                ratio = o / ours
                ok = ratio >= bound
                text = f"{label} >= {bound:g}x faster than {other}: {ratio:.1f}x"
            checks.append({"target": text, "ratio": ratio, "bound": bound, "met": ok})
    return {"spec": spec, "pixels": h * w, "methods": methods, "targets": checks}


def print_table(name: str, res: dict) -> None:
    spec = res["spec"]
    print()
    print(
        f"### {name}: {spec['width']}x{spec['height']}, {spec['polygons']} polygons x "
        f"{spec['vertices']} vertices"
    )
    print()
    print("| method | median ms | min ms | n | x floor | x kernel | px != rasterio |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for method, m in sorted(res["methods"].items(), key=lambda kv: kv[1]["median_ms"]):
        diff = m.get("px_diff_vs_rasterio")
        dtext = "-" if diff is None else f"{diff} ({m['px_diff_pct']:.3f} %)"
        print(
            f"| {method} | {m['median_ms']:.3f} | {m['min_ms']:.3f} | {m['repeats']} | "
            f"{m['x_floor']:.1f} | "
            f"{m['x_kernel']:.2f} | {dtext} |"
        )
    if res["targets"]:
        print()
        for t in res["targets"]:
            print(f"* {'MET ' if t['met'] else 'MISS'} {t['target']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--workloads", default="W1,W2,W3,W2big")
    parser.add_argument(
        "--skip", default="", help="comma-separated methods to skip (rasterio,cv2,dataloop)"
    )
    parser.add_argument("--output", default=str(RESULTS))
    parser.add_argument(
        "--default-malloc", action="store_true", help="do not tune glibc malloc (see steady_malloc)"
    )
    args = parser.parse_args(argv)
    skip = {s for s in args.skip.split(",") if s}
    malloc_tuned = False if args.default_malloc else steady_malloc()
    print(f"glibc malloc tuned for steady state: {malloc_tuned}")

    t0 = time.perf_counter()
    kernel.warm_up()
    print(f"warm_up: {time.perf_counter() - t0:.2f} s (numba cache load or compile)")

    results = {}
    for name in args.workloads.split(","):
        results[name] = run_workload(name, WORKLOADS[name], args.quick, skip)
    for name, res in results.items():
        print_table(name, res)

    import numba  # noqa: PLC0415

    versions = {"python": platform.python_version(), "numpy": np.__version__,
                "shapely": shapely.__version__, "numba": numba.__version__}  # fmt: skip
    for mod in ("rasterio", "cv2", "dtlpy"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            versions[mod] = None
    payload = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "load_avg": os.getloadavg()},
        "versions": versions,
        "quick": args.quick,
        "malloc_tuned": malloc_tuned,
        "workloads": results,
    }  # fmt: skip
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
