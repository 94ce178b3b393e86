"""``polyburn run`` to S3 under network latency (issue #19), run by hand.

Run from the repository root::

    .venv/bin/python bench/s3_latency.py [--rtt-ms 0,30,100] [--items 200,1000,5000]
                                         [--quick] [--repeats 3] [--aws PATH | --no-aws]
                                         [--name s3_latency] [--keep] [--before DIR]

How long: set by the slowest S3 runs. polyburn before issue #19 did about 6 items/s at 30 ms
and 2.5 at 100 ms, so the defaults take hours; ``--rtt-ms 0,30 --items 200,1000`` about 15
minutes; ``--quick`` (30 ms, 200 and 600 items) about 6 minutes.

Set-up, all on 127.0.0.1: a SeaweedFS ``weed mini`` (:class:`tests.support.weed.WeedServer`)
behind :class:`bench.latency_proxy.LatencyProxy`, which adds one round trip (RTT) per
request/response turn and counts the HTTP requests by method and key; a running
``prefect server start`` (SQLite); generated W1-like items (``tests/support/generate.py``:
1920x1080, 50 star polygons of 30 vertices, some with holes; five labels).

polyburn reaches S3 as a user configures it: boto3's default chain from the environment,
``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_DEFAULT_REGION`` and
``AWS_ENDPOINT_URL`` pointing at the proxy (a custom endpoint gets path-style addressing), shared
AWS config files switched off.

Measured, each as a fresh process (``bench/_measure.py``: wall, CPU, peak RSS of the main
process and of the largest burn worker):

* ``folder``: ``polyburn run EXPORT DIR --mode semantic --labels L --no-progress --json`` per
  item count (no S3; the reference for what the machine does without a network), ``--repeats``
  times (default 3, the median kept: it is short, so start-up noise weighs on it);
* per RTT and item count, ``s3``: the same command to ``s3://polyburn-bench/rtt<R>-n<N>``, a
  fresh prefix; then ``s3 re-run``: the same again with nothing changed (every batch is a hit
  in Prefect's result cache, so no item is even looked at); then ``s3 re-run nc``: the same
  again with an empty Prefect result store (a fresh ``PREFECT_HOME``: every batch is a cache
  miss, as for a run on another machine or after an upgrade, so every item is checked against
  the destination and nothing is written);
* per RTT and item count, ``aws cp``: ``aws s3 cp --recursive`` of the semantic PNGs the folder
  run wrote, through the same proxy, to a fresh prefix (awscli's defaults: 10 requests in
  flight, single PUTs below 8 MiB) - what a plain uploader gets from the same link; also
  ``--repeats`` times, the median kept;
* with ``--before DIR``, per RTT and item count, ``s3 before``: the first run again, just
  before ``s3``, to a prefix of its own, with the polyburn sources in ``DIR`` first on
  ``PYTHONPATH`` (e.g. ``git archive main polyburn | tar -x -C DIR``): a before/after pair
  under the same load, which a shared machine does not give two runs minutes apart;
* at the largest count, per RTT: ``polyburn manifest s3://… -o FILE`` and
  ``polyburn dataset s3://…`` on the prefix the runs wrote.

Reported: wall seconds, items/s, the marginal rate ``(n2 - n1) / (t2 - t1)`` between the smallest
and largest counts (the fixed start-up cancels out), how many times slower than the folder run
and than ``aws cp`` (time ratio at the same count; rate ratio for the marginal rates), requests
per item by method and by what they touch (mask, record, lease, list, ...) for the first run and
the re-run, plus the marginal requests per item, and peak RSS, and where the 2 cores went:
the marginal CPU milliseconds per item of the measured process, of the S3 server, of the Prefect
server and of the latency proxy (``marginal_cpu_ms_per_item``; read from ``/proc`` around each
run), which tells a run bound by the round trip from one bound by CPU that the harness shares.
Results go to ``bench/results/<--name>.json`` (default ``s3_latency``).

awscli pins botocore exactly, so it never goes into the project's venv: by default this script
creates ``bench/.awscli-venv`` (``python -m venv`` + ``pip install awscli``, about 15 s, once;
git-ignored) or uses ``--aws /path/to/aws``; ``--no-aws`` skips the reference.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import unquote

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(BENCH))

from _measure import run_timed, write_results  # noqa: E402
from latency_proxy import LatencyProxy  # noqa: E402

from tests.support.generate import LABELS as LABEL_NAMES  # noqa: E402
from tests.support.generate import write_export  # noqa: E402
from tests.support.prefect_server import start_prefect_server  # noqa: E402
from tests.support.weed import WeedServer  # noqa: E402

BUCKET = "polyburn-bench"
AWS_VENV = BENCH / ".awscli-venv"
MASK_FOLDERS = ("semantic", "instance", "binary", "coco", "previews")
S3_PHASES = ("s3", "s3 re-run", "s3 re-run nc")
BEFORE = "s3 before"  # --before: the first run with other polyburn sources
S3_ROWS = (*S3_PHASES, BEFORE)


# ---------------------------------------------------------------------- set-up
def export_of(work: Path, everything: Path, n: int) -> Path:
    """An export folder holding the first ``n`` generated items (symlinks, no copies)."""
    target = work / f"export-{n}"
    if target.exists():
        return target
    for file in sorted((everything / "json").rglob("*.json"))[:n]:
        link = target / "json" / file.relative_to(everything / "json")
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(file)
    return target


def find_aws(explicit: str | None) -> str:
    """``--aws``, else ``bench/.awscli-venv/bin/aws`` (created on first use)."""
    if explicit:
        return explicit
    aws = AWS_VENV / "bin" / "aws"
    if not aws.exists():
        print(f"creating {AWS_VENV.relative_to(ROOT)} (pip install awscli) ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(AWS_VENV)], check=True)
        subprocess.run(
            [str(AWS_VENV / "bin" / "pip"), "install", "-q", "awscli"],
            check=True,
        )
    version = subprocess.run([str(aws), "--version"], capture_output=True, text=True, check=True)
    print(version.stdout.strip() or version.stderr.strip())
    return str(aws)


def s3_env(base: dict[str, str], server: WeedServer, endpoint: str, work: Path) -> dict[str, str]:
    """``base`` with the AWS settings of boto3's default chain pointed at ``endpoint``."""
    env = {
        k: v
        for k, v in base.items()
        if not k.startswith(("AWS_", "POLYBURN_S3_")) and k != "POLYBURN_AWS_CREDENTIALS_BLOCK"
    }
    env.update(
        AWS_ACCESS_KEY_ID=server.access_key,
        AWS_SECRET_ACCESS_KEY=server.secret_key,
        AWS_DEFAULT_REGION=server.region,
        AWS_ENDPOINT_URL=endpoint,
        AWS_EC2_METADATA_DISABLED="true",
        AWS_CONFIG_FILE=str(work / "no-aws-config"),
        AWS_SHARED_CREDENTIALS_FILE=str(work / "no-aws-credentials"),
    )
    return env


