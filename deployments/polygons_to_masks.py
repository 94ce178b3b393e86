"""The four deployments of the polygons-to-masks flow, side by side.

* ``nightly``: a cron schedule; an incremental run (only items changed since the last
  successful incremental run of the same source and destination) that then rewrites the
  dataset files (manifest, splits, COCO) when it processed items.
* ``on-demand``: no schedule; run it from the UI or with
  ``prefect deployment run 'polygons-to-masks/on-demand'``.
* ``shard``: one shard of a sharded run (``shards`` > 1), started by the parent run; serve it
  wherever shards should run (see ``flows/shards.py``).
* ``on-annotation``: started by Dataloop item/annotation events (``dataloop.item.*``,
  ``dataloop.annotation.*``) whose resource is the item (``dataloop.item.<item-id>``); one run per
  item, for that item only, once the item has been quiet for ``debounce_seconds``.

:func:`build_deployments` returns them for ``prefect.serve`` (``polyburn serve``);
``prefect.yaml`` at the repository root declares the same four for a process work pool.

Debouncing
----------
The trigger is *proactive* with the same events in ``after`` and ``expect``, bucketed per item
(``for_each: prefect.resource.id``): an event opens a ``within`` window for its item, each further
event for the item restarts the window, and the trigger fires when a window passes without a new
event. A burst of annotation edits on one item therefore starts exactly one run, after the last
edit, and that run reads the item's final annotations. (A *reactive* trigger with ``within``
would fire on the first event and drop the rest of the window, missing the later edits.) The cost
is latency: a run starts ``debounce_seconds`` (plus up to ~5 s of Prefect's proactive evaluation
period) after the last edit, and an item edited without a pause never fires; the nightly run is the
backstop for that.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from prefect.deployments.runner import RunnerDeployment
from prefect.events import DeploymentEventTrigger, Posture
from prefect.schedules import Cron

from deployments.settings import DeploymentSettings
from flows.polygons_to_masks import polygons_to_masks, polygons_to_masks_params

#: Event names that start ``on-annotation`` (Prefect event globs: a trailing ``*`` only).
ANNOTATION_EVENTS: tuple[str, ...] = ("dataloop.annotation.*", "dataloop.item.*")
#: Prefix of the resource id of those events; the rest is the item id (or local item path).
ITEM_RESOURCE_PREFIX = "dataloop.item."
ITEM_ID_LABEL = "dataloop.item.id"
DATASET_ID_LABEL = "dataloop.dataset.id"

#: Jinja (rendered by the Prefect server when the trigger fires): the event's item id, from the
#: ``dataloop.item.id`` label, else from the resource id. The parentheses matter: the server
#: rewrites a one-expression template ``{{ x }}`` to ``{{ x | tojson }}`` and JSON-decodes the
#: result, and ``a or b | tojson`` would apply the filter to ``b`` only.
ITEM_ID_TEMPLATE = (
    f"{{{{ (event.resource.get('{ITEM_ID_LABEL}') "
    f"or event.resource.id.removeprefix('{ITEM_RESOURCE_PREFIX}')) }}}}"
)


def source_template(default_source: str) -> str:
    """Jinja for the run's source: ``dataloop://<dataset>`` when the event names a dataset (label
    ``dataloop.dataset.id``), else ``default_source`` (so events for items of a local export,
    which carry no dataset, run against the configured local source)."""
    dataset = f"event.resource.get('{DATASET_ID_LABEL}')"
    return (
        f"{{% if {dataset} %}}dataloop://{{{{ {dataset} }}}}"
        f"{{% else %}}{default_source}{{% endif %}}"
    )


def annotation_trigger(settings: DeploymentSettings) -> DeploymentEventTrigger:
    """The debounced per-item trigger of ``on-annotation`` (see the module docstring).

    It matches resources ``dataloop.item.*``, and, when the configured source is a Dataloop
    dataset, only events of that dataset, so one destination never mixes datasets.
    """
    match: dict[str, str] = {"prefect.resource.id": f"{ITEM_RESOURCE_PREFIX}*"}
    if settings.dataset_id:
        match[DATASET_ID_LABEL] = settings.dataset_id
    events = set(ANNOTATION_EVENTS)
    return DeploymentEventTrigger(
        name="polyburn-on-annotation",
        description=(
            "One run per Dataloop item, for that item only, "
            f"{settings.debounce_seconds} s after its last annotation event."
        ),
        posture=Posture.Proactive,
        after=events,
        expect=events,
        match=match,
        for_each={"prefect.resource.id"},
        threshold=1,
        within=timedelta(seconds=settings.debounce_seconds),
        parameters=annotation_parameters(settings),
    )


def annotation_parameters(settings: DeploymentSettings) -> dict[str, Any]:
    """The templated parameters of an ``on-annotation`` run: ``source`` and ``item_ids`` only.
    Prefect merges them into the deployment's parameters, so its other values (destination,
    modes, ... as edited in the UI) hold for event runs too."""
    return {"source": source_template(settings.source), "item_ids": [ITEM_ID_TEMPLATE]}


def nightly(settings: DeploymentSettings) -> RunnerDeployment:
    """``nightly``: incremental, on ``settings.nightly_cron`` in ``settings.timezone``; never two
    at once (the watermark would race)."""
    return polygons_to_masks.to_deployment(
        name="nightly",
        description="Incremental run: only items changed since the last nightly run.",
        schedules=[Cron(settings.nightly_cron, timezone=settings.timezone)],
        parameters={
            **settings.base_parameters(),
            "incremental": True,
            "refresh_dataset_files": True,
        },
        concurrency_limit=1,
        tags=["polyburn", "nightly"],
    )


def on_demand(settings: DeploymentSettings) -> RunnerDeployment:
    """``on-demand``: no schedule; defaults from the settings, everything editable in the UI."""
    return polygons_to_masks.to_deployment(
        name="on-demand",
        description="Run by hand, from the UI or `prefect deployment run`.",
        parameters=settings.base_parameters(),
        tags=["polyburn", "on-demand"],
    )


def on_annotation(settings: DeploymentSettings) -> RunnerDeployment:
    """``on-annotation``: started by :func:`annotation_trigger` only."""
    return polygons_to_masks.to_deployment(
        name="on-annotation",
        description="Started by Dataloop annotation events; one debounced run per item.",
        parameters=settings.base_parameters(),
        triggers=[annotation_trigger(settings)],
        tags=["polyburn", "on-annotation"],
    )


def shard(settings: DeploymentSettings) -> RunnerDeployment:
    """``shard``: runs one shard of a sharded run (``shards`` > 1); started by the parent run
    with the shard's items, not by hand. Serve it on every machine that should take shards.

    Its flow takes the whole :class:`~polyburn.params.RunParameters` in one ``params`` (the
    internal ``shard_of`` included), which the parent run always passes in full."""
    return polygons_to_masks_params.to_deployment(
        name="shard",
        description="One shard of a sharded run; started by its parent run.",
        parameters={"params": settings.shard_parameters()},
        tags=["polyburn", "shard"],
    )


def build_deployments(settings: DeploymentSettings | None = None) -> list[RunnerDeployment]:
    """``[nightly, on-demand, on-annotation, shard]`` for ``prefect.serve``; settings from the
    environment by default (ConfigError when one is wrong)."""
    settings = settings or DeploymentSettings.from_env()
    return [nightly(settings), on_demand(settings), on_annotation(settings), shard(settings)]
