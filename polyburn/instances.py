"""Number an item's instances: one id per Dataloop object, or one per shape (pure, no I/O).

``object`` (the default): the id of a shape is its annotation's ``metadata.system.objectId``
when that is a whole number from 1 to 65535 (``MAX_INSTANCE_ID``, uint16), as in Dataloop's own
``np.where(seg.geo == 1, annotation.object_id, image)``. Annotations with the same objectId and
label are parts of one instance (a car split in two by a pole is one car): every part is burned
with the same id, so the instance is the union of its parts under the pixel rule. Parts are
burned in draw order like any shape, so draw order decides between objects where they overlap.

An annotation whose objectId is missing, not a whole number, or outside 1..65535 gets a fresh
id, counting up from the largest objectId (from 1 to 65535) of the item's shapes, in draw order.
One objectId used by more than one label is ambiguous: each (objectId, label) group then gets a
fresh id of its own (its parts stay one instance, nothing is merged across labels). Fresh ids
given in place of an objectId that was there are reported per annotation, as
:class:`~polyburn.model.Repair` records of kind ``object_id_unusable`` or ``object_id_conflict``.
No shape is ever dropped.

``shape``: shape k in draw order (1-based) gets id k (polyburn before objects).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from polyburn.model import Annotation, Repair, Shape

InstanceIds = Literal["object", "shape"]
MAX_INSTANCE_ID = 65535
UNUSABLE = "object_id_unusable"
CONFLICT = "object_id_conflict"


@dataclass
class Instance:
    """One instance of an item: its id in the instance mask, label, the objectId of its
    annotations (None when they have none that is a whole number) and their ids, in draw order."""

    id: int
    label: str
    object_id: int | None
    annotations: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object_id": self.object_id,
            "label": self.label,
            "annotations": list(self.annotations),
        }


def usable_object_id(annotation: Annotation) -> int | None:
    """The annotation's objectId if it can be an instance id (1..65535), else None."""
    oid = annotation.object_id
    return oid if oid is not None and 1 <= oid <= MAX_INSTANCE_ID else None


def number_instances(
    shapes: Sequence[Shape], how: InstanceIds = "object"
) -> tuple[list[int], list[Instance], list[Repair]]:
    """The instance id of each shape (``shapes`` in draw order), the instances sorted by id, and
    the reports of objectIds not used as ids (see the module docstring).

    Shapes that all carry a fixed ``annotation.instance`` (a video's tracks, numbered once per
    video by :func:`polyburn.video.number_tracks`) burn those ids, whatever ``how`` is.

    Raises ValueError when an id does not fit uint16 (more than 65535 shapes, or fresh ids
    running past 65535) or ``how`` is neither ``object`` nor ``shape``.
    """
    if shapes and all(s.annotation.instance is not None for s in shapes):
        return _fixed(shapes)
    if how == "shape":
        return _by_shape(shapes)
    if how != "object":
        raise ValueError(f"instance ids must be 'object' or 'shape', not {how!r}")
    labels_of: dict[int, set[str]] = {}
    for shape in shapes:
        oid = usable_object_id(shape.annotation)
        if oid is not None:
            labels_of.setdefault(oid, set()).add(shape.annotation.label)
    fresh = max(labels_of, default=0)
    ids: list[int] = []
    instances: dict[tuple[str, int, str], Instance] = {}  # (kind, objectId or position, label)
    repairs: list[Repair] = []
    for position, shape in enumerate(shapes):
        annotation = shape.annotation
        oid = usable_object_id(annotation)
        if oid is not None and len(labels_of[oid]) == 1:
            key = ("object", oid, annotation.label)
            if key not in instances:
                instances[key] = Instance(oid, annotation.label, oid)
        elif oid is not None:  # one objectId, several labels: a fresh id per (objectId, label)
            key = ("conflict", oid, annotation.label)
            if key not in instances:
                fresh = _next(fresh, annotation)
                instances[key] = Instance(fresh, annotation.label, oid)
            others = ", ".join(repr(label) for label in sorted(labels_of[oid]))
            repairs.append(
                Repair(
                    CONFLICT,
                    annotation.annotation_id,
                    detail=f"objectId {oid} is used by labels {others}: instance id "
                    f"{instances[key].id}, not merged with the other labels' annotations",
                )
            )
        else:  # no usable objectId: an instance of its own
            key = ("own", position, annotation.label)
            fresh = _next(fresh, annotation)
            instances[key] = Instance(fresh, annotation.label, annotation.object_id)
            given = annotation.bad_object_id
            if given is None and annotation.object_id is not None:
                given = str(annotation.object_id)
            if given is not None:
                repairs.append(
                    Repair(
                        UNUSABLE,
                        annotation.annotation_id,
                        detail=f"objectId {given} is not a whole number from 1 to "
                        f"{MAX_INSTANCE_ID}: instance id {fresh}",
                    )
                )
        instance = instances[key]
        instance.annotations.append(annotation.annotation_id)
        ids.append(instance.id)
    return ids, sorted(instances.values(), key=lambda i: i.id), repairs


def _next(last: int, annotation: Annotation) -> int:
    if last >= MAX_INSTANCE_ID:
        raise ValueError(
            f"annotation {annotation.annotation_id} needs a fresh instance id above "
            f"{MAX_INSTANCE_ID}, which does not fit uint16"
        )
    return last + 1


def _by_shape(shapes: Sequence[Shape]) -> tuple[list[int], list[Instance], list[Repair]]:
    if len(shapes) > MAX_INSTANCE_ID:
        raise ValueError(f"{len(shapes)} instances do not fit uint16 instance ids")
    instances = [
        Instance(k, s.annotation.label, s.annotation.object_id, [s.annotation.annotation_id])
        for k, s in enumerate(shapes, start=1)
    ]
    return [i.id for i in instances], instances, []


def _fixed(shapes: Sequence[Shape]) -> tuple[list[int], list[Instance], list[Repair]]:
    instances: dict[tuple[int, str], Instance] = {}
    ids = []
    for shape in shapes:
        annotation = shape.annotation
        key = (annotation.instance, annotation.label)
        if key not in instances:
            instances[key] = Instance(annotation.instance, annotation.label, annotation.object_id)
        instances[key].annotations.append(annotation.annotation_id)
        ids.append(annotation.instance)
    return ids, sorted(instances.values(), key=lambda i: i.id), []
