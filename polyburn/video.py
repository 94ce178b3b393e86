"""Video items: Dataloop's frame-by-frame annotations as tracks, and the frames they cover (pure).

The frame model is dtlpy's (``entities/annotation.py`` ``Annotation.from_json`` and
``FrameAnnotation.from_snapshot``, ``entities/reflect_dict.py``, dtlpy 1.126.5):

* an annotation of a video item is an object (a *track*) over a range of frames; its
  ``coordinates`` and ``label`` are its state at ``metadata.system.frame`` (missing or null: 0);
* each entry of ``metadata.system.snapshots_`` sets the object's state from its ``frame`` on:
  ``data`` (coordinates in the form of ``coordinates``; a ``coordinates`` key wins, as in dtlpy),
  ``label`` (that frame's label; the annotation's when missing), ``objectVisible`` (false hides
  the object until a later visible state). A snapshot without ``frame`` is at the largest frame
  set so far plus one; of two states at one frame the later in the list wins (dtlpy's dict);
* a frame without a state of its own holds the nearest earlier one;
* the object exists from its first state to ``endFrame`` inclusive; states outside
  [``frame``, ``endFrame``] extend the range; a missing ``endFrame`` (or one before ``frame``)
  means up to the last state.

polyburn adds bounds dtlpy does not have: a frame number must be a whole number from 0 to
``MAX_FRAME``, and below the item's frame count when that is known (:func:`frame_count`). A state
at a frame outside them is rejected (a :class:`~polyburn.model.Problem`); an ``endFrame``
outside them is reported as a :class:`~polyburn.model.Repair`: past a known frame count the
object ends at the video's last frame, otherwise at its last state. A track whose first frame
is not a frame number is rejected as a whole. Nothing here raises for bad frame data, and no
loop runs over a range that was not bounded first.

An item is a video when ``metadata.system.mimetype`` contains ``video``, or, with no mimetype,
when one of its annotations has ``metadata.system.endFrame > 0`` (dtlpy's test).
"""

from __future__ import annotations

import copy
import math
from collections import Counter
from collections.abc import Iterator, Mapping
from typing import Any

from polyburn.dataloop_annotation import (
    POLYGON,
    AnnotationRejected,
    annotation_head,
    set_coordinates,
)
from polyburn.instances import MAX_INSTANCE_ID, usable_object_id
from polyburn.model import Annotation, Problem, Repair, Rings, State, Track, Video

MAX_FRAME = 10_000_000
"""Largest frame number accepted (about 46 hours at 60 fps)."""
FRAME_COUNT_SOURCES = (
    "metadata.system.nb_frames",
    "metadata.system.ffmpeg.nb_read_frames",
    "metadata.system.ffmpeg.nb_frames",
    "metadata.fps x metadata.system.duration",
)


def state_annotation(state: State, head: Annotation, width: int, height: int) -> Annotation:
    """The annotation ``state`` draws: ``head`` (id, type, objectId, instance id) with the
    state's label and coordinates. Raises AnnotationRejected when they cannot be read."""
    annotation = copy.copy(head)
    annotation.label = state.label
    if isinstance(state.data, Rings):
        annotation.rings = list(state.data.arrays)
    else:
        set_coordinates(annotation, state.data, width, height)
    return annotation


def is_video(metadata: Mapping[str, Any], raw_annotations: list) -> bool:
    """Whether an item is a video: its mimetype says so, or (no mimetype) an annotation has
    ``metadata.system.endFrame > 0``."""
    system = _mapping(metadata.get("system"))
    mimetype = system.get("mimetype")
    if isinstance(mimetype, str) and mimetype:
        return "video" in mimetype
    for raw in raw_annotations:
        end = _mapping(_mapping(_mapping(raw).get("metadata")).get("system")).get("endFrame")
        if _is_number(end) and end > 0:
            return True
    return False


def frame_count(metadata: Mapping[str, Any]) -> tuple[int | None, str | None]:
    """The item's number of frames and the field it came from (:data:`FRAME_COUNT_SOURCES`, in
    that order; a null, non-positive or non-numeric field counts as absent; ``nb_read_frames`` is
    a string in real exports), or (None, None)."""
    system = _mapping(metadata.get("system"))
    ffmpeg = _mapping(system.get("ffmpeg"))
    fields = (system.get("nb_frames"), ffmpeg.get("nb_read_frames"), ffmpeg.get("nb_frames"))
    for value, source in zip(fields, FRAME_COUNT_SOURCES, strict=False):
        count = _count(value)
        if count is not None:
            return count, source
    fps = metadata.get("fps", system.get("fps"))
    duration = system.get("duration")
    if _is_number(fps) and _is_number(duration):
        product = float(fps) * float(duration)
        if math.isfinite(product) and 0.5 <= product <= MAX_FRAME + 1:
            return round(product), FRAME_COUNT_SOURCES[3]
    return None, None


