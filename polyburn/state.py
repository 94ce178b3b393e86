"""A destination's run state, kept per item so that runs cost the work they do and may overlap.

Everything lives in the destination's state store (:attr:`Destination.state`: the folder or S3
prefix itself, or the local state folder of a Dataloop destination):

``.polyburn/records/<item path>.json``
    The item's record: its manifest line (status, outputs with sha256 and size, repairs,
    rejections, revision). Written by the run that processed the item, after the item's
    outputs, while it holds the item's lease; one atomic write.
``.polyburn/leases/<item path>.json``
    The item's lease: who is writing the item's outputs and record (host, pid, expiry). At
    most one run holds it; its holder renews the expiry while it writes, and deletes the lease
    when the record is written. A lease whose holder is gone
    (a dead process of this host, an expiry passed, or marked abandoned after a failed write)
    marks the item *unfinished*: its outputs may be a mix, so the next run that lists the item
    processes it again (never from Prefect's cache) and takes the lease over.
``.polyburn/claims/<owner>.json``
    A batch claim: the same right as a lease, for every item of a batch at once (host, pid,
    expiry, the item paths), so that a batch pays a few requests for its state instead of two
    per item (:class:`BatchClaim`). A claim and a lease are each created first and then look
    for the other kind, so two writers of one item always see each other and one backs off.
    A claim whose holder is gone marks all its items unfinished; a writer that takes some of
    them over leaves the others an abandoned lease each, then deletes the claim.
``label_map.json``
    Label → id, extended by compare-and-swap (:func:`settle_label_map`): a new label gets one id
    however many runs add it at once, and an id never changes.
``manifest.jsonl``
    A compacted snapshot of every record, sorted by path (:func:`write_snapshot`): written last by
    full runs and by ``polyburn manifest DEST --compact``. :func:`current_records` is the live
    view; it also reads destinations written before records existed (``manifest.jsonl`` only).
``.polyburn/layout``
    ``records-1`` once the records are the whole truth; before that (a destination written by an
    earlier polyburn), the snapshot's lines count for items without a record of their own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from polyburn import settings as config
from polyburn.destinations.base import (
    LABEL_MAP_KEY,
    MANIFEST_KEY,
    FileDestination,
    StoredEntry,
)
from polyburn.errors import TransientError
from polyburn.keys import safe_relpath
from polyburn.labels import dump_label_map, extend_label_map, parse_label_map
from polyburn.manifest import RecordSpool, iter_manifest
from polyburn.processes import host_name, pid_alive
from polyburn.records import ItemRecord, json_line

log = logging.getLogger("polyburn.state")

RECORDS = ".polyburn/records/"
LEASES = ".polyburn/leases/"
CLAIMS = ".polyburn/claims/"
FAILED = ".polyburn/failed/"
LAYOUT_KEY = ".polyburn/layout"
LAYOUT = "records-1"
CAS_ATTEMPTS = 50


def lease_seconds() -> float:
    """How long a lease of a holder on another host counts as held (``POLYBURN_LEASE_SECONDS``).
    A lease of this host is freed as soon as its process is gone."""
    return config.settings().lease_seconds


def lease_wait_seconds() -> float:
    """How long a run waits for an item another run is writing before reporting it busy
    (``POLYBURN_LEASE_WAIT_SECONDS``)."""
    return config.settings().lease_wait_seconds


def record_key(path: str) -> str:
    """The state key of an item's record."""
    return f"{RECORDS}{safe_relpath(path)}.json"


def lease_key(path: str) -> str:
    """The state key of an item's lease."""
    return f"{LEASES}{safe_relpath(path)}.json"


# ---------------------------------------------------------------------------- records
def read_record(store: FileDestination, path: str) -> ItemRecord | None:
    """The item's stored record, or None (no record, or one that does not parse)."""
    return _parse_record(store.get(record_key(path)))


def write_record(store: FileDestination, record: ItemRecord) -> None:
    """Store ``record`` as its item's record (its manifest line)."""
    store.put_record(record_key(record.path), record.to_json())


def create_record(store: FileDestination, record: ItemRecord) -> bool:
    """Store ``record`` as its item's record only if the item has none; False if it has."""
    return store.create(record_key(record.path), record.to_json()) is not None


