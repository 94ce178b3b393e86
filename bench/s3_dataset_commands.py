"""Dataset-level commands on a big S3 prefix at a real bucket's latency (issue #19, point 3).

Run by hand from the repository root (about 5 minutes with the defaults; most of it fills the
bucket)::

    .venv/bin/python bench/s3_dataset_commands.py [--items 100000] [--rtt-ms 30] [--changed 1000]

Writes ``bench/results/s3_dataset_commands.json`` and prints one table.

Setup: a ``weed mini`` (:class:`tests.support.weed.WeedServer`) on 127.0.0.1 and, in front of
it, :class:`bench.latency_proxy.LatencyProxy` adding ``--rtt-ms`` per request. The prefix is
filled directly (no proxy, 64 threads) with what a full run of ``--items`` items leaves: one
record per item (a real record of a W1-like item, its path and id varied), ``label_map.json``,
the layout marker and a ``manifest.jsonl`` snapshot of every record.

Timed through the proxy, each in this process as the CLI runs it:

* ``polyburn manifest DEST -o FILE`` and ``polyburn dataset DEST`` (splits and the manifest
  snapshot) when the snapshot is current;
* the snapshot a full run writes last (``write_snapshot`` with the run's own records handed
  over, as the flow does), when the run wrote every record;
* ``polyburn manifest`` after ``--changed`` records were rewritten by other runs since the
  snapshot (their GETs are the price);
* for reference, reading every record (what these commands did before: one GET per record).

Reported: wall seconds, requests by method (counted at the proxy), peak RSS of this process.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import io
import json
import os
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _measure import record_dict, write_results  # noqa: E402
from latency_proxy import LatencyProxy  # noqa: E402

from tests.support.weed import WeedServer  # noqa: E402

BUCKET = "bench-dataset"
PREFIX = "masks"
SUBSETS = ("train", "validation", "test", None)


def template_record() -> dict:
    """A real record: one W1-like item burned into a folder by the core path."""
    from polyburn.destinations.local import LocalDestination
    from polyburn.parallel import process_items
    from polyburn.params import MaskOptions
    from polyburn.pipeline import scan_labels
    from polyburn.sources import open_source
    from tests.support.generate import write_export

    with tempfile.TemporaryDirectory() as work:
        source = open_source(str(write_export(Path(work) / "export", 1, seed=3)))
        refs = list(source.list_items())
        labels = sorted(scan_labels(refs, source, 10**9))
        label_map = {label: k + 1 for k, label in enumerate(labels)}
        destination = LocalDestination(Path(work) / "dest")
        (record,) = process_items(refs, source, destination, MaskOptions(), label_map)
    return record_dict(record)


def record_for(template: dict, k: int) -> dict:
    path = f"d{k // 1000:03d}/img_{k:06d}"
    outputs = [dict(o, key=o["key"].replace(template["path"], path)) for o in template["outputs"]]
    return dict(template, path=path, item=f"id{k:08d}", outputs=outputs, subset=SUBSETS[k % 4])


def fill(client, items: int, template: dict) -> list[bytes]:
    """Store ``items`` records, the label map, the layout marker and the manifest; return the
    records' lines."""
    from polyburn.manifest import manifest_line
    from polyburn.records import ItemRecord
    from polyburn.state import LAYOUT, LAYOUT_KEY, record_key

    lines = [manifest_line(ItemRecord.from_dict(record_for(template, k))) for k in range(items)]

    def put(k: int) -> None:
        path = json.loads(lines[k])["path"]
        client.put_object(Bucket=BUCKET, Key=f"{PREFIX}/{record_key(path)}", Body=lines[k])

    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        list(pool.map(put, range(items)))
    client.put_object(Bucket=BUCKET, Key=f"{PREFIX}/{LAYOUT_KEY}", Body=f"{LAYOUT}\n".encode())
    client.put_object(Bucket=BUCKET, Key=f"{PREFIX}/label_map.json", Body=b'{"building": 1}')
    client.put_object(Bucket=BUCKET, Key=f"{PREFIX}/manifest.jsonl", Body=b"".join(sorted(lines)))
    return lines