def parse_video(
    raw_annotations: list, metadata: Mapping[str, Any]
) -> tuple[Video, list[Problem], Counter[str]]:
    """The tracks of a video item's annotations (pixel types only; coordinates left raw), the
    rejected annotations and states, and the other annotation types counted by type."""
    count, source = frame_count(metadata)
    video = Video([], count, source)
    limit = min(MAX_FRAME, count - 1) if count else MAX_FRAME
    problems: list[Problem] = []
    skipped: Counter[str] = Counter()
    for index, raw in enumerate(raw_annotations):
        try:
            head = annotation_head(raw, index)
        except AnnotationRejected as rejected:
            label = raw.get("label") if isinstance(raw, Mapping) else None
            if rejected.problem.label is None and isinstance(label, str) and label:
                rejected.problem.label = label
            problems.append(rejected.problem)
            continue
        if isinstance(head, str):
            skipped[head] += 1
            continue
        track = _track(head, raw, limit, video.repairs, problems)
        if track is not None:
            video.tracks.append(track)
    return video, problems, skipped


def _track(
    head: Annotation, raw: Mapping, limit: int, repairs: list[Repair], problems: list[Problem]
) -> Track | None:
    system = _mapping(_mapping(raw.get("metadata")).get("system"))
    name, label = head.annotation_id, head.label

    def reject(reason: str, where: str, frame: int | None = None) -> None:
        problems.append(Problem(reason, name, where, label, frame))

    first = system.get("frame")
    first = 0 if first is None else first
    why = _bad_frame(first, limit)
    if why:
        reject(f"first frame {_show(first)} {why}: the object is left out", "metadata.system.frame")
        return None
    first = int(first)
    states = {first: State(first, label, True, _compact(head, raw.get("coordinates")))}
    snapshots = system.get("snapshots_")
    if snapshots is None:
        snapshots = []
    if not isinstance(snapshots, list):
        reject("snapshots_ is not a list: only the first frame's state is used", "snapshots_")
        snapshots = []
    seen: set[int] = set()
    previous = first
    unordered = False
    for k, snapshot in enumerate(snapshots):
        where = f"metadata.system.snapshots_[{k}]"
        if not isinstance(snapshot, Mapping):
            reject(f"snapshot {k} is not an object", where)
            continue
        frame = snapshot.get("frame")
        if frame is None:  # dtlpy: the largest frame set so far, plus one
            frame = max(states) + 1
        why = _bad_frame(frame, limit)
        if why:
            at = frame if isinstance(frame, int) and 0 <= frame <= MAX_FRAME else None
            reject(f"snapshot {k}: frame {_show(frame)} {why}", where + ".frame", at)
            continue
        frame = int(frame)
        if frame in seen:
            repairs.append(
                Repair(
                    "duplicate_snapshot",
                    name,
                    detail=f"snapshot {k} repeats frame {frame}: the later one is used (dtlpy)",
                    frame=frame,
                )
            )
        unordered = unordered or frame < previous
        seen.add(frame)
        previous = frame
        state_label = snapshot.get("label")
        visible = bool(snapshot.get("objectVisible", True))
        data = snapshot["coordinates"] if "coordinates" in snapshot else snapshot.get("data")
        states[frame] = State(
            frame,
            state_label if isinstance(state_label, str) and state_label else label,
            visible,
            _compact(head, data) if visible else None,
        )
    if unordered:
        repairs.append(
            Repair("snapshots_unordered", name, detail="snapshots are not in frame order: sorted")
        )
    last = max(states)
    end = system.get("endFrame")
    if end is not None:
        why = _bad_frame(end, limit)
        beyond = _is_number(end) and end > limit
        if why and beyond and limit < MAX_FRAME:  # past the video's known end: clipped to it
            repairs.append(
                Repair(
                    "end_frame_clipped",
                    name,
                    detail=f"endFrame {_show(end)} {why}: the object ends at frame {limit}",
                )
            )
            last = limit
        elif why:
            repairs.append(
                Repair(
                    "end_frame_invalid",
                    name,
                    detail=f"endFrame {_show(end)} {why}: the object ends at its last state, "
                    f"frame {last}",
                )
            )
        elif end < first:
            repairs.append(
                Repair(
                    "end_frame_before_frame",
                    name,
                    detail=f"endFrame {end} is before frame {first}: the object ends at its "
                    f"last state, frame {last} (dtlpy)",
                )
            )
        else:
            last = max(last, int(end))
    return Track(head, [states[frame] for frame in sorted(states)], last)