def forget_items(store: FileDestination, paths: Iterable[str]) -> None:
    """Delete the records (and failure marks) of items that are gone from their source."""
    paths = list(paths)
    store.remove([record_key(path) for path in paths] + [failed_key(path) for path in paths])


# ---------------------------------------------------------------------------- failure marks
def failed_key(path: str) -> str:
    """The state key of the mark of an item whose record says it failed."""
    return f"{FAILED}{safe_relpath(path)}.json"


def mark_failed(store: FileDestination, record: ItemRecord) -> None:
    """Mark the item of a failed ``record`` as failed, before its record is stored: a run that
    only asks the source for changed items (incremental) still finds it by listing the marks,
    and tries it again, so its watermark may move on past a failure."""
    mark = {"item": record.item, "path": record.path}
    store.put_record(failed_key(record.path), json_line(mark))


def failed_marks(store: FileDestination) -> dict[str, str | None]:
    """The items marked failed: path → item id (None for a local export's items). One listing,
    then a read per mark (failures are few)."""
    keys = [e.key for e in store.entries(FAILED) if e.key.endswith(".json")]
    marks = {}
    for data in _get_many(store, keys):
        mark = _parse_json(data)
        if isinstance(mark.get("path"), str):
            marks[mark["path"]] = mark.get("item")
    return marks


def clear_failed_marks(store: FileDestination, paths: Iterable[str]) -> list[str]:
    """Remove the marks of these items whose stored record is ``ok`` now (read again, so a run
    that failed the item since keeps its mark); returns the paths cleared."""
    cleared = [r.path for r in read_records(store, paths) if r.ok]
    store.remove([failed_key(path) for path in cleared])
    return cleared


def read_records(store: FileDestination, paths: Iterable[str]) -> Iterator[ItemRecord]:
    """The stored records of these items (those that have one), read with a few threads."""
    yield from _read_many(store, [record_key(path) for path in paths])


def find_records(
    store: FileDestination, paths: Iterable[str] = (), item_ids: Iterable[str] = ()
) -> list[ItemRecord]:
    """The records of the items with these paths, and of the items with these item ids. Paths
    cost one read each; item ids cost a read of every record (records are kept by path), so
    pass them only when some are asked for."""
    found = list(read_records(store, paths))
    wanted = set(item_ids)
    if wanted:
        found += [r for r in _read_many(store, _record_keys(store)) if r.item in wanted]
    return found


def destination_clock(store: FileDestination) -> float:
    """The store's own clock now (seconds since the epoch), as its listings will show it, so
    that run start and record times compare without trusting this host's clock."""
    key = f".polyburn/clock/{uuid.uuid4().hex}"
    tag = store.create(key, b"{}\n")
    (entry,) = store.entries(key)
    store.remove_if(key, tag or entry.tag)
    return entry.modified


def stale_record_keys(store: FileDestination, refs: Iterable[Any], before: float) -> list[str]:
    """Keys of records of items a full listing (``refs``) no longer has, stored before
    ``before`` (:func:`destination_clock` at the listing's start): the record of an item that a
    concurrent run added since is newer and kept."""
    listed = {record_key(ref.path) for ref in refs}
    return [
        entry.key
        for entry in _record_entries(store)
        if entry.key not in listed and entry.modified < before
    ]


def _parse_record(data: bytes | None) -> ItemRecord | None:
    if data is None:
        return None
    try:
        return ItemRecord.from_json(data)
    except ValueError:  # no JSON, no UTF-8, or no record
        return None


# ---------------------------------------------------------------------------- leases
class ItemBusyError(TransientError):
    """Another run kept the item's lease for longer than ``POLYBURN_LEASE_WAIT_SECONDS``."""


