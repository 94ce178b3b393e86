"""Deployments of polyburn's flows: ``nightly``, ``on-demand``, ``on-annotation`` and ``shard``.

``polyburn serve`` serves them from one process; ``prefect.yaml`` deploys the same four to the
``polyburn-process`` work pool. See the README's *Deployments* section.
"""

from deployments.polygons_to_masks import (
    ANNOTATION_EVENTS,
    DATASET_ID_LABEL,
    ITEM_ID_LABEL,
    ITEM_RESOURCE_PREFIX,
    annotation_trigger,
    build_deployments,
    nightly,
    on_annotation,
    on_demand,
)
from deployments.settings import DeploymentSettings

__all__ = [
    "ANNOTATION_EVENTS",
    "DATASET_ID_LABEL",
    "ITEM_ID_LABEL",
    "ITEM_RESOURCE_PREFIX",
    "DeploymentSettings",
    "annotation_trigger",
    "build_deployments",
    "nightly",
    "on_annotation",
    "on_demand",
]