def number_tracks(tracks: list[Track], how: str = "object") -> list[Repair]:
    """Give every track the instance id it burns in every frame (``head.instance``), once per
    video so ids are stable across frames; returns the reports of objectIds not used as ids.

    ``object``: a track's usable objectId (1..65535) is its id (also when its label changes
    from frame to frame); tracks sharing an objectId are parts of one instance when their labels
    are the same, else each gets a fresh id (``object_id_conflict``); a track without a usable
    objectId gets a fresh id (``object_id_unusable`` when it had one). Fresh ids count up from
    the largest usable objectId, in file order. ``shape``: track k in file order (1-based) is id k.

    Raises ValueError when an id does not fit uint16.
    """
    if how == "shape":
        if len(tracks) > MAX_INSTANCE_ID:
            raise ValueError(f"{len(tracks)} tracks do not fit uint16 instance ids")
        for k, track in enumerate(tracks, start=1):
            track.head.instance = k
        return []
    labels_of: dict[int, list[frozenset[str]]] = {}
    for track in tracks:
        oid = usable_object_id(track.head)
        if oid is not None:
            labels_of.setdefault(oid, []).append(frozenset(track.labels()))
    fresh = max(labels_of, default=0)
    repairs = []
    for track in tracks:
        head = track.head
        oid = usable_object_id(head)
        groups = labels_of.get(oid, []) if oid is not None else []
        if oid is not None and all(g == groups[0] for g in groups):
            head.instance = oid
            continue
        if fresh >= MAX_INSTANCE_ID:
            raise ValueError(
                f"annotation {head.annotation_id} needs a fresh instance id above "
                f"{MAX_INSTANCE_ID}, which does not fit uint16"
            )
        fresh += 1
        head.instance = fresh
        if oid is not None:
            repairs.append(
                Repair(
                    "object_id_conflict",
                    head.annotation_id,
                    detail=f"objectId {oid} is shared by annotations with other labels: "
                    f"instance id {fresh} in every frame",
                )
            )
        elif head.bad_object_id is not None or head.object_id is not None:
            given = head.bad_object_id or str(head.object_id)
            repairs.append(
                Repair(
                    "object_id_unusable",
                    head.annotation_id,
                    detail=f"objectId {given} is not a whole number from 1 to "
                    f"{MAX_INSTANCE_ID}: instance id {fresh} in every frame",
                )
            )
    return repairs


def active_states(video: Video, frames: range) -> Iterator[tuple[int, list[tuple[Track, int]]]]:
    """For each frame of ``frames`` in order: the frame and, for each track that exists in it
    (in file order), the track and the index of its state there (hidden states included).
    Holds one frame's list at a time."""
    pointers = [0] * len(video.tracks)
    for frame in frames:
        active = []
        for i, track in enumerate(video.tracks):
            if not track.first <= frame <= track.end:
                continue
            p, states = pointers[i], track.states
            while p + 1 < len(states) and states[p + 1].frame <= frame:
                p += 1
            pointers[i] = p
            active.append((track, p))
        yield frame, active


def _compact(head: Annotation, data: Any) -> Any:
    """Readable polygon coordinates as :class:`Rings`; anything else as it is."""
    if head.type != POLYGON:
        return data
    probe = copy.copy(head)
    try:
        set_coordinates(probe, data, 0, 0)
    except AnnotationRejected:
        return data  # rejected, with its reason, when its first frame is burned
    return Rings(tuple(probe.rings))


def _bad_frame(value: Any, limit: int) -> str | None:
    """Why ``value`` is not a frame number from 0 to ``limit``, or None when it is."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "is not a whole number"
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        return "is not a whole number"
    if value < 0:
        return "is negative"
    if value > limit:
        if limit < MAX_FRAME:
            return f"is beyond the video's last frame {limit}"
        return f"is beyond {MAX_FRAME}"
    return None


def _count(value: Any) -> int | None:
    if isinstance(value, str):
        value = value.strip()
        if not value.isdigit():
            return None
        value = int(value)
    if not _is_number(value) or not float(value).is_integer():
        return None
    return int(value) if 0 < value <= MAX_FRAME + 1 else None


def _is_number(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an int beyond float range
        return False


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:39] + "…"


def _mapping(value: Any) -> Mapping:
    return value if isinstance(value, Mapping) else {}
