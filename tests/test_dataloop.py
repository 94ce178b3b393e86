"""``dataloop://`` end to end: the REAL dtlpy client against the session's fake gate.

Covers issue #3: keyset-paged listing of a few hundred items, a Dataloop → folder run that is
pixel-identical to the same items exported to disk and run through the local source, write-back
that replaces instead of duplicating (and is never read back), faults that heal within the retry
budget, a fault that does not (only its items fail), partial uploads, throttling through a Prefect
limit, and a bad API key (one line, no traceback, no secret anywhere).

Uses the session ``fake_gate`` and ``prefect_api`` fixtures only; each test makes its own dataset.
Retries sleep at most a few tens of milliseconds (``POLYBURN_DATALOOP_BACKOFF_*``).
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import logging
import os
import random
import re
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from polyburn import dataloop_api as api
from polyburn.batching import batches_of
from polyburn.destinations.dataloop import DataloopDestination
from polyburn.destinations.local import LocalDestination
from polyburn.encode import decode_mask
from polyburn.errors import ConfigError, TransientError
from polyburn.manifest import output_keys
from polyburn.params import MaskOptions
from polyburn.pipeline import process_item, write_label_map
from polyburn.sources.dataloop import DataloopSource, parse_colour
from tests.support.fake_gate import FakeGate, make_fake_jwt
from tests.support.oracle import rasterio_oracle, raw_rings
from tests.support.settings import SettingsMonkeyPatch

QUERY = r"/datasets/[0-9a-f]{24}/query$"
ONTOLOGY = [
    {"tag": "car", "color": "#ff0000", "children": [{"tag": "sedan", "color": "#00aa00"}]},
    {"tag": "road", "color": "#808080"},
    {"tag": "truck", "color": "rgb(0, 0, 255)"},  # declared, never used: still in the label map
]
ALL_MODES = ["semantic", "instance", "binary"]


# ------------------------------------------------------------------------------------ setup
@pytest.fixture(scope="module", autouse=True)
def dataloop_env(fake_gate: FakeGate, fake_gate_token: str, tmp_path_factory):
    """Point polyburn at the fake gate with the session's token; tiny backoff; private state."""
    mp = SettingsMonkeyPatch()
    mp.setenv("DATALOOP_GATE_URL", fake_gate.api_url)
    mp.setenv("DATALOOP_API_KEY", fake_gate_token)
    mp.delenv("DATALOOP_API_KEY_BLOCK", raising=False)
    mp.setenv("POLYBURN_DATALOOP_BACKOFF_BASE", "0.005")
    mp.setenv("POLYBURN_DATALOOP_BACKOFF_MAX", "0.03")
    mp.setenv("POLYBURN_DATALOOP_ATTEMPTS", "5")
    mp.setenv("POLYBURN_DATALOOP_PAGE_SIZE", "50")
    mp.setenv("POLYBURN_DATALOOP_LIMIT", "")  # throttling is tested on its own
    mp.setenv("POLYBURN_STATE_DIR", str(tmp_path_factory.mktemp("dataloop-state")))
    api.reset_session()
    _restart_burn_workers()
    yield
    mp.undo()
    api.reset_session()
    _restart_burn_workers()


def _restart_burn_workers() -> None:
    """The burn pool's worker processes keep the environment they were spawned with: drop a
    pool started by an earlier test so the next one sees this module's settings."""
    from polyburn import parallel

    pool = getattr(parallel, "_pool", None)
    if pool is not None and hasattr(parallel, "_discard_pool"):
        parallel._discard_pool(pool)


@pytest.fixture(autouse=True)
def _no_faults_left(fake_gate: FakeGate):
    yield
    fake_gate.clear_faults()


def square(x0: float, y0: float, x1: float, y1: float) -> list[tuple[float, float]]:
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


def png_uri(mask: np.ndarray, rgb=(0, 200, 0)) -> str:
    rgba = np.zeros((*mask.shape, 4), np.uint8)
    rgba[mask] = (*rgb, 255)
    buffer = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def decode_png(uri: str) -> tuple[np.ndarray, tuple[int, int, int] | None]:
    """(alpha > 127 mask, RGB of the first set pixel), as dtlpy decodes a binary annotation."""
    data = base64.b64decode(uri.split(",", 1)[1])
    rgba = np.asarray(Image.open(io.BytesIO(data)).convert("RGBA"))
    mask = rgba[:, :, 3] > 127
    rgb = tuple(int(c) for c in rgba[mask][0][:3]) if mask.any() else None
    return mask, rgb


def build_dataset(gate: FakeGate, name: str, n: int, seed: int = 0) -> tuple[str, list[dict]]:
    """``n`` 24x16 items over three folders. Every 10th has no pixel annotation (a box only);
    the others have a ``car`` polygon WITH A HOLE, a ``road`` polygon, sometimes a ``car.sedan``
    polygon, a human ``road`` binary mask and a ``class``."""
    ds = gate.add_dataset(name, labels=ONTOLOGY)
    rng = random.Random(seed)
    items = []
    for i in range(n):
        w, h = 24, 16
        if i % 10 == 9:
            anns = [{"type": "box", "label": "road", "coordinates": [(0, 0), (3, 3)]}]
        else:
            x0, y0 = rng.uniform(0, 6), rng.uniform(0, 4)
            anns = [
                {
                    "type": "segment",
                    "label": "car",
                    "coordinates": [
                        square(x0, y0, x0 + 14.3, y0 + 9.7),
                        square(x0 + 4.2, y0 + 2.6, x0 + 9.1, y0 + 6.4),  # the hole
                    ],
                    "metadata": {"system": {"objectId": str(i % 4 + 1)}},
                },
                {
                    "type": "segment",
                    "label": "road",
                    "coordinates": [[(0, h), (w, h - 5.5), (w, h)]],
                },
            ]
            if i % 3 == 0:
                sx, sy = rng.uniform(10, 16), rng.uniform(0, 6)
                anns.append(
                    {
                        "type": "segment",
                        "label": "car.sedan",
                        "coordinates": [square(sx, sy, sx + 6, sy + 5)],
                    }
                )
            if i % 4 == 0:
                mask = np.zeros((h, w), bool)
                mask[1:4, 18:23] = True
                anns.append({"type": "binary", "label": "road", "coordinates": png_uri(mask)})
            if i % 5 == 0:
                anns.append({"type": "class", "label": "road"})
        items.append(gate.add_item(ds, f"/folder{i % 3}/img_{i:03d}.jpg", w, h, anns))
    return ds, items


