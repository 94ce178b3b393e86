"""Webhook receiver latency (by hand): ``python bench/webhook_receiver.py``.

Starts one real ``prefect server start`` (SQLite, temporary home), then for each receiver and
each number of concurrent clients sends ``--deliveries`` signed webhook calls (one item each)
from that many clients at once, over loopback, and measures each call's accept latency: from
the start of sending to the full 202 response. Receivers, each a separate process beside the
Prefect server on the same cores:

* ``polyburn events`` as checked out (the Starlette/uvicorn receiver);
* the ``http.server`` receiver of ``--baseline-commit``, loaded from git (its
  ``polyburn/events.py`` at that commit), when git has it.

It then reads every event back from Prefect's events API and checks that each accepted call's
event arrived exactly once and nothing else did. CPU seconds of the receiver, the Prefect server
and the clients are recorded per load. Results (p50/p99/max per load, and the median over
``--repeats`` loads) are APPENDED to bench/results/webhook_receiver.json with the date, commit
and load average, so earlier figures stay.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import uuid
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _measure import scratch_folder  # noqa: E402  (bench/ is the script's folder)

from tests.support.prefect_server import free_port, start_prefect_server, stop_process  # noqa: E402
from tests.support.processes import start_process, wait_healthy  # noqa: E402
from tests.support.webhook_load import deliver, percentile, received_events  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "webhook_receiver.json"
#: The last commit with the http.server receiver.
BASELINE_COMMIT = "6d1549d"
OLD_RUNNER = """
import sys
sys.path[:0] = [{old_dir!r}, {root!r}]
import polyburn_old_events as events
server = events.make_server("127.0.0.1", {port}, events.load_verifier())
try:
    server.serve_forever()
