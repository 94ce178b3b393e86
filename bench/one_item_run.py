"""What a one-item run costs as the destination grows (run by hand):
``python bench/one_item_run.py [--sizes 1000,10000,100000] [--kinds folder,s3] [--repeats 3]``.

Writes bench/results/one_item_run.json and prints a table. For each destination kind (a folder;
S3 on a local SeaweedFS) and size N, the destination holds N items (each with its record and its
semantic mask, plus a ``manifest.jsonl`` snapshot of all N, as a full run leaves it), and one
item of the export is edited; then ``polyburn run EXPORT DEST --item <that item>`` runs as a
fresh process against a started ``prefect server start``, ``--repeats`` times (the item edited
anew before each run). Reported: the median wall time, its ratio to the smallest size's, and the
bytes the run left changed at the destination besides that item's own masks (objects new or
rewritten, from a listing before and after: the item's record; the item's lease and the folder's
staging files come and go within the run and are not in the listing).

The first 1,000 items are burned by a real full run; the other items of a size are copies of
those items' records and masks under new paths (a full run of 100,000 items into S3 would take
most of an hour and tell nothing more about a one-item run).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from _measure import scratch_folder  # noqa: E402
from end_to_end import measure  # noqa: E402

from tests.support.generate import write_export  # noqa: E402
from tests.support.prefect_server import start_prefect_server  # noqa: E402
from tests.support.s3_fixtures import aws_env  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "one_item_run.json"
SEED_ITEMS = 1000
ITEM = {"width": 96, "height": 64, "polygons": 3, "vertices": 8}


def item_path(index: int) -> str:
    return f"batch{index // 100:03d}/img_{index:06d}"


class Store:
    """The destination as the bench sees it: write raw objects, list (key → (tag, size))."""

    def __init__(self, uri: str, client=None) -> None:
        self.uri = uri
        self.client = client
        if uri.startswith("s3://"):
            self.bucket, self.prefix = uri[5:].split("/", 1)

    def put(self, key: str, data: bytes) -> None:
        if self.client is None:
            path = Path(self.uri) / key
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        else:
            self.client.put_object(Bucket=self.bucket, Key=f"{self.prefix}/{key}", Body=data)

    def get(self, key: str) -> bytes:
        if self.client is None:
            return (Path(self.uri) / key).read_bytes()
        return self.client.get_object(Bucket=self.bucket, Key=f"{self.prefix}/{key}")["Body"].read()

    def listing(self) -> dict[str, tuple[str, int]]:
        if self.client is None:
            root = Path(self.uri)
            return {
                p.relative_to(root).as_posix(): (str(p.stat().st_mtime_ns), p.stat().st_size)
                for p in root.rglob("*")
                if p.is_file()
            }
        found = {}
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=f"{self.prefix}/"
        )
        for page in pages:
            for entry in page.get("Contents", ()):
                key = entry["Key"][len(self.prefix) + 1 :]
                found[key] = (entry["ETag"] + str(entry["LastModified"]), entry["Size"])
        return found


def grow(store: Store, have: int, want: int) -> None:
    """Copy the seed items' records and masks to items ``have`` … ``want - 1`` and write the
    snapshot of all ``want`` items."""
    seeds = {}
    for k in range(SEED_ITEMS):
        path = item_path(k)
        seeds[k] = (
            json.loads(store.get(f".polyburn/records/{path}.json")),
            store.get(f"semantic/{path}.png"),
        )

    def line(index: int) -> bytes:
        record, _ = seeds[index % SEED_ITEMS]
        path = item_path(index)
        record = dict(record, path=path, item=f"item{index:08d}")
        record["outputs"] = [dict(o, key=f"semantic/{path}.png") for o in record["outputs"]]
        return (json.dumps(record, sort_keys=True) + "\n").encode()

    def copy(index: int) -> None:
        path = item_path(index)
        store.put(f"semantic/{path}.png", seeds[index % SEED_ITEMS][1])
        store.put(f".polyburn/records/{path}.json", line(index))

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        list(pool.map(copy, range(have, want), chunksize=64))
    # The snapshot a full run leaves: every record, sorted by path (paths sort by index).
    store.put("manifest.jsonl", b"".join(line(k) for k in range(want)))


def edit(export: Path, index: int, nudge: int) -> None:
    file = export / "json" / f"{item_path(index)}.json"
    item = json.loads(file.read_text())
    point = item["annotations"][0]["coordinates"][0][0]
    point["x"] = round(point["x"] + (0.5 if nudge % 2 else -0.5), 3)
    file.write_text(json.dumps(item))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--kinds", default="folder,s3")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    sizes = sorted(int(n) for n in args.sizes.split(","))
    kinds = args.kinds.split(",")
    work = scratch_folder("polyburn-bench-one-")
    export = write_export(work / "export", SEED_ITEMS, seed=7, **ITEM)
    server = start_prefect_server(work / "prefect-home")
    env = server.client_env({"PREFECT_LOGGING_LEVEL": "WARNING"})
    weed = None
    results: dict = {"sizes": sizes, "repeats": args.repeats, "kinds": {}}
    try:
        for kind in kinds:
            client = None
            if kind == "s3":
                from tests.support.weed import WeedServer

                weed = WeedServer().start()
                client = weed.client()
                client.create_bucket(Bucket="bench")
                env = {**env, **aws_env(weed)}
                store = Store("s3://bench/masks", client)
            else:
                store = Store(str(work / "dest"))

            def polyburn_run(*args: str, env: dict = env, uri: str = store.uri) -> dict:
                return measure(env, "polyburn", "run", str(export), uri, "--no-progress", *args)

            full = polyburn_run("--labels", str(_labels(work)))
            assert full["code"] == 0, full
            rows = {}
            have = SEED_ITEMS
            target = SEED_ITEMS // 2
            for n in sizes:
                started = time.perf_counter()
                grow(store, have, n)
                have = n
                print(f"{kind}: {n} items in place ({time.perf_counter() - started:.0f} s)")
                walls, extra = [], []
                for repeat in range(args.repeats):
                    edit(export, target, repeat)
                    before = store.listing()
                    run = polyburn_run("--item", item_path(target))
                    assert run["code"] == 0, run
                    after = store.listing()
                    own = {f"semantic/{item_path(target)}.png"}
                    changed = [k for k in after if before.get(k) != after[k] and k not in own]
                    walls.append(run["wall"])
                    extra.append(sum(after[k][1] for k in changed))
                rows[n] = {
                    "wall_s_median": statistics.median(walls),
                    "walls_s": walls,
                    "bytes_written_besides_masks_max": max(extra),
                }
                print(kind, n, rows[n], flush=True)
            smallest = rows[sizes[0]]["wall_s_median"]
            for n in sizes:
                rows[n]["ratio_to_smallest"] = rows[n]["wall_s_median"] / smallest
            results["kinds"][kind] = rows
    finally:
        server.stop()
        if weed is not None:
            weed.stop()
    results["measured"] = time.strftime("%Y-%m-%d")
    results["machine_cpus"] = os.cpu_count()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


def _labels(work: Path) -> Path:
    path = work / "labels.json"
    path.write_text(json.dumps({"car": 1, "person": 2, "road": 3, "building": 4, "tree": 5}))
    return path


if __name__ == "__main__":
    main()
