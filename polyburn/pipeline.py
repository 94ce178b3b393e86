"""One item from source to destination, and the run-level steps around it. Prefect-free."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from polyburn import version
from polyburn.coco import file_name
from polyburn.destinations import Destination
from polyburn.destinations.base import LABEL_MAP_KEY
from polyburn.errors import ConfigError, ItemError, PolyburnError, TransientError
from polyburn.geometry import repair_item
from polyburn.labels import dump_label_map, load_label_map, palette, semantic_dtype
from polyburn.manifest import output_keys
from polyburn.masks import ItemMasks, build_masks
from polyburn.model import Item, ItemRef
from polyburn.recipe import item_recipe
from polyburn.records import ItemRecord
from polyburn.sources import Source
from polyburn.state import (
    ClaimCheck,
    ItemBusyError,
    ItemLease,
    abandon_claimed_item,
    finish_claimed_item,
    mark_failed,
    read_record,
    record_key,
    settle_label_map,
    write_record,
)
from polyburn.video_burn import VideoBurn

if TYPE_CHECKING:  # burn workers import this module: no pydantic, no PIL there
    from polyburn.params import MaskOptions

log = logging.getLogger("polyburn")

READ_AHEAD_MARGIN = 2.0
"""Seconds of clock difference allowed between this host and the destination's store when
deciding whether an item read ahead may be older than its stored record."""


class ClaimedItem(NamedTuple):
    """An item its batch's claim holds (:class:`~polyburn.state.BatchClaim`), with what the
    batch read for it: :func:`process_item` then takes no lease and reads no record itself."""

    claim_key: str
    claim_owner: str
    previous: ItemRecord | None
    """The item's stored record, read with the batch's records (None: it has none)."""
    stale_lease: str | None = None
    """The tag of the stale lease the item had (a writer died or failed half-way: its outputs
    may be a mix, so its record is not trusted); "?" when an earlier attempt of this run may
    have left one."""


def process_item(
    ref: ItemRef,
    source: Source,
    destination: Destination | None,
    options: MaskOptions,
    label_map: Mapping[str, int],
    colours: Mapping[str, tuple[int, int, int]] | None = None,
    preview: bool = False,
    retries: int = 0,
    claimed: ClaimedItem | None = None,
) -> ItemRecord:
    """Load, repair, burn and publish one item; never raises for a problem of this item.

    Returns the item's manifest record: ``status`` ("ok" or "failed"), ``error`` (one line),
    counts, every repair and rejected annotation, the outputs with their sha256 and
    ``polyburn_version`` (the version that processed it, :func:`polyburn.version`); with
    ``options.skip_empty``, an item with no shape to burn gets no outputs and
    ``skipped_empty: true`` (status "ok"). With ``destination=None`` nothing is burned
    (validation only).

    With a destination, the item is processed while its writer holds the item: its own lease
    (:mod:`polyburn.state`), or with ``claimed`` the batch's claim. So runs that overlap never
    mix their outputs: the item is loaded from the source inside it (the newest revision wins),
    outputs the previous record lists that the item no longer produces are removed, and the
    record is stored last. With ``claimed``, the previous record is trusted for what is stored
    (an output it lists with the same sha256 and size is not sent again, nor compared) unless
    ``options.verify`` is set or the item was left unfinished. A failed item's record
    keeps the previous record's outputs (marked not written); when the failure came after its
    outputs started to change, the item is left with an abandoned lease, so it counts as
    unfinished until a run processes it again. ``retries`` (the caller's earlier attempts) goes
    into the record. With ``preview``, the returned record also holds ``preview``: small
    colourised PNGs of the item's masks (a video's first written frame), over the image when the
    source has it (:func:`polyburn.report.mask_previews`), empty when the item wrote no mask;
    it is not stored.
    """
    started = time.perf_counter()
    if destination is None:
        record, _ = _burn(ref, source, None, options, label_map, colours, (), False)
        return _finish(record, started, retries)
    state = destination.state
    holder: _Holder | None = None
    try:
        if claimed is None:
            holder = _LeaseHolder(state, ref.path)
        else:
            holder = _ClaimHolder(state, ref.path, claimed, getattr(options, "verify", False))
        previous = holder.previous
        record, touched = _burn(
            ref,
            source,
            destination,
            options,
            label_map,
            colours,
            output_keys(previous),
            preview,
            _stored_at(state, ref.path) if previous else None,
            previous.revision if previous else None,
            holder.check,
            (previous or _NO_RECORD) if holder.trusted else None,
        )
        holder.check_still_held()
        _add_recipe(record, ref, options, label_map, colours)
        _store_record(state, record, previous, started, retries)
        holder.done(unfinished=touched and not record.ok)
        return record
    except Exception as exc:  # noqa: BLE001 - the state store failed (lease, claim, record I/O)
        if holder is not None:
            holder.failed()
        return _state_failed(ref, exc, started, retries, preview)


class _Holder:
    """How a writer holds an item while it writes it, and what it knows of it then."""

    previous: ItemRecord | None
    """The item's stored record (None when it has none)."""
    trusted: bool
    """Whether that record may be trusted for what is stored (else each output is compared)."""

    def check(self) -> None:
        """Raise when another run took the item over (called after each frame of a video)."""

    def check_still_held(self) -> None:
        """Raise before the record is stored if another run took the item over."""

    def done(self, unfinished: bool) -> None:
        """The record is stored; ``unfinished``: the outputs changed and then the item failed."""

    def failed(self) -> None:
        """The state store failed half-way: leave the item unfinished, if the store allows."""


