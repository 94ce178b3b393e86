"""Client CPU per S3 request, the way polyburn's S3 destination makes them (issue #19), by hand.

Run from the repository root::

    .venv/bin/python bench/s3_put_cost.py [--calls 400] [--rounds 5] [--threads 1,32]
                                          [--baseline REF] [--profile] [--name s3_put_cost]

What a burn worker spends per item into S3 beyond what it spends into a folder is the client's
CPU for two ``PutObject`` calls (the mask and the item's record). This measures that CPU, in
this process only (``time.process_time``: every thread of this process, not SeaweedFS), per
call, against a loopback SeaweedFS (:class:`tests.support.weed.WeedServer`):

* ``put mask``: :meth:`S3Destination.put_new` of 24 KiB (a semantic mask's PNG is 10-40 KiB);
* ``put record``: :meth:`S3Destination.put_record` of 700 bytes of JSON;
* ``put if-none-match``: :meth:`S3Destination.create` (a conditional PUT, ``If-None-Match: *``);
* ``get``: :meth:`S3Destination.get` of the record (``GetObject``, checksum mode on).

Each is run by the destination as the code under test builds it (``from_uri``: the client from
boto3's default chain through the environment, polyburn's config, hooks and in-flight window),
and by the same destination module at git ``--baseline`` (default: the merge base with
``main``) loaded into this same process, so the two share the machine's load at that moment;
the variants take turns, ``--rounds`` times, and each figure is the median over rounds of the
CPU per call. ``--threads`` runs the calls on that many threads at once (32 is
``POLYBURN_S3_CONCURRENCY``'s default: GIL turns cost CPU too). ``--profile`` adds a cProfile
breakdown (CPU time, inflated by the profiler itself: read the shares, not the totals) of
single-threaded mask PUTs per variant, grouped by where the time is spent (signing, endpoint
resolution, validation, ...).

Results: ``bench/results/<--name>.json``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import cProfile
import importlib.util
import json
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _measure import scratch_folder, write_results  # noqa: E402

from polyburn.destinations import s3 as current_s3  # noqa: E402
from tests.support.weed import WeedServer  # noqa: E402

BUCKET = "polyburn-cost"
MASK = os.urandom(24 * 1024)
RECORD = json.dumps(
    {
        "path": "street/scene_003.json",
        "revision": "0" * 64,
        "outputs": [{"key": "semantic/street/scene_003.png", "sha256": "1" * 64, "size": 24576}],
        "pad": "x" * 450,
    }
).encode()
METADATA = {"item-id": "64f0c0ffee0123456789abcd", "revision": "0" * 64}

# where the CPU goes, by the file a function lives in (cProfile's own time, not cumulative)
CATEGORIES = (
    (
        "signing (SigV4, payload hash)",
        ("botocore/auth.py", "botocore/signers.py", "hmac", "_hashlib"),
    ),
    ("endpoint ruleset resolution", ("botocore/endpoint_provider.py", "botocore/regions.py")),
    ("parameter validation", ("botocore/validate.py",)),
    ("request serialization", ("botocore/serialize.py",)),
    ("response parsing", ("botocore/parsers.py",)),
    ("event hooks", ("botocore/hooks.py", "botocore/handlers.py", "botocore/utils.py")),
    ("checksums", ("botocore/httpchecksum.py", "zlib", "awscrt")),
    ("retries", ("botocore/retries/", "botocore/retryhandler.py")),
    (
        "HTTP (botocore, urllib3, http.client, socket)",
        (
            "botocore/awsrequest.py",
            "botocore/httpsession.py",
            "botocore/endpoint.py",
            "urllib3/",
            "http/client.py",
            "socket.py",
            "<method 'recv",
            "<method 'send",
            "<method 'sendall",
            "ssl.py",
            "email/",
        ),
    ),
    ("other botocore / boto3", ("botocore/", "boto3/")),
    ("polyburn", ("polyburn/",)),
    ("threading and locks", ("threading.py", "<method 'acquire", "<method 'release")),
)


def load_baseline(ref: str) -> Any:
    """``polyburn/destinations/s3.py`` as of git ``ref``, as a module of its own, with the lean
    PUT path of ``ref`` (``s3_put.py``, when ``ref`` has it) loaded the same way and imported by
    it; its imports of the rest of polyburn resolve to the working tree's, whose interfaces it
    uses."""
    folder = scratch_folder("polyburn-s3-baseline-")

    def load(name: str, source: str) -> Any:
        path = folder / f"{name}.py"
        path.write_text(source)
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        return module

    def show(path: str) -> str | None:
        shown = subprocess.run(
            ["git", "show", f"{ref}:{path}"], cwd=ROOT, capture_output=True, text=True
        )
        return shown.stdout if shown.returncode == 0 else None

    source = show("polyburn/destinations/s3.py")
    if source is None:
        raise SystemExit(f"{ref} has no polyburn/destinations/s3.py")
    lean = show("polyburn/destinations/s3_put.py")
    if lean is not None:
        load("polyburn_s3_put_baseline", lean)
        source = source.replace(
            "from polyburn.destinations.s3_put import", "from polyburn_s3_put_baseline import"
        )
    return load("polyburn_s3_baseline", source)


def operations(destination: Any, tag: str) -> dict[str, Any]:
    """name → a callable of one call number, each making one request."""
    run = uuid.uuid4().hex[:8]
    return {
        "put mask": lambda i: destination.put_new(
            f"{tag}/{run}/semantic/{i}.png", MASK, "image/png", METADATA
        ),
        "put record": lambda i: destination.put_record(f"{tag}/{run}/records/{i}.json", RECORD),
        "put if-none-match": lambda i: destination.create(f"{tag}/{run}/claims/{i}.json", RECORD),
        "get": lambda i: destination.get(f"{tag}/{run}/records/{i}.json"),
    }


def cpu_per_call(call: Any, calls: int, threads: int) -> tuple[float, float]:
    """(CPU ms per call of this whole process, wall ms per call) for ``calls`` calls."""
    wall, cpu = time.perf_counter(), time.process_time()
    if threads == 1:
        for i in range(calls):
            call(i)
    else:
        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            for _ in pool.map(call, range(calls)):
                pass
    return (
        (time.process_time() - cpu) * 1000 / calls,
        (time.perf_counter() - wall) * 1000 / calls,
    )


def categorise(profile: cProfile.Profile, calls: int) -> dict[str, float]:
    """cProfile's own time per category, in ms per call."""
    stats = pstats.Stats(profile)
    out: dict[str, float] = {name: 0.0 for name, _ in CATEGORIES}
    out["rest"] = 0.0
    for (file, _, function), (_, _, own, _, _) in stats.stats.items():
        where = f"{file} {function}"
        for name, needles in CATEGORIES:
            if any(n in where for n in needles):
                out[name] += own
                break
        else:
            out["rest"] += own
    total = sum(out.values())
    shown = {k: round(v * 1000 / calls, 3) for k, v in out.items() if v * 1000 / calls >= 0.005}
    shown["total (profiled)"] = round(total * 1000 / calls, 3)
    return shown