# ---------------------------------------------------------------------- measuring
def measure(env: dict[str, str], log: Path, *command: str) -> dict[str, Any]:
    """One ``bench/_measure.py`` process running ``polyburn COMMAND``: its figures, plus the
    run's JSON summary when it printed one. Raises with the stderr tail on failure."""
    out = log.with_suffix(".measure.json")
    stdout, stderr = log.with_suffix(".stdout"), log.with_suffix(".stderr")
    elsewhere = cpu_elsewhere()
    with stdout.open("wb") as so, stderr.open("wb") as se:
        done = subprocess.run(
            [sys.executable, str(BENCH / "_measure.py"), str(out), "polyburn", *command],
            env=env,
            stdout=so,
            stderr=se,
        )
    if done.returncode != 0 or not out.exists():
        tail = "\n".join(stderr.read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"polyburn {' '.join(command)} failed ({done.returncode}):\n{tail}")
    result = json.loads(out.read_text())
    result["cpu_elsewhere"] = spent_elsewhere(elsewhere)
    if result["code"] != 0:
        tail = "\n".join(stderr.read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"polyburn {' '.join(command)} exited {result['code']}:\n{tail}")
    if "--json" in command:
        summary = json.loads(stdout.read_text())
        result["summary"] = {
            k: summary.get(k) for k in ("items", "ok", "failed", "outputs_written")
        }
    return result


