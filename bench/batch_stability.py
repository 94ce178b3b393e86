"""How much of a full run Prefect's batch cache still serves after the source changed a little.

For synthetic listings of 10,000 and 100,000 sorted item paths and batch size 100, one item is
added (or removed) at the start, the middle or the end, and the batches before and after are
compared: a batch whose items are the same keeps its cache key (``tasks.masks.batch_cache_key``),
any other batch is burned again. Positional slices (polyburn before content-defined batches)
against :func:`polyburn.batching.batches_of`. Pure computation: no Prefect, no burning.

Usage: .venv/bin/python bench/batch_stability.py
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _measure import write_results  # noqa: E402

from polyburn.batching import batches_of  # noqa: E402
from polyburn.model import ItemRef  # noqa: E402

SIZE = 100


def positional(refs: list[ItemRef], size: int) -> list[list[ItemRef]]:
    return [refs[i : i + size] for i in range(0, len(refs), size)]


def listing(n: int) -> list[ItemRef]:
    rng = random.Random(n)
    paths = {f"{rng.choice('abcdefgh')}/img_{rng.randrange(10**10):010d}" for _ in range(n)}
    return [ItemRef("", path, "") for path in sorted(paths)]


def rerun_share(before: list, after: list) -> tuple[int, int]:
    """(batches burned again, batches in the new run)."""
    old = {tuple(ref.path for ref in batch) for batch in before}
    new = [tuple(ref.path for ref in batch) for batch in after]
    return sum(batch not in old for batch in new), len(new)


def main() -> None:
    runs = []
    for n in (10_000, 100_000):
        refs = listing(n)
        for where, k in (("start", 0), ("middle", n // 2), ("end", n - 1)):
            added = [*refs[:k], ItemRef("", refs[k].path + "-new", ""), *refs[k:]]
            removed = [*refs[:k], *refs[k + 1 :]]
            for change, changed in (("add", added), ("remove", removed)):
                for name, split in (("positional", positional), ("content-defined", batches_of)):
                    again, total = rerun_share(split(refs, SIZE), split(changed, SIZE))
                    runs.append(
                        {
                            "items": n,
                            "change": f"{change} one item at the {where}",
                            "batching": name,
                            "batches": total,
                            "burned_again": again,
                            "from_cache_percent": round(100 * (total - again) / total, 2),
                        }
                    )
                    print(f"{n:>7} {change:6} {where:6} {name:16} {again:>5} / {total}")
    write_results(
        "batch_stability",
        "batches burned again by a full run after one item was added or removed (batch size "
        f"{SIZE}); the rest come from Prefect's cache",
        runs,
    )


if __name__ == "__main__":
    main()