def top_functions(profile: cProfile.Profile, calls: int, n: int = 25) -> list[str]:
    stats = pstats.Stats(profile)
    rows = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:n]
    out = []
    for (file, line, function), (_, ncalls, own, cumulative, _) in rows:
        short = file.split("site-packages/")[-1]
        out.append(
            f"{own * 1000 / calls:7.3f} ms own {cumulative * 1000 / calls:7.3f} cum "
            f"{ncalls / calls:6.1f}x  {short}:{line} {function}"
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=400, help="calls per variant and round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", default="1,32", help="comma-separated thread counts")
    parser.add_argument(
        "--baseline",
        help="git ref of the baseline destination (default: where this branch left main)",
    )
    parser.add_argument("--profile", action="store_true", help="cProfile breakdown of mask PUTs")
    parser.add_argument("--name", default="s3_put_cost", help="bench/results/<name>.json")
    args = parser.parse_args(argv)
    thread_counts = [int(t) for t in args.threads.split(",") if t.strip()]
    if args.baseline is None:
        args.baseline = subprocess.run(
            ["git", "merge-base", "HEAD", "main"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()[:7]
    baseline = load_baseline(args.baseline)
    head = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()

    weed = WeedServer(temp_root=tempfile.gettempdir()).start()
    try:
        weed.client().create_bucket(Bucket=BUCKET)
        with tempfile.TemporaryDirectory() as home:
            for name in list(os.environ):
                if name.startswith(("AWS_", "POLYBURN_S3_")):
                    del os.environ[name]
            os.environ.update(
                AWS_ACCESS_KEY_ID=weed.access_key,
                AWS_SECRET_ACCESS_KEY=weed.secret_key,
                AWS_DEFAULT_REGION=weed.region,
                AWS_ENDPOINT_URL=weed.endpoint_url,
                AWS_EC2_METADATA_DISABLED="true",
                AWS_CONFIG_FILE=f"{home}/no-config",
                AWS_SHARED_CREDENTIALS_FILE=f"{home}/no-credentials",
            )
            variants = {
                f"baseline ({args.baseline})": baseline.S3Destination.from_uri(
                    f"s3://{BUCKET}/baseline"
                ),
                f"current ({head})": current_s3.S3Destination.from_uri(f"s3://{BUCKET}/current"),
            }
            figures, profiles = measure(variants, args, thread_counts)
    finally:
        weed.stop()

    summary = summarise(figures, list(variants))
    print_summary(summary)
    for variant, profile in profiles.items():
        print(f"\n{variant}: mask PUT, single thread, cProfile own time (ms per call)")
        for k, v in profile["categories"].items():
            print(f"  {v:7.3f}  {k}")
        print("  top functions:")
        for line in profile["top"][:15]:
            print("   ", line)
    write_results(
        args.name,
        "client CPU (this process, all threads) per S3 request as polyburn's S3 destination "
        "makes it, against a loopback SeaweedFS; baseline and current destination modules in "
        "the same process, taking turns; median over rounds",
        figures,
        summary={"per_call": summary, "profiles": profiles},
        cpus=os.cpu_count(),
        load_avg=list(os.getloadavg()),
        calls=args.calls,
        rounds=args.rounds,
        baseline=args.baseline,
        head=head,
    )
    return 0


def measure(
    variants: dict[str, Any], args: argparse.Namespace, thread_counts: list[int]
) -> tuple[list[dict], dict[str, Any]]:
    figures = []
    for round_ in range(args.rounds):
        for threads in thread_counts:
            for variant, destination in variants.items():
                for op, call in operations(destination, f"r{round_}-t{threads}").items():
                    if op == "get":  # read back what this round's "put record" wrote
                        continue
                    cpu, wall = cpu_per_call(call, args.calls, threads)
                    figures.append(_row(variant, op, threads, round_, cpu, wall))
                ops = operations(destination, f"g{round_}-t{threads}")
                for i in range(args.calls):
                    ops["put record"](i)
                get = ops["get"]
                cpu, wall = cpu_per_call(get, args.calls, threads)
                figures.append(_row(variant, "get", threads, round_, cpu, wall))
        print(f"round {round_ + 1}/{args.rounds} done", flush=True)
    profiles = {}
    if args.profile:
        for variant, destination in variants.items():
            call = operations(destination, "profile")["put mask"]
            call(-1)
            profile = cProfile.Profile(time.thread_time)  # CPU, not waiting
            profile.enable()
            for i in range(args.calls):
                call(i)
            profile.disable()
            profiles[variant] = {
                "categories": categorise(profile, args.calls),
                "top": top_functions(profile, args.calls),
            }
    return figures, profiles


def _row(variant: str, op: str, threads: int, round_: int, cpu: float, wall: float) -> dict:
    return {
        "variant": variant,
        "op": op,
        "threads": threads,
        "round": round_,
        "cpu_ms_per_call": cpu,
        "wall_ms_per_call": wall,
    }


def summarise(figures: list[dict], variants: list[str]) -> list[dict]:
    """Median CPU and wall per call per (op, threads, variant), with the ratio of each
    variant's CPU to the first (the baseline), and a burn item's two PUTs (mask + record)."""
    out = []
    keys = sorted({(f["op"], f["threads"]) for f in figures}, key=lambda k: (k[1], k[0]))
    for op, threads in keys:
        base = None
        for variant in variants:
            rows = [
                f
                for f in figures
                if f["op"] == op and f["threads"] == threads and f["variant"] == variant
            ]
            cpu = statistics.median(r["cpu_ms_per_call"] for r in rows)
            wall = statistics.median(r["wall_ms_per_call"] for r in rows)
            base = cpu if base is None else base
            out.append(
                {
                    "op": op,
                    "threads": threads,
                    "variant": variant,
                    "cpu_ms_median": round(cpu, 3),
                    "wall_ms_median": round(wall, 3),
                    "cpu_vs_baseline": round(cpu / base, 3),
                }
            )
    for threads in sorted({f["threads"] for f in figures}):
        base = None
        for variant in variants:
            both = sum(
                s["cpu_ms_median"]
                for s in out
                if s["threads"] == threads
                and s["variant"] == variant
                and s["op"] in ("put mask", "put record")
            )
            base = both if base is None else base
            out.append(
                {
                    "op": "item (put mask + put record)",
                    "threads": threads,
                    "variant": variant,
                    "cpu_ms_median": round(both, 3),
                    "cpu_vs_baseline": round(both / base, 3),
                }
            )
    return out


def print_summary(summary: list[dict]) -> None:
    print(f"\n{'op':30} {'threads':>7} {'variant':28} {'CPU ms':>8} {'wall ms':>8} {'x base':>7}")
    for s in summary:
        wall = s.get("wall_ms_median")
        print(
            f"{s['op']:30} {s['threads']:>7} {s['variant']:28} {s['cpu_ms_median']:8.3f} "
            f"{wall if wall is not None else float('nan'):8.3f} {s['cpu_vs_baseline']:7.3f}"
        )


if __name__ == "__main__":
    sys.exit(main())