def timed(proxy: LatencyProxy, what: str, call: Callable[[], object]) -> dict:
    proxy.reset()
    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        call()
    wall = time.perf_counter() - started
    result = {
        "what": what,
        "wall_s": round(wall, 2),
        "requests": dict(sorted(proxy.counts().items())),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    print(f"{what:<58} {wall:7.1f} s  {result['requests']}", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--rtt-ms", type=float, default=30.0)
    parser.add_argument("--changed", type=int, default=1000)
    parser.add_argument("--skip-every-record", action="store_true")
    args = parser.parse_args()

    from polyburn.cli import main as polyburn
    from polyburn.destinations.s3 import S3Destination
    from polyburn.manifest import manifest_line
    from polyburn.records import ItemRecord
    from polyburn.state import record_key, write_snapshot

    runs = []
    with tempfile.TemporaryDirectory(prefix="polyburn-bench-") as work:
        work_dir = Path(work)
        server = WeedServer().start()
        try:
            client = server.client()
            client.create_bucket(Bucket=BUCKET)
            template = template_record()
            started = time.perf_counter()
            lines = fill(client, args.items, template)
            print(f"filled {args.items} records in {time.perf_counter() - started:.0f} s")
            proxy = LatencyProxy(server.host, server.s3_port, rtt_s=args.rtt_ms / 1000).start()
            os.environ.update(
                AWS_ACCESS_KEY_ID=server.access_key,
                AWS_SECRET_ACCESS_KEY=server.secret_key,
                AWS_DEFAULT_REGION=server.region,
                AWS_ENDPOINT_URL=proxy.endpoint_url,
            )
            uri = f"s3://{BUCKET}/{PREFIX}"
            out = str(work_dir / "manifest-out.jsonl")
            runs.append(
                timed(
                    proxy,
                    "polyburn manifest (snapshot current)",
                    lambda: polyburn(["manifest", uri, "-o", out]),
                )
            )
            runs.append(
                timed(
                    proxy, "polyburn dataset (snapshot current)", lambda: polyburn(["dataset", uri])
                )
            )
            written = work_dir / "written.jsonl"
            written.write_bytes(b"".join(lines))
            store = S3Destination.from_uri(uri)
            runs.append(
                timed(
                    proxy,
                    "full run's snapshot (run wrote every record)",
                    lambda: write_snapshot(store, work_dir, known=[written]).close(),
                )
            )
            changed = [
                manifest_line(ItemRecord.from_dict(dict(json.loads(lines[k]), seconds=1.0)))
                for k in range(0, args.items, max(1, args.items // max(1, args.changed)))
            ][: args.changed]

            def rewrite(line: bytes) -> None:
                path = json.loads(line)["path"]
                client.put_object(Bucket=BUCKET, Key=f"{PREFIX}/{record_key(path)}", Body=line)

            with concurrent.futures.ThreadPoolExecutor(64) as pool:
                list(pool.map(rewrite, changed))
            runs.append(
                timed(
                    proxy,
                    f"polyburn manifest ({len(changed)} records changed since)",
                    lambda: polyburn(["manifest", uri, "-o", out]),
                )
            )
            if not args.skip_every_record:
                client.delete_object(Bucket=BUCKET, Key=f"{PREFIX}/manifest.jsonl")
                runs.append(
                    timed(
                        proxy,
                        "polyburn manifest (no snapshot: every record read)",
                        lambda: polyburn(["manifest", uri, "-o", out]),
                    )
                )
            proxy.stop()
        finally:
            server.stop()
    write_results(
        "s3_dataset_commands",
        f"dataset-level commands on a {args.items}-item S3 prefix at {args.rtt_ms:g} ms RTT",
        runs,
        cpus=os.cpu_count(),
        items=args.items,
        rtt_ms=args.rtt_ms,
    )


if __name__ == "__main__":
    main()
