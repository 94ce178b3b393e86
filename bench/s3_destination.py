"""Benchmark the S3 destination against a local folder: items/s through polyburn's core path.

Run by hand from the repository root (about 2 minutes with the defaults)::

    .venv/bin/python bench/s3_destination.py [--items 500] [--repeats 3] [--workers 4]
                                             [--modes semantic] [--quick]

Writes ``bench/results/s3_destination.json`` and prints one table.

Workload: ``--items`` seeded W1-like items (1920 x 1080, 50 star polygons x 30 vertices, R
uniform in 20..130 px, ten labels), written as a local Dataloop JSON export in a temp folder and
read back through :class:`polyburn.sources.local.LocalSource`.

Timed path: :func:`polyburn.pipeline.process_item` for every item (load, repair, burn, encode,
publish) on a ``ThreadPoolExecutor`` of ``--workers`` threads sharing one destination (the flow
runs its batches on threads the same way; its optional process pool is not measured here), no
Prefect. A second table times ``put`` alone on the pre-encoded masks: the storage path without
the burn. Destinations, interleaved within each repeat so load spikes hit
all of them alike:

* ``encode only``: a destination that encodes every mask and stores nothing (the compute floor);
* ``local folder``: :class:`~polyburn.destinations.local.LocalDestination` in a fresh temp folder;
* ``SeaweedFS S3``: :class:`~polyburn.destinations.s3.S3Destination` (HEAD + PUT with a SHA-256
  checksum per object) to a fresh prefix of a local ``weed mini`` started by
  :class:`tests.support.weed.WeedServer` on 127.0.0.1 (loopback: no real network latency).

Each destination is timed on a first run (everything written) and a re-run over the same
destination (everything already there: the local folder compares bytes, S3 sends one HEAD per
object). Reported: median seconds over ``--repeats``, items/s, and the ratio to the local folder.
The VM is shared: compare within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _measure import record_dict  # noqa: E402

from polyburn.destinations.base import FileDestination  # noqa: E402
from polyburn.destinations.local import LocalDestination  # noqa: E402
from polyburn.destinations.s3 import S3Destination  # noqa: E402
from polyburn.model import ItemRef  # noqa: E402
from polyburn.params import MaskOptions  # noqa: E402
from polyburn.pipeline import process_item  # noqa: E402
from polyburn.sources.local import LocalSource  # noqa: E402
from tests.support.weed import WeedServer  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "s3_destination.json"
WIDTH, HEIGHT, POLYGONS, VERTICES, LABELS, SEED = 1920, 1080, 50, 30, 10, 7


class EncodeOnlyDestination(FileDestination):
    """Encodes every mask (through the inherited ``publish_item``) and stores nothing; with
    ``capture``, keeps every ``put``'s arguments in :attr:`files`."""

    uri = "null://"

    def __init__(self, capture: bool = False) -> None:
        self.capture = capture
        self.files: list[tuple[str, bytes, str, dict[str, str]]] = []
        self._lock = threading.Lock()

    def put(self, key: str, data: bytes, content_type: str, metadata: Mapping[str, str]) -> bool:
        if self.capture:
            with self._lock:
                self.files.append((key, data, content_type, dict(metadata)))
        return True

    def get(self, key: str) -> bytes | None:
        return None


def write_export(root: Path, items: int, seed: int = SEED) -> None:
    """``items`` W1-like item JSON files under ``root/json/w1/`` (seeded star polygons: sorted
    random angles, radius in [0.35 R, R], R uniform in 20..130 px, centres slightly past the
    border too)."""
    folder = root / "json" / "w1"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(items):
        big = rng.uniform(20.0, 130.0, POLYGONS)
        cx = rng.uniform(-0.05, 1.05, POLYGONS) * WIDTH
        cy = rng.uniform(-0.05, 1.05, POLYGONS) * HEIGHT
        ang = np.sort(rng.uniform(0.0, 2.0 * np.pi, (POLYGONS, VERTICES)), axis=1)
        rad = rng.uniform(0.35, 1.0, (POLYGONS, VERTICES)) * big[:, None]
        xs = np.round(cx[:, None] + rad * np.cos(ang), 2)
        ys = np.round(cy[:, None] + rad * np.sin(ang), 2)
        annotations = [
            {
                "id": f"a{i:05d}{k:03d}",
                "type": "segment",
                "label": f"class_{k % LABELS}",
                "coordinates": [
                    [
                        {"x": float(x), "y": float(y), "z": 0}
                        for x, y in zip(xs[k], ys[k], strict=True)
                    ]
                ],
                "metadata": {"system": {"objectId": k + 1}},
            }
            for k in range(POLYGONS)
        ]
        item = {
            "id": f"bench{i:05d}",
            "filename": f"/w1/item_{i:05d}.jpg",
            "metadata": {"system": {"width": WIDTH, "height": HEIGHT}},
            "annotations": annotations,
        }
        (folder / f"item_{i:05d}.json").write_text(json.dumps(item))