def run_flow(source: str, dest: str, **kwargs):
    from flows.polygons_to_masks import polygons_to_masks_params
    from polyburn.params import RunParameters

    options = MaskOptions(**kwargs.pop("options", {"modes": ["semantic"]}))
    state = polygons_to_masks_params(
        RunParameters(source=source, destination=dest, options=options, **kwargs),
        return_state=True,
    )
    return state, state.result(raise_on_failure=False)


def ours(gate: FakeGate, item_id: str) -> list[dict]:
    return [a for a in gate.annotations_of(item_id) if "polyburn" in a["metadata"].get("user", {})]


def theirs(gate: FakeGate, item_id: str) -> list[dict]:
    return [
        a for a in gate.annotations_of(item_id) if "polyburn" not in a["metadata"].get("user", {})
    ]


def pixel_items(items: list[dict]) -> list[dict]:
    return [it for k, it in enumerate(items) if k % 10 != 9]


@pytest.fixture(scope="module")
def big_dataset(fake_gate: FakeGate) -> tuple[str, list[dict]]:
    return build_dataset(fake_gate, "big", 200, seed=1)


# ------------------------------------------------------------------------------------ source
def test_listing_streams_keyset_pages_with_the_pixel_join(fake_gate, big_dataset):
    ds, items = big_dataset
    wanted = [it["id"] for it in pixel_items(items)]
    source = DataloopSource.from_uri(f"dataloop://{ds}")
    fake_gate.clear_requests()

    refs = source.list_items()
    first = next(refs)
    assert len(fake_gate.requests_to(QUERY)) == 1  # one page asked for, not the whole dataset
    listed = [first, *refs]
    assert [r.item_id for r in listed] == sorted(wanted) and len(wanted) == 180
    assert listed[0].path == "folder0/img_000" and listed[0].locator == listed[0].item_id

    bodies = [r.body for r in fake_gate.requests_to(QUERY)]
    assert len(bodies) == 4  # 180 items, 50 a page; page 0 asked once (dtlpy asks it twice)
    cursors = []
    for body in bodies:
        assert body["resource"] == "items" and body["page"] == 0 and body["pageSize"] == 50
        assert body["sort"] == {"id": "ascending"}
        assert body["join"]["filter"] == {"$and": [{"type": {"$in": ["segment", "binary"]}}]}
        assert {"hidden": False} in body["filter"]["$and"]
        cursors.append([c["id"]["$gt"] for c in body["filter"]["$and"] if "id" in c])
    assert cursors == [[], [listed[49].item_id], [listed[99].item_id], [listed[149].item_id]]


def test_load_keeps_holes_and_labels_come_from_the_ontology(fake_gate, big_dataset):
    ds, items = big_dataset
    source = DataloopSource.from_uri(f"dataloop://{ds}")
    ref = next(source.list_items())
    item = source.load(ref, 10**8)
    car = next(a for a in item.annotations if a.label == "car")
    assert len(car.rings) == 2 and car.object_id == 1  # dtlpy's entity would keep ring 0 only
    assert [a.type for a in item.annotations].count("binary") == 1
    assert (item.width, item.height) == (24, 16)

    assert source.labels() == {
        "car": (255, 0, 0),
        "car.sedan": (0, 170, 0),
        "road": (128, 128, 128),
        "truck": (0, 0, 255),
    }
    assert parse_colour("#0f0") == (0, 255, 0)
    assert parse_colour("__import__('os').system('touch /tmp/pwned')") == (255, 255, 255)
    assert parse_colour("rgb(__import__('os'), 1, 2)") == (255, 255, 255)


def test_a_rejected_query_is_an_error_never_zero_items(fake_gate, big_dataset):
    ds, _ = big_dataset
    bad = DataloopSource.from_uri(f"dataloop://{ds}", item_filter='{"dir": {"$regexx": "a"}}')
    with pytest.raises(
        api.DataloopError, match=r"HTTP 400.*Bad query: unknown operator '\$regexx'"
    ):
        list(bad.list_items())
    with pytest.raises(api.DataloopError, match="HTTP 400"):
        bad.check()

    good = DataloopSource.from_uri(f"dataloop://{ds}", item_filter='{"dir": "/folder1"}')
    fake_gate.inject(QUERY, "http400", times=1, message="filter too complex")
    with pytest.raises(api.DataloopError, match="filter too complex") as err:
        list(good.list_items())
    assert err.value.status == 400
    assert len(list(good.list_items())) == 60  # the same query, unfaulted: folder1 only

    with pytest.raises(ConfigError, match="not valid JSON"):
        DataloopSource.from_uri(f"dataloop://{ds}", item_filter="{dir: /a}")
    with pytest.raises(ConfigError, match="not found"):
        DataloopSource.from_uri("dataloop://" + "f" * 24)