class _LeaseHolder(_Holder):
    """A writer of one item: its own lease, taken here, and its record read under it."""

    def __init__(self, state, path: str) -> None:
        self.lease = ItemLease(state, path)
        self.lease.acquire()
        self.previous = read_record(state, path)
        self.trusted = False
        self.check = self.lease.check

    def check_still_held(self) -> None:
        if self.lease.lost:  # another run took the item over: its record, not ours, is stored
            raise ItemBusyError(
                f"{self.lease.path}: another run took the item over while it was written"
            )

    def done(self, unfinished: bool) -> None:
        if unfinished:
            self.lease.abandon()
        else:
            self.lease.release()

    def failed(self) -> None:
        with contextlib.suppress(Exception):
            self.lease.abandon()


class _ClaimHolder(_Holder):
    """An item its batch's claim holds (:class:`ClaimedItem`), its record read with the batch's."""

    def __init__(self, state, path: str, claimed: ClaimedItem, verify: bool) -> None:
        self.state, self.path, self.claimed = state, path, claimed
        self.previous = claimed.previous
        self.trusted = not (verify or claimed.stale_lease)
        self.check = ClaimCheck(state, claimed.claim_key, claimed.claim_owner).check

    def check_still_held(self) -> None:
        self.check()  # another run took the batch over: its records, not ours, are stored

    def done(self, unfinished: bool) -> None:
        if unfinished:
            abandon_claimed_item(self.state, self.path, self.claimed.stale_lease)
        elif self.claimed.stale_lease:
            finish_claimed_item(self.state, self.path, self.claimed.stale_lease)

    def failed(self) -> None:
        with contextlib.suppress(Exception):
            abandon_claimed_item(self.state, self.path, self.claimed.stale_lease)


def _store_record(
    state, record: ItemRecord, previous: ItemRecord | None, started: float, retries: int
) -> None:
    """Store the item's record, unless the stored one already says the same: only the timing,
    retry counts and whether this run wrote the outputs would differ (a re-run of an unchanged
    item then writes nothing at all). What only travels with the record (its preview, the
    destination's cleanup) is never stored (:meth:`~polyburn.records.ItemRecord.to_json`)."""
    if not record.ok and previous is not None:
        _keep_previous_outputs(record, previous)
    _finish(record, started, retries)
    if not record.ok:
        mark_failed(state, record)
    if previous is None or _lasting(record) != _lasting(previous):
        write_record(state, record)


def store_failed_record(state, record: ItemRecord) -> None:
    """Store ``record``, failed after its ``ok`` record was stored (a batch's last step failed
    for it), with its failure mark first (:func:`~polyburn.state.mark_failed`)."""
    mark_failed(state, record)
    write_record(state, record)


_PER_RUN = ("seconds", "retries", "io_retries")


def _lasting(record: ItemRecord) -> dict[str, Any]:
    """What a record says about the item and its stored outputs, without what only describes
    the run that wrote it (time taken, retries, which outputs it wrote)."""
    lasting = {k: v for k, v in record.to_dict().items() if k not in _PER_RUN}
    outputs = lasting.get("outputs")
    if isinstance(outputs, list):
        lasting["outputs"] = [
            {k: v for k, v in o.items() if k != "written"} if isinstance(o, dict) else o
            for o in outputs
        ]
    return lasting


def _add_recipe(
    record: ItemRecord,
    ref: ItemRef,
    options: MaskOptions,
    label_map: Mapping[str, int],
    colours: Mapping[str, tuple[int, int, int]] | None,
) -> None:
    """Give an ``ok`` record its recipe digest (:mod:`polyburn.recipe`): a later run with the
    same digest for the item skips it. A failed item gets none: it is always tried again."""
    run = getattr(options, "recipe", None)
    if record.ok and run:
        digest = item_recipe(run, ref.revision, record.labels or (), label_map, colours)
        if digest:
            record.recipe = digest


