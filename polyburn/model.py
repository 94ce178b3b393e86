"""Typed records that cross the boundaries of the pipeline.

source --ItemRef--> loader --Item--> repair --RepairedAnnotation--> burn --ItemMasks--> destination
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import shapely


@dataclass(frozen=True)
class ItemRef:
    """A pointer to one item, cheap to list and to pass between tasks.

    ``path`` is the item's path inside its dataset without extension and without a leading slash
    (``folder/img_001``); outputs mirror it. ``locator`` is what the source needs to load the item
    (a file path for a local export, an item id for Dataloop). ``revision`` is a cheap change
    marker known at listing time (file size and mtime, or the item's ``updatedAt``); empty when
    unknown, which disables result caching for the batch holding the item. ``data`` is what the
    listing already said about the item, for sources that can load from it without asking again
    (a Dataloop item's compact JSON; empty otherwise); it is not part of the item's identity.
    """

    item_id: str
    path: str
    locator: str
    revision: str = ""
    data: str = field(default="", compare=False, repr=False)


@dataclass
class Annotation:
    """One pixel annotation of an item, as parsed, before any repair.

    ``rings`` holds the polygon rings for ``type == "segment"`` (ring 0 the exterior, the rest
    holes), each a float64 (N, 2) array of x, y in continuous image coordinates. ``mask`` holds the
    decoded bool (H, W) mask for ``type == "binary"``. ``object_id`` is Dataloop's
    ``metadata.system.objectId`` as a whole number (any sign or size), None when absent or not
    one; ``bad_object_id`` is the JSON text (at most 40 characters) of an objectId that is present
    but not a whole number, for reports.
    """

    annotation_id: str
    label: str
    type: str
    index: int
    object_id: int | None = None
    rings: list[np.ndarray] = field(default_factory=list)
    mask: np.ndarray | None = None
    bad_object_id: str | None = None
    instance: int | None = None
    """A fixed instance id given by the caller (a video's tracks are numbered once per video, so
    an object keeps its id from frame to frame); None: numbered per item."""


@dataclass
class Repair:
    """A change made to an annotation (its geometry, or the instance id it gets in place of its
    objectId); machine-readable for the manifest."""

    kind: str
    annotation_id: str
    area_before: float | None = None
    area_after: float | None = None
    detail: str = ""
    frame: int | None = None
    """Of a video item: the frame from which the repaired state applies; None for images."""

    def as_dict(self) -> dict[str, Any]:
        return _with_frame(
            {
                "kind": self.kind,
                "annotation": self.annotation_id,
                "area_before": _round(self.area_before),
                "area_after": _round(self.area_after),
                "detail": self.detail,
            },
            self.frame,
        )


@dataclass
class Problem:
    """A rejected annotation; with ``annotation_id`` None, a problem of the item itself (it
    failed, or its ML subset tags conflict)."""

    reason: str
    annotation_id: str | None = None
    field: str | None = None
    label: str | None = None
    frame: int | None = None
    """Of a video item: the frame of the rejected state; None for images and whole tracks."""

    def as_dict(self) -> dict[str, Any]:
        return _with_frame(
            {
                "annotation": self.annotation_id,
                "field": self.field,
                "label": self.label,
                "reason": self.reason,
            },
            self.frame,
        )


@dataclass
class Item:
    """An item with its parsed annotations. ``skipped`` counts non-pixel annotation types."""

    item_id: str
    path: str
    width: int
    height: int
    annotations: list[Annotation]
    skipped: dict[str, int] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    revision: str = ""
    filename: str = ""
    own_outputs: list[dict[str, Any]] | None = field(default=None, repr=False)
    """Raw JSON of the outputs of an earlier polyburn run stored on the item itself (skipped as
    input), when the source read them with the item; None when it did not look."""
    read_at: float | None = None
    """When the source read the item's annotations ahead of processing it (a bulk read, seconds
    since the epoch), or None when it read them just now."""
    video: Video | None = field(default=None, repr=False)
    """A video item's tracks (:class:`Video`, parsed by :mod:`polyburn.video`); ``annotations``
    is then empty and its masks are burned frame by frame. None for images."""
    subset: str | None = None
    """The item's Dataloop ML subset (``train``, ``validation`` or ``test``, from
    ``metadata.system.tags``), None when it has none or more than one (then reported in
    ``problems``)."""


@dataclass
class Shape:
    """A repaired annotation ready to burn: a valid (Multi)Polygon, or a bool mask."""

    annotation: Annotation
    geometry: shapely.Geometry | None = None
    mask: np.ndarray | None = None

    @property
    def area(self) -> float:
        if self.geometry is not None:
            return float(self.geometry.area)
        return float(np.count_nonzero(self.mask)) if self.mask is not None else 0.0


def _with_frame(entry: dict[str, Any], frame: int | None) -> dict[str, Any]:
    if frame is not None:
        entry["frame"] = frame
    return entry


def _round(value: float | None) -> float | None:
    return None if value is None else round(float(value), 4)


# ---------------------------------------------------------------------------- video tracks
# The records of a video item (parsed by polyburn.video, burned by polyburn.video_burn).
Frames = Literal["span", "all"]


@dataclass(frozen=True)
class Rings:
    """Polygon rings parsed ahead of the burn: float64 (N, 2) arrays, ring 0 the exterior."""

    arrays: tuple[np.ndarray, ...]


@dataclass(frozen=True)
class State:
    """An object's state from ``frame`` on: its label, whether it is visible, and its
    coordinates: :class:`Rings` for readable polygon coordinates (so the decoded item JSON need
    not be kept while the frames are burned), else as in the JSON (a binary mask's data URI, or
    coordinates that are rejected when their first frame is burned); None when hidden."""

    frame: int
    label: str
    visible: bool
    data: Any = field(repr=False)


@dataclass
class Track:
    """One annotation of a video item: ``head`` (id, type, first label, file position,
    objectId, and the instance id it burns), its states sorted by frame (one per frame, the
    first at the object's first frame), and its last frame (inclusive)."""

    head: Annotation
    states: list[State]
    end: int

    @property
    def first(self) -> int:
        return self.states[0].frame

    def labels(self) -> set[str]:
        return {state.label for state in self.states}


@dataclass
class Video:
    """The tracks of a video item, in file order, and its frame count (None when unknown) with
    where that came from; ``repairs`` holds what was changed in the tracks' frame ranges."""

    tracks: list[Track]
    frame_count: int | None = None
    count_source: str | None = None
    repairs: list[Repair] = field(default_factory=list)

    def labels(self) -> set[str]:
        return set().union(*(track.labels() for track in self.tracks))

    def frames(self, which: Frames = "span") -> range:
        """The frames to write. ``span``: from the first frame of any track to the last frame of
        any track (empty without tracks); ``all``: 0 to frame count - 1, or to the span's end
        when the frame count is unknown (also when it is smaller, which bounds cannot allow)."""
        if which not in ("span", "all"):
            raise ValueError(f"frames must be 'span' or 'all', not {which!r}")
        end = max((track.end for track in self.tracks), default=-1) + 1
        if which == "all":
            return range(0, max(end, self.frame_count or 0))
        if not self.tracks:
            return range(0)
        return range(min(track.first for track in self.tracks), end)