def test_transient_faults_heal_inside_the_budget(fake_gate, big_dataset, monkeypatch, caplog):
    ds, items = big_dataset
    item_id = items[0]["id"]
    route = rf"/items/{item_id}$"
    source = DataloopSource.from_uri(f"dataloop://{ds}")

    faults = [  # 4 failures, then success: inside a budget of 5 attempts
        fake_gate.inject(route, "http429", times=1),  # no Retry-After: dtlpy alone gives up
        fake_gate.inject(route, "http500", times=1),  # dtlpy alone never retries a 500
        fake_gate.inject(route, "reset", times=1),
        fake_gate.inject(route, "stall", times=1, seconds=0.3, then="close"),
    ]
    bare = dataclasses.replace(next(source.list_items()), data="")  # nothing from the listing
    assert source.load(bare, 10**8).item_id == item_id
    assert [f.hits for f in faults] == [1, 1, 1, 1]
    statuses = [r.status for r in fake_gate.requests_to(route)][-5:]
    assert statuses == [429, 500, None, None, 200]

    # a stall longer than the read timeout is a timeout, retried
    monkeypatch.setenv("POLYBURN_DATALOOP_TIMEOUT", "0.4")
    fake_gate.inject(route, "stall", times=1, seconds=1.0)
    assert api.request("GET", f"/items/{item_id}", what="get item")["id"] == item_id

    # Retry-After is honoured: the pause is the server's 1 s (not the test's ~0.03 s backoff,
    # nor more), and it is slept
    fake_gate.inject(route, "http429", times=1, retry_after=1)
    caplog.clear()
    t0 = time.monotonic()
    with caplog.at_level(logging.INFO, logger="polyburn.dataloop"):
        assert api.request("GET", f"/items/{item_id}", what="get item")["id"] == item_id
    assert time.monotonic() - t0 >= 1.0
    (retry,) = [r.getMessage() for r in caplog.records if "; retry " in r.getMessage()]
    assert "HTTP 429" in retry and retry.endswith("retry 1/4 in 1.00 s")

    # the budget is bounded: a persistent 503 gives a TransientError naming the call
    fake_gate.inject(route, "http503", times=None, message="gate overloaded")
    with pytest.raises(TransientError, match=r"get item: gave up after 5 attempts.*HTTP 503"):
        api.request("GET", f"/items/{item_id}", what="get item")
    fake_gate.clear_faults()
    fake_gate.inject(route, "http403", times=None, message="no access to item")
    with pytest.raises(api.DataloopError, match="HTTP 403.*no access to item"):
        api.request("GET", f"/items/{item_id}", what="get item")
    assert fake_gate.requests_to(route)[-2].status != 403  # 4xx: one attempt, no retry


# ------------------------------------------------------------------------------------ flows
@pytest.mark.usefixtures("prefect_api")
def test_run_to_a_folder_is_pixel_identical_to_the_exported_items(
    fake_gate, big_dataset, dtlpy_client, tmp_path
):
    ds, items = big_dataset
    dl_masks, local_masks, export = tmp_path / "from-dataloop", tmp_path / "from-export", tmp_path
    state, summary = run_flow(f"dataloop://{ds}", str(dl_masks), options={"modes": ALL_MODES})
    assert state.is_completed() and summary["failed"] == 0 and summary["items"] == 180
    label_map = json.loads((dl_masks / "label_map.json").read_text())
    assert label_map == {"car": 1, "car.sedan": 2, "road": 3, "truck": 4}  # from the ontology

    # the same items through the SDK's own export and the local source
    join = dtlpy_client.Filters()
    join.add_join(field="type", values={"$in": ["segment", "binary"]})
    dtlpy_client.datasets.get(dataset_id=ds).download_annotations(
        local_path=str(export / "export"), filters=join
    )
    _, local = run_flow(
        str(export / "export"),
        str(local_masks),
        labels=str(dl_masks / "label_map.json"),
        options={"modes": ALL_MODES},
    )
    assert local["items"] == 180 and local["failed"] == 0

    compared = 0
    for file in sorted(dl_masks.rglob("*.png")):
        rel = file.relative_to(dl_masks)
        got = decode_mask(file.read_bytes(), "png")
        want = decode_mask((local_masks / rel).read_bytes(), "png")
        assert np.array_equal(got, want), rel
        compared += 1
    assert compared == len(list(local_masks.rglob("*.png"))) > 3 * 180

    # holes survive: the binary car mask is rasterio's fill of both rings
    item = items[0]
    car = next(a for a in fake_gate.annotations_of(item["id"]) if a["label"] == "car")
    got = decode_mask((dl_masks / "binary/car/folder0/img_000.png").read_bytes(), "png")
    assert np.array_equal(got.astype(bool), rasterio_oracle(raw_rings(car), 16, 24))
    assert got.sum() < rasterio_oracle(raw_rings(car)[:1], 16, 24).sum()  # the hole is empty