def run_items(
    refs: list[ItemRef],
    source: LocalSource,
    destination: Any,
    options: MaskOptions,
    label_map: dict[str, int],
    workers: int,
) -> tuple[float, int]:
    """(seconds, objects written) for ``process_item`` over every ref on ``workers`` threads."""
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        records = list(
            pool.map(lambda ref: process_item(ref, source, destination, options, label_map), refs)
        )
    seconds = time.perf_counter() - started
    records = [record_dict(r) for r in records]
    failed = [r["error"] for r in records if r["status"] != "ok"]
    if failed:
        raise RuntimeError(f"{len(failed)} items failed, first: {failed[0]}")
    written = sum(1 for r in records for o in r.get("outputs", []) if o["written"])
    return seconds, written


def put_all(files: list[tuple[str, bytes, str, dict[str, str]]], destination: Any, workers: int):
    """(seconds, objects written) for ``destination.put`` of pre-encoded files on threads: the
    cost of the storage path alone."""
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        flags = list(pool.map(lambda f: destination.put(*f), files))
    return time.perf_counter() - started, sum(flags)


class RequestCounter:
    """Counts the S3 requests a client sends, by operation (every attempt counts)."""

    def __init__(self, client: Any) -> None:
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        client.meta.events.register("before-send.s3", self._count)

    def _count(self, request: Any, **kwargs: Any) -> None:
        name = kwargs.get("event_name", "").rsplit(".", 1)[-1]
        with self._lock:
            self.counts[name] += 1

    def take(self) -> dict[str, int]:
        with self._lock:
            counts, self.counts = dict(self.counts), Counter()
        return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--modes", default="semantic", help="comma-separated mask modes")
    parser.add_argument("--quick", action="store_true", help="100 items, 1 repeat")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.quick:
        args.items, args.repeats = 100, 1

    options = MaskOptions(modes=[m.strip() for m in args.modes.split(",") if m.strip()])
    label_map = {f"class_{k}": k + 1 for k in range(LABELS)}
    work = Path(tempfile.mkdtemp(prefix="polyburn-bench-s3-"))
    server = WeedServer(temp_root=tempfile.gettempdir())
    try:
        print(f"writing {args.items} items ({WIDTH}x{HEIGHT}, {POLYGONS}x{VERTICES}) ...")
        write_export(work / "export", args.items)
        source = LocalSource(work / "export")
        refs = list(source.list_items())
        process_item(refs[0], source, EncodeOnlyDestination(), options, label_map)  # JIT warm-up
        captured = EncodeOnlyDestination(capture=True)
        run_items(refs, source, captured, options, label_map, args.workers)
        files = sorted(captured.files)
        mask_bytes = sum(len(f[1]) for f in files)

        server.start()
        bucket = "polyburn-bench"
        server.client().create_bucket(Bucket=bucket)
        os.environ.update(
            AWS_ACCESS_KEY_ID=server.access_key,
            AWS_SECRET_ACCESS_KEY=server.secret_key,
            AWS_DEFAULT_REGION=server.region,
            AWS_ENDPOINT_URL=server.endpoint_url,
        )

        makers: dict[str, Callable[[int], Any]] = {
            "encode only": lambda rep: EncodeOnlyDestination(),
            "local folder": lambda rep: LocalDestination(work / f"local-{rep}"),
            "SeaweedFS S3": lambda rep: S3Destination.from_uri(
                f"s3://{bucket}/bench-{rep}-{uuid.uuid4().hex[:6]}"
            ),
        }
        times: dict[str, dict[str, list[float]]] = {
            name: {"first": [], "rerun": []} for name in makers
        }
        put_times: dict[str, dict[str, list[float]]] = {
            name: {"first": [], "rerun": []} for name in ("local folder", "SeaweedFS S3")
        }
        written: dict[str, dict[str, int]] = {}
        requests: dict[str, dict[str, int]] = {}
        for rep in range(args.repeats):
            for name in put_times:
                destination = makers[name](f"put-{rep}")
                for phase in ("first", "rerun"):
                    seconds, count = put_all(files, destination, args.workers)
                    assert count == (len(files) if phase == "first" else 0), (name, phase, count)
                    put_times[name][phase].append(seconds)
                    print(f"  repeat {rep + 1} put only {name:13s} {phase:6s} {seconds:6.2f} s")
                if isinstance(destination, LocalDestination):
                    shutil.rmtree(destination.root, ignore_errors=True)
                destination.close()
            for name, make in makers.items():
                destination = make(rep)
                counter = RequestCounter(destination.client) if name.endswith("S3") else None
                for phase in ("first", "rerun"):
                    if counter:
                        counter.take()
                    seconds, count = run_items(
                        refs, source, destination, options, label_map, args.workers
                    )
                    times[name][phase].append(seconds)
                    written.setdefault(name, {})[phase] = count
                    if counter:
                        requests[phase] = counter.take()
                    print(f"  repeat {rep + 1} {name:13s} {phase:6s} {seconds:7.2f} s", flush=True)
                if isinstance(destination, LocalDestination):
                    shutil.rmtree(destination.root, ignore_errors=True)
                destination.close()

        results = summarize(times, args.items)
        put_results = summarize(put_times, len(files))
        print_table(results, args, requests, written)
        print_put_table(put_results, len(files), mask_bytes, args)
        payload = {
            "machine": {
                "platform": platform.platform(),
                "cpus": os.cpu_count(),
                "load_avg": list(os.getloadavg()),
            },
            "versions": versions(),
            "workload": {
                "items": args.items,
                "width": WIDTH,
                "height": HEIGHT,
                "polygons": POLYGONS,
                "vertices": VERTICES,
                "labels": LABELS,
                "seed": SEED,
                "modes": options.modes,
                "format": options.format,
            },
            "workers": args.workers,
            "repeats": args.repeats,
            "results": results,
            "put_only": {
                "objects": len(files),
                "mean_object_bytes": round(mask_bytes / max(len(files), 1)),
                "results": put_results,
                "seconds": put_times,
            },
            "objects_written": written,
            "s3_requests": requests,
            "seconds": times,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


def summarize(times: dict[str, dict[str, list[float]]], items: int) -> dict[str, Any]:
    local = {phase: statistics.median(times["local folder"][phase]) for phase in ("first", "rerun")}
    out: dict[str, Any] = {}
    for name, phases in times.items():
        out[name] = {}
        for phase, seconds in phases.items():
            median = statistics.median(seconds)
            out[name][phase] = {
                "median_s": round(median, 3),
                "min_s": round(min(seconds), 3),
                "items_per_s": round(items / median, 1),
                "x_local_time": round(median / local[phase], 2),
            }
    return out


def print_table(results: dict, args: argparse.Namespace, requests: dict, written: dict) -> None:
    print()
    print(
        f"{args.items} items, modes {args.modes}, {args.workers} threads, median of {args.repeats}"
    )
    print(f"{'':14s} | {'first run':^19s} | {'re-run (all skipped)':^20s} | {'time vs local':^15s}")
    print(
        f"{'destination':14s} | {'items/s':>8s} {'median':>10s} | {'items/s':>8s} {'median':>11s} "
        f"| {'first':>6s} {'re-run':>8s}"
    )
    print("-" * 80)
    for name, phases in results.items():
        first, rerun = phases["first"], phases["rerun"]
        print(
            f"{name:14s} | {first['items_per_s']:8.1f} {first['median_s']:9.2f}s "
            f"| {rerun['items_per_s']:8.1f} {rerun['median_s']:10.2f}s "
            f"| {first['x_local_time']:5.2f}x {rerun['x_local_time']:7.2f}x"
        )
    for phase, counts in requests.items():
        per_item = {k: round(v / args.items, 2) for k, v in sorted(counts.items())}
        print(f"S3 requests per item, {phase}: {per_item}")
    print(f"objects written (last repeat): {written}")


def print_put_table(results: dict, objects: int, mask_bytes: int, args) -> None:
    mean_kb = mask_bytes / max(objects, 1) / 1024
    print()
    print(
        f"storage path alone: put() of {objects} pre-encoded masks (mean {mean_kb:.0f} KiB), "
        f"{args.workers} threads, median of {args.repeats}"
    )
    print(f"{'destination':14s} | {'first: objects/s':>16s} | {'re-run: objects/s':>17s} | x local")
    print("-" * 68)
    for name, phases in results.items():
        first, rerun = phases["first"], phases["rerun"]
        print(
            f"{name:14s} | {first['items_per_s']:16.1f} | {rerun['items_per_s']:17.1f} "
            f"| {first['x_local_time']:.2f} / {rerun['x_local_time']:.2f}"
        )


def versions() -> dict[str, str]:
    import boto3
    import botocore

    return {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "boto3": boto3.__version__,
        "botocore": botocore.__version__,
        "seaweedfs": "4.48",
    }


if __name__ == "__main__":
    raise SystemExit(main())