class ItemLease:
    """The exclusive right to write one item's outputs and record (see the module docstring).

    Use :func:`item_lease`. ``taken_over`` says whether a holder that is gone left the item
    unfinished (its outputs may be a mix of two versions until this holder writes them all).
    """

    def __init__(self, store: FileDestination, path: str) -> None:
        self.store = store
        self.path = path
        self.key = lease_key(path)
        self.owner = uuid.uuid4().hex
        self.tag: str | None = None
        self.taken_over = False
        self.lost = False
        self.renewed = 0.0
        self._lock = threading.Lock()

    def _body(self, abandoned: bool = False) -> bytes:
        return json.dumps(
            {
                "path": self.path,
                "owner": self.owner,
                "host": host_name(),
                "pid": os.getpid(),
                "expires": time.time() + lease_seconds(),
                "abandoned": abandoned,
            }
        ).encode("utf-8")

    def acquire(self, wait: float | None = None) -> None:
        """Take the lease, waiting while a live holder (a lease or a batch claim) has the item;
        raises ItemBusyError after ``wait`` seconds (default :func:`lease_wait_seconds`)."""
        wait = lease_wait_seconds() if wait is None else wait
        deadline = time.monotonic() + wait
        delay = 0.005
        while True:
            self.renewed = time.monotonic()
            self.tag = self.store.create(self.key, self._body())
            if self.tag is None:
                held = self.store.get_tagged(self.key)
                if held is None:
                    continue  # released in between
                if lease_is_stale(held[0]):
                    self.tag = self.store.replace(self.key, self._body(), held[1])
                    if self.tag is None:
                        continue  # another run took it over first
                    self.taken_over = True
            if self.tag is not None:
                live, stale = survey_claims(self.store, {self.path})
                if not live:
                    self.taken_over |= bool(stale)
                    _renewals.add(self)
                    return
                self._back_off()
            if time.monotonic() > deadline:
                raise ItemBusyError(f"{self.path}: another run kept writing it for {wait:.0f} s")
            time.sleep(delay * random.uniform(0.5, 1.5))
            delay = min(delay * 2, 0.5)

    def _back_off(self) -> None:
        """Give the lease back to a live batch claim found after it was taken; a lease taken
        over from a gone holder stays behind abandoned (the item is still unfinished)."""
        if self.taken_over:
            self.store.replace(self.key, self._body(abandoned=True), self.tag)
        else:
            self.store.remove_if(self.key, self.tag)
        self.tag = None
        self.taken_over = False

    def renew(self) -> None:
        """Push the lease's expiry :func:`lease_seconds` ahead again (compare-and-swap); done
        every third of it while it is held, so an item that takes longer than that to write
        keeps its lease. A lease another run took over meanwhile
        (this process stalled past the expiry) is marked ``lost``."""
        with self._lock:
            if self.tag is None:
                return
            self.renewed = time.monotonic()
            tag = self.store.replace(self.key, self._body(), self.tag)
            if tag is None:
                self.lost = True
                log.warning("%s: lease was taken over while this run was writing", self.path)
            self.tag = tag

    def check(self) -> None:
        """Raise TransientError when another run took the lease over (see :meth:`renew`): a
        long write (a video's frames) stops early instead of mixing its outputs with theirs."""
        if self.lost:
            raise TransientError(
                f"{self.path}: another run took the item over while it was written"
            )

    def release(self) -> None:
        """Give the lease up: the item's outputs and record are complete."""
        _renewals.discard(self)
        with self._lock:
            if self.tag is not None and not self.store.remove_if(self.key, self.tag):
                log.warning("%s: lease was taken over before it was released", self.path)
            self.tag = None

    def abandon(self) -> None:
        """Give the lease up leaving the item marked unfinished (a write failed half-way)."""
        _renewals.discard(self)
        with self._lock:
            if self.tag is not None:
                self.store.replace(self.key, self._body(abandoned=True), self.tag)
            self.tag = None


def abandoned_lease(path: str, owner: str = "") -> bytes:
    """The body of a lease that marks ``path`` unfinished and protects nothing."""
    return json.dumps(
        {
            "path": path,
            "owner": owner,
            "host": host_name(),
            "pid": os.getpid(),
            "expires": 0,
            "abandoned": True,
        }
    ).encode("utf-8")