@pytest.mark.usefixtures("prefect_api")
def test_write_back_replaces_instead_of_duplicating(fake_gate, tmp_path, caplog):
    ds, items = build_dataset(fake_gate, "write-back", 12, seed=2)
    wanted = pixel_items(items)
    human_before = {it["id"]: theirs(fake_gate, it["id"]) for it in items}
    options = {"modes": ["semantic", "instance"]}

    state, first = run_flow(f"dataloop://{ds}", "dataloop://", options=options)
    assert state.is_completed() and first["failed"] == 0 and first["items"] == 11
    assert first["outputs_written"] > 0

    # masks as the local destination burns them, from the same items and label map
    source = DataloopSource.from_uri(f"dataloop://{ds}")
    destination = DataloopDestination.from_uri(f"dataloop://{ds}")
    label_map = json.loads(destination.read_text("label_map.json"))
    local = LocalDestination(tmp_path / "local")
    colours = source.labels()
    for ref in source.list_items():
        record = process_item(ref, source, local, MaskOptions(**options), label_map, colours)
        assert record.status == "ok"
        semantic = decode_mask((tmp_path / f"local/semantic/{ref.path}.png").read_bytes(), "png")
        instance = decode_mask((tmp_path / f"local/instance/{ref.path}.png").read_bytes(), "png")
        written = ours(fake_gate, ref.item_id)
        marks = [a["metadata"]["user"]["polyburn"] for a in written]
        assert all(m["tool"] == "polyburn" and m["version"] and m["run"] for m in marks)
        for annotation, mark in zip(written, marks, strict=True):
            mask, rgb = decode_png(annotation["coordinates"])
            assert annotation["type"] == "binary"
            if mark["mode"] == "semantic":
                assert np.array_equal(mask, semantic == label_map[annotation["label"]])
                assert rgb == colours[annotation["label"]]
            else:
                k = int(annotation["metadata"]["system"]["objectId"])
                assert np.array_equal(mask, instance == k)
        assert sum(m["mode"] == "semantic" for m in marks) == len(np.unique(semantic)) - 1
        assert sum(m["mode"] == "instance" for m in marks) == len(np.unique(instance)) - 1
    for item in items:  # human annotations are untouched
        assert theirs(fake_gate, item["id"]) == human_before[item["id"]]
    assert not ours(fake_gate, items[9]["id"])  # an item without polygons gets nothing

    ids_before = {it["id"]: sorted(a["id"] for a in ours(fake_gate, it["id"])) for it in wanted}
    fake_gate.clear_requests()
    _, second = run_flow(f"dataloop://{ds}", "dataloop://", options=options)
    assert second["failed"] == 0 and second["outputs_written"] == 0
    # polyburn's own annotations were listed but never read back as input
    assert second["skipped_by_type"].get("binary (written by polyburn)", 0) == sum(
        map(len, ids_before.values())
    )
    assert second["annotations"] == first["annotations"]
    assert not fake_gate.requests_to(r"/annotations(/[0-9a-f]+)?$", "POST")
    assert not fake_gate.requests_to(r"/annotations/", "DELETE")
    ids_after = {it["id"]: sorted(a["id"] for a in ours(fake_gate, it["id"])) for it in wanted}
    assert ids_after == ids_before

    # a human edits one polygon: only that item's masks are replaced, nothing is duplicated
    edited = wanted[1]["id"]
    polygon = next(a for a in theirs(fake_gate, edited) if a["label"] == "road")
    fake_gate.annotations[polygon["id"]]["coordinates"] = [
        [{"x": 0, "y": 16}, {"x": 24, "y": 2.5}, {"x": 24, "y": 16}]
    ]
    fake_gate.update_item(edited)
    _, third = run_flow(f"dataloop://{ds}", "dataloop://", options=options)
    assert third["failed"] == 0 and third["outputs_written"] >= 1
    ids_third = {it["id"]: sorted(a["id"] for a in ours(fake_gate, it["id"])) for it in wanted}
    assert {k for k, v in ids_third.items() if v != ids_before[k]} == {edited}
    assert len(ids_third[edited]) == len(ids_before[edited])
    replaced = set(ids_third[edited]) - set(ids_before[edited])
    assert len(replaced) == third["outputs_written"]


@pytest.mark.usefixtures("prefect_api")
def test_faults_during_a_write_back_run_heal(fake_gate):
    ds, items = build_dataset(fake_gate, "healing", 20, seed=3)
    fake_gate.clear_requests()  # the gate serves the whole session: count this test's only
    uploads = r"/items/[0-9a-f]{24}/annotations$"
    faults = [
        fake_gate.inject(QUERY, "http429", times=2),  # the listing: 4 failures, then served
        fake_gate.inject(QUERY, "http503", times=2),
        fake_gate.inject(QUERY, "http500", times=3, after=1),  # a bulk annotation query
        fake_gate.inject(r"/ontologies/", "reset", times=1),
        fake_gate.inject(uploads, "lost_response", times=2, method="POST"),  # stored, reply lost
        fake_gate.inject(uploads, "http502", times=2, method="POST"),
    ]
    state, summary = run_flow(f"dataloop://{ds}", "dataloop://", options={"modes": ["instance"]})
    assert state.is_completed() and summary["failed"] == 0, summary["failures"]
    assert [f.hits for f in faults] == [2, 2, 3, 1, 2, 2]
    assert not fake_gate.requests_to(r"/items/[0-9a-f]{24}$", "GET")  # the listing had them
    for item in pixel_items(items):  # a lost reply never duplicated an upload
        keys = [a["metadata"]["user"]["polyburn"]["key"] for a in ours(fake_gate, item["id"])]
        assert len(keys) == len(set(keys)) > 0


@pytest.mark.usefixtures("prefect_api")
def test_a_fault_that_does_not_heal_fails_only_its_items(fake_gate, tmp_path):
    ds, items = build_dataset(fake_gate, "broken", 8, seed=4)
    unwritable = items[5]["id"]
    # the run's batches (polyburn.batching, in listing order); each is one bulk read: every
    # annotation query naming the unreadable item fails, so its whole batch fails
    refs = list(DataloopSource.from_uri(f"dataloop://{ds}").list_items())
    (batch, *_) = [
        b for b in batches_of(refs, 3) if len(b) >= 2 and unwritable not in {r.item_id for r in b}
    ]
    unreadable, page = batch[-1].item_id, [ref.path for ref in batch]
    fake_gate.inject(QUERY, "http500", times=None, message="disk on fire", body=unreadable)
    fake_gate.inject(rf"/items/{unwritable}/annotations$", "reset", times=None, method="POST")
    state, summary = run_flow(
        f"dataloop://{ds}", "dataloop://", options={"modes": ["semantic"]}, batch_size=3
    )
    assert state.is_completed()
    failed = len(page) + 1
    assert summary["items"] == 8 and summary["failed"] == failed and summary["ok"] == 8 - failed
    errors = {f["path"]: f["error"] for f in summary["failures"]}
    assert sorted(errors) == sorted([*page, "folder2/img_005"])
    for path in page:
        assert errors[path].startswith(f"{path}: reading the annotations of {len(page)} items ")
        assert "gave up after 5 attempts" in errors[path]
        assert errors[path].endswith("HTTP 500: disk on fire")
    assert re.search(r"upload \d masks to item", errors["folder2/img_005"])
    assert "ConnectionError" in errors["folder2/img_005"]
    assert "\n" not in "".join(errors.values())
    failed_ids = {ref.item_id for ref in refs if ref.path in page} | {unwritable}
    assert not any(ours(fake_gate, i) for i in failed_ids)
    assert all(ours(fake_gate, it["id"]) for it in items if it["id"] not in failed_ids)