def _state_failed(
    ref: ItemRef, exc: Exception, started: float, retries: int, preview: bool = False
) -> ItemRecord:
    failed = ItemRecord(ref.path, ref.item_id)
    if preview:  # asked for: none, the item failed
        failed.preview = {}
    _fail(failed, ref, exc)
    return _finish(failed, started, retries)


_NO_RECORD = ItemRecord("", status="")
"""A trusted record that trusts nothing: the item has no stored record, so none of its outputs
is known to be stored (:func:`known_outputs` gives {}), and none is compared either."""


def known_outputs(
    previous: ItemRecord | None, revision: str | None
) -> dict[str, tuple[str, int]] | None:
    """What a trusted previous record says is stored for ``revision`` (key → sha256, size):
    its outputs when it is an ``ok`` record of that revision, else nothing (every output is
    sent); None when there is no record to trust (``previous`` None: compare with the store)."""
    if previous is None:
        return None
    if not previous.ok or previous.revision != revision:
        return {}
    return {
        o["key"]: (o.get("sha256"), o.get("bytes"))
        for o in previous.outputs or ()
        if isinstance(o, dict) and "key" in o
    }


def _burn(
    ref: ItemRef,
    source: Source,
    destination: Destination | None,
    options: MaskOptions,
    label_map: Mapping[str, int],
    colours: Mapping[str, tuple[int, int, int]] | None,
    previous_keys: Sequence[str],
    preview: bool,
    stored_at: Callable[[], float | None] | None = None,
    stored_revision: str | None = None,
    check_lease: Callable[[], None] | None = None,
    trusted: ItemRecord | None = None,
) -> tuple[ItemRecord, bool]:
    """The record of one item and whether its outputs at the destination started to change.

    An item the source read ahead (a bulk read, ``item.read_at``) is read again here when its
    stored record is of another revision (``stored_revision``) and ``stored_at()`` says it was
    stored after that read, give or take ``READ_AHEAD_MARGIN``: another run may have written a
    newer version since, and the last writer must have read the newest one. ``check_lease``
    raises when another run took the item over (a video item calls it after each frame).
    ``trusted`` is the previous record when it may be trusted for what is stored
    (:func:`known_outputs`); ``_NO_RECORD`` when there is none to trust but nothing can be
    stored either.
    """
    record = ItemRecord(ref.path, ref.item_id)
    if preview:  # asked for: stays empty when the item writes no mask
        record.preview = {}
    touched = False
    try:
        item = source.load(ref, options.max_pixels)
        if item.read_at is not None and stored_at is not None and item.revision != stored_revision:
            when = stored_at()
            if when is not None and when >= item.read_at - READ_AHEAD_MARGIN:
                item = source.load(dataclasses.replace(ref, data=""), options.max_pixels)
        _describe(record, item)
        known = known_outputs(trusted, item.revision) if trusted is not None else None
        if item.video is not None:  # frame by frame
            video = VideoBurn(item, destination, options, label_map, colours)
            touched = video.will_write
            video.run(previous_keys, record, check_lease, known, preview)
            return record, touched
        shapes, repairs, problems = repair_item(item)
        record.repairs = [r.as_dict() for r in repairs]
        record.problems += [p.as_dict() for p in problems]
        record.shapes = len(shapes)
        if destination is not None and not shapes and options.skip_empty:
            record.skipped_empty, record.outputs = True, []  # nothing to burn: no mask at all
            if previous_keys:
                touched = True
                destination.remove(sorted(previous_keys))
        elif destination is not None:
            masks = build_masks(
                item,
                shapes,
                options.modes,
                label_map,
                semantic_dtype(label_map),
                options.draw_order,
                options.instance_id,
            )
            record.repairs += [r.as_dict() for r in masks.repairs]
            pal = palette(label_map, colours)
            retried = destination.retries_in_this_thread()
            touched = True
            outputs = destination.publish_item(item, masks, options.format, pal, known)
            if destination.retries_in_this_thread() > retried:
                record.io_retries = destination.retries_in_this_thread() - retried
            record.outputs = [o.as_dict() for o in outputs]
            record.cleanup = destination.take_cleanup(item.path) or None
            stale = sorted(set(previous_keys) - {o.key for o in outputs})
            if stale:
                destination.remove(stale)
            if preview:
                record.preview = _preview(ref, source, masks, pal, label_map)
    except Exception as exc:  # noqa: BLE001 - one item never takes the run down
        _fail(record, ref, exc)
    return record, touched