class BatchClaim:
    """The exclusive right to write the outputs and records of many items at once.

    One object under ``CLAIMS`` lists the items; it costs a create, two listings (claims and
    leases) and a delete per batch, where item leases cost two writes per item. Use
    :func:`batch_claim`. After :meth:`acquire`:

    ``paths``
        The items held (sorted).
    ``busy``
        Items a live writer kept for longer than the wait: not held, left to the caller.
    ``leases``
        Held items that had a stale item lease (a writer gone, or a failed write): path → the
        lease's tag. Their outputs may be a mix; :func:`finish_claimed_item` removes the lease
        once the item is written.
    """

    def __init__(self, store: FileDestination, paths: Iterable[str]) -> None:
        self.store = store
        self.paths = sorted(set(paths))
        self.owner = uuid.uuid4().hex
        self.key = f"{CLAIMS}{self.owner}.json"
        self.path = f"batch claim {self.owner[:8]}"  # for the renewal thread's messages
        self.tag: str | None = None
        self.lost = False
        self.renewed = 0.0
        self.busy: list[str] = []
        self.leases: dict[str, str] = {}
        self._lock = threading.Lock()

    def _body(self, abandoned: bool = False) -> bytes:
        return json.dumps(
            {
                "owner": self.owner,
                "host": host_name(),
                "pid": os.getpid(),
                "expires": time.time() + lease_seconds(),
                "abandoned": abandoned,
                "paths": self.paths,
            }
        ).encode("utf-8")

    def acquire(self, wait: float | None = None) -> None:
        """Claim the items, waiting while live writers hold some of them; after ``wait``
        seconds (default :func:`lease_wait_seconds`) the items still held by others move to
        ``busy`` and the rest are claimed."""
        wait = lease_wait_seconds() if wait is None else wait
        deadline = time.monotonic() + wait
        delay = 0.005
        while self.paths:
            self.renewed = time.monotonic()
            self.tag = self.store.create(self.key, self._body())
            if self.tag is None:  # a key nobody else writes: the store refused the write
                raise TransientError(f"{self.store.uri}/{self.key}: could not be created")
            wanted = set(self.paths)
            live_claims, _ = survey_claims(self.store, wanted, own=self.key)
            live_leases, stale_leases = _survey_leases(self.store, wanted)
            conflicts = live_claims | live_leases
            if not conflicts:
                self.leases = stale_leases
                _renewals.add(self)
                return
            self.store.remove_if(self.key, self.tag)
            self.tag = None
            if time.monotonic() > deadline:
                self.busy += sorted(conflicts)
                self.paths = [p for p in self.paths if p not in conflicts]
                continue
            time.sleep(delay * random.uniform(0.5, 1.5))
            delay = min(delay * 2, 0.5)

    renew = ItemLease.renew
    check = ItemLease.check

    def release(self) -> None:
        """Give the claim up: every held item's outputs and record are complete (an item that
        failed half-way has an abandoned lease of its own, see :func:`abandon_claimed_item`)."""
        ItemLease.release(self)

    def abandon(self) -> None:
        """Give the claim up leaving every held item unfinished (the batch broke off)."""
        ItemLease.abandon(self)

    def handle(self) -> tuple[str, str]:
        """What a burn worker needs to check the claim (:class:`ClaimCheck`)."""
        return self.key, self.owner


def batch_claim(
    store: FileDestination, paths: Iterable[str]
) -> contextlib.AbstractContextManager[BatchClaim]:
    """Hold a claim on ``paths`` for the block (see :class:`BatchClaim`): released when the
    block ends, abandoned (every held item stays unfinished) when it raises."""
    return _holding(BatchClaim(store, paths))


class ClaimCheck:
    """A burn worker's view of its batch's claim, held by its parent process: :meth:`check`
    raises when another run took the claim over. It reads the claim at most once every third
    of :func:`lease_seconds` (as often as the holder renews it), so fast items cost nothing."""

    def __init__(self, store: FileDestination, key: str, owner: str) -> None:
        self.store, self.key, self.owner = store, key, owner
        self.checked = time.monotonic()
        self.lost = False

    def check(self) -> None:
        if not self.lost and time.monotonic() - self.checked >= lease_seconds() / 3:
            self.checked = time.monotonic()
            body = _parse_json(self.store.get(self.key))
            self.lost = body.get("owner") != self.owner or bool(body.get("abandoned"))
        if self.lost:
            raise TransientError("another run took the item over while it was written")