# ------------------------------------------------------------------------------------ destination
def test_a_failed_upload_batch_rolls_back_and_keeps_the_previous_masks(fake_gate, monkeypatch):
    ds = fake_gate.add_dataset("batches", labels={"dot": "#00ff00"})
    dots = [
        {"type": "segment", "label": "dot", "coordinates": [square(x, y, x + 0.9, y + 0.9)]}
        for y in range(10)
        for x in range(12)
    ]
    item = fake_gate.add_item(ds, "/many.png", 12, 10, dots)  # 120 instances: two batches
    source = DataloopSource.from_uri(f"dataloop://{ds}")
    destination = DataloopDestination.from_uri("dataloop://", source_dataset=source.uri)
    write_label_map(destination, {"dot": 1})
    ref = next(source.list_items())
    semantic, instance = MaskOptions(modes=["semantic"]), MaskOptions(modes=["instance"])

    assert process_item(ref, source, destination, semantic, {"dot": 1}).status == "ok"
    before = ours(fake_gate, item["id"])
    assert len(before) == 1

    uploads = rf"/items/{item['id']}/annotations$"
    fake_gate.inject(uploads, "http500", times=None, method="POST", after=1)
    record = process_item(ref, source, destination, instance, {"dot": 1})
    assert record.status == "failed"
    assert "upload 20 masks" in record.error and "gave up after 5 attempts" in record.error
    assert ours(fake_gate, item["id"]) == before  # first batch rolled back, old mask kept
    fake_gate.clear_faults()

    # a reply listing fewer annotations than were sent is an error, not a log line
    real = api.request

    def short_reply(method, path, **kwargs):
        result = real(method, path, **kwargs)
        return result[:-1] if method == "POST" and path.endswith("/annotations") else result

    monkeypatch.setattr(api, "request", short_reply)
    record = process_item(ref, source, destination, instance, {"dot": 1})
    assert record.status == "failed"
    assert "Dataloop stored 99 of 100 masks" in record.error
    assert ours(fake_gate, item["id"]) == before
    monkeypatch.setattr(api, "request", real)

    record = process_item(ref, source, destination, instance, {"dot": 1})
    assert record.status == "ok" and record.cleanup == [before[0]["id"]]
    assert len(ours(fake_gate, item["id"])) == 121  # the old mask stays until its batch ends
    destination.finish_batch([record])
    assert record.status == "ok" and record.cleanup is None
    assert len(ours(fake_gate, item["id"])) == 120


def test_write_back_is_one_binary_annotation_per_object_carrying_its_object_id(fake_gate):
    """A car split in two by a pole (objectId "7" and 7) is one instance annotation with
    objectId 7 whose mask is both parts; a sedan without an objectId gets the next id, 8."""
    ds = fake_gate.add_dataset("objects", labels=ONTOLOGY)
    parts = [
        ("car", square(0, 0, 5, 6), "7"),
        ("road", square(5, 0, 6, 16), 2),
        ("car", square(6, 0, 11, 6), 7),
        ("car.sedan", square(14, 8, 20, 14), None),
    ]
    annotations = []
    for label, ring, object_id in parts:
        annotation = {"type": "segment", "label": label, "coordinates": [ring]}
        if object_id is not None:
            annotation["metadata"] = {"system": {"objectId": object_id}}
        annotations.append(annotation)
    item = fake_gate.add_item(ds, "/objects.png", 24, 16, annotations)
    source = DataloopSource.from_uri(f"dataloop://{ds}")
    destination = DataloopDestination.from_uri("dataloop://", source_dataset=source.uri)
    label_map = {"car": 1, "car.sedan": 2, "road": 3}
    write_label_map(destination, label_map)
    ref = next(source.list_items())

    record = process_item(ref, source, destination, MaskOptions(modes=["instance"]), label_map)
    assert record.status == "ok" and record.repairs == []
    human = theirs(fake_gate, item["id"])
    left, pole, right, sedan = human
    expected = {
        7: ("car", [left, right]),
        2: ("road", [pole]),
        8: ("car.sedan", [sedan]),
    }
    written = ours(fake_gate, item["id"])
    assert sorted(int(a["metadata"]["system"]["objectId"]) for a in written) == [2, 7, 8]
    for annotation in written:
        object_id = int(annotation["metadata"]["system"]["objectId"])
        label, members = expected[object_id]
        union = np.zeros((16, 24), bool)
        for member in members:
            union |= rasterio_oracle(raw_rings(member), 16, 24)
        mask, _ = decode_png(annotation["coordinates"])
        marker = annotation["metadata"]["user"]["polyburn"]
        assert annotation["type"] == "binary" and annotation["label"] == label
        assert np.array_equal(mask, union), object_id
        assert marker["key"] == f"instance/{object_id}"
        assert marker["sourceAnnotations"] == [m["id"] for m in members]
    assert [o["key"] for o in record.outputs] == [
        "instance/objects/2",
        "instance/objects/7",
        "instance/objects/8",
    ]