except KeyboardInterrupt:
    pass
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--deliveries", type=int, default=500)
    parser.add_argument("--clients", default="30,50", help="comma-separated client counts")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baseline-commit", default=BASELINE_COMMIT)
    parser.add_argument("--no-baseline", action="store_true")
    args = parser.parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    work = scratch_folder("polyburn-bench-webhook-")
    secret = uuid.uuid4().hex + uuid.uuid4().hex  # this run's only; never printed

    receivers = {"polyburn events (uvicorn/Starlette)": current_command}
    old = None if args.no_baseline else old_receiver(args.baseline_commit, work)
    if old is not None:
        receivers[f"http.server receiver @{args.baseline_commit}"] = old

    server = start_prefect_server(work / "prefect")
    loads: list[dict] = []
    try:
        for repeat in range(args.repeats):
            for name, command in receivers.items():
                for n in clients:
                    loads.append(
                        measure(server, name, command, secret, n, args.deliveries, work, repeat)
                    )
                    print(json.dumps({**loads[-1], "accepted": "..."}), flush=True)
        for load in loads:
            load.update(count_received(server.api_url, load.pop("prefix"), load.pop("accepted")))
    finally:
        server.stop()

    summary = []
    for name in receivers:
        for n in clients:
            mine = [x for x in loads if x["receiver"] == name and x["clients"] == n]
            summary.append(
                {
                    "receiver": name,
                    "clients": n,
                    "deliveries": args.deliveries,
                    "loads": len(mine),
                    "median_p50_s": round(statistics.median(x["p50_s"] for x in mine), 4),
                    "median_p99_s": round(statistics.median(x["p99_s"] for x in mine), 4),
                    "worst_p99_s": max(x["p99_s"] for x in mine),
                    "median_calls_per_s": round(
                        statistics.median(x["calls_per_s"] for x in mine), 1
                    ),
                    "accepted_received_exactly_once": all(x["exactly_once"] for x in mine),
                    "not_accepted": sum(args.deliveries - x["accepted"] for x in mine),
                }
            )
    record = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": git("rev-parse", "--short", "HEAD"),
        "machine": f"{os.cpu_count()} cores, shared with the Prefect server",
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "summary": summary,
        "loads": loads,
    }
    previous = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"measurements": []}
    previous["measurements"].append(record)
    RESULTS.write_text(json.dumps(previous, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


def current_command(port: int, work: Path) -> list[str]:
    return [sys.executable, "-m", "polyburn.cli", "events", "--port", str(port)]


def old_receiver(commit: str, work: Path):
    """A command factory for the http.server receiver at ``commit``, or None when git lacks it."""
    try:
        source = git("show", f"{commit}:polyburn/events.py")
    except subprocess.CalledProcessError:
        print(f"no baseline: git has no polyburn/events.py at {commit}", file=sys.stderr)
        return None
    old_dir = work / "old"
    old_dir.mkdir()
    (old_dir / "polyburn_old_events.py").write_text(source)

    def command(port: int, work: Path) -> list[str]:
        code = OLD_RUNNER.format(old_dir=str(old_dir), root=str(ROOT), port=port)
        return [sys.executable, "-c", code]

    return command


def measure(server, name, command, secret, clients, deliveries, work, repeat) -> dict:
    """Start the receiver, warm it up, send the load, stop it; the load's figures."""
    port = free_port()
    home = work / f"home-{uuid.uuid4().hex[:8]}"
    env = server.client_env({"PREFECT_HOME": str(home), "POLYBURN_WEBHOOK_SECRET": secret})
    log = work / f"{home.name}.log"
    process = start_process(command(port, work), env, log)
    url = f"http://127.0.0.1:{port}/dataloop"
    try:
        wait_healthy(f"http://127.0.0.1:{port}/healthz", process, log)
        prefix = f"bench-{uuid.uuid4().hex[:10]}"
        deliver(url, secret, [f"{prefix}-warmup-{i}" for i in range(20)], 5)
        items = [f"{prefix}-load-{i}" for i in range(deliveries)]
        cpu_before = cpu_seconds(process.pid), cpu_seconds(server.process.pid), own_cpu()
        started = time.perf_counter()
        done = deliver(url, secret, items, clients)
        wall = time.perf_counter() - started
        cpu_after = cpu_seconds(process.pid), cpu_seconds(server.process.pid), own_cpu()
    finally:
        stop_process(process)
    cpu = [round(after - before, 2) for before, after in zip(cpu_before, cpu_after, strict=True)]
    seconds = [d.seconds for d in done if d.status == 202]
    return {
        "receiver": name,
        "clients": clients,
        "repeat": repeat,
        "statuses": dict(Counter(str(d.status) for d in done)),
        "p50_s": round(percentile(seconds, 0.50), 4),
        "p99_s": round(percentile(seconds, 0.99), 4),
        "max_s": round(max(seconds), 4),
        "calls_per_s": round(len(done) / wall, 1),
        "wall_s": round(wall, 2),
        "cpu_s": {"receiver": cpu[0], "prefect_server": cpu[1], "clients": cpu[2]},
        "prefix": f"dataloop.item.{prefix}-load-",
        "accepted": [d.item for d in done if d.status == 202],
    }


def cpu_seconds(pid: int) -> float:
    """User and system CPU seconds of process ``pid`` and its waited-for children (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def count_received(api_url: str, prefix: str, accepted: list[str], timeout: float = 120) -> dict:
    """Whether Prefect received each accepted call's event exactly once, and nothing else."""
    expected = Counter(f"dataloop.item.{item}" for item in accepted)
    deadline = time.monotonic() + timeout
    while True:
        events = received_events(api_url, prefix)
        counts = Counter(e["resource"]["prefect.resource.id"] for e in events)
        if len(counts) >= len(expected) or time.monotonic() > deadline:
            break
        time.sleep(2)
    return {
        "accepted": len(accepted),
        "events_received": len(events),
        "exactly_once": counts == expected,
    }


def git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()


if __name__ == "__main__":
    main()
