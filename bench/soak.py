"""Soak run (by hand): ``python bench/soak.py [--items 20000]``.

20,000 generated items through the full flow (local export → S3 on a real SeaweedFS) with
transient faults injected on a few percent of all S3 requests by the in-repo fault proxy: TCP
resets, 503 SlowDown, 500s and truncated responses. Then every object is checked against the
manifest (present, same SHA-256) and nothing may be missing. Writes bench/results/soak.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _measure import scratch_folder  # noqa: E402  (bench/ is the script's folder)

from tests.support.fault_proxy import FaultProxy  # noqa: E402
from tests.support.generate import write_export  # noqa: E402
from tests.support.weed import WeedServer  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "soak.json"
FAULTS = [  # kind, regex on "METHOD /path?query", probability, options
    ("reset", r"^PUT ", 0.02, {}),
    ("http503", r"^PUT ", 0.02, {}),
    ("http500", r"^(HEAD|GET) ", 0.01, {}),
    ("truncate", r"^GET ", 0.02, {"truncate_bytes": 10}),
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--items", type=int, default=20_000)
    args = parser.parse_args()
    work = scratch_folder("polyburn-soak-")
    os.environ.setdefault("PREFECT_HOME", str(work / "prefect"))
    os.environ["PREFECT_LOGGING_LEVEL"] = "WARNING"
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    print(f"generating {args.items} items ...", flush=True)
    source = write_export(
        work / "export", args.items, seed=7, width=320, height=240, polygons=10, vertices=12
    )
    with WeedServer() as weed, FaultProxy("127.0.0.1", weed.s3_port) as proxy:
        weed.client().create_bucket(Bucket="soak")
        os.environ.update(
            {
                "AWS_ACCESS_KEY_ID": weed.access_key,
                "AWS_SECRET_ACCESS_KEY": weed.secret_key,
                "AWS_DEFAULT_REGION": weed.region,
                "AWS_ENDPOINT_URL": proxy.endpoint_url,
                "POLYBURN_S3_MAX_ATTEMPTS": "3",
                "POLYBURN_ITEM_RETRY_DELAY": "0.2",
            }
        )
        rules = [
            proxy.add(kind, times=None, match=match, probability=p, **options)
            for kind, match, p, options in FAULTS
        ]
        from prefect.testing.utilities import prefect_test_harness

        from flows.polygons_to_masks import polygons_to_masks_params
        from polyburn.params import RunParameters

        with prefect_test_harness(server_startup_timeout=120):
            started = time.perf_counter()
            state = polygons_to_masks_params(
                RunParameters(source=str(source), destination="s3://soak/masks", batch_size=250),
                return_state=True,
            )
            seconds = time.perf_counter() - started
        summary = state.result(raise_on_failure=False)
        requests = len(proxy.seen)
        injected = {rule.kind: rule.hits for rule in rules}

        client = weed.client()
        stored = {}
        for page in client.get_paginator("list_objects_v2").paginate(Bucket="soak"):
            stored.update({o["Key"]: o["Size"] for o in page.get("Contents", [])})
        manifest = client.get_object(Bucket="soak", Key="masks/manifest.jsonl")["Body"].read()
        records = [json.loads(line) for line in manifest.decode().splitlines()]
        listed = {f"masks/{o['key']}": o for r in records for o in r.get("outputs", [])}
        missing = sorted(set(listed) - set(stored))
        wrong_size = sorted(k for k, o in listed.items() if k in stored and stored[k] != o["bytes"])
    result = {
        "items": args.items,
        "state": state.name,
        "seconds": round(seconds, 1),
        "items_per_s": round(args.items / seconds, 1),
        "ok": summary["ok"],
        "failed": summary["failed"],
        "s3_requests": requests,
        "faults_injected": injected,
        "faults_total": sum(injected.values()),
        "fault_share": round(sum(injected.values()) / max(requests, 1), 4),
        "client_retries": summary["io_retries"],
        "item_retries": summary["item_retries"],
        "task_retries": summary["retries"],
        "manifest_records": len(records),
        "objects_listed_in_manifest": len(listed),
        "missing_objects": len(missing),
        "wrong_size_objects": len(wrong_size),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    if summary["failed"] or missing or wrong_size or len(records) != args.items:
        raise SystemExit("soak run lost something")


if __name__ == "__main__":
    main()