def test_another_dataset_receives_masks_by_filename(fake_gate):
    src_ds, items = build_dataset(fake_gate, "copy-from", 3, seed=5)
    dst_ds = fake_gate.add_dataset("copy-to", labels=ONTOLOGY)
    copies = [fake_gate.add_item(dst_ds, it["filename"], 24, 16, []) for it in items]
    source = DataloopSource.from_uri(f"dataloop://{src_ds}")
    destination = DataloopDestination.from_uri(f"dataloop://{dst_ds}", source_dataset=source.uri)
    write_label_map(destination, {"car": 1, "car.sedan": 2, "road": 3})
    for ref in source.list_items():
        record = process_item(
            ref, source, destination, MaskOptions(), {"car": 1, "car.sedan": 2, "road": 3}
        )
        assert record.status == "ok"
    assert all(not ours(fake_gate, it["id"]) for it in items)
    assert all(ours(fake_gate, c["id"]) for c in copies)
    with pytest.raises(ConfigError, match="source is not a Dataloop dataset"):
        DataloopDestination.from_uri("dataloop://")


# ------------------------------------------------------------------------------------ throttle
@pytest.mark.usefixtures("prefect_api")
def test_calls_take_slots_of_the_prefect_limit_only_when_it_exists(
    fake_gate, tmp_path, monkeypatch, caplog
):
    import prefect.concurrency.sync as prefect_sync
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    ds, items = build_dataset(fake_gate, "throttled", 4, seed=6)
    taken: list[tuple[str, int]] = []
    real = prefect_sync.rate_limit

    def counting(names, occupy=1, *args, **kwargs):
        taken.append((names, occupy))
        return real(names, occupy, *args, **kwargs)

    @flow
    def calls(n: int) -> None:
        for _ in range(n):
            api.request("GET", f"/items/{items[0]['id']}", what="get item")

    monkeypatch.setattr(prefect_sync, "rate_limit", counting)
    name = f"dataloop-api-test-{os.getpid()}"
    monkeypatch.setenv("POLYBURN_DATALOOP_LIMIT", name)

    api.forget_limits()  # no such limit: no slot taken, no per-call warning
    with caplog.at_level(logging.WARNING):
        calls(10)
    assert taken == [] and "do not exist" not in caplog.text

    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(
            GlobalConcurrencyLimitCreate(name=name, limit=200, slot_decay_per_second=200.0)
        )
    try:
        api.forget_limits()
        fake_gate.clear_requests()
        _, summary = run_flow(f"dataloop://{ds}", str(tmp_path / "b"))
        assert summary["failed"] == 0
        assert {n for n, _ in taken} == {name} and {k for _, k in taken} == {10}
        # every Dataloop request spent a slot; slots come 10 per Prefect round trip
        assert sum(k for _, k in taken) >= len(fake_gate.requests) > len(taken)

        taken.clear()
        monkeypatch.setenv("POLYBURN_DATALOOP_LIMIT_BATCH", "1")
        api.forget_limits()
        calls(3)
        assert taken == [(name, 1)] * 3  # exactly one slot per request
        taken.clear()
        api.request("GET", f"/items/{items[0]['id']}", what="get item")
        assert taken == []  # outside a flow or task run: not throttled
    finally:
        with get_client(sync_client=True) as client:
            client.delete_global_concurrency_limit_by_name(name)
        api.forget_limits()


# ------------------------------------------------------------------------------------ credentials
@pytest.mark.parametrize("kind", ["not-a-jwt", "unknown-jwt"])
def test_a_bad_api_key_gives_one_line_and_leaks_nowhere(
    fake_gate, big_dataset, tmp_path, capsys, caplog, monkeypatch, kind
):
    from polyburn.cli import main

    ds, _ = big_dataset
    secret = (
        "dlk-SENTINEL-" + os.urandom(12).hex()
        if kind == "not-a-jwt"
        else make_fake_jwt("intruder@example.com", sentinel=os.urandom(12).hex())
    )
    monkeypatch.setenv("DATALOOP_API_KEY", secret)
    api.reset_session()
    with caplog.at_level(logging.DEBUG):
        code = main(["run", f"dataloop://{ds}", str(tmp_path / "masks"), "--no-progress"])
    out, err = capsys.readouterr()
    assert code == 2
    assert out == "" and err.count("\n") == 1 and err.startswith("polyburn: error: ")
    assert "Traceback" not in err
    if kind == "not-a-jwt":
        assert "API key is expired or is not a JWT" in err
    else:
        assert "Dataloop rejected the API key: HTTP 401" in err
    texts = [out, err, caplog.text]
    for root in (Path(os.environ["POLYBURN_STATE_DIR"]), Path(os.environ["DATALOOP_PATH"])):
        texts += [p.read_text(errors="replace") for p in root.rglob("*") if p.is_file()]
    assert not (tmp_path / "masks").exists()
    parts = [secret] + secret.split(".")[1:2]  # the whole key, and a JWT's own claims
    assert not [p for p in parts for text in texts if p in text]
    api.reset_session()


@pytest.mark.usefixtures("prefect_api")
def test_the_key_can_come_from_a_prefect_secret_block(fake_gate_token, big_dataset, monkeypatch):
    from prefect.blocks.system import Secret

    ds, _ = big_dataset
    Secret(value=fake_gate_token).save("polyburn-test-dataloop-key", overwrite=True)
    monkeypatch.setenv("DATALOOP_API_KEY_BLOCK", "polyburn-test-dataloop-key")
    monkeypatch.setenv("DATALOOP_API_KEY", "ignored-when-a-block-is-named")
    api.reset_session()
    try:
        assert next(DataloopSource.from_uri(f"dataloop://{ds}").list_items())
        monkeypatch.setenv("DATALOOP_API_KEY_BLOCK", "no-such-block")
        with pytest.raises(ConfigError, match="from Prefect Secret block 'no-such-block'"):
            api.session()
    finally:
        api.reset_session()


