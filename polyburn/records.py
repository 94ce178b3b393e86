"""The typed values that cross a boundary between a batch and its run.

Item records stay JSON objects: they are the lines of ``manifest.jsonl``, read by tools that
know nothing of polyburn (:mod:`polyburn.manifest`).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BatchResult:
    """What a ``burn-batch`` task run returns (and what Prefect's cache keeps of it).

    ``records``: the batch's item records, packed (:func:`polyburn.manifest.pack_records`);
    ``items``: how many; ``attempts``: the task run's attempt that produced them (1 = first);
    ``unchanged``: items whose record already had their recipe digest, so they were not burned.
    """

    records: bytes
    items: int
    attempts: int = 1
    unchanged: int = 0
