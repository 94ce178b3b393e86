"""Run one command in this process and report its own wall, CPU and peak RSS as JSON.

Usage: python bench/_measure.py OUT.json polyburn ARGS... | python bench/_measure.py OUT.json
trivial-flow. Used by bench/end_to_end.py so each measurement is one fresh process.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path


def write_results(
    name: str, what: str, runs: list, *, summary: object = None, **machine: object
) -> None:
    """Write ``bench/results/<name>.json`` (what was measured, the machine, the runs, and the
    ``summary`` when one is given)."""
    import platform

    root = Path(__file__).resolve().parents[1]
    out = {"what": what, "machine": {"python": platform.python_version(), **machine}}
    if summary is not None:
        out["summary"] = summary
    results = root / f"bench/results/{name}.json"
    results.write_text(json.dumps({**out, "runs": runs}, indent=1) + "\n")
    print(f"wrote {results.relative_to(root)}")


def scratch_folder(prefix: str, parent: str | None = None, keep: bool = False) -> Path:
    """A fresh folder for one benchmark's exports, outputs and servers, under ``parent`` (the
    system's temp folder when None), removed when the process exits, also by an error or a
    Ctrl-C, unless ``keep``: a run leaves up to gigabytes behind otherwise."""
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    if keep:
        atexit.register(print, f"kept {folder}")
    else:
        atexit.register(shutil.rmtree, folder, True)
    return folder


def filesystem_figures(folder: Path, files: int = 500) -> dict:
    """The filesystem under ``folder`` (mount point and type, from ``/proc/mounts``) and what
    creating one file there costs: the median microseconds, wall, of creating a temp file,
    writing 20 kB to it and renaming it into place, as a folder destination does twice per
    item. Where many files were just deleted it can be ten times what it is elsewhere (on this
    VM's ext4, the inode allocator skips recently deleted inodes), enough to move a folder run."""
    probe = Path(tempfile.mkdtemp(prefix="fs-probe-", dir=folder))
    data = b"\0" * 20_000
    costs = []
    try:
        for k in range(files):
            started = time.perf_counter()
            fd, temp = tempfile.mkstemp(dir=probe, suffix=".tmp")
            os.write(fd, data)
            os.close(fd)
            os.replace(temp, probe / f"{k}.png")
            costs.append(time.perf_counter() - started)
    finally:
        shutil.rmtree(probe, ignore_errors=True)
    mount, kind = "", "?"  # the longest mount point holding the folder
    real = os.path.realpath(folder)
    with contextlib.suppress(OSError), open("/proc/mounts") as mounts:
        for line in mounts:
            _, point, fstype, *_ = line.split()
            if os.path.commonpath([real, point]) == point and len(point) >= len(mount):
                mount, kind = point, fstype
    return {
        "mount": mount or "?",
        "type": kind,
        "file_create_us": round(1e6 * statistics.median(costs), 1),
    }


def record_dict(record) -> dict:
    """An item record as a dict: an ItemRecord's ``to_dict()``, or the dict itself from a
    polyburn older than typed records (``--before`` / ``--label before`` runs other trees)."""
    return record if isinstance(record, dict) else record.to_dict()


def run_timed(command: list[str], env: dict | None = None, **popen: object) -> dict:
    """Run an external command (not Python's: e.g. ``aws``) and return its exit ``code``, its
    ``wall`` seconds, its ``cpu`` seconds and its ``peak_rss_mb``, from ``wait4`` (the process
    and the children it waited for). ``popen`` goes to :class:`subprocess.Popen` (stdout...)."""
    import subprocess

    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, **popen)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    return {
        "code": process.returncode,
        "wall": wall,
        "cpu": usage.ru_utime + usage.ru_stime,
        "peak_rss_mb": usage.ru_maxrss / 1024,
    }


def main() -> None:
    out, what, *args = sys.argv[1:]
    started = time.perf_counter()
    if what == "polyburn":
        from polyburn.cli import main as polyburn_main

        code = polyburn_main(args)
    elif what == "trivial-flow":
        from prefect import flow, task

        @task
        def nothing() -> int:
            return 1

        @flow(name="trivial")
        def trivial() -> int:
            return nothing()

        trivial()
        code = 0
    else:
        raise SystemExit(f"unknown command {what}")
    wall = time.perf_counter() - started
    from polyburn import parallel

    parallel._shutdown()  # join the burn workers so that their usage is counted
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    workers = parallel._pool_size if parallel._pool is not None else 0
    with open(out, "w") as handle:
        json.dump(
            {
                "code": code,
                "wall": wall,
                "cpu": own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime,
                "cpu_main": own.ru_utime + own.ru_stime,
                "cpu_workers": children.ru_utime + children.ru_stime,
                "peak_rss_mb": own.ru_maxrss / 1024,
                "peak_rss_worker_mb": children.ru_maxrss / 1024,
                "workers": workers,
                "peak_rss_total_mb": (own.ru_maxrss + workers * children.ru_maxrss) / 1024,
            },
            handle,
        )


if __name__ == "__main__":
    main()
