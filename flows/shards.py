"""Sharded runs: the parent flow run splits its items over shard runs of a deployment.

A very large dataset is more than one machine burns in a night. With ``shards`` = N the parent
run lists the items, settles the label map (so every shard uses the same ids), and starts N runs
of ``shard_deployment`` (``polygons-to-masks/shard``) with ``run_deployment``: each gets a
contiguous slice of the listing as ``item_ids`` and the label map in ``shard_of``, and whichever
Prefect worker (or ``polyburn serve``) serves that deployment picks it up, on any machine. They
show in the UI as subflow runs of the parent.

A shard run burns and publishes its items like any run: each item's record is stored at the
destination as the item is done (:mod:`polyburn.state`). The parent waits for all shards, runs a
shard that did not complete once more (its finished batches come from the cache when the workers
share Prefect's result storage), and then reads its items' records back for its summary. The
items of a shard that never completed (its run crashed twice) are reported failed, naming the
shard run and its state: nothing is dropped silently.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound
from prefect.settings import PREFECT_API_URL
from prefect.states import Cancelled

from polyburn import settings as config
from polyburn.errors import ConfigError
from polyburn.model import ItemRef
from polyburn.params import RunParameters, ShardOf
from polyburn.records import ShardOutcome

SHARD_ATTEMPTS = 2


def split_evenly(refs: list[ItemRef], count: int) -> list[list[ItemRef]]:
    """``refs`` in at most ``count`` contiguous slices whose sizes differ by at most one (no
    empty slice)."""
    count = max(1, min(count, len(refs)))
    size, extra = divmod(len(refs), count)
    slices, start = [], 0
    for k in range(count):
        end = start + size + (1 if k < extra else 0)
        slices.append(refs[start:end])
        start = end
    return slices


def shard_parameters(params: RunParameters, refs: list[ItemRef], shard: ShardOf) -> dict[str, Any]:
    """The ``params`` of one shard run: the parent's, narrowed to ``refs`` (by item id, or by
    path for a local export), not incremental and not strict (the parent decides both)."""
    narrowed = params.model_copy(
        update={
            "item_ids": [ref.item_id or ref.path for ref in refs],
            "item_filter": None,
            "updated_since": None,
            "incremental": False,
            "strict": False,
            "labels": None,
            "shards": 0,
            "shard_of": shard,
        }
    )
    return narrowed.model_dump(mode="json")


def run_shards(
    params: RunParameters,
    refs: list[ItemRef],
    label_map: dict[str, int],
    group: str,
    on_progress: Callable[[int, int], None] = lambda done, total: None,
    logger: Any = None,
    run_here: Callable[[dict[str, Any]], Any] | None = None,
) -> list[ShardOutcome]:
    """Run the shards of ``refs``; returns how each ended, in shard order.

    A shard run that ends without completing is started once more. A shard no worker starts
    within ``POLYBURN_SHARD_START_TIMEOUT`` is cancelled and, when ``run_here`` is given, run
    by calling ``run_here(shard_params)`` (the parent's process, as a subflow) instead.
    """
    check_shard_deployment(params.shard_deployment)
    slices = split_evenly(refs, params.shards)
    count = len(slices)

    def shard_params(k: int) -> dict[str, Any]:
        shard = ShardOf(group=group, index=k, count=count, label_map=label_map)
        return shard_parameters(params, slices[k], shard)

    outcome: dict[int, ShardOutcome] = {}
    unstarted: set[int] = set()
    reported: set[int] = set()
    pending = list(range(count))
    for attempt in range(1, SHARD_ATTEMPTS + 1):
        started = {
            k: run_deployment(
                name=params.shard_deployment,
                parameters={"params": shard_params(k)},
                flow_run_name=f"shard-{k + 1}-of-{count}",
                tags=["polyburn-shard"],
                idempotency_key=f"{group}-{k}-{attempt}",
                timeout=0,
                as_subflow=True,
            )
            for k in pending
        }

        def finished(k: int) -> None:
            reported.add(k)
            on_progress(len(reported), count)

        final, timed_out = _wait_for_runs(started, finished)
        unstarted |= timed_out
        for k, run in final.items():
            outcome[k] = ShardOutcome(
                shard=k,
                run=run.name,
                state=run.state.name if run.state else "unknown",
                message=(run.state.message or "") if run.state else "",
                completed=bool(run.state and run.state.is_completed()),
                items=len(slices[k]),
                attempts=attempt,
            )
        pending = [k for k in pending if not outcome[k].completed and k not in unstarted]
        if not pending:
            break
        if logger and attempt < SHARD_ATTEMPTS:
            logger.warning(
                "%d shard run(s) did not complete (%s); running them once more",
                len(pending),
                ", ".join(f"{outcome[k].run}: {outcome[k].state}" for k in pending),
            )

    for k in sorted(unstarted) if run_here is not None else ():
        if logger:
            logger.warning(
                "no worker started shard %d of %d within %.0f s; running it in this process",
                k + 1,
                count,
                config.settings().shard_start_timeout,
            )
        state = run_here(shard_params(k))
        outcome[k].state = state.name
        outcome[k].message = state.message or ""
        outcome[k].completed = state.is_completed()
        outcome[k].ran_here = True

    for k, piece in enumerate(slices):
        outcome[k].refs = piece
    return [outcome[k] for k in range(count)]


def not_processed(outcome: ShardOutcome) -> str:
    """Why an item of a shard has no record to report."""
    message = f": {outcome.message}" if outcome.message else ""
    if outcome.state == "Completed":
        return f"no record: shard run '{outcome.run}' completed without storing one"
    return f"not processed: shard run '{outcome.run}' ended {outcome.state}{message}"


def check_shard_deployment(name: str) -> None:
    """Raise ConfigError unless a Prefect server (not the ephemeral API, where no worker could
    take the shards) knows the deployment ``name`` and it takes a whole ``params`` (the public
    flow's deployments take one parameter per field, and no ``shard_of``)."""
    if not PREFECT_API_URL.value():
        raise ConfigError(
            "shards need a Prefect server with workers serving the shard deployment; set "
            "PREFECT_API_URL (the ephemeral API of a single process has no workers)"
        )
    with get_client(sync_client=True) as client:
        try:
            deployment = client.read_deployment_by_name(name)
        except ObjectNotFound:
            raise ConfigError(
                f"shard deployment '{name}' does not exist on the Prefect server; serve it "
                "(`polyburn serve --deployment shard`) or deploy it (`prefect deploy --all`)"
            ) from None
    schema = deployment.parameter_openapi_schema or {}
    if "params" not in schema.get("properties", {}):
        raise ConfigError(
            f"shard deployment '{name}' does not take one 'params' (its flow must be "
            "flows/polygons_to_masks.py:polygons_to_masks_params, as the shard deployment's "
            "is); register it again (`polyburn serve --deployment shard`, `prefect deploy --all`)"
        )


def _wait_for_runs(
    runs: dict[int, Any], on_done: Callable[[int], None]
) -> tuple[dict[int, Any], set[int]]:
    """Poll the flow runs until each is final; ``on_done(k)`` as shard ``k`` finishes.

    A run no worker has started within ``POLYBURN_SHARD_START_TIMEOUT`` seconds is cancelled
    (its state message says why) instead of hanging the parent; returns the final runs and
    those shards.
    """
    final: dict[int, Any] = {}
    timed_out: set[int] = set()
    start_timeout = config.settings().shard_start_timeout
    poll_seconds = config.settings().shard_poll_seconds
    since = time.monotonic()
    with get_client(sync_client=True) as client:
        while len(final) < len(runs):
            for k, run in runs.items():
                if k in final:
                    continue
                current = client.read_flow_run(run.id)
                state = current.state
                if state and state.is_scheduled() and time.monotonic() - since > start_timeout:
                    client.set_flow_run_state(
                        run.id,
                        Cancelled(
                            message=f"no worker started it within {start_timeout:.0f} s; is "
                            "`polyburn serve --deployment shard` or a worker running?"
                        ),
                        force=True,
                    )
                    timed_out.add(k)
                    current = client.read_flow_run(run.id)
                    state = current.state
                if state and state.is_final():
                    final[k] = current
                    on_done(k)
            if len(final) < len(runs):
                time.sleep(poll_seconds)
    return final, timed_out