def finish_claimed_item(store: FileDestination, path: str, lease_tag: str | None) -> None:
    """A claimed item is written: remove the stale lease it had (``lease_tag``), or one that a
    failed earlier attempt of this run left (``lease_tag`` "?": looked up)."""
    if lease_tag == "?":
        held = store.get_tagged(lease_key(path))
        if held is None or not lease_is_stale(held[0]):
            return
        lease_tag = held[1]
    if lease_tag:
        store.remove_if(lease_key(path), lease_tag)


def abandon_claimed_item(store: FileDestination, path: str, lease_tag: str | None) -> None:
    """A claimed item failed half-way: leave it an abandoned lease, so it stays unfinished
    after the claim is released."""
    body = abandoned_lease(path)
    if lease_tag and lease_tag != "?" and store.replace(lease_key(path), body, lease_tag):
        return
    if store.create(lease_key(path), body) is None:
        held = store.get_tagged(lease_key(path))
        if held is not None and lease_is_stale(held[0]):
            store.replace(lease_key(path), body, held[1])


_claim_bodies: dict[tuple[str, str], tuple[str, dict[str, Any]]] = {}
_claim_bodies_lock = threading.Lock()


def _claims(store: FileDestination, own: str | None = None) -> list[tuple[StoredEntry, dict]]:
    """Every claim but ``own`` with its body; bodies are read once per version (the listing's
    tag), so the claims of a run's other batches cost one read each."""
    found = []
    for entry in store.entries(CLAIMS):
        if entry.key == own or not entry.key.endswith(".json"):
            continue
        cache_key = (store.uri, entry.key)
        with _claim_bodies_lock:
            cached = _claim_bodies.get(cache_key)
        if cached is not None and cached[0] == entry.tag:
            found.append((entry, cached[1]))
            continue
        held = store.get_tagged(entry.key)
        if held is None:
            continue  # released in between
        body = _parse_json(held[0])
        with _claim_bodies_lock:
            if len(_claim_bodies) > 4096:
                _claim_bodies.clear()
            _claim_bodies[cache_key] = (held[1], body)
        found.append((dataclasses.replace(entry, tag=held[1]), body))
    return found


def survey_claims(
    store: FileDestination, paths: set[str], own: str | None = None
) -> tuple[set[str], set[str]]:
    """(items of ``paths`` a live claim holds, items a stale claim held). A stale claim that
    holds any of ``paths`` is split first: each of its items gets an abandoned lease (so it stays
    unfinished), then the claim is deleted."""
    live: set[str] = set()
    stale: set[str] = set()
    for entry, body in _claims(store, own):
        held = paths.intersection(_claim_paths(body))
        if not held:
            continue
        if _holder_is_gone(body):
            _split(store, entry, body)
            stale |= held
        else:
            live |= held
    return live, stale


def _split(store: FileDestination, entry: StoredEntry, body: Mapping[str, Any]) -> None:
    owner = f"claim {body.get('owner', '')}"
    for path in _claim_paths(body):
        store.create(lease_key(path), abandoned_lease(path, owner))
    store.remove_if(entry.key, entry.tag)


def _survey_leases(store: FileDestination, paths: set[str]) -> tuple[set[str], dict[str, str]]:
    """(items of ``paths`` with a live item lease, {item: tag} of those with a stale one)."""
    keys = {lease_key(path): path for path in paths}
    live: set[str] = set()
    stale: dict[str, str] = {}
    for entry in store.entries(LEASES):
        path = keys.get(entry.key)
        if path is None:
            continue
        held = store.get_tagged(entry.key)
        if held is None:
            continue
        if lease_is_stale(held[0]):
            stale[path] = held[1]
        else:
            live.add(path)
    return live, stale


def _claim_paths(body: Mapping[str, Any]) -> list[str]:
    paths = body.get("paths")
    return [p for p in paths if isinstance(p, str)] if isinstance(paths, list) else []


def _parse_json(data: bytes | None) -> dict[str, Any]:
    try:
        value = json.loads(data) if data is not None else {}
    except (ValueError, UnicodeDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


class _Renewals:
    """The leases this process holds, renewed by one daemon thread started on first use."""

    def __init__(self) -> None:
        self._held: set[ItemLease] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def add(self, lease: ItemLease) -> None:
        with self._lock:
            self._held.add(lease)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="polyburn-lease-renewal", daemon=True
                )
                self._thread.start()

    def discard(self, lease: ItemLease) -> None:
        with self._lock:
            self._held.discard(lease)

    def _run(self) -> None:
        while True:
            every = lease_seconds() / 3
            time.sleep(min(every / 4, 1.0))
            with self._lock:
                due = [le for le in self._held if time.monotonic() - le.renewed >= every]
            for lease in due:
                try:
                    lease.renew()
                except Exception:  # noqa: BLE001 - the store failed: try again next round
                    log.debug("renewing %s failed", lease.path, exc_info=True)
                if lease.tag is None:
                    self.discard(lease)


