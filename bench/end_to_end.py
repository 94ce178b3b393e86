"""End-to-end benchmark (run by hand): ``python bench/end_to_end.py [--quick] [--work-dir DIR]``.

Writes bench/results/end_to_end.json and prints a table. What it measures, on generated W1-like
items (1920x1080, 50 star polygons x 30 vertices, some with holes), semantic PNGs to a folder:

* ``polyburn run`` as a fresh process against a running ``prefect server start`` (SQLite), at
  200 and 2,000 items: wall, CPU utilisation (CPU s / wall s; 2.0 = both cores busy), peak RSS;
  the marginal rate (2000-200) / (t2000 - t200) and the fixed start-up t - n / marginal rate;
* the same items through the Prefect-free core (``process_items`` over all items in one call,
  on the same 2-process pool, already started): the orchestration overhead is the share of
  ``polyburn run``'s marginal wall time not explained by the core's;
* the Dataloop-documented loop (``dl.Segmentation.from_polygon`` per annotation + ``np.where``
  into the canvas, the loop bug fixed) writing the same palette PNGs with PIL, on ``--loop-items``
  items right before and right after each pair of runs: this machine's speed drifts by tens of
  percent over minutes, so each pair's marginal rate is divided by the mean of the two loop
  rates around it, and the speed-up reported is the median of those per-pair ratios (``pairs``
  lists them);
* Prefect's own fixed cost (a trivial flow in a fresh process) against polyburn's on one item;
* scaling: 1k / 5k / 20k items — seconds per item and peak RSS must stay flat;
* the filesystem everything is written to, and what one new file costs there, before and after
  the pairs (``filesystem``): each item is two new files, and on some filesystems that cost
  moves the figures by tens of percent. The scratch folder (under ``--work-dir``, else the temp
  folder) is removed at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _measure import filesystem_figures, record_dict, scratch_folder  # noqa: E402

from tests.support.generate import write_export  # noqa: E402
from tests.support.prefect_server import start_prefect_server  # noqa: E402

RESULTS = ROOT / "bench" / "results"
LABELS = {"building": 1, "car": 2, "person": 3, "road": 4, "tree": 5}


def export_of(pool: Path, everything: Path, n: int) -> Path:
    """An export folder holding the first ``n`` generated items (symlinks, no copies)."""
    target = pool / f"export-{n}"
    if target.exists():
        return target
    files = sorted((everything / "json").rglob("*.json"))[:n]
    for file in files:
        link = target / "json" / file.relative_to(everything / "json")
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(file)
    return target


def measure(env: dict, *command: str) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        subprocess.run(
            [sys.executable, str(ROOT / "bench" / "_measure.py"), out.name, *command],
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        result = json.loads(Path(out.name).read_text())
    result["cpu_utilisation"] = result["cpu"] / result["wall"]
    return result


def polyburn_run(env: dict, source: Path, dest: Path, labels: Path) -> dict:
    return measure(
        env,
        "polyburn",
        "run",
        str(source),
        str(dest),
        "--labels",
        str(labels),
        "--no-progress",
        "--json",
    )


def core_path(source: Path, dest: Path, workers: int = 2) -> float:
    """Wall seconds of the Prefect-free core over an export: every item in one call of
    ``polyburn.parallel.process_items`` on the same process pool the flow uses (started
    beforehand): what the machine does with the same work and no orchestration at all."""
    from polyburn.destinations.local import LocalDestination
    from polyburn.parallel import process_items
    from polyburn.params import MaskOptions
    from polyburn.sources.local import LocalSource

    src, dst, options = LocalSource(source), LocalDestination(dest), MaskOptions()
    refs = list(src.list_items())
    process_items(refs[:4], src, dst, options, LABELS, workers=workers)  # start the pool
    started = time.perf_counter()
    records = process_items(refs, src, dst, options, LABELS, workers=workers)
    assert all(record_dict(r)["status"] == "ok" for r in records)
    return time.perf_counter() - started


def dataloop_documented(source: Path, dest: Path, limit: int) -> float:
    """Items/s of the Dataloop-documented loop writing palette PNGs (the baseline)."""
    os.environ.setdefault("DATALOOP_PATH", str(dest.parent / "dtlpy-home"))
    import dtlpy as dl
    from PIL import Image

    from polyburn.labels import palette

    pal = palette(LABELS)
    files = sorted((source / "json").rglob("*.json"))[:limit]
    started = time.perf_counter()
    for file in files:
        data = json.loads(file.read_text())
        h, w = data["metadata"]["system"]["height"], data["metadata"]["system"]["width"]
        image = np.zeros((h, w), dtype=np.uint8)
        for annotation in data["annotations"]:
            if annotation["type"] != "segment":
                continue
            geo = np.array([[p["x"], p["y"]] for p in annotation["coordinates"][0]])  # ring 0
            seg = dl.Segmentation.from_polygon(geo=geo, label=annotation["label"], shape=(h, w))
            image = np.where(seg.geo == 1, LABELS[annotation["label"]], image).astype(np.uint8)
        out = dest / file.relative_to(source / "json").with_suffix(".png")
        out.parent.mkdir(parents=True, exist_ok=True)
        picture = Image.fromarray(image)
        picture.putpalette(pal)
        picture.save(out, compress_level=1)
    return len(files) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--small", type=int, default=200)
    parser.add_argument("--large", type=int, default=2000)
    parser.add_argument("--scaling", default="1000,5000,20000")
    # 5: every flow run ends with Prefect joining its heartbeat thread, which sleeps in 1 s steps,
    # so each wall time carries 0-1 s of noise; the 200/2,000 difference is only ~4 s.
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--loop-items", type=int, default=100, help="items of each loop run")
    parser.add_argument("--name", default="end_to_end", help="bench/results/<name>.json")
    parser.add_argument("--quick", action="store_true", help="100/400 items, no scaling")
    parser.add_argument(
        "--work-dir", help="where the run's scratch folder goes (default: the temp folder)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    args = parser.parse_args()
    if args.quick:
        args.small, args.large, args.scaling, args.repeats = 100, 400, "", 1
    scaling = [int(n) for n in args.scaling.split(",") if n]
    work = scratch_folder("polyburn-bench-", args.work_dir, args.keep)
    results = measure_all(args, scaling, work)
    target = RESULTS / f"{args.name}.json"
    target.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


def measure_all(args: argparse.Namespace, scaling: list[int], work: Path) -> dict:
    """Every figure of the benchmark, measured in ``work`` (see the module's docstring)."""
    biggest = max([args.large, *scaling])
    print(f"generating {biggest} items in {work} ...", flush=True)
    everything = write_export(work / "all", biggest, seed=42)
    labels = work / "labels.json"
    labels.write_text(json.dumps(LABELS))
    server = start_prefect_server(work / "prefect-home")
    env = server.client_env({"PREFECT_LOGGING_LEVEL": "WARNING"})
    results: dict = {"items": {}, "machine": os.cpu_count()}
    # Every item is two new files: what the filesystem charges for one is part of the figures.
    results["filesystem"] = {"before": filesystem_figures(work)}
    try:
        one = export_of(work, everything, 1)
        polyburn_run(env, one, work / "warm", labels)  # numba cache, server warm-up
        trivial = [measure(env, "trivial-flow")["wall"] for _ in range(args.repeats)]
        single = [
            polyburn_run(env, one, work / f"one-{k}", labels)["wall"] for k in range(args.repeats)
        ]
        results["startup"] = {
            "trivial_flow_s": statistics.median(trivial),
            "polyburn_one_item_s": statistics.median(single),
            "polyburn_added_s": statistics.median(single) - statistics.median(trivial),
        }
        small_source = export_of(work, everything, args.small)
        large_source = export_of(work, everything, args.large)
        runs: dict[int, list[dict]] = {args.small: [], args.large: []}
        pairs = []
        loop_before = dataloop_documented(small_source, work / "baseline-0", args.loop_items)
        for k in range(args.repeats):
            for n, source in ((args.small, small_source), (args.large, large_source)):
                runs[n].append(polyburn_run(env, source, work / f"out-{n}-{k}", labels))
            small_wall, large_wall = runs[args.small][-1]["wall"], runs[args.large][-1]["wall"]
            marginal = (args.large - args.small) / (large_wall - small_wall)
            loop_after = dataloop_documented(
                small_source, work / f"baseline-{k + 1}", args.loop_items
            )
            loop = statistics.fmean((loop_before, loop_after))
            pairs.append(
                {
                    "marginal_items_per_s": marginal,
                    "dataloop_documented_items_per_s": loop,
                    "loop_before_and_after": [loop_before, loop_after],
                    "speedup": marginal / loop,
                }
            )
            loop_before = loop_after
            print(f"pair {k}: {pairs[-1]}", flush=True)
        results["filesystem"]["after_pairs"] = filesystem_figures(work)
        for n in scaling:
            if n not in runs:
                runs[n] = [
                    polyburn_run(env, export_of(work, everything, n), work / f"out-{n}", labels)
                ]
        for n in sorted(runs):
            results["items"][n] = _size_figures(n, runs[n])
            print(n, results["items"][n], flush=True)
        small, large = results["items"][args.small], results["items"][args.large]
        marginal = (args.large - args.small) / (large["wall_s"] - small["wall_s"])
        core = statistics.median(
            core_path(large_source, work / f"core-{k}") for k in range(args.repeats)
        )
        core_small = statistics.median(
            core_path(small_source, work / f"core-s{k}") for k in range(args.repeats)
        )
        core_marginal = (args.large - args.small) / (core - core_small)
        results["pairs"] = pairs
        results["summary"] = {
            "marginal_items_per_s": marginal,
            "fixed_startup_s": large["wall_s"] - args.large / marginal,
            "core_items_per_s_marginal": core_marginal,
            "orchestration_overhead_share": 1 - marginal / core_marginal,
            "dataloop_documented_items_per_s": statistics.median(
                p["dataloop_documented_items_per_s"] for p in pairs
            ),
            "speedup_vs_dataloop_documented": statistics.median(p["speedup"] for p in pairs),
        }
    finally:
        server.stop()
    return results


def _size_figures(n: int, runs: list[dict]) -> dict:
    """Medians (peaks: maxima) over the runs of one size."""
    wall = statistics.median(r["wall"] for r in runs)
    return {
        "wall_s": wall,
        "items_per_s": n / wall,
        "cpu_utilisation": statistics.median(r["cpu_utilisation"] for r in runs),
        "cpu_main_s": statistics.median(r["cpu_main"] for r in runs),
        "cpu_workers_s": statistics.median(r["cpu_workers"] for r in runs),
        "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
        "peak_rss_worker_mb": max(r["peak_rss_worker_mb"] for r in runs),
        "peak_rss_total_mb": max(r["peak_rss_total_mb"] for r in runs),
        "workers": runs[0]["workers"],
        "ms_per_item": 1000 * wall / n,
        "runs": len(runs),
    }


if __name__ == "__main__":
    main()
