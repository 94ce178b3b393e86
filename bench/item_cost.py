"""Per-item cost of the burn workers, run by hand: ``python bench/item_cost.py --label LABEL``.

Generates W1-like items (1920x1080, 50 star polygons x 30 vertices, some with holes;
``tests/support/generate.py`` with seed 42) and measures, in this one process, the median
milliseconds per item of each stage of :func:`polyburn.pipeline.process_item`:

* ``read_decode``: read the JSON file, sha256 it (the item revision) and decode it;
* ``parse``: :func:`~polyburn.dataloop_json.parse_item` on the decoded JSON;
* ``repair``: :func:`~polyburn.geometry.repair_item`;
* ``burn``: :func:`~polyburn.masks.build_masks` (semantic, uint8);
* ``encode``: the palette PNG (:func:`~polyburn.destinations.base.mask_files`);
* ``write_hash``: sha256 of the output and the atomic write into a fresh folder;
* ``process_item``: the whole item, source to destination (fresh folder); ``process_item_cpu``
  the same in CPU time of this process (less sensitive to other load on the machine).

The stages run under a burn worker's malloc settings (``polyburn.parallel._steady_malloc``, when
the code has it).

Then, in a fresh process started like the ``polyburn`` console script (its ``__main__`` imports
``polyburn.cli``), it runs :func:`polyburn.parallel.process_items` with 2 workers over the items
four times (the first run starts and warms the pool) and records the workers' memory after the
last: VmHWM (peak RSS), VmRSS, and from ``smaps_rollup`` the proportional (Pss) and private
memory (the worst worker for each), the first run's items/s (``cold_pool_items_per_s``: it
includes starting the workers), the warm pool's best items/s and its workers' CPU
milliseconds per item (utime + stime; the least of the warm runs: robust to other load on the
machine, unlike the wall-clock figures). ``import_rss_mb`` is the RSS of a fresh interpreter after
importing what a worker imports (``polyburn.parallel``) and nothing else.

The code measured is the ``polyburn`` that Python imports (``PYTHONPATH=<tree>`` picks a tree,
e.g. an export of the unchanged code for ``before``). Results go under ``--label`` in
``bench/results/item_cost.json``; when both ``before`` and ``after`` are present, ``ratio`` holds
before / after for every cost and after / before for every rate (> 1: after is better).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from _measure import record_dict, scratch_folder  # bench/ is the script's folder, first on sys.path

ROOT = Path(__file__).resolve().parents[1]


def _generator():
    """tests/support/generate.py, loaded by path: sys.path is left alone, so the ``polyburn``
    measured is whichever PYTHONPATH points at."""
    spec = importlib.util.spec_from_file_location(
        "_generate", ROOT / "tests" / "support" / "generate.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


RESULTS = ROOT / "bench" / "results" / "item_cost.json"
LABELS = {"building": 1, "car": 2, "person": 3, "road": 4, "tree": 5}

_POOL_SCRIPT = textwrap.dedent(
    """
    import sys
    from polyburn.cli import main  # as the console script does: spawn re-imports this module

    if __name__ == "__main__":
        import json, os, time
        from pathlib import Path

        from polyburn import parallel
        from polyburn.destinations.local import LocalDestination
        from polyburn.params import MaskOptions
        from polyburn.sources.local import LocalSource

        source_dir, dest_dir, out, labels = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
        source = LocalSource(source_dir)
        refs = list(source.list_items())
        options = MaskOptions()
        label_map = json.loads(labels)
        ticks = os.sysconf("SC_CLK_TCK")

        def cpu_seconds(pid):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / ticks  # utime + stime

        rates, cpu = [], []
        for run in range(4):
            destination = LocalDestination(f"{dest_dir}-{run}")
            pids = list(parallel._pool._processes) if parallel._pool else []
            before = sum(cpu_seconds(pid) for pid in pids)
            started = time.perf_counter()
            records = parallel.process_items(
                refs, source, destination, options, label_map, workers=2
            )
            rates.append(len(refs) / (time.perf_counter() - started))
            if pids:
                cpu.append(1000 * (sum(cpu_seconds(pid) for pid in pids) - before) / len(refs))
            statuses = [r["status"] if isinstance(r, dict) else r.status for r in records]
            assert set(statuses) == {"ok"}, records[:1]

        def status(pid):
            fields = {}
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                key, _, value = line.partition(":")
                if key in ("VmHWM", "VmRSS"):
                    fields[key] = int(value.split()[0]) / 1024
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                key, _, value = line.partition(":")
                if key in ("Pss", "Private_Clean", "Private_Dirty"):
                    fields[key] = int(value.split()[0]) / 1024
            return {
                "peak_rss_mb": fields["VmHWM"],
                "rss_mb": fields["VmRSS"],
                "pss_mb": fields["Pss"],
                "private_mb": fields["Private_Clean"] + fields["Private_Dirty"],
            }

        workers = [status(pid) for pid in parallel._pool._processes]
        worst = {k: max(w[k] for w in workers) for k in workers[0]}
        worst["cold_pool_items_per_s"] = rates[0]  # includes starting the workers
        worst["warm_pool_items_per_s"] = max(rates[1:])
        worst["worker_cpu_ms_per_item"] = min(cpu)
        Path(out).write_text(json.dumps(worst))
    """
)

_IMPORT_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import polyburn.parallel  # what a worker unpickles its job function from
    from pathlib import Path

    rss = 0.0
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) / 1024
    heavy = ["prefect", "rasterio", "boto3", "botocore", "dtlpy", "PIL", "pydantic", "numba",
             "shapely", "orjson"]
    print(json.dumps({"import_rss_mb": rss,
                      "imported": sorted(m for m in heavy if m in sys.modules)}))
    """
)


