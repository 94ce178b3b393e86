"""The shared burn pool: its workers serve every batch of a process, whichever thread ran it."""

from __future__ import annotations

import threading
import time

from polyburn import parallel
from polyburn.destinations.local import LocalDestination
from polyburn.params import MaskOptions
from polyburn.sources import open_source
from polyburn.state import settle_label_map
from tests.support.oracle import EXAMPLES


def test_workers_outlive_the_thread_that_started_them(tmp_path):
    """A flow's task thread starts the pool and ends; the next batch, from another thread, is
    served by the same workers (Linux's parent-death signal fires when the spawning *thread*
    ends, which used to kill them and fail that batch)."""
    source = open_source(str(EXAMPLES / "export"))
    refs = sorted(source.list_items(), key=lambda ref: ref.path)
    destination = LocalDestination(tmp_path / "masks")
    label_map = settle_label_map(destination.state, parallel.collect_labels(refs, source, 10**8))

    def batch() -> list[dict]:
        return parallel.process_items(
            refs, source, destination, MaskOptions(), label_map, workers=2
        )

    try:
        first: list[list[dict]] = []
        thread = threading.Thread(target=lambda: first.append(batch()))
        thread.start()
        thread.join()
        workers = {process.pid for process in parallel._pool._processes.values()}
        assert len(workers) == 2
        time.sleep(1.0)  # a worker signalled when its spawning thread ended is gone by now
        second = batch()
        assert {process.pid for process in parallel._pool._processes.values()} == workers
        assert len(refs) >= 4 and all(r.status == "ok" for r in first[0] + second)
    finally:
        if parallel._pool is not None:
            parallel._discard_pool(parallel._pool)
