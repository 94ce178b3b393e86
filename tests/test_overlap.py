"""Runs that overlap on one destination: per-item records, item leases, the label map's
compare-and-swap, the current view (`polyburn manifest`), and crashes in the middle of all that.

Folder and S3 (the session's SeaweedFS) destinations alike; the runs are real `polyburn run`
processes on the session's Prefect API, or the flow called in this process.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flows.polygons_to_masks import polygons_to_masks_params
from polyburn import state
from polyburn.batching import batches_of
from polyburn.destinations import open_destination
from polyburn.destinations.local import LocalDestination
from polyburn.params import MaskOptions, RunParameters
from polyburn.sources import open_source
from polyburn.state import (
    CLAIMS,
    LEASES,
    BatchClaim,
    ItemBusyError,
    ItemLease,
    finish_claimed_item,
    item_lease,
    lease_key,
    record_key,
    settle_label_map,
    unfinished_items,
)
from tests.support.generate import write_export
from tests.support.oracle import describe_difference, same_output
from tests.support.s3_fixtures import aws_env, stored_objects

REPO = Path(__file__).resolve().parents[1]
MODES = ["semantic", "instance", "binary"]
ITEMS = 30


# ------------------------------------------------------------------ fixtures and helpers
@pytest.fixture(params=["folder", "s3"])
def dest_uri(request, tmp_path, monkeypatch) -> str:
    """A fresh destination of each kind; for S3 the environment reaches the session's server."""
    if request.param == "folder":
        return str(tmp_path / "dest")
    weed_server = request.getfixturevalue("weed_server")
    bucket = request.getfixturevalue("s3_bucket")
    for name, value in aws_env(weed_server).items():
        monkeypatch.setenv(name, value)
    return f"s3://{bucket}/masks"


def stored(dest_uri: str, request) -> dict[str, bytes]:
    """Every object of the destination: key → bytes."""
    if dest_uri.startswith("s3://"):
        bucket, prefix = dest_uri[5:].split("/", 1)
        return stored_objects(request.getfixturevalue("weed_server"), bucket, prefix)
    root = Path(dest_uri)
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def make_export(root: Path) -> Path:
    return write_export(root, ITEMS, seed=11, width=160, height=120, polygons=6, vertices=12)


def item_paths(export: Path) -> list[str]:
    files = sorted((export / "json").rglob("*.json"))
    return [f.relative_to(export / "json").as_posix()[: -len(".json")] for f in files]


def relabel(export: Path, path: str, label: str) -> None:
    """Give every annotation of the item ``label`` (a label the destination never saw)."""
    file = export / "json" / f"{path}.json"
    item = json.loads(file.read_text())
    for annotation in item["annotations"]:
        annotation["label"] = label
    file.write_text(json.dumps(item))


def cli_env() -> dict[str, str]:
    from prefect.settings import PREFECT_API_URL

    return {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}


def start_cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "polyburn.cli", *args],
        cwd=REPO,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "polyburn.cli", *args],
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )


def run_args(export: Path, dest_uri: str, *extra: str) -> list[str]:
    return ["run", str(export), dest_uri, "--mode", ",".join(MODES), "--no-progress", *extra]


def full_run_here(export: Path, dest_uri: str) -> dict:
    state = polygons_to_masks_params(
        RunParameters(
            source=str(export),
            destination=dest_uri,
            batch_size=10,
            options=MaskOptions(modes=MODES),
        ),
        return_state=True,
    )
    return state.result()


def current_manifest(dest_uri: str) -> list[dict]:
    done = run_cli("manifest", dest_uri)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines()]


def check_records_match_bytes(records: list[dict], objects: dict[str, bytes]) -> None:
    """Every output a record lists is stored with exactly that sha256 and size."""
    for record in records:
        for output in record.get("outputs", []):
            data = objects[output["key"]]
            assert hashlib.sha256(data).hexdigest() == output["sha256"], output["key"]
            assert len(data) == output["bytes"], output["key"]


def semantic_values(objects: dict[str, bytes], path: str) -> set[int]:
    with Image.open(io.BytesIO(objects[f"semantic/{path}.png"])) as image:
        return set(np.unique(np.asarray(image)).tolist())