def test_sdk_logging_is_kept_out_of_the_console(capsys):
    dl = api.dtlpy()
    logger = logging.getLogger("dtlpy")
    assert logger.propagate is False and logger.level == logging.WARNING
    own = [h for h in logger.handlers if not type(h).__module__.startswith("_pytest")]
    assert [type(h).__name__ for h in own] == ["_ForwardHandler"]  # pytest adds its own
    logger.debug("[COOKIE.read] noisy")
    logger.error("Invalid token.")
    assert dl.__version__ and capsys.readouterr() == ("", "")


@pytest.mark.usefixtures("prefect_api")
def test_a_write_back_run_killed_midway_resumes_without_duplicates(fake_gate, tmp_path):
    """SIGKILL a real `polyburn run` process while it uploads, run again: every item ends with
    exactly one set of polyburn masks and the human annotations are untouched."""
    import signal
    import subprocess
    import sys

    from prefect.settings import PREFECT_API_URL

    ds, items = build_dataset(fake_gate, "killed", 150, seed=11)
    humans = {it["id"]: len(theirs(fake_gate, it["id"])) for it in items}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "polyburn.cli",
            "run",
            f"dataloop://{ds}",
            "dataloop://",
            "--mode",
            "instance",
            "--batch-size",
            "10",
            "--no-progress",
        ],
        env={**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while sum(1 for it in items if ours(fake_gate, it["id"])) < 30:
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    done_before = sum(1 for it in items if ours(fake_gate, it["id"]))
    assert done_before < len(pixel_items(items))  # really killed midway

    state, summary = run_flow(f"dataloop://{ds}", "dataloop://", options={"modes": ["instance"]})
    assert state.is_completed() and summary["failed"] == 0, summary["failures"]
    for item in pixel_items(items):
        keys = [a["metadata"]["user"]["polyburn"]["key"] for a in ours(fake_gate, item["id"])]
        assert keys and len(keys) == len(set(keys)), item["id"]
    assert {it["id"]: len(theirs(fake_gate, it["id"])) for it in items} == humans


@pytest.mark.usefixtures("prefect_api")
def test_write_back_keeps_a_record_per_item_and_a_one_item_run_rewrites_only_its_own(
    fake_gate, capsys
):
    """A Dataloop destination keeps its items' records in its state folder, like a folder or
    S3 does: `polyburn manifest dataloop://<id>` lists each item once, each output matching the
    marker of the annotation that holds it; a run of one item rewrites that item's record only."""
    from polyburn.cli import main
    from polyburn.state import RECORDS, record_key

    ds, items = build_dataset(fake_gate, "records", 12, seed=4)
    options = {"modes": ["semantic", "instance"]}
    _, first = run_flow(f"dataloop://{ds}", "dataloop://", options=options)
    assert first["failed"] == 0

    def manifest() -> dict[str, dict]:
        capsys.readouterr()
        assert main(["manifest", f"dataloop://{ds}"]) == 0
        lines = capsys.readouterr().out.splitlines()
        records = [json.loads(line) for line in lines]
        assert [r["path"] for r in records] == sorted(r["path"] for r in records)
        return {r["item"]: r for r in records}

    records = manifest()
    # every item the listing has (the item with a box only is not listed) once
    assert set(records) == {it["id"] for it in pixel_items(items)}
    for item in pixel_items(items):
        stored = {
            (a["metadata"]["user"]["polyburn"]["sha256"], a["metadata"]["user"]["polyburn"]["mode"])
            for a in ours(fake_gate, item["id"])
        }
        listed = {(o["sha256"], o["key"].split("/", 1)[0]) for o in records[item["id"]]["outputs"]}
        assert listed == stored, item["id"]

    state = DataloopDestination.from_uri(f"dataloop://{ds}").state
    stamps = {e.key: e.tag for e in state.entries(RECORDS)}
    assert len(stamps) == len(pixel_items(items))
    edited = pixel_items(items)[2]["id"]
    _, one = run_flow(f"dataloop://{ds}", "dataloop://", options=options, item_ids=[edited])
    assert (one["items"], one["failed"]) == (1, 0)
    changed = {e.key for e in state.entries(RECORDS) if stamps.get(e.key) != e.tag}
    assert changed == {record_key(records[edited]["path"])}
    again = manifest()[edited]["outputs"]  # nothing changed in the item: the same masks, kept
    assert [(o["key"], o["sha256"], o["written"]) for o in again] == [
        (o["key"], o["sha256"], False) for o in records[edited]["outputs"]
    ]


def test_a_video_item_is_not_written_back_and_fails_with_one_line(fake_gate):
    """Dataloop write-back has no per-frame masks: a video item fails alone, nothing uploaded,
    and an image item of the same dataset is written back as usual."""
    ds = fake_gate.add_dataset("videos", labels=ONTOLOGY)
    track = {
        "type": "segment",
        "label": "car",
        "coordinates": [square(0, 0, 5, 6)],
        "metadata": {
            "system": {
                "frame": 0,
                "endFrame": 3,
                "objectId": 1,
                "snapshots_": [{"frame": 2, "data": [square(2, 0, 7, 6)], "label": "car"}],
            }
        },
    }
    clip = fake_gate.add_item(ds, "/clips/drive.webm", 24, 16, [track])
    still = fake_gate.add_item(ds, "/still.png", 24, 16, [{**track, "metadata": {}}])
    source = DataloopSource.from_uri(f"dataloop://{ds}")
    destination = DataloopDestination.from_uri("dataloop://", source_dataset=source.uri)
    label_map = {"car": 1, "car.sedan": 2, "road": 3}
    write_label_map(destination, label_map)
    records = {
        ref.path: process_item(ref, source, destination, MaskOptions(), label_map)
        for ref in source.list_items()
    }
    assert records["clips/drive"].status == "failed"
    assert records["clips/drive"].error.startswith(
        "clips/drive: video item: per-frame masks cannot be written back to Dataloop"
    )
    assert "\n" not in records["clips/drive"].error
    assert ours(fake_gate, clip["id"]) == []
    assert records["still"].status == "ok" and len(ours(fake_gate, still["id"])) == 1


def test_a_video_read_through_dtlpy_burns_the_same_frames_as_its_export(fake_gate, tmp_path):
    """The example export's video (snapshots, a hidden stretch, an early end, two parts of one
    object) served by the gate: read from the listing (bulk) and from GET /items/{id}, it gives
    byte for byte the per-frame masks of the same JSON read from disk."""
    from polyburn.sources.local import LocalSource
    from tests.support.oracle import EXAMPLES

    export = EXAMPLES / "export"
    raw = json.loads((export / "json/clips/crossing_001.json").read_text())
    ds = fake_gate.add_dataset("video", labels=ONTOLOGY)
    fake_gate.add_item(ds, raw["filename"], 64, 48, raw["annotations"], metadata=raw["metadata"])
    options = MaskOptions(modes=["semantic", "instance", "binary"])
    label_map = {"car": 1, "car.sedan": 2, "road": 3, "person": 4}

    def frames(source, ref, folder) -> dict[str, object]:
        """Each output: a mask's bytes, an instance table's rows without the annotation ids
        (the gate gives items and annotations ids of its own)."""
        record = process_item(ref, source, LocalDestination(folder), options, label_map)
        assert record.status == "ok", record.error
        outputs = {}
        for key in output_keys(record):
            data = (folder / key).read_bytes()
            if key.endswith(".json"):
                rows = json.loads(data)["instances"]
                data = [(r["id"], r["object_id"], r["label"], len(r["annotations"])) for r in rows]
            outputs[key] = data
        return outputs

    local = LocalSource(export)
    (disk_ref,) = local.find(["clips/crossing_001"])
    expected = frames(local, disk_ref, tmp_path / "disk")
    assert len([k for k in expected if k.startswith("semantic/")]) == 16
    source = DataloopSource.from_uri(f"dataloop://{ds}")
    (ref,) = source.list_items()
    assert frames(source, ref, tmp_path / "bulk") == expected
    assert frames(source, dataclasses.replace(ref, data=""), tmp_path / "get") == expected


@pytest.mark.usefixtures("prefect_api")
def test_ml_subsets_come_the_same_through_dtlpy_and_through_the_sdks_export(
    fake_gate, dtlpy_client, tmp_path
):
    """metadata.system.tags as Dataloop keeps an item's ML subset: read from the listing (bulk
    path), from GET /items/{id}, and from the SDK's own export on disk, with the same splits."""
    ds = fake_gate.add_dataset("subsets", labels=ONTOLOGY)
    tags = [{"train": True}, {"validation": True}, {"test": True}, None]
    tags += [{"train": True, "test": True}, {"train": True, "other": True}]
    for i, tag in enumerate(tags):
        car = {"type": "segment", "label": "car", "coordinates": [square(2, 2, 12 + i, 9)]}
        metadata = {"system": {"tags": tag}} if tag else None
        fake_gate.add_item(ds, f"/f/img_{i}.jpg", 24, 16, [car], metadata=metadata)
    want = {
        "train": ["f/img_0", "f/img_5"],
        "validation": ["f/img_1"],
        "test": ["f/img_2"],
        "unassigned": ["f/img_3", "f/img_4"],
    }

    source = DataloopSource.from_uri(f"dataloop://{ds}")
    refs = sorted(source.list_items(), key=lambda ref: ref.path)
    by_get = [source.load(dataclasses.replace(ref, data="")) for ref in refs]
    by_bulk = [source.load(ref) for ref in source.preload(refs)]
    for items in (by_get, by_bulk):
        subsets = [item.subset for item in items]
        assert subsets == ["train", "validation", "test", None, None, "train"]
        assert [p.field for p in items[4].problems] == ["metadata.system.tags"]

    dl_dest, local_dest = tmp_path / "from-dataloop", tmp_path / "from-export"
    modes = {"modes": ["semantic", "coco"]}
    _, summary = run_flow(f"dataloop://{ds}", str(dl_dest), options=modes)
    assert summary["failed"] == 0 and summary["rejected"] == 1
    dtlpy_client.datasets.get(dataset_id=ds).download_annotations(local_path=str(tmp_path / "x"))
    _, local = run_flow(
        str(tmp_path / "x"),
        str(local_dest),
        labels=str(dl_dest / "label_map.json"),
        options=modes,
    )
    assert local["failed"] == 0 and local["items"] == 6
    for name, paths in want.items():
        assert (dl_dest / f"splits/{name}.txt").read_text().splitlines() == paths
        assert (local_dest / f"splits/{name}.txt").read_bytes() == (
            dl_dest / f"splits/{name}.txt"
        ).read_bytes()
    coco = json.loads((dl_dest / "coco/instances.json").read_text())
    assert [(im["file_name"], im["dataloop_subset"]) for im in coco["images"]] == [
        ("f/img_0.jpg", "train"),
        ("f/img_1.jpg", "validation"),
        ("f/img_2.jpg", "test"),
        ("f/img_3.jpg", None),
        ("f/img_4.jpg", None),
        ("f/img_5.jpg", "train"),
    ]
    assert coco == json.loads((local_dest / "coco/instances.json").read_text())