WATCHED: dict[str, int] = {}
"""Processes beside the measured one that share the 2 cores: name → pid (set in :func:`main`)."""


def tree_cpu(pid: int) -> float:
    """CPU seconds (user + system, with reaped children's) of ``pid`` and its live descendants,
    from ``/proc``; 0 for a process that is gone."""
    ticks = os.sysconf("SC_CLK_TCK")
    parents, usage = {}, {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
        usage[int(stat.parent.name)] = sum(int(f) for f in fields[11:15]) / ticks
    tree, grew = {pid}, True
    while grew:
        more = {child for child, parent in parents.items() if parent in tree} - tree
        tree |= more
        grew = bool(more)
    return sum(usage.get(p, 0.0) for p in tree)


def cpu_elsewhere() -> dict[str, float]:
    """CPU seconds so far of the watched processes, and of this one (``proxy``: while a measured
    process runs, the latency proxy's thread is all that works here)."""
    return {**{name: tree_cpu(pid) for name, pid in WATCHED.items()}, "proxy": time.process_time()}


def spent_elsewhere(before: dict[str, float]) -> dict[str, float]:
    after = cpu_elsewhere()
    return {name: round(after[name] - before[name], 3) for name in before}


def kind_of(method: str, target: str, prefix: str) -> str:
    """What a request touches: ``list``, ``delete-batch``, ``mask``, ``record``, ``lease``,
    another ``.polyburn/…`` key, or the run-level file's name (``label_map.json``...)."""
    path, _, query = target.partition("?")
    path = unquote(path)
    if method == "GET" and ("list-type" in query or path.rstrip("/") == f"/{BUCKET}"):
        return "list"
    if method == "POST" and "delete" in query:
        return "delete-batch"
    rest = path.removeprefix(f"/{BUCKET}/").removeprefix(f"{prefix}/")
    for start, kind in ((".polyburn/records/", "record"), (".polyburn/leases/", "lease")):
        if rest.startswith(start):
            return kind
    parts = rest.split("/")
    if parts[0] in MASK_FOLDERS:
        return "mask" if parts[0] != "previews" else "preview"
    return "/".join(parts[:2]) if parts[0] == ".polyburn" else parts[0]  # not .polyburn/clock/ID


def requests_seen(proxy: LatencyProxy, prefix: str) -> dict[str, Any]:
    """The proxy's requests since its last reset: by method, by method and kind, connections."""
    seen = proxy.requests()
    return {
        "total": len(seen),
        "by_method": dict(Counter(method for method, _ in seen)),
        "by_kind": dict(sorted(Counter(f"{m} {kind_of(m, t, prefix)}" for m, t in seen).items())),
        "connections": proxy.connections(),
        "unparsed_connections": proxy.unparsed(),
    }


def row(rtt: float | None, n: int, destination: str, measured: dict, **more: Any) -> dict:
    keep = (
        "wall",
        "cpu",
        "cpu_main",
        "cpu_workers",
        "peak_rss_mb",
        "peak_rss_worker_mb",
        "workers",
        "summary",
        "walls",
        "cpu_elsewhere",
    )
    out = {"rtt_ms": rtt, "items": n, "destination": destination}
    out.update({k: measured[k] for k in keep if k in measured})
    out["items_per_s"] = n / measured["wall"]
    out.update(more)
    return out


# ---------------------------------------------------------------------- the run
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rtt-ms", default="0,30,100", help="comma-separated round trips")
    parser.add_argument("--items", default="200,1000,5000", help="comma-separated item counts")
    parser.add_argument("--quick", action="store_true", help="30 ms only, 200 and 600 items")
    parser.add_argument(
        "--repeats", type=int, default=3, help="folder and aws cp runs per count (median)"
    )
    parser.add_argument("--aws", help="the aws executable (default: bench/.awscli-venv)")
    parser.add_argument("--no-aws", action="store_true", help="skip the aws s3 cp reference")
    parser.add_argument("--name", default="s3_latency", help="bench/results/<name>.json")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument(
        "--before",
        help="a folder holding other polyburn sources (git archive REF polyburn | tar -x -C "
        "DIR): each first run is preceded by the same run with them first on PYTHONPATH, "
        "reported as 's3 before', so before and after share the machine's load",
    )
    args = parser.parse_args(argv)
    # a SIGTERM (or a SIGINT to a background job, which ignores it) must still stop the servers
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.quick:
        args.rtt_ms, args.items = "30", "200,600"
    rtts = [float(r) for r in args.rtt_ms.split(",") if r.strip()]
    counts = sorted({int(n) for n in args.items.split(",") if n.strip()})
    aws = None if args.no_aws else find_aws(args.aws)

    work = Path(tempfile.mkdtemp(prefix="polyburn-s3lat-"))
    print(f"generating {counts[-1]} items in {work} ...", flush=True)
    everything = write_export(work / "all", counts[-1], seed=42)
    labels = work / "labels.json"
    labels.write_text(json.dumps({name: k + 1 for k, name in enumerate(LABEL_NAMES)}))
    logs = work / "logs"
    logs.mkdir()
    weed = WeedServer(temp_root=tempfile.gettempdir())
    prefect = None
    runs: list[dict[str, Any]] = []
    try:
        weed.start()
        weed.client().create_bucket(Bucket=BUCKET)
        prefect = start_prefect_server(work / "prefect-home")
        WATCHED.update(s3_server=weed.pid, prefect_server=prefect.process.pid)
        # the clients' own PREFECT_HOME: their result store (the batch cache) stays in here
        base = prefect.client_env(
            {"PREFECT_LOGGING_LEVEL": "WARNING", "PREFECT_HOME": str(work / "client-home")}
        )

        def run(env: dict, dest: str, source: Path, log: str) -> dict:
            command = ["run", str(source), dest, "--mode", "semantic", "--labels", str(labels)]
            return measure(env, logs / log, *command, "--no-progress", "--json")

        run(base, str(work / "warm"), export_of(work, everything, 1), "warm")  # numba cache
        if aws:  # awscli's first start compiles and caches; keep that out of the figures
            ls = [aws, "s3", "ls", f"s3://{BUCKET}", "--endpoint-url", weed.endpoint_url]
            subprocess.run(ls, env=s3_env(base, weed, weed.endpoint_url, work), check=True)
        folders: dict[int, Path] = {}
        for n in counts:
            tries = []
            for k in range(args.repeats):
                folders[n] = work / f"folder-{n}-{k}"
                source = export_of(work, everything, n)
                tries.append(run(base, str(folders[n]), source, f"folder-{n}-{k}"))
            measured = median_run(tries)
            runs.append(row(None, n, "folder", measured))
            print(f"folder        n={n:>5} {measured['wall']:7.1f} s {walls(tries)}", flush=True)

        for rtt in rtts:
            with LatencyProxy("127.0.0.1", weed.s3_port, rtt / 1000).start() as proxy:
                env = s3_env(base, weed, proxy.endpoint_url, work)
                for n in counts:
                    if args.before:
                        runs.append(
                            before_run(
                                rtt, n, env, proxy, run, export_of(work, everything, n), args.before
                            )
                        )
                    runs += s3_runs(rtt, n, env, proxy, run, export_of(work, everything, n))
                    if aws:
                        masks = folders[n] / "semantic"
                        runs.append(aws_cp(rtt, n, env, proxy, aws, masks, args.repeats))
                    if n == counts[-1]:
                        runs += listing_runs(rtt, n, env, proxy, work, logs)
    finally:
        if prefect is not None:
            prefect.stop()
        weed.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    summary = summarise(runs, rtts, counts)
    print_tables(runs, summary)
    write_results(
        args.name,
        "polyburn run to S3 (SeaweedFS behind a loopback proxy adding an RTT per turn) vs a "
        "folder and vs aws s3 cp, fresh processes, semantic masks of W1-like items",
        runs,
        summary=summary,
        cpus=os.cpu_count(),
        load_avg=list(os.getloadavg()),
        items=counts,
        rtt_ms=rtts,
        aws=aws and subprocess.run([aws, "--version"], capture_output=True, text=True).stdout,
    )
    return 0


def s3_runs(rtt: float, n: int, env: dict, proxy: LatencyProxy, run, source: Path) -> list[dict]:
    """A first run into a fresh prefix, a re-run with nothing changed, and that re-run again
    with an empty Prefect result store (a fresh PREFECT_HOME: no batch cache hits)."""
    prefix = f"rtt{rtt:g}-n{n}"
    out = []
    for phase in S3_PHASES:
        log = f"{prefix}-{phase.replace(' ', '')}"
        phase_env = env
        if phase == "s3 re-run nc":
            home = Path(env["PREFECT_HOME"]).parent / f"home-{log}"
            phase_env = {**env, "PREFECT_HOME": str(home)}
        proxy.reset()
        measured = run(phase_env, f"s3://{BUCKET}/{prefix}", source, log)
        requests = requests_seen(proxy, prefix)
        out.append(row(rtt, n, phase, measured, prefix=prefix, requests=requests))
        per_item = {m: round(c / n, 2) for m, c in sorted(requests["by_method"].items())}
        print(
            f"{phase:13s} n={n:>5} rtt={rtt:g} ms {measured['wall']:7.1f} s, "
            f"written {measured['summary']['outputs_written']}, requests/item {per_item}",
            flush=True,
        )
    return out


def before_run(
    rtt: float, n: int, env: dict, proxy: LatencyProxy, run, source: Path, before: str
) -> dict:
    """The first run with the polyburn sources in ``before`` (``--before``), to a prefix of its
    own."""
    prefix = f"rtt{rtt:g}-n{n}-before"
    proxy.reset()
    before_env = {**env, "PYTHONPATH": str(Path(before).resolve())}
    measured = run(before_env, f"s3://{BUCKET}/{prefix}", source, prefix)
    requests = requests_seen(proxy, prefix)
    print(f"{BEFORE:13s} n={n:>5} rtt={rtt:g} ms {measured['wall']:7.1f} s", flush=True)
    return row(rtt, n, BEFORE, measured, prefix=prefix, requests=requests)


def aws_cp(
    rtt: float, n: int, env: dict, proxy: LatencyProxy, aws: str, masks: Path, repeats: int
) -> dict:
    """``aws s3 cp --recursive`` of the folder run's masks through the proxy, ``repeats`` times
    (each to a fresh prefix); the run of median wall time, with the others' walls."""
    files = sum(1 for p in masks.rglob("*") if p.is_file())
    tries = []
    for k in range(repeats):
        prefix = f"awscp-rtt{rtt:g}-n{n}-{k}"
        command = [aws, "s3", "cp", "--recursive", "--only-show-errors", str(masks)]
        command += [f"s3://{BUCKET}/{prefix}/{masks.name}/", "--endpoint-url", proxy.endpoint_url]
        proxy.reset()
        elsewhere = cpu_elsewhere()
        measured = run_timed(command, env=env, stdin=subprocess.DEVNULL)
        measured["cpu_elsewhere"] = spent_elsewhere(elsewhere)
        if measured["code"] != 0:
            raise RuntimeError(f"aws s3 cp failed ({measured['code']})")
        tries.append({**measured, "requests": requests_seen(proxy, prefix)})
    measured = median_run(tries)
    print(f"aws cp        n={n:>5} rtt={rtt:g} ms {measured['wall']:7.1f} s {walls(tries)}")
    return row(rtt, n, "aws cp", measured, files=files, requests=measured["requests"])


def median_run(tries: list[dict]) -> dict:
    """The try of median wall time (the lower middle one for an even count), with every
    try's wall under ``walls``."""
    ordered = sorted(tries, key=lambda t: t["wall"])
    return {**ordered[(len(ordered) - 1) // 2], "walls": [t["wall"] for t in tries]}


def walls(tries: list[dict]) -> str:
    return "(" + ", ".join(f"{t['wall']:.1f}" for t in tries) + ")" if len(tries) > 1 else ""


def listing_runs(
    rtt: float, n: int, env: dict, proxy: LatencyProxy, work: Path, logs: Path
) -> list[dict]:
    """``polyburn manifest`` and ``polyburn dataset`` on the prefix the runs wrote."""
    prefix = f"rtt{rtt:g}-n{n}"
    out = []
    for name, command in (
        ("manifest", ["manifest", f"s3://{BUCKET}/{prefix}", "-o", str(work / f"{prefix}.jsonl")]),
        ("dataset", ["dataset", f"s3://{BUCKET}/{prefix}"]),
    ):
        proxy.reset()
        measured = measure(env, logs / f"{prefix}-{name}", *command)
        out.append(
            row(rtt, n, name, measured, prefix=prefix, requests=requests_seen(proxy, prefix))
        )
        print(f"{name:13s} n={n:>5} rtt={rtt:g} ms {measured['wall']:7.1f} s", flush=True)
    return out


# ---------------------------------------------------------------------- reporting
def _find(runs: list[dict], rtt: float | None, n: int, destination: str) -> dict | None:
    for r in runs:
        same_rtt = destination == "folder" or r["rtt_ms"] == rtt
        if r["destination"] == destination and r["items"] == n and same_rtt:
            return r
    return None


def summarise(runs: list[dict], rtts: list[float], counts: list[int]) -> dict[str, Any]:
    """Marginal rates between the smallest and largest counts, per RTT and destination, with
    their ratios and the marginal requests per item."""
    small, large = counts[0], counts[-1]
    out: dict[str, Any] = {"between_items": [small, large], "per_rtt": {}}
    if small == large:
        return out
    folder = marginal(_find(runs, None, small, "folder"), _find(runs, None, large, "folder"))
    for rtt in rtts:
        entry: dict[str, Any] = {}
        for destination in (*S3_ROWS, "aws cp"):
            a, b = _find(runs, rtt, small, destination), _find(runs, rtt, large, destination)
            if a is None or b is None:
                continue
            rate = marginal(a, b)
            entry[destination] = {"marginal_items_per_s": rate}
            if "cpu_elsewhere" in a and "cpu_elsewhere" in b:
                entry[destination]["marginal_cpu_ms_per_item"] = cpu_per_item(a, b)
            if folder and rate:
                entry[destination]["x_slower_than_folder"] = folder / rate
            if "requests" in a and "requests" in b:
                methods = set(a["requests"]["by_method"]) | set(b["requests"]["by_method"])
                entry[destination]["marginal_requests_per_item"] = {
                    m: (b["requests"]["by_method"].get(m, 0) - a["requests"]["by_method"].get(m, 0))
                    / (large - small)
                    for m in sorted(methods)
                }
        aws = entry.get("aws cp", {}).get("marginal_items_per_s")
        for destination in S3_ROWS:
            if aws and entry.get(destination, {}).get("marginal_items_per_s"):
                entry[destination]["x_slower_than_aws_cp"] = (
                    aws / entry[destination]["marginal_items_per_s"]
                )
        entry["folder"] = {"marginal_items_per_s": folder}
        a, b = _find(runs, None, small, "folder"), _find(runs, None, large, "folder")
        if a and b and "cpu_elsewhere" in a and "cpu_elsewhere" in b:
            entry["folder"]["marginal_cpu_ms_per_item"] = cpu_per_item(a, b)
        out["per_rtt"][f"{rtt:g}"] = entry
    return out


def cpu_per_item(a: dict, b: dict) -> dict[str, float]:
    """Marginal CPU milliseconds per item between runs ``a`` and ``b``, by process: the
    measured one (``polyburn``, or ``aws``), then the S3 server, the Prefect server and the
    latency proxy, and ``all`` of them: what the 2 cores spend per item."""
    items = b["items"] - a["items"]
    own = 1000 * (b.get("cpu", 0.0) - a.get("cpu", 0.0)) / items
    out = {"aws" if b["destination"] == "aws cp" else "polyburn": round(own, 3)}
    for name in b["cpu_elsewhere"]:
        spent = b["cpu_elsewhere"][name] - a["cpu_elsewhere"].get(name, 0.0)
        out[name] = round(1000 * spent / items, 3)
    out["all"] = round(sum(out.values()), 3)
    return out


def marginal(a: dict | None, b: dict | None) -> float | None:
    """Items/s of the items between ``a``'s and ``b``'s; None when ``b`` took no longer (the
    difference is lost in the fixed cost's noise)."""
    if a is None or b is None or b["wall"] <= a["wall"]:
        return None
    return (b["items"] - a["items"]) / (b["wall"] - a["wall"])


def print_tables(runs: list[dict], summary: dict) -> None:
    print()
    print(
        "x folder / x aws: this wall time / that one's at the same count (times slower); "
        "requests per item by method (all requests of the process / items); re-run: nothing "
        "changed, Prefect's batch cache hit; re-run nc: the same with an empty result store"
    )
    print(
        f"{'rtt':>5} {'items':>6} {'destination':12} {'wall s':>8} {'items/s':>8} "
        f"{'x folder':>8} {'x aws':>6} {'RSS MB main/worker':>19}  requests/item"
    )
    for r in runs:
        folder = _find(runs, None, r["items"], "folder")
        aws = _find(runs, r["rtt_ms"], r["items"], "aws cp")
        nan = float("nan")
        burns = r["destination"] in (*S3_ROWS, "aws cp")
        x_folder = r["wall"] / folder["wall"] if folder and burns else nan
        x_aws = r["wall"] / aws["wall"] if aws and r["destination"].startswith("s3") else nan
        rss = f"{r['peak_rss_mb']:.0f}/{r.get('peak_rss_worker_mb', 0):.0f}"
        reqs = r.get("requests", {}).get("by_method", {})
        per_item = " ".join(f"{m} {c / r['items']:.2f}" for m, c in sorted(reqs.items()))
        rtt = "-" if r["rtt_ms"] is None else f"{r['rtt_ms']:g}"
        print(
            f"{rtt:>5} {r['items']:>6} {r['destination']:12} {r['wall']:8.1f} "
            f"{r['items_per_s']:8.1f} {x_folder:8.1f} {x_aws:6.1f} {rss:>19}  {per_item}"
        )
    if not summary["per_rtt"]:
        return
    small, large = summary["between_items"]
    print()
    print(f"marginal rates between {small} and {large} items")
    print(
        f"{'rtt':>5} {'destination':12} {'items/s':>8} {'x folder':>8} {'x aws':>6}  "
        "marginal requests/item"
    )
    for rtt, entry in summary["per_rtt"].items():
        for destination, figures in entry.items():
            rate = figures["marginal_items_per_s"]
            reqs = figures.get("marginal_requests_per_item", {})
            per_item = " ".join(f"{m} {c:.2f}" for m, c in reqs.items())
            shown = f"{rate:8.1f}" if rate else f"{'flat':>8}"
            print(
                f"{rtt:>5} {destination:12} {shown} "
                f"{figures.get('x_slower_than_folder', float('nan')):8.1f} "
                f"{figures.get('x_slower_than_aws_cp', float('nan')):6.1f}  {per_item}"
            )
    print()
    print("marginal CPU ms per item, by process (the 2 cores' budget: 2000 / items per s)")
    for rtt, entry in summary["per_rtt"].items():
        for destination, figures in entry.items():
            cpu = figures.get("marginal_cpu_ms_per_item")
            if cpu:
                shown = " ".join(f"{name} {ms:.2f}" for name, ms in cpu.items())
                print(f"{rtt:>5} {destination:12} {shown}")


if __name__ == "__main__":
    sys.exit(main())