# ------------------------------------------------------------------ the state store itself
def die_holding(dest_uri: str, kind: str, what: str) -> None:
    """A process that takes ``kind(store, what)`` (an ItemLease or a BatchClaim) at the
    destination and is SIGKILLed while holding it."""
    code = (
        "import os, signal\n"
        "from polyburn.destinations import open_destination\n"
        f"from polyburn.state import {kind}\n"
        f"{kind}(open_destination({dest_uri!r}).state, {what}).acquire()\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    killed = subprocess.run([sys.executable, "-c", code], cwd=REPO, timeout=120)
    assert killed.returncode == -signal.SIGKILL


def check_one_version(destination: LocalDestination, path: str, problems: list[str]) -> None:
    """Under the item's lease: its outputs are whole, one version's, and match its record."""
    from polyburn.state import read_record

    with item_lease(destination.state, path):
        record = read_record(destination.state, path)
        if record is None:
            return
        objects = {o["key"]: (destination.root / o["key"]).read_bytes() for o in record.outputs}
        try:
            check_records_match_bytes([record.to_dict()], objects)
        except AssertionError as exc:
            problems.append(f"record and bytes differ: {exc}")
        ids = semantic_values(objects, path) - {0}
        if len(ids) != 1:
            problems.append(f"a mix of versions: {ids}")


def test_conditional_writes_refuse_what_changed_since_it_was_read(dest_uri):
    store = open_destination(dest_uri).state
    tag = store.create("x/lease.json", b"one")
    assert tag is not None
    assert store.create("x/lease.json", b"two") is None  # already there
    assert store.get_tagged("x/lease.json") == (b"one", tag)
    newer = store.replace("x/lease.json", b"three", tag)
    assert newer is not None and newer != tag
    assert store.replace("x/lease.json", b"four", tag) is None  # stale tag
    assert not store.remove_if("x/lease.json", tag)
    assert store.get("x/lease.json") == b"three"
    assert [e.key for e in store.entries("x/")] == ["x/lease.json"]
    assert store.remove_if("x/lease.json", newer)
    assert store.get_tagged("x/lease.json") is None
    assert store.entries("x/") == []


def test_new_labels_found_at_once_get_one_distinct_id_each(dest_uri):
    """Eight threads each add their own new label (and two shared ones) to one label map."""
    store = open_destination(dest_uri).state
    assert settle_label_map(store, {"car", "road"}) == {"car": 1, "road": 2}
    start = threading.Barrier(8)
    results: dict[int, dict[str, int]] = {}

    def add(k: int) -> None:
        mine = open_destination(dest_uri).state  # its own client/handles, as another run
        start.wait()
        results[k] = settle_label_map(mine, {"car", f"fresh-{k}", "shared-a", "shared-b"})

    threads = [threading.Thread(target=add, args=(k,)) for k in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    final = json.loads(store.get("label_map.json"))
    assert (final["car"], final["road"]) == (1, 2)  # existing ids never change
    assert len(final) == 12 and len(set(final.values())) == 12  # no two labels share an id
    for k, seen in results.items():  # what each run burns with agrees with the final map
        assert all(final[label] == ident for label, ident in seen.items()), k


def test_an_item_lease_is_exclusive_and_a_dead_holders_lease_is_taken_over(dest_uri):
    store = open_destination(dest_uri).state
    holder = ItemLease(store, "a/b")
    holder.acquire()
    waiting = ItemLease(open_destination(dest_uri).state, "a/b")
    with pytest.raises(ItemBusyError):
        waiting.acquire(wait=0.3)
    got_it = threading.Event()

    def wait_for_it() -> None:
        waiting.acquire(wait=30)
        got_it.set()

    thread = threading.Thread(target=wait_for_it)
    thread.start()
    time.sleep(0.3)
    assert not got_it.is_set()  # still held
    holder.release()
    thread.join(timeout=30)
    assert got_it.is_set() and not waiting.taken_over
    waiting.release()
    assert store.entries(LEASES) == []

    # A holder killed while writing: its lease stays, marks the item unfinished, and the next
    # writer takes it over at once (its process is gone), not after the lease expires.
    die_holding(dest_uri, "ItemLease", "'a/b'")
    assert unfinished_items(store) == {"a/b"}
    with item_lease(store, "a/b") as lease:
        assert lease.taken_over
    assert unfinished_items(store) == set() and store.entries(LEASES) == []

    # A write that fails half-way leaves the item unfinished too.
    with pytest.raises(RuntimeError), item_lease(store, "a/c"):
        raise RuntimeError("upload failed")
    assert unfinished_items(store) == {"a/c"}
    assert store.get_tagged(lease_key("a/c")) is not None


def test_a_batch_claim_and_item_leases_exclude_each_other(dest_uri):
    """A batch claim holds each of its items as a lease would: an item lease or another claim
    waits for it; after the wait, a claim takes the items nobody holds and reports the rest
    busy."""
    store = open_destination(dest_uri).state
    claim = BatchClaim(store, ["a/b", "a/c"])
    claim.acquire()
    with pytest.raises(ItemBusyError):
        ItemLease(open_destination(dest_uri).state, "a/b").acquire(wait=0.3)
    other = BatchClaim(open_destination(dest_uri).state, ["a/c", "a/d"])
    other.acquire(wait=0.3)
    assert other.busy == ["a/c"] and other.paths == ["a/d"]
    other.release()
    claim.release()

    lease = ItemLease(store, "a/b")
    lease.acquire(wait=5)  # free now
    assert not lease.taken_over
    blocked = BatchClaim(open_destination(dest_uri).state, ["a/b"])
    blocked.acquire(wait=0.3)
    assert blocked.busy == ["a/b"] and blocked.paths == [] and blocked.tag is None
    lease.release()
    assert store.entries(LEASES) == [] and store.entries(CLAIMS) == []


def test_a_killed_claim_holder_leaves_its_items_unfinished_until_each_is_written(dest_uri):
    """A batch claim whose process was killed marks every item it held unfinished. A writer
    that takes some of them over leaves the others an abandoned lease each (still unfinished)
    and deletes the claim; each item stops being unfinished once it is written again."""
    store = open_destination(dest_uri).state
    die_holding(dest_uri, "BatchClaim", "['k/1', 'k/2', 'k/3']")
    assert unfinished_items(store) == {"k/1", "k/2", "k/3"}

    claim = BatchClaim(store, ["k/1"])
    claim.acquire(wait=5)  # at once: the holder is gone
    assert set(claim.leases) == {"k/1"}  # taken over: its outputs may be a mix
    assert [e.key for e in store.entries(CLAIMS)] == [claim.key]
    finish_claimed_item(store, "k/1", claim.leases["k/1"])
    claim.release()
    assert unfinished_items(store) == {"k/2", "k/3"}

    with item_lease(store, "k/2") as lease:
        assert lease.taken_over
    assert unfinished_items(store) == {"k/3"}
    assert store.entries(CLAIMS) == []


def test_batch_and_item_writers_of_one_item_never_mix_their_outputs(tmp_path):
    """One thread writes an item through batches (a claim), another through item leases, each
    from its own version, for 3 s: whenever a checker holds the item, its outputs are one
    version's, whole, and match its record."""
    from polyburn.parallel import process_items
    from polyburn.pipeline import process_item

    path = "batch000/img_000000"
    versions = []
    for k in range(2):
        export = make_export(tmp_path / f"export-{k}")
        relabel(export, path, f"version-{k}")
        versions.append(open_source(str(export)))
    destination = LocalDestination(tmp_path / "dest")
    label_map = settle_label_map(destination.state, {"version-0", "version-1"})
    options = MaskOptions(modes=MODES)
    (ref0,) = versions[0].find([path])
    (ref1,) = versions[1].find([path])
    stop = time.monotonic() + 3
    problems: list[str] = []
    writes = [0, 0]

    def by_batch() -> None:
        while time.monotonic() < stop:
            (record,) = process_items([ref0], versions[0], destination, options, label_map)
            writes[0] += record.status == "ok"

    def by_item() -> None:
        while time.monotonic() < stop:
            record = process_item(ref1, versions[1], destination, options, label_map)
            writes[1] += record.status == "ok"

    def check() -> None:
        while time.monotonic() < stop:
            check_one_version(destination, path, problems)

    threads = [threading.Thread(target=f) for f in (by_batch, by_item, check)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert problems == []
    assert writes[0] > 0 and writes[1] > 0  # both kinds of writer got the item
    assert unfinished_items(destination.state) == set()
    assert destination.state.entries(CLAIMS) == []


def test_a_lease_held_longer_than_its_expiry_is_renewed_and_a_taken_over_one_is_lost(
    dest_uri, monkeypatch
):
    """A writer busy for several lease lifetimes (a long video) keeps its lease: its stored
    expiry moves ahead, so another host never takes it over. A lease taken over while held
    (this process stalled past the expiry) is marked lost, not silently overwritten."""
    monkeypatch.setenv("POLYBURN_LEASE_SECONDS", "0.6")
    store = open_destination(dest_uri).state
    with item_lease(store, "long/video") as lease:
        time.sleep(2.0)  # over three lease lifetimes
        body = json.loads(store.get_tagged(lease_key("long/video"))[0])
        assert body["owner"] == lease.owner and body["expires"] > time.time()
        assert not state.lease_is_stale(json.dumps(dict(body, host="another-host")).encode())
        assert not lease.lost
    assert store.entries(LEASES) == []

    lease = ItemLease(store, "stolen")
    lease.acquire()
    held = store.get_tagged(lease_key("stolen"))
    assert store.replace(lease_key("stolen"), b'{"owner": "another run"}', held[1]) is not None
    deadline = time.monotonic() + 10
    while not lease.lost and time.monotonic() < deadline:
        time.sleep(0.05)
    assert lease.lost
    lease.release()  # leaves the other run's lease alone
    assert store.get_tagged(lease_key("stolen"))[0] == b'{"owner": "another run"}'


def test_a_writer_whose_lease_was_taken_over_stores_no_record(tmp_path, monkeypatch):
    """The item is taken over while this run loads it (it stalled past the expiry): the run
    stores no record over the new holder's and reports the item busy (retried later)."""
    from polyburn.pipeline import process_item, scan_labels
    from polyburn.sources import open_source

    monkeypatch.setenv("POLYBURN_LEASE_SECONDS", "0.3")
    source = open_source(str(make_export(tmp_path / "export")))
    destination = LocalDestination(tmp_path / "dest")
    (ref,) = source.find(["batch000/img_000000"])
    label_map = settle_label_map(destination.state, scan_labels([ref], source, 10**8))
    load = source.load

    def stalled_load(ref, max_pixels):
        key = lease_key(ref.path)
        held = destination.state.get_tagged(key)
        assert destination.state.replace(key, b'{"owner": "another run"}', held[1])
        time.sleep(1.0)  # the renewal finds the lease gone
        return load(ref, max_pixels)

    monkeypatch.setattr(source, "load", stalled_load)
    record = process_item(ref, source, destination, MaskOptions(modes=MODES), label_map)
    assert record.status == "failed" and record.transient
    assert "took the item over" in record.error
    assert destination.state.get_tagged(record_key(ref.path)) is None
    assert destination.state.get_tagged(lease_key(ref.path))[0] == b'{"owner": "another run"}'


# ------------------------------------------------------------------ real runs, overlapping
@pytest.mark.usefixtures("prefect_api")
def test_one_item_runs_and_a_full_run_at_once_lose_nothing(dest_uri, tmp_path, request):
    """Eight one-item runs (each item relabelled with a label the destination never saw), a
    second run of one of those items, and a full run, all started at once on one destination."""
    export = make_export(tmp_path / "export")
    paths = item_paths(export)
    assert full_run_here(export, dest_uri)["ok"] == ITEMS
    before = json.loads(stored(dest_uri, request)["label_map.json"])
    edited = paths[3:27:3]
    for k, path in enumerate(edited):
        relabel(export, path, f"fresh-{k}")

    runs = [start_cli(*run_args(export, dest_uri, "--item", path)) for path in edited]
    runs.append(start_cli(*run_args(export, dest_uri, "--item", edited[0])))
    runs.append(start_cli(*run_args(export, dest_uri)))
    for run in runs:
        out, err = run.communicate(timeout=600)
        assert run.returncode == 0, err[-3000:]

    records = current_manifest(dest_uri)
    assert [r["path"] for r in records] == paths  # every item once, sorted by path
    assert all(r["status"] == "ok" for r in records)
    objects = stored(dest_uri, request)
    check_records_match_bytes(records, objects)
    label_map = json.loads(objects["label_map.json"])
    assert {k: label_map[k] for k in before} == before  # existing ids never change
    fresh = {label_map[f"fresh-{k}"] for k in range(len(edited))}
    assert len(fresh) == 8 and not fresh & set(before.values())
    for k, path in enumerate(edited):
        assert semantic_values(objects, path) == {0, label_map[f"fresh-{k}"]}, path
    assert not [key for key in objects if key.startswith(LEASES)]


@pytest.mark.usefixtures("prefect_api")
def test_two_writers_of_one_item_never_mix_their_outputs(tmp_path):
    """Two threads write one item over and over for 3 s, each from its own version of the item:
    at every moment no one holds the lease, the stored outputs are one version's, whole."""
    from polyburn.pipeline import process_item
    from polyburn.sources import open_source

    versions = []
    for k in range(2):
        export = make_export(tmp_path / f"export-{k}")
        relabel(export, "batch000/img_000000", f"version-{k}")
        versions.append(open_source(str(export)))
    destination = LocalDestination(tmp_path / "dest")
    label_map = settle_label_map(destination.state, {"version-0", "version-1"})
    options = MaskOptions(modes=MODES)
    (ref0,) = versions[0].find(["batch000/img_000000"])
    (ref1,) = versions[1].find(["batch000/img_000000"])
    stop = time.monotonic() + 3
    problems: list[str] = []

    def write(source, ref) -> None:
        while time.monotonic() < stop:
            record = process_item(ref, source, destination, options, label_map)
            if record.status != "ok":
                problems.append(record.error)

    def check() -> None:
        while time.monotonic() < stop:
            check_one_version(destination, "batch000/img_000000", problems)

    threads = [
        threading.Thread(target=write, args=(versions[0], ref0)),
        threading.Thread(target=write, args=(versions[1], ref1)),
        threading.Thread(target=check),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert problems == []
    assert unfinished_items(destination.state) == set()


@pytest.mark.usefixtures("prefect_api")
def test_a_writer_killed_mid_item_is_redone_even_when_its_batch_is_cached(dest_uri, tmp_path):
    """A full run fills the Prefect cache; a writer is then killed half-way through one item
    (its lease held, one mask replaced by other bytes). The same full run again must not take
    that item's batch from the cache."""
    export = make_export(tmp_path / "export")
    path = item_paths(export)[5]
    first = full_run_here(export, dest_uri)
    assert first["ok"] == ITEMS
    destination = open_destination(dest_uri)
    original = destination.get(f"semantic/{path}.png")
    code = (
        "import os, signal\n"
        "from polyburn.destinations import open_destination\n"
        "from polyburn.state import ItemLease\n"
        f"destination = open_destination({dest_uri!r})\n"
        f"ItemLease(destination.state, {path!r}).acquire()\n"
        f"destination.put('semantic/{path}.png', b'half-written', 'image/png', {{}})\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    killed = subprocess.run([sys.executable, "-c", code], cwd=REPO, timeout=120, env=os.environ)
    assert killed.returncode == -signal.SIGKILL
    assert unfinished_items(destination.state) == {path}

    again = full_run_here(export, dest_uri)
    assert again["ok"] == ITEMS
    # the item's batch runs again; the other batches come from the cache
    refs = sorted(open_source(str(export)).list_items(), key=lambda ref: ref.path)
    assert again["cached_batches"] == len(batches_of(refs, 10)) - 1 >= 1
    key = f"semantic/{path}.png"
    assert same_output(key, destination.get(key), original)
    assert unfinished_items(destination.state) == set()
    records = current_manifest(dest_uri)
    objects = {k: destination.get(k) for r in records for k in (o["key"] for o in r["outputs"])}
    check_records_match_bytes(records, objects)


@pytest.mark.usefixtures("prefect_api")
def test_killed_overlapping_runs_then_a_full_run_converge(tmp_path):
    """A full run and a one-item run on one folder, both SIGKILLed half-way; one more full run
    ends with a clean run's masks, records that match them, and no temp file or lease left."""
    export = write_export(tmp_path / "export", 60, seed=5, width=480, height=360, polygons=30)
    paths = item_paths(export)
    clean, dest = tmp_path / "clean", tmp_path / "dest"
    full_run_here(export, str(clean))
    full = start_cli(*run_args(export, str(dest), "--batch-size", "10"))
    one = start_cli(*run_args(export, str(dest), "--item", paths[40]))  # in a later batch
    deadline = time.monotonic() + 300
    while len(list(dest.glob("semantic/**/*.png"))) < 25 and full.poll() is None:
        assert time.monotonic() < deadline, "the full run never got going"
        time.sleep(0.01)
    for run in (full, one):
        run.send_signal(signal.SIGKILL)
        run.communicate()

    summary = full_run_here(export, str(dest))
    assert (summary["items"], summary["failed"]) == (60, 0)
    records = [json.loads(line) for line in (dest / "manifest.jsonl").read_text().splitlines()]
    assert [r["path"] for r in records] == paths
    objects = {
        p.relative_to(dest).as_posix(): p.read_bytes() for p in dest.rglob("*") if p.is_file()
    }
    check_records_match_bytes(records, objects)

    def masks(root: Path) -> dict[str, bytes]:
        return {
            p.relative_to(root).as_posix(): p.read_bytes()
            for p in root.rglob("*")
            if p.is_file() and p.parts[len(root.parts)] in ("semantic", "instance", "binary")
        }

    assert describe_difference(masks(dest), masks(clean)) == ""
    state = dest / ".polyburn"
    leftovers = [p.relative_to(state) for p in state.rglob("*") if p.is_file()]
    assert not [p for p in leftovers if p.parts[0] in ("tmp", "leases")]
    assert not list(dest.rglob("*.part"))


# ------------------------------------------------------------------ cost and upgrade
@pytest.mark.usefixtures("prefect_api")
def test_a_one_item_run_writes_only_that_item(tmp_path):
    export = make_export(tmp_path / "export")
    dest = tmp_path / "dest"
    full_run_here(export, str(dest))
    path = item_paths(export)[7]
    relabel(export, path, "car")  # a known label: the label map stays as it is

    def stamps() -> dict[str, int]:
        return {
            p.relative_to(dest).as_posix(): p.stat().st_mtime_ns
            for p in dest.rglob("*")
            if p.is_file()
        }

    before = stamps()
    done = run_cli(*run_args(export, str(dest), "--item", path, "--json"))
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)
    assert (summary["items"], summary["ok"]) == (1, 1)
    after = stamps()
    changed = {k for k in after if before.get(k) != after[k]}
    assert changed - {record_key(path)} <= {
        o["key"] for r in current_manifest(str(dest)) if r["path"] == path for o in r["outputs"]
    }
    assert record_key(path) in changed
    others = ("person", "road", "building", "tree")  # no longer in the item: masks removed
    assert before.keys() - after.keys() <= {f"binary/{label}/{path}.png" for label in others}


@pytest.mark.usefixtures("prefect_api")
def test_a_destination_of_the_previous_layout_upgrades_in_place(dest_uri, tmp_path, request):
    """A destination with only `manifest.jsonl` (what earlier versions wrote): `polyburn
    manifest` reads it as it is, and the next run gives every item a record of its own."""
    export = make_export(tmp_path / "export")
    paths = item_paths(export)
    full_run_here(export, dest_uri)
    destination = open_destination(dest_uri)
    legacy = destination.get("manifest.jsonl")
    state_keys = [
        e.key for e in destination.state.entries(".polyburn/") if "destination-id" not in e.key
    ]
    destination.remove(state_keys)  # back to the previous layout: no records, no layout mark
    assert current_manifest(dest_uri) == [json.loads(line) for line in legacy.splitlines()]

    relabel(export, paths[2], "car")
    done = run_cli(*run_args(export, dest_uri, "--item", paths[2]))
    assert done.returncode == 0, done.stderr[-3000:]
    records = current_manifest(dest_uri)
    assert [r["path"] for r in records] == paths
    old = {json.loads(line)["path"]: json.loads(line) for line in legacy.splitlines()}
    assert [r for r in records if r["path"] != paths[2]] == [old[p] for p in paths if p != paths[2]]
    objects = stored(dest_uri, request)
    car = json.loads(objects["label_map.json"])["car"]
    assert semantic_values(objects, paths[2]) == {0, car}
    check_records_match_bytes(records, objects)
    keys = {e.key for e in destination.state.entries(".polyburn/records/")}
    assert keys == {record_key(p) for p in paths}