_renewals = _Renewals()


def lease_is_stale(data: bytes, now: float | None = None) -> bool:
    """Whether a stored lease no longer protects anything: abandoned, expired, held by a
    process of this host that is gone, or unreadable."""
    try:
        return _holder_is_gone(json.loads(data), now)
    except ValueError:
        return True


def _holder_is_gone(lease: Any, now: float | None = None) -> bool:
    """:func:`lease_is_stale` of a lease or claim body already parsed."""
    try:
        if lease.get("abandoned"):
            return True
        if lease.get("host") == host_name() and not pid_alive(int(lease["pid"])):
            return True
        return float(lease["expires"]) < (time.time() if now is None else now)
    except (ValueError, KeyError, TypeError, AttributeError):
        return True


def item_lease(store: FileDestination, path: str) -> contextlib.AbstractContextManager[ItemLease]:
    """Hold the item's lease for the block: released when the block ends, abandoned (the item
    stays unfinished) when it raises."""
    return _holding(ItemLease(store, path))


@contextlib.contextmanager
def _holding(holder):
    """Acquire ``holder`` (a lease or a claim) for the block; release it when the block ends,
    abandon it when the block raises."""
    holder.acquire()
    try:
        yield holder
    except BaseException:
        with contextlib.suppress(Exception):
            holder.abandon()
        raise
    holder.release()


def unfinished_items(store: FileDestination) -> set[str]:
    """Paths of items whose lease or batch claim is stale: a writer was killed or failed
    half-way. Costs a listing of the leases and of the claims (the items being written right
    now), not of the destination."""
    stale = set()
    for entry in store.entries(LEASES):
        held = store.get_tagged(entry.key)
        if held is None or not lease_is_stale(held[0]):
            continue
        try:
            stale.add(str(json.loads(held[0])["path"]))
        except (ValueError, KeyError, TypeError):
            continue
    for _, body in _claims(store):
        if _holder_is_gone(body):
            stale.update(_claim_paths(body))
    return stale


# ---------------------------------------------------------------------------- label map
def settle_label_map(store: FileDestination, labels: Iterable[str]) -> dict[str, int]:
    """The destination's label map with every label of ``labels`` in it, by compare-and-swap:
    existing ids are kept, new labels get the next ids, and concurrent runs that add labels at
    the same moment all end up with the same map."""
    wanted = set(labels)
    origin = f"{store.uri}/{LABEL_MAP_KEY}"
    for _ in range(CAS_ATTEMPTS):
        held = store.get_tagged(LABEL_MAP_KEY)
        existing = parse_label_map(held[0].decode("utf-8"), origin) if held else {}
        merged = extend_label_map(existing, wanted)
        if held is not None and merged == existing:
            return existing
        text = dump_label_map(merged).encode("utf-8")
        tag = (
            store.create(LABEL_MAP_KEY, text)
            if held is None
            else store.replace(LABEL_MAP_KEY, text, held[1])
        )
        if tag is not None:
            return merged
        time.sleep(random.uniform(0.005, 0.05))
    raise TransientError(f"{origin}: changed by other runs {CAS_ATTEMPTS} times in a row")


# ---------------------------------------------------------------------------- the current view
def _record_entries(store: FileDestination) -> list[StoredEntry]:
    """The listing of every stored record (temp or foreign files under the prefix left out)."""
    return [entry for entry in store.entries(RECORDS) if entry.key.endswith(".json")]


def _record_keys(store: FileDestination) -> list[str]:
    return [entry.key for entry in _record_entries(store)]


def _read_many(store: FileDestination, keys: list[str]) -> Iterator[ItemRecord]:
    """The records at ``keys`` that exist and parse (:func:`_get_many`)."""
    for _, record in _read_stored(store, keys):
        yield record


