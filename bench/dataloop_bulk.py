"""Dataloop at dataset scale (issue #15), run by hand: ``python bench/dataloop_bulk.py``.

The real ``dtlpy`` client against the loopback fake gate (``tests/support/fake_gate.py``) with
every request held ``--latency`` seconds (default 0.05: a remote API in the same region), items
of 96x64 with 1-4 polygons (some with a hole), a running ``prefect server start``. For each size
(``--sizes``, default 100 and 1,000; add 10000 for the full table) and each run, a fresh
``polyburn run`` process (``bench/_measure.py``):

* ``read``: ``polyburn run dataloop://DS <folder> --mode semantic``;
* ``write-back``: ``polyburn run dataloop://DS dataloop://DS --mode semantic`` on a dataset that
  holds no masks yet (a fresh copy per size), then ``rewrite``: the same after every item's
  polygons moved (each item's mask is replaced: upload + bulk delete).

Reported per run: wall seconds, items/s, requests the gate saw per item (all routes, login and
dataset look-ups included), peak RSS (main process, one burn worker). The marginal rate is
``(n2 - n1) / (t2 - t1)`` between the two smallest sizes. ``--code DIR`` runs the polyburn of
another checkout (e.g. an export of the commit before this change); the fake gate is always
this one. Each invocation stores its figures under ``--label`` in
``bench/results/dataloop_bulk.json`` (``--out``), keeping the other labels.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _measure import scratch_folder  # noqa: E402  (bench/ is the script's folder)

from tests.support.fake_gate import FakeGate, make_fake_jwt  # noqa: E402
from tests.support.prefect_server import start_prefect_server  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "dataloop_bulk.json"
ONTOLOGY = [
    {"tag": "car", "color": "#ff0000"},
    {"tag": "road", "color": "#808080"},
    {"tag": "person", "color": "#00ff00"},
]
W, H = 96, 64


def square(x0: float, y0: float, x1: float, y1: float) -> list[tuple[float, float]]:
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


def annotations(rng: random.Random, shift: float = 0.0) -> list[dict]:
    """1-4 polygons, the first with a hole; ``shift`` moves them all (a changed item)."""
    out = []
    for k in range(rng.randint(1, 4)):
        x0, y0 = rng.uniform(0, W / 2) + shift, rng.uniform(0, H / 2)
        x1, y1 = x0 + rng.uniform(8, W / 2), y0 + rng.uniform(8, H / 2)
        rings = [square(x0, y0, x1, y1)]
        if k == 0:
            rings.append(square(x0 + 2, y0 + 2, x0 + 5, y0 + 5))
        label = ONTOLOGY[rng.randrange(len(ONTOLOGY))]["tag"]
        out.append({"type": "segment", "label": label, "coordinates": rings})
    return out


def make_dataset(gate: FakeGate, name: str, n: int, seed: int) -> str:
    ds = gate.add_dataset(name, labels=ONTOLOGY)
    rng = random.Random(seed)
    for i in range(n):
        gate.add_item(ds, f"/d{i % 10}/img_{i:06d}.jpg", W, H, annotations(rng))
    return ds


def move_polygons(gate: FakeGate, ds: str) -> None:
    """Shift every human polygon of ``ds`` by one pixel (every item's mask changes)."""
    with gate._lock:
        for annotation in gate.annotations.values():
            if annotation["datasetId"] != ds or annotation["type"] != "segment":
                continue
            annotation["coordinates"] = [
                [{**point, "x": point["x"] + 1} for point in ring]
                for ring in annotation["coordinates"]
            ]
            gate.items[annotation["itemId"]]["updatedAt"] = gate.now_iso()


def measure(env: dict, gate: FakeGate, n: int, *args: str) -> dict:
    gate.clear_requests()
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        started = time.perf_counter()
        subprocess.run(
            [sys.executable, str(ROOT / "bench" / "_measure.py"), out.name, "polyburn", *args],
            env=env,
            check=False,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        elapsed = time.perf_counter() - started
        result = json.loads(Path(out.name).read_text())
    requests = len(gate.requests)
    return {
        "items": n,
        "code": result["code"],
        "wall": round(result["wall"], 2),
        "process_wall": round(elapsed, 2),
        "items_per_s": round(n / result["wall"], 1),
        "requests": requests,
        "requests_per_item": round(requests / n, 3),
        "peak_rss_mb": round(result["peak_rss_mb"], 1),
        "peak_rss_worker_mb": round(result["peak_rss_worker_mb"], 1),
        "workers": result["workers"],
    }


def marginal(rows: list[dict]) -> float | None:
    if len(rows) < 2:
        return None
    a, b = rows[0], rows[1]
    return round((b["items"] - a["items"]) / max(b["wall"] - a["wall"], 1e-9), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,1000", help="comma-separated item counts")
    parser.add_argument("--latency", type=float, default=0.05)
    parser.add_argument("--code", help="run the polyburn of this checkout instead")
    parser.add_argument("--runs", default="read,write-back,rewrite")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--label", default="after", help="key of these figures in --out")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    runs = args.runs.split(",")

    gate = FakeGate().start()
    token = gate.allow_token(make_fake_jwt())
    work = scratch_folder("polyburn-bench-dataloop-")
    try:
        server = start_prefect_server(work / "prefect-home")
    except BaseException:
        gate.stop()
        raise
    extra = {
        "DATALOOP_GATE_URL": gate.api_url,
        "DATALOOP_API_KEY": token,
        "POLYBURN_STATE_DIR": str(work / "state"),
        "PREFECT_LOGGING_LEVEL": "WARNING",
    }
    if args.code:
        extra["PYTHONPATH"] = os.pathsep.join([args.code, str(ROOT)])
    env = server.client_env(extra)
    table: dict[str, list[dict]] = {run: [] for run in runs}
    try:
        warm = make_dataset(gate, "warm", 5, 0)
        measure(env, gate, 5, "run", f"dataloop://{warm}", str(work / "warm"), "--no-progress")
        gate.latency = args.latency
        for n in sizes:
            ds = make_dataset(gate, f"bench-{n}", n, n)
            common = ("--mode", "semantic", "--no-progress", "--json")
            if "read" in runs:
                row = measure(
                    env, gate, n, "run", f"dataloop://{ds}", str(work / f"out-{n}"), *common
                )
                table["read"].append(row)
                print("read", row, flush=True)
            if "write-back" in runs:
                row = measure(env, gate, n, "run", f"dataloop://{ds}", f"dataloop://{ds}", *common)
                table["write-back"].append(row)
                print("write-back", row, flush=True)
            if "rewrite" in runs:
                gate.latency = 0.0
                move_polygons(gate, ds)
                gate.latency = args.latency
                row = measure(env, gate, n, "run", f"dataloop://{ds}", f"dataloop://{ds}", *common)
                table["rewrite"].append(row)
                print("rewrite", row, flush=True)
            with gate._lock:  # free the fake's memory before the next size
                for item_id in [i for i, it in gate.items.items() if it["datasetId"] == ds]:
                    for annotation in gate.annotations.of_item(item_id):
                        gate.annotations.pop(annotation["id"], None)
                    del gate.items[item_id]
    finally:
        server.stop()
        gate.stop()
    result = {
        "latency_s": args.latency,
        "item": f"{W}x{H}, 1-4 polygons",
        "code": args.code or "this checkout",
        "cpus": os.cpu_count(),
        "runs": table,
        "marginal_items_per_s": {run: marginal(rows) for run, rows in table.items()},
    }
    out = Path(args.out)
    everything = json.loads(out.read_text()) if out.exists() else {}
    everything[args.label] = result
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(everything, indent=1) + "\n")
    print(json.dumps(result["marginal_items_per_s"]))


if __name__ == "__main__":
    main()