def _fail(record: ItemRecord, ref: ItemRef, exc: Exception) -> None:
    """Mark ``record`` failed with a one-line error; a transient error is marked for a retry."""
    record.status = "failed"
    if isinstance(exc, TransientError):  # worth another try: the caller decides
        record.error, record.transient = f"{ref.path}: {exc}", True
    elif isinstance(exc, ItemError):
        record.error = str(exc)
    elif isinstance(exc, PolyburnError):
        record.error = f"{ref.path}: {exc}"
    else:
        log.debug("unexpected error on %s", ref.path, exc_info=True)
        record.error = f"{ref.path}: {type(exc).__name__}: {exc}"


def _stored_at(state, path: str) -> Callable[[], float | None]:
    """When the item's record was stored (the store's clock), asked only when needed."""

    def when() -> float | None:
        key = record_key(path)
        return next((e.modified for e in state.entries(key) if e.key == key), None)

    return when


def _finish(record: ItemRecord, started: float, retries: int) -> ItemRecord:
    record.seconds = round(time.perf_counter() - started, 4)
    record.polyburn_version = version()  # which polyburn wrote the item's outputs
    if retries:
        record.retries = retries
    return record


def _keep_previous_outputs(record: ItemRecord, previous: ItemRecord) -> None:
    """A failed item still has what an earlier run stored for it: keep those outputs listed (as
    not written by this run), so a later run still removes the ones it no longer produces."""
    kept = [dict(o, written=False) for o in previous.outputs or () if isinstance(o, dict)]
    if kept:
        record.outputs = kept


def _preview(
    ref: ItemRef,
    source: Source,
    masks: ItemMasks,
    pal: Sequence[int],
    label_map: Mapping[str, int],
) -> dict[str, Any]:
    """The previews of the item's masks (:func:`polyburn.report.mask_previews`), over the image
    when the source has it; empty when they cannot be made."""
    from polyburn.report import mask_previews

    image_of = getattr(source, "image", None)
    try:
        image = image_of(ref) if image_of else None
        return mask_previews(masks, pal, {i: label for label, i in label_map.items()}, image)
    except Exception:  # noqa: BLE001 - a preview never fails an item
        log.debug("no preview for %s", ref.path, exc_info=True)
        return {}


def _describe(record: ItemRecord, item: Item) -> None:
    """What the item is, read: into ``record``."""
    record.item = item.item_id
    record.revision = item.revision
    record.width = item.width
    record.height = item.height
    record.annotations = len(item.annotations) if item.video is None else len(item.video.tracks)
    record.skipped = item.skipped
    record.problems = [p.as_dict() for p in item.problems]
    record.subset = item.subset
    record.labels = sorted(_labels_of(item))
    record.file_name = file_name(item)


def _labels_of(item: Item) -> set[str]:
    """The labels of the item's pixel annotations (every frame's, for a video)."""
    labels = {a.label for a in item.annotations}
    if item.video is not None:
        labels.update(item.video.labels())
    return labels


def scan_labels(refs: Iterable[ItemRef], source: Source, max_pixels: int) -> set[str]:
    """Labels of the pixel annotations of the given items (unreadable items are skipped here and
    reported when they are processed)."""
    labels: set[str] = set()
    for ref in refs:
        try:
            item = source.load(ref, max_pixels)
        except PolyburnError:
            continue
        labels |= _labels_of(item)
    return labels


def resolve_label_map(
    labels_file: str | None,
    destination: Destination,
    found: Iterable[str] | None,
    declared: Mapping[str, Any] | None = None,
) -> dict[str, int]:
    """Settle the label map of a run and store it at the destination.

    A user file wins and is stored as given. Otherwise the destination's map is extended, by
    compare-and-swap, with the labels it lacks (declared by the source, e.g. a Dataloop ontology,
    or ``found`` in the items): ids never change for a destination, and runs that add the same
    new label at once give it one id. Raises ConfigError when no label is known at all.
    """
    if labels_file:
        label_map = load_label_map(labels_file)
        write_label_map(destination, label_map)
        return label_map
    label_map = settle_label_map(destination.state, set(found or ()) | set(declared or ()))
    if not label_map:
        raise ConfigError("no labels found in the source and no label map given")
    return label_map


def write_label_map(destination: Destination, label_map: Mapping[str, int]) -> None:
    """Store ``label_map`` as given (a user's label map file)."""
    destination.write_text(LABEL_MAP_KEY, dump_label_map(label_map))
