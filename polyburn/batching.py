"""Split a run's items into batches whose boundaries follow the items, not their positions.

Prefect caches a batch by the items it holds (:func:`tasks.masks.batch_cache_key`). Cut at
fixed positions, one item added or removed near the start of a listing would shift every later
boundary, and a full run of an unchanged dataset would burn nearly everything again. Here a
batch ends after an item whose path hashes to a cut point (content-defined chunking, as backup
tools do): an item added or removed changes its own batch and at most the next, and the other
batches keep their cache keys.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TypeVar

from polyburn.model import ItemRef

Ref = TypeVar("Ref", bound=ItemRef)


def batches_of(refs: Sequence[Ref], size: int) -> list[list[Ref]]:
    """``refs`` (in their order) in consecutive batches of about ``size`` items.

    A batch holds at least ``size // 2`` items (except the last) and at most ``2 * size``; within
    that, it ends after an item whose path hashes to a cut point, which happens about once in
    ``size - size // 2 + 1`` items. A batch that reaches ``2 * size`` items without one ends at
    its last *backup* cut point (a path hash twice as likely), so that even then the boundary
    follows the paths. Deterministic: the same refs always give the same batches. Raises
    ValueError for ``size < 1``.
    """
    if size < 1:
        raise ValueError(f"batch size must be at least 1, not {size}")
    low, high = max(1, size // 2), 2 * size
    every = size - low + 1  # a cut once in `every` items after the first `low`: mean ~ size
    batches: list[list[Ref]] = []
    current: list[Ref] = []
    backup = 0  # length of the current batch at its last backup cut point
    for ref in refs:
        current.append(ref)
        if len(current) < low:
            continue
        cut = _cut_value(ref.path)
        if cut % every == 0:
            batches.append(current)
            current, backup = [], 0
        elif len(current) >= high:
            end = backup or len(current)
            batches.append(current[:end])
            current = current[end:]
            backup = 0  # the items carried over are before `low`: no cut point among them
        elif cut % max(1, every // 2) == 0:
            backup = len(current)
    if current:
        batches.append(current)
    return batches


def _cut_value(path: str) -> int:
    digest = hashlib.blake2b(path.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big")