def _read_stored(store: FileDestination, keys: list[str]) -> Iterator[tuple[bytes, ItemRecord]]:
    """``(bytes, record)`` of the records at ``keys`` that exist and parse."""
    for data in _get_many(store, keys):
        record = _parse_record(data)
        if record is not None:
            yield data, record


def _get_many(store: FileDestination, keys: list[str]) -> Iterator[bytes]:
    """The objects at ``keys`` that exist, a thousand at a time (a store with latency reads each
    thousand many at once: :meth:`FileDestination.get_many`)."""
    chunk = 1000
    for start in range(0, len(keys), chunk):
        yield from store.get_many(keys[start : start + chunk]).values()


def records_of(store: FileDestination, paths: Iterable[str]) -> dict[str, ItemRecord]:
    """The stored records of these items (path → record; items without one are left out),
    read together: what a batch reads before its items are burned. With a snapshot attached
    (:func:`attach_snapshot`), a record the snapshot holds as stored costs no read."""
    keys = {record_key(path): path for path in paths}
    found = {}
    for key, data in store.get_many(list(keys), store.snapshot).items():
        record = _parse_record(data)
        if record is not None and record.path == keys[key]:
            found[keys[key]] = record
    return found


def is_migrated(store: FileDestination) -> bool:
    return (store.get(LAYOUT_KEY) or b"").strip() == LAYOUT.encode()


class SnapshotRecords:
    """The lines of a local copy of ``manifest.jsonl``, by record key and content tag: a line
    whose tag (:meth:`FileDestination.content_tag`) is the listed tag of the item's record *is*
    that record, byte for byte (a record is stored as its manifest line). Call it as
    ``known(key, tag)`` (:meth:`FileDestination.get_many`), from any thread (positional
    reads). Memory: about 200 bytes a line."""

    def __init__(self, store: FileDestination, lines: Path) -> None:
        self._file = open(lines, "rb")  # noqa: SIM115 - closed by close()
        self._index: dict[str, tuple[str, int, int]] = {}
        offset = 0
        for line in self._file:
            tag = store.content_tag(line)
            path = _line_path(line)
            if tag is not None and path is not None:
                self._index[record_key(path)] = (tag, offset, len(line))
            offset += len(line)

    def __len__(self) -> int:
        return len(self._index)

    def __call__(self, key: str, tag: str) -> bytes | None:
        entry = self._index.get(key)
        if entry is None or entry[0] != tag:
            return None
        return os.pread(self._file.fileno(), entry[2], entry[1])

    def close(self) -> None:
        self._file.close()


@contextlib.contextmanager
def attach_snapshot(store: FileDestination, scratch: Path, items: int) -> Iterator[int]:
    """For the ``with`` block, let :func:`records_of` on ``store`` take records from the last
    snapshot (``manifest.jsonl``, copied under ``scratch``; ``store.snapshot``) instead of
    reading each (the run's batches use the same ``store`` object: one per URI and process): a
    run of ``items`` items into a store that tags by content (S3) then reads only the records
    written since. Skipped (yields 0) when the store does not tag by content, has no snapshot,
    or the snapshot is much bigger than what the run would read (more than 4 KB per item)."""
    if store.content_tag(b"") is None:
        yield 0
        return
    sizes = [e.size for e in store.entries(MANIFEST_KEY) if e.key == MANIFEST_KEY]
    copy = scratch / "snapshot-records.jsonl"
    if not sizes or sizes[0] > SNAPSHOT_BYTES_PER_ITEM * items:
        yield 0
        return
    if not store.read_file(MANIFEST_KEY, copy):
        yield 0
        return
    snapshot = SnapshotRecords(store, copy)
    store.snapshot = snapshot
    try:
        yield len(snapshot)
    finally:
        store.snapshot = None
        snapshot.close()
        copy.unlink(missing_ok=True)


SNAPSHOT_BYTES_PER_ITEM = 4096


def _line_path(line: bytes) -> str | None:
    record = _parse_record(line)
    return record.path if record is not None else None


