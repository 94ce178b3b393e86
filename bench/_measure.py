"""Run one command in this process and report its own wall, CPU and peak RSS as JSON.

Usage: python bench/_measure.py OUT.json polyburn ARGS... | python bench/_measure.py OUT.json
trivial-flow. Used by bench/end_to_end.py so each measurement is one fresh process.
"""

from __future__ import annotations

import json
import resource
import sys
import time


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
    usage = resource.getrusage(resource.RUSAGE_SELF)
    with open(out, "w") as handle:
        json.dump(
            {
                "code": code,
                "wall": wall,
                "cpu": usage.ru_utime + usage.ru_stime,
                "peak_rss_mb": usage.ru_maxrss / 1024,
            },
            handle,
        )


if __name__ == "__main__":
    main()
