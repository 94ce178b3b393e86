"""What a run costs when every batch comes from Prefect's cache (run by hand).

The shipped example export (13 items, one of them a video) is burned once into a fresh folder
with batch size 4, then run again ``--repeats`` times unchanged: every batch is served from the
cache and nothing is written. Both are the flow called in this process on Prefect's test harness
(a temporary local API, SQLite), as tests/test_orchestration.py runs it. Reported: the wall time
of the first run and of each cached re-run, their median, and whether the median meets the target
of ``TARGET_S`` seconds (the bound tests/test_orchestration.py asserted until it moved here).

Usage: .venv/bin/python bench/cached_rerun.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from _measure import scratch_folder, write_results  # noqa: E402

BATCH_SIZE = 4
TARGET_S = 10.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    os.environ.setdefault("PREFECT_HOME", str(scratch_folder("polyburn-bench-prefect-")))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    from prefect.testing.utilities import prefect_test_harness

    from flows.polygons_to_masks import polygons_to_masks_params
    from polyburn import version
    from polyburn.params import RunParameters

    with tempfile.TemporaryDirectory() as folder, prefect_test_harness(server_startup_timeout=120):
        export, dest = Path(folder) / "export", Path(folder) / "masks"
        shutil.copytree(ROOT / "examples" / "export", export)
        params = RunParameters(source=str(export), destination=str(dest), batch_size=BATCH_SIZE)

        def timed_run() -> tuple[float, dict]:
            started = time.perf_counter()
            summary = polygons_to_masks_params(params)
            return time.perf_counter() - started, summary

        first, summary = timed_run()
        assert summary["failed"] == 0 and summary["cached_batches"] == 0, summary
        reruns = []
        for _ in range(args.repeats):
            wall, summary = timed_run()
            assert summary["cached_batches"] > 0 and summary["outputs_written"] == 0, summary
            reruns.append({"wall_s": round(wall, 3), "batches_cached": summary["cached_batches"]})
    median = statistics.median(r["wall_s"] for r in reruns)
    print(f"first run: {first:.2f} s; cached re-runs: median {median:.2f} s (target {TARGET_S} s)")
    for k, rerun in enumerate(reruns, 1):
        print(f"  re-run {k}: {rerun['wall_s']:.2f} s, {rerun['batches_cached']} batches cached")
    write_results(
        "cached_rerun",
        f"wall time of an unchanged re-run of examples/export (13 items, batch size {BATCH_SIZE})"
        " whose batches all come from Prefect's cache, in-process on Prefect's test harness",
        [
            {
                "first_run_s": round(first, 3),
                "reruns": reruns,
                "rerun_median_s": median,
                "target_s": TARGET_S,
                "target_met": median < TARGET_S,
            }
        ],
        cpus=os.cpu_count(),
        load_average_1_5_15_min=[round(x, 2) for x in os.getloadavg()],
        polyburn=version(),
    )


if __name__ == "__main__":
    main()