def median_ms(samples: list[float]) -> float:
    return 1000 * statistics.median(samples)


def stage_costs(export: Path, work: Path, rounds: int) -> dict[str, float]:
    from polyburn.dataloop_json import decode_json, parse_item
    from polyburn.destinations.base import mask_files, sha256
    from polyburn.destinations.local import LocalDestination
    from polyburn.geometry import repair_item
    from polyburn.labels import palette, semantic_dtype
    from polyburn.masks import build_masks
    from polyburn.params import MaskOptions
    from polyburn.pipeline import process_item
    from polyburn.sources.local import LocalSource

    source = LocalSource(export)
    refs = list(source.list_items())
    options = MaskOptions()
    pal = palette(LABELS)
    dtype = semantic_dtype(LABELS)
    times: dict[str, list[float]] = {
        k: []
        for k in (
            "read_decode",
            "parse",
            "repair",
            "burn",
            "encode",
            "write_hash",
            "process_item",
            "process_item_cpu",
        )
    }
    clock = time.perf_counter
    for r in range(rounds):
        destination = LocalDestination(work / f"stages-{r}")
        for ref in refs:
            t0 = clock()
            raw = Path(ref.locator).read_bytes()
            revision = hashlib.sha256(raw).hexdigest()
            data = decode_json(raw, ref.path)
            t1 = clock()
            item = parse_item(data, ref.path, revision=revision, max_pixels=options.max_pixels)
            t2 = clock()
            shapes, _, _ = repair_item(item)
            t3 = clock()
            masks = build_masks(item, shapes, options.modes, LABELS, dtype, options.draw_order)
            t4 = clock()
            files = mask_files(item, masks, "png", pal)
            t5 = clock()
            for key, blob, content_type in files:
                digest = sha256(blob)
                meta = {"item-id": item.item_id, "revision": item.revision, "sha256": digest}
                destination.put(key, blob, content_type, meta)
            t6 = clock()
            for name, a, b in (
                ("read_decode", t0, t1),
                ("parse", t1, t2),
                ("repair", t2, t3),
                ("burn", t3, t4),
                ("encode", t4, t5),
                ("write_hash", t5, t6),
            ):
                times[name].append(b - a)
        destination = LocalDestination(work / f"whole-{r}")
        for ref in refs:
            t0, c0 = clock(), time.process_time()
            record = process_item(ref, source, destination, options, LABELS)
            times["process_item"].append(clock() - t0)
            times["process_item_cpu"].append(time.process_time() - c0)
            assert record_dict(record)["status"] == "ok", record
    result = {f"{k}_ms": median_ms(v) for k, v in times.items()}
    result["stages_sum_ms"] = sum(
        result[f"{k}_ms"]
        for k in ("read_decode", "parse", "repair", "burn", "encode", "write_hash")
    )
    return result


def pool_costs(export: Path, work: Path) -> dict:
    import polyburn

    code = Path(polyburn.__file__).resolve().parents[1]  # the polyburn being measured
    env = dict(os.environ, PYTHONPATH=str(code))
    script = work / "console_like.py"
    script.write_text(_POOL_SCRIPT)
    out = work / "pool.json"
    subprocess.run(
        [
            sys.executable,
            str(script),
            str(export),
            str(work / "pool"),
            str(out),
            json.dumps(LABELS),
        ],
        env=env,
        check=True,
    )
    result = json.loads(out.read_text())
    imports = subprocess.run(
        [sys.executable, "-c", _IMPORT_SCRIPT],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    result.update(json.loads(imports.stdout))
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--label", choices=["before", "after"], required=True)
    parser.add_argument("--items", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    import polyburn

    work = scratch_folder("polyburn-item-cost-")
    export = _generator().write_export(work / "export", args.items, seed=42)
    print(f"polyburn from {Path(polyburn.__file__).parent}; {args.items} items in {work}")

    from polyburn import parallel
    from polyburn.kernel import warm_up

    steady = getattr(parallel, "_steady_malloc", None)
    if steady is not None:  # measure the stages under a burn worker's malloc settings
        steady()
    warm_up()
    figures = {
        "items": args.items,
        "steady_malloc": steady is not None,
        "stages": stage_costs(export, work, args.rounds),
    }
    print(json.dumps(figures["stages"], indent=1), flush=True)
    figures["worker"] = pool_costs(export, work)
    print(json.dumps(figures["worker"], indent=1), flush=True)

    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results[args.label] = figures
    if "before" in results and "after" in results:
        ratio = {}
        for group in ("stages", "worker"):
            before, after = results["before"][group], results["after"][group]
            ratio[group] = {
                k: round(after[k] / before[k] if k.endswith("per_s") else before[k] / after[k], 3)
                for k in before
                if isinstance(before[k], int | float) and after.get(k)
            }
        results["ratio"] = ratio
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