def current_records(
    store: FileDestination, scratch: Path, known: Iterable[Path] = ()
) -> RecordSpool:
    """Every item's current record, in a spool (on disk under ``scratch``) sorted on output.

    Costs a listing of the records, one read of ``manifest.jsonl`` and a read of each record
    the snapshot does not hold as stored: on a store whose tags follow from the bytes
    (:meth:`FileDestination.content_tag`, S3), a snapshot line whose tag is the listed record's
    is that record, so only records written since the last snapshot are read. A destination not
    yet migrated (see :func:`migrate`) also counts the snapshot's records of items that have no
    record of their own. ``known`` are local files of manifest lines already at hand (the
    records a run just stored), used the same way before the snapshot.
    """
    spool = RecordSpool(scratch)
    listed = {entry.key: entry.tag for entry in _record_entries(store)}
    migrated = is_migrated(store)
    snapshot = scratch / "previous-manifest.jsonl"
    taken: set[str] = set()
    reuses_lines = store.content_tag(b"") is not None
    for lines in known if reuses_lines else ():
        taken |= _take_snapshot_lines(store, lines, listed, spool, taken)
    if (reuses_lines or not migrated) and store.read_file(MANIFEST_KEY, snapshot):
        taken |= _take_snapshot_lines(store, snapshot, listed, spool, taken)
    for data, record in _read_stored(store, [key for key in listed if key not in taken]):
        spool.add(record, data)
    if not migrated and snapshot.exists():
        for _, _, record in iter_manifest(snapshot):
            if record.path not in spool:
                spool.add(record)
    snapshot.unlink(missing_ok=True)
    return spool


def _take_snapshot_lines(
    store: FileDestination,
    lines: Path,
    listed: Mapping[str, str],
    spool: RecordSpool,
    already: set[str],
) -> set[str]:
    """Add to ``spool`` the manifest lines that are their item's stored record (the listing
    shows the tag those bytes get), but for records ``already`` taken; return the keys taken."""
    taken = set()
    for _, line, record in iter_manifest(lines):
        key = record_key(record.path)
        tag = listed.get(key)
        if key in already or key in taken or tag is None:
            continue
        stored = line.rstrip(b"\n") + b"\n"
        if tag == store.content_tag(stored):
            spool.add(record, stored)
            taken.add(key)
    return taken


def migrate(store: FileDestination, scratch: Path) -> int:
    """Give every item of a destination written by an earlier polyburn (``manifest.jsonl``
    only) a record of its own, without replacing a record a concurrent run wrote; returns how
    many were created. Idempotent: a killed migration is finished by the next run."""
    if is_migrated(store):
        return 0
    created = 0
    legacy = scratch / "legacy-manifest.jsonl"
    if store.read_file(MANIFEST_KEY, legacy):
        for _, line, record in iter_manifest(legacy):
            line = line if line.endswith(b"\n") else line + b"\n"
            created += store.create(record_key(record.path), line) is not None
        legacy.unlink()
    store.put(LAYOUT_KEY, f"{LAYOUT}\n".encode(), "text/plain", {})
    return created


def write_snapshot(
    store: FileDestination,
    scratch: Path,
    before: Callable[[RecordSpool], object] | None = None,
    known: Iterable[Path] = (),
) -> RecordSpool:
    """Write ``manifest.jsonl`` from the current records (atomically: readers see the old file
    or the new one) and return the spool it was written from (for its counts). ``before`` is
    called with that spool first (the other dataset files: the manifest stays the last one).
    ``known``: files of manifest lines at hand, as for :func:`current_records`."""
    spool = current_records(store, scratch, known)
    if before is not None:
        before(spool)
    target = scratch / "snapshot.jsonl"
    spool.write_manifest(target)
    store.write_file(MANIFEST_KEY, target)
    target.unlink()
    return spool


__all__ = [
    "BatchClaim",
    "ClaimCheck",
    "ItemBusyError",
    "ItemLease",
    "create_record",
    "current_records",
    "destination_clock",
    "abandon_claimed_item",
    "batch_claim",
    "find_records",
    "finish_claimed_item",
    "forget_items",
    "item_lease",
    "lease_is_stale",
    "migrate",
    "read_record",
    "read_records",
    "record_key",
    "settle_label_map",
    "stale_record_keys",
    "survey_claims",
    "unfinished_items",
    "write_record",
    "write_snapshot",
]
