"""Burn and publish a video item frame by frame (the video part of
:func:`polyburn.pipeline.process_item`).

Each frame is burned as an image item of its own, named ``<item path>/<frame:06d>``, so its
files are ``semantic/<dir>/<video stem>/<frame:06d>.png`` and so on, through the destination's
ordinary :meth:`~polyburn.destinations.Destination.publish_item`. A track's state is parsed and
repaired once, when the first frame it covers is reached (its repairs and rejections carry that
frame); frames are burned one at a time, so memory holds one frame's masks and one parsed state
per track, however long the video.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from polyburn.dataloop_json import AnnotationRejected
from polyburn.errors import ItemError
from polyburn.geometry import repair_item
from polyburn.labels import palette, semantic_dtype
from polyburn.masks import ItemMasks, build_masks
from polyburn.model import Annotation, Item, Shape
from polyburn.video import Track, active_states, number_tracks, state_annotation

if TYPE_CHECKING:
    from polyburn.destinations import Destination
    from polyburn.destinations.base import OutputRecord
    from polyburn.params import MaskOptions
    from polyburn.records import ItemRecord


class VideoBurn:
    """One video item's burn. The constructor checks what can fail before anything is written
    (the destination takes frames, every label is in the label map, instance ids fit) and raises
    ItemError otherwise; :meth:`run` writes the frames and fills the record."""

    def __init__(
        self,
        item: Item,
        destination: Destination | None,
        options: MaskOptions,
        label_map: Mapping[str, int],
        colours: Mapping[str, tuple[int, int, int]] | None,
    ) -> None:
        assert item.video is not None
        self.item, self.video = item, item.video
        self.destination, self.options, self.label_map = destination, options, label_map
        if destination is not None and not getattr(destination, "takes_video_frames", True):
            raise ItemError(
                item.path,
                "video item: per-frame masks cannot be written back to Dataloop (polyburn "
                "writes no video annotations); write to a folder or s3:// instead",
            )
        try:
            self.repairs = number_tracks(self.video.tracks, options.instance_id)
        except ValueError as exc:
            raise ItemError(item.path, str(exc), "annotations") from None
        unknown = sorted(self.video.labels() - set(label_map))
        if destination is not None and unknown:
            raise ItemError(
                item.path,
                f"label(s) not in the label map: {', '.join(map(repr, unknown))}",
                "label",
            )
        self.frames = self.video.frames(getattr(options, "frames", "span"))
        self.palette = palette(label_map, colours)
        self.will_write = destination is not None

    def run(
        self,
        previous_keys: Sequence[str],
        record: ItemRecord,
        check_lease: Callable[[], None] | None = None,
        known: Mapping[str, tuple[str, int]] | None = None,
        preview: bool = False,
    ) -> None:
        """Burn and publish every frame (or, without a destination, only parse and repair every
        state), then remove the previous outputs no longer produced. Fills ``record``:
        ``repairs``, ``problems`` (with their ``frame``), ``shapes`` (states burned),
        ``outputs`` and ``video`` (frame range, frame count and its source, tracks); with
        ``preview``, ``preview`` of the first frame written (with its ``frame``).
        ``check_lease`` is called after each frame; it raises when the item was taken over.
        ``known`` is what the item's trusted record says is stored (see
        :meth:`~polyburn.destinations.Destination.publish_item`)."""
        video, destination = self.video, self.destination
        record.repairs = [r.as_dict() for r in video.repairs + self.repairs]
        record.shapes = 0
        record.video = {
            "tracks": len(video.tracks),
            "frame_count": video.frame_count,
            "frame_count_source": video.count_source,
            "frames": [self.frames.start, self.frames.stop - 1] if self.frames else None,
        }
        if destination is None:
            layers = max((len(t.states) for t in video.tracks), default=0)
            for k in range(layers):  # every state once; each track once per call
                self._shapes([(t, k) for t in video.tracks if k < len(t.states)], record)
            return
        if not video.tracks:  # only boxes, points...: nothing to burn, no frame written
            record.skipped_empty, record.outputs = True, []
            if previous_keys:
                destination.remove(sorted(previous_keys))
            return
        retried = destination.retries_in_this_thread()
        outputs = self._publish_frames(record, check_lease, known, preview)
        if destination.retries_in_this_thread() > retried:
            record.io_retries = destination.retries_in_this_thread() - retried
        record.outputs = [o.as_dict() for o in outputs]
        stale = sorted(set(previous_keys) - {o.key for o in outputs})
        if stale:
            destination.remove(stale)

    def _publish_frames(
        self,
        record: ItemRecord,
        check_lease: Callable[[], None] | None,
        known: Mapping[str, tuple[str, int]] | None,
        preview: bool,
    ) -> list[OutputRecord]:
        item, options, destination = self.item, self.options, self.destination
        dtype = semantic_dtype(self.label_map)
        current: dict[int, tuple[int, Shape | None]] = {}  # track position -> (state, shape)
        outputs: list[OutputRecord] = []
        for frame, active in active_states(self.video, self.frames):
            changed = [(t, p) for t, p in active if current.get(t.head.index, (None,))[0] != p]
            if changed:
                for (track, p), shape in zip(changed, self._shapes(changed, record), strict=True):
                    current[track.head.index] = (p, shape)
            shapes = [s for t, _ in active if (s := current[t.head.index][1]) is not None]
            frame_item = Item(
                item_id=item.item_id,
                path=f"{item.path}/{frame:06d}",
                width=item.width,
                height=item.height,
                annotations=[s.annotation for s in shapes],
                revision=item.revision,
                filename=item.filename,
                subset=item.subset,
            )
            masks = build_masks(
                frame_item,
                shapes,
                options.modes,
                self.label_map,
                dtype,
                options.draw_order,
                options.instance_id,
                frame=(item, frame),
            )
            outputs += destination.publish_item(
                frame_item, masks, options.format, self.palette, known
            )
            if preview and not record.preview:  # the first frame written
                record.preview = self._preview(masks, frame)
            if check_lease is not None:
                check_lease()
        return outputs

    def _preview(self, masks: ItemMasks, frame: int) -> dict[str, Any]:
        """The previews of one frame's masks (no image: a video's frames are not read)."""
        from polyburn.report import mask_previews  # PIL: only for the previews

        names = {i: label for label, i in self.label_map.items()}
        try:
            return {**mask_previews(masks, self.palette, names), "frame": frame}
        except Exception:  # noqa: BLE001 - a preview never fails an item
            return {}

    def _shapes(self, states: list[tuple[Track, int]], record: ItemRecord) -> list[Shape | None]:
        """The repaired shape of each (track, state index) (None when hidden or rejected),
        repaired together as one item; their repairs and rejections go into ``record`` with
        each state's frame."""
        item = self.item
        parsed: list[tuple[Annotation, int]] = []
        for track, p in states:
            state = track.states[p]
            if not state.visible:
                continue
            try:
                annotation = state_annotation(state, track.head, item.width, item.height)
            except AnnotationRejected as rejected:
                rejected.problem.frame = state.frame
                rejected.problem.label = state.label
                record.problems.append(rejected.problem.as_dict())
                continue
            parsed.append((annotation, state.frame))
        if not parsed:
            return [None] * len(states)
        together = Item(item.item_id, item.path, item.width, item.height, [a for a, _ in parsed])
        shapes, repairs, problems = repair_item(together)
        frame_of = {a.annotation_id: frame for a, frame in parsed}  # ids are unique per item
        for report in (*repairs, *problems):
            report.frame = frame_of.get(report.annotation_id)
        record.repairs += [r.as_dict() for r in repairs]
        record.problems += [p.as_dict() for p in problems]
        record.shapes += len(shapes)
        by_annotation = {id(s.annotation): s for s in shapes}
        shape_of = {a.index: by_annotation.get(id(a)) for a, _ in parsed}
        return [shape_of.get(track.head.index) for track, _ in states]
