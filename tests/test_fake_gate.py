"""The fake Dataloop gate, driven by the REAL dtlpy client (no network, loopback only).

These tests pin both the fake (routes, DQL, paging, faults) and the dtlpy behaviours polyburn relies
on (keyset paging, 400 swallowed into an empty page, which errors are retried).
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import pytest
import requests

from tests.support.fake_gate import DqlError, FakeGate, dql_match, make_fake_jwt

# The root conftest is expected to do ``from tests.support.gate_fixtures import *``. Import the
# fixtures here only when it does not, so there is never a second session gate.
if not any(
    name.endswith("conftest") and hasattr(mod, "fake_gate") for name, mod in sys.modules.items()
):
    from tests.support.gate_fixtures import *  # noqa: F403

QUERY = r"/datasets/[0-9a-f]{24}/query$"


def _query_bodies(gate: FakeGate, dataset_id: str) -> list[dict]:
    return [r.body for r in gate.requests_to(rf"/datasets/{dataset_id}/query$", "POST")]


def _poly(x0: float, y0: float, x1: float, y1: float) -> list:
    return [[(x0, y0), (x1, y0), (x1, y1), (x0, y1)]]


@pytest.fixture
def small_dataset(fake_gate: FakeGate) -> tuple[str, list[dict]]:
    """A dataset with labels car/road and 3 items carrying a polygon, a box and a class."""
    ds_id = fake_gate.add_dataset("small", labels={"car": "#ff0000", "road": "#00ff00"})
    items = []
    for i in range(3):
        items.append(
            fake_gate.add_item(
                ds_id,
                f"/folder/img_{i:03d}.jpg",
                width=8,
                height=6,
                annotations=[
                    {
                        "type": "segment",
                        "label": "car",
                        "coordinates": _poly(1, 1, 5, 4),
                        "metadata": {"system": {"objectId": str(i + 1)}},
                    },
                    {"type": "box", "label": "road", "coordinates": [(0, 0), (2, 2)]},
                    {"type": "class", "label": "road"},
                ],
            )
        )
    return ds_id, items


# ------------------------------------------------------------------------------------- auth
def test_login_uses_users_me_and_token_passes_client_check(dtlpy_client, fake_gate):
    dl = dtlpy_client
    assert dl.client_api.environment == fake_gate.api_url
    assert dl.client_api.token_expired() is False  # exp > now + 60 s
    assert dl.client_api.info()["user_email"] == "fake@example.com"
    fake_gate.clear_requests()  # the session login may be long gone from the shared log
    dl.login_token(dl.client_api.token)
    me = fake_gate.requests_to(r"/users/me$", "GET")
    assert me and me[0].status == 200
    assert me[0].headers["authorization"].startswith("Bearer ")


def test_unknown_token_is_rejected_and_previous_token_restored(dtlpy_client, fake_gate):
    dl = dtlpy_client
    before = dl.client_api.token
    with pytest.raises(ValueError, match="Invalid API key"):
        dl.login_token(make_fake_jwt("intruder@example.com"))
    assert dl.client_api.token == before
    assert fake_gate.requests_to(r"/users/me$")[-1].status == 401


def test_expired_token_fails_before_any_request(dtlpy_client, fake_gate):
    dl = dtlpy_client
    good = dl.client_api.token
    n = len(fake_gate.requests)
    dl.client_api.token = make_fake_jwt(ttl_seconds=30)  # within the 60 s safety margin
    try:
        with pytest.raises(dl.exceptions.TokenExpired):
            dl.datasets.get(dataset_id="0" * 24)
    finally:
        dl.client_api.token = good
    assert len(fake_gate.requests) == n


# ------------------------------------------------------------------------------------- entities
def test_datasets_get(dtlpy_client, fake_gate, small_dataset):
    ds_id, _ = small_dataset
    ds = dtlpy_client.datasets.get(dataset_id=ds_id)
    assert ds.id == ds_id and ds.name == "small"
    assert ds.items_count == 3
    assert ds.metadata["system"]["recipes"] == list(
        fake_gate.datasets[ds_id]["metadata"]["system"]["recipes"]
    )
    with pytest.raises(dtlpy_client.exceptions.NotFound):
        dtlpy_client.datasets.get(dataset_id="f" * 24)


def test_items_get_has_size_and_paths(dtlpy_client, small_dataset):
    _, items = small_dataset
    item = dtlpy_client.items.get(item_id=items[1]["id"])
    assert (item.height, item.width) == (6, 8)
    assert item.filename == "/folder/img_001.jpg"
    assert item.dir == "/folder"
    assert item.name == "img_001.jpg"
    assert item.mimetype == "image/jpeg"
    assert item.annotated is True


def test_labels_and_instance_map_via_recipe_and_ontology(dtlpy_client, fake_gate):
    roots = [
        {"tag": "road", "color": "#808080"},
        {"tag": "car", "color": "#ff0000", "children": [{"tag": "sedan", "color": "#aa0000"}]},
    ]
    ds_id = fake_gate.add_dataset("ontology", labels=roots)
    fake_gate.clear_requests()
    ds = dtlpy_client.datasets.get(dataset_id=ds_id)
    assert [label.tag for label in ds.labels] == ["road", "car"]
    assert ds.instance_map == {"car": 1, "car.sedan": 2, "road": 3}
    assert ds._get_ontology().color_map["car"] == (255, 0, 0)
    paths = [r.path.split("/")[3] for r in fake_gate.requests]
    assert paths == ["datasets", "recipes", "ontologies"]


# ------------------------------------------------------------------------------------- listing
@pytest.mark.parametrize(
    "join_values", ["segment", {"$in": ["segment", "binary"]}], ids=["eq", "in"]
)
def test_list_250_items_keyset_pages_with_join(dtlpy_client, fake_gate, join_values):
    ds_id = fake_gate.add_dataset("big", labels={"car": "#ff0000"})
    wanted = set()
    for i in range(250):
        anns = [{"type": "segment", "label": "car", "coordinates": _poly(0, 0, 2, 2)}]
        wanted.add(fake_gate.add_item(ds_id, f"/d/sub/yes_{i:03d}.png", 4, 4, anns)["id"])
        if i % 10 == 3:  # 25 interleaved items without a polygon: a box only, or nothing
            box = [{"type": "box", "label": "car", "coordinates": [(0, 0), (1, 1)]}]
            fake_gate.add_item(ds_id, f"/d/no_{i:03d}.png", 4, 4, box if i % 20 == 3 else [])
    fake_gate.clear_requests()

    filters = dtlpy_client.Filters()
    filters.add_join(field="type", values=join_values)
    ds = dtlpy_client.datasets.get(dataset_id=ds_id)
    pages = ds.items.list(filters=filters, page_size=100)
    assert pages.items_count == 250
    seen = [item.id for page in pages for item in page]
    assert len(seen) == len(set(seen)) == 250
    assert set(seen) == wanted
    assert seen == sorted(seen)

    bodies = _query_bodies(fake_gate, ds_id)
    # list() fetches page 0, iteration fetches it AGAIN, then two keyset pages
    assert len(bodies) == 4
    assert bodies[0] == bodies[1]
    cursors = []
    for body in bodies:
        assert body["page"] == 0 and body["pageSize"] == 100
        assert body["sort"] == {"id": "ascending"}
        assert body["join"]["on"] == {"resource": "annotations", "local": "itemId", "forigen": "id"}
        assert body["join"]["filter"] == {"$and": [{"type": join_values}]}
        cursors.append([c["id"]["$gt"] for c in body["filter"]["$and"] if "id" in c])
    assert cursors[:2] == [[], []]
    assert cursors[2] == [seen[99]] and cursors[3] == [seen[199]]


def test_filters_on_dir_metadata_and_updated_at(dtlpy_client, fake_gate):
    ds_id = fake_gate.add_dataset("filters")
    a = fake_gate.add_item(ds_id, "/x/a.jpg", 2, 2, metadata={"user": {"split": "train"}})
    b = fake_gate.add_item(ds_id, "/x/y/b.jpg", 2, 2, metadata={"user": {"split": "val"}})
    c = fake_gate.add_item(ds_id, "/c.jpg", 2, 2)
    ds = dtlpy_client.datasets.get(dataset_id=ds_id)

    def ids(**add) -> set[str]:
        flt = dtlpy_client.Filters()
        for field, values in add.items():
            flt.add(field=field.replace("__", "."), values=values)
        return {item.id for item in ds.items.list(filters=flt).all()}

    assert ids(dir="/x") == {a["id"]}
    assert ids(filename="/x") == {a["id"], b["id"]}  # dtlpy makes it "/x/**" (glob)
    assert ids(metadata__user__split="val") == {b["id"]}
    assert ids(metadata__user__split={"$in": ["train", "val"]}) == {a["id"], b["id"]}
    assert ids(metadata__user__split={"$ne": "train"}) == {b["id"], c["id"]}
    assert ids(updatedAt={"$gt": b["updatedAt"]}) == {c["id"]}
    assert ids() == {a["id"], b["id"], c["id"]}  # default filter hides the dir items


def test_item_annotations_list(dtlpy_client, fake_gate, small_dataset):
    _, items = small_dataset
    item = dtlpy_client.items.get(item_id=items[0]["id"])
    fake_gate.clear_requests()
    anns = item.annotations.list()
    assert sorted(a.type for a in anns) == ["box", "class", "segment"]
    poly = next(a for a in anns if a.type == "segment")
    assert poly.object_id == "1"
    assert poly.geo.tolist() == [[1, 1], [5, 1], [5, 4], [1, 4]]
    (body,) = [r.body for r in fake_gate.requests]
    assert body["resource"] == "annotations"
    assert {"itemId": item.id} in body["filter"]["$and"]
    assert "note" not in body["filter"]["$and"][0]["type"]["$in"]

    polys = item.annotations.list(
        filters=dtlpy_client.Filters(
            resource=dtlpy_client.FiltersResource.ANNOTATION, field="type", values="segment"
        )
    )
    assert [a.id for a in polys] == [poly.id]


def test_dataset_annotations_query_keyset(dtlpy_client, fake_gate, small_dataset):
    ds_id, items = small_dataset
    ds = dtlpy_client.datasets.get(dataset_id=ds_id)
    flt = dtlpy_client.Filters(resource=dtlpy_client.FiltersResource.ANNOTATION)
    flt.add(field="type", values={"$in": ["segment", "box"]})
    fake_gate.clear_requests()
    got = [a.id for a in ds.annotations.list(filters=flt, page_size=2).all()]
    expected = [
        a["id"]
        for it in items
        for a in fake_gate.annotations_of(it["id"])
        if a["type"] in ("segment", "box")
    ]
    assert got == expected and len(got) == 6
    assert any("$gt" in json.dumps(b) for b in _query_bodies(fake_gate, ds_id))


# ------------------------------------------------------------------------------------- writes
def test_upload_binary_annotation_and_read_back(dtlpy_client, fake_gate, small_dataset):
    dl = dtlpy_client
    _, items = small_dataset
    item = dl.items.get(item_id=items[2]["id"])
    mask = np.zeros((6, 8), dtype=bool)
    mask[2:4, 3:6] = True
    builder = item.annotations.builder()
    builder.add(annotation_definition=dl.Segmentation(geo=mask, label="car"), object_id=7)
    fake_gate.clear_requests()
    uploaded = item.annotations.upload(builder)

    assert len(uploaded) == 1 and uploaded[0].id in fake_gate.annotations
    (post,) = fake_gate.requests_to(r"/items/[0-9a-f]+/annotations$", "POST")
    assert isinstance(post.body, list) and len(post.body) == 1
    sent = post.body[0]
    assert sent["type"] == "binary" and sent["id"] is None and sent["creator"] is None
    assert sent["coordinates"].startswith("data:image/png;base64,")
    assert sent["metadata"]["system"]["objectId"] == "7"

    stored = [a for a in fake_gate.annotations_of(item.id) if a["type"] == "binary"]
    assert len(stored) == 1
    assert stored[0]["creator"] == "fake@example.com" and stored[0]["createdAt"].endswith("Z")

    back = dl.annotations.get(annotation_id=uploaded[0].id)
    assert back.type == "binary" and back.label == "car" and back.object_id == "7"
    assert np.array_equal(back.geo.astype(bool), mask)
    assert back.color == (255, 0, 0)  # label colour from the ontology
    listed = [a for a in item.annotations.list() if a.type == "binary"]
    assert [a.id for a in listed] == [uploaded[0].id]
    assert dl.items.get(item_id=item.id).annotations_count == 4


def test_annotation_update_and_delete(dtlpy_client, fake_gate, small_dataset):
    dl = dtlpy_client
    _, items = small_dataset
    item = dl.items.get(item_id=items[0]["id"])
    poly = next(a for a in item.annotations.list() if a.type == "segment")
    before = fake_gate.annotations[poly.id]["updatedAt"]
    poly.label = "road"
    poly.update()
    put = fake_gate.requests_to(rf"/annotations/{poly.id}$", "PUT")[-1]
    assert put.body["label"] == "road"  # a diff, not the whole annotation
    assert "id" not in put.body and "metadata" not in put.body
    stored = fake_gate.annotations[poly.id]
    assert stored["label"] == "road" and stored["updatedAt"] > before
    assert dl.annotations.get(annotation_id=poly.id).label == "road"

    assert item.annotations.delete(annotation_id=poly.id) is True
    delete = fake_gate.requests_to(rf"/annotations/{poly.id}$", "DELETE")[-1]
    assert delete.body == {"username": "fake@example.com"}
    assert poly.id not in fake_gate.annotations
    assert all(a["id"] != poly.id for a in fake_gate.annotations_of(item.id))
    with pytest.raises(dl.exceptions.NotFound):
        dl.annotations.get(annotation_id=poly.id)


def test_download_annotations_export(dtlpy_client, fake_gate, small_dataset, tmp_path):
    """Export flow: split queries, POST /export, command, GET item + stream (SDK sleeps 2 s)."""
    ds_id, items = small_dataset
    ds = dtlpy_client.datasets.get(dataset_id=ds_id)
    ds.download_annotations(local_path=str(tmp_path))
    files = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.json"))
    assert files == [f"json/folder/img_{i:03d}.json" for i in range(3)]
    data = json.loads((tmp_path / "json/folder/img_000.json").read_text())
    assert data["id"] == items[0]["id"]
    assert sorted(a["type"] for a in data["annotations"]) == ["box", "class", "segment"]
    assert not fake_gate.unknown_routes


# ------------------------------------------------------------------------------------- faults
def test_429_with_retry_after_is_retried_by_the_sdk(dtlpy_client, fake_gate, small_dataset):
    ds_id, _ = small_dataset
    ds = dtlpy_client.datasets.get(dataset_id=ds_id)
    fault = fake_gate.inject(QUERY, "http429", times=1, retry_after=1)
    fake_gate.clear_requests()
    t0 = time.monotonic()
    assert len(list(ds.items.list().all())) == 3
    assert time.monotonic() - t0 >= 0.9  # urllib3 honoured Retry-After
    assert fault.hits == 1
    statuses = [r.status for r in fake_gate.requests_to(QUERY)]
    assert statuses[:2] == [429, 200]


def test_429_without_retry_after_raises(dtlpy_client, fake_gate, small_dataset):
    ds_id, _ = small_dataset
    ds = dtlpy_client.datasets.get(dataset_id=ds_id)
    fake_gate.inject(QUERY, "http429", times=1)
    with pytest.raises(dtlpy_client.exceptions.UnknownException, match="429"):
        ds.items.list()
    assert "Retry-After" not in json.dumps(fake_gate.requests_to(QUERY)[-1].headers)


def test_400_on_query_is_swallowed_into_an_empty_page(dtlpy_client, fake_gate, small_dataset):
    """dtlpy's PagedEntities.get_page catches BadRequest and returns [] (only a warning)."""
    dl = dtlpy_client
    ds_id, _ = small_dataset
    ds = dl.datasets.get(dataset_id=ds_id)
    fake_gate.inject(QUERY, "http400", times=1)
    pages = ds.items.list()
    assert pages.items == [] and pages.items_count == 0

    # a genuinely bad filter: the fake answers 400 itself, the SDK again shows "0 items".
    # custom filters page by offset; iteration keeps has_next_page=True after the swallowed 400,
    # so it asks for page 0 (list), page 0 again (iteration) and page 1 before giving up.
    bad = dl.Filters(custom_filter={"filter": {"x": {"$regexx": "a"}}, "resource": "items"})
    fake_gate.clear_requests()
    assert list(ds.items.list(filters=bad).all()) == []
    reqs = fake_gate.requests_to(QUERY)
    assert [(r.status, r.fault, r.body["page"]) for r in reqs] == [(400, None, 0)] * 2 + [
        (400, None, 1)
    ]
    assert "$regexx" in fake_gate.requests[-1].body["filter"]["x"]


def test_500_surfaces_immediately_without_retry(dtlpy_client, fake_gate, small_dataset):
    _, items = small_dataset
    route = rf"/items/{items[0]['id']}$"
    fake_gate.inject(route, "http500", times=1)
    with pytest.raises(dtlpy_client.exceptions.InternalServerError):
        dtlpy_client.items.get(item_id=items[0]["id"])
    assert [r.status for r in fake_gate.requests_to(route)] == [500]


def test_503_once_is_retried_by_the_sdk(dtlpy_client, fake_gate, small_dataset):
    _, items = small_dataset
    route = rf"/items/{items[0]['id']}$"
    fake_gate.inject(route, "http503", times=1)
    assert dtlpy_client.items.get(item_id=items[0]["id"]).id == items[0]["id"]
    assert [r.status for r in fake_gate.requests_to(route)] == [503, 200]


def test_single_reset_is_retried_transparently(dtlpy_client, fake_gate, small_dataset):
    _, items = small_dataset
    route = rf"/items/{items[1]['id']}$"
    fake_gate.inject(route, "reset", times=1)
    assert dtlpy_client.items.get(item_id=items[1]["id"]).id == items[1]["id"]
    assert [(r.status, r.fault) for r in fake_gate.requests_to(route)] == [
        (None, "reset"),
        (200, None),
    ]


def test_persistent_reset_surfaces_as_connection_error(
    dtlpy_client, fake_gate, small_dataset, monkeypatch
):
    """urllib3 retries a reset 5 times (read=5) with 0+2+4+8+16 s backoff; skip the sleeps."""
    from urllib3.util.retry import Retry

    monkeypatch.setattr(Retry, "get_backoff_time", lambda self: 0)
    _, items = small_dataset
    route = rf"/items/{items[2]['id']}$"
    fake_gate.inject(route, "reset", times=None)
    with pytest.raises(requests.exceptions.ConnectionError):
        dtlpy_client.items.get(item_id=items[2]["id"])
    assert [r.fault for r in fake_gate.requests_to(route)] == ["reset"] * 6


def test_stall_then_respond(dtlpy_client, fake_gate, small_dataset):
    _, items = small_dataset
    fake_gate.inject(rf"/items/{items[0]['id']}$", "stall", seconds=0.3)
    t0 = time.monotonic()
    assert dtlpy_client.items.get(item_id=items[0]["id"]).id == items[0]["id"]
    assert time.monotonic() - t0 >= 0.3


def test_unknown_route_is_a_recorded_404(dtlpy_client, fake_gate):
    ok, resp = dtlpy_client.client_api.gen_request(req_type="get", path="/no/such/route")
    assert ok is False and resp.status_code == 404
    assert ("GET", "/api/v1/no/such/route") in fake_gate.unknown_routes


def test_fake_has_no_internal_errors(fake_gate):
    assert fake_gate.errors == []


# ------------------------------------------------------------------------------------- DQL unit
DOC = {
    "id": "b",
    "type": "file",
    "hidden": False,
    "filename": "/a/b/c.jpg",
    "tags": ["x", "y"],
    "metadata": {"user": {"n": 5, "s": "v"}, "system": {"height": None}},
}


@pytest.mark.parametrize(
    ("flt", "expected"),
    [
        ({}, True),
        ({"type": "file"}, True),
        ({"hidden": 0}, False),  # bool is not a number
        ({"metadata.user.n": 5}, True),
        ({"metadata.user.n": {"$gt": 4, "$lte": 5}}, True),
        ({"metadata.user.n": {"$gte": 6}}, False),
        ({"metadata.user.n": {"$lt": "9"}}, False),  # no cross-type ordering
        ({"metadata.user.s": {"$nin": ["a", "b"]}}, True),
        ({"metadata.user.missing": {"$ne": 1}}, True),
        ({"metadata.user.missing": None}, True),
        ({"metadata.system.height": {"$eq": None}}, True),
        ({"metadata.user.missing": {"$exists": False}}, True),
        ({"tags": "y"}, True),
        ({"tags": {"$in": ["z", "x"]}}, True),
        ({"id": {"$gt": "a"}}, True),
        ({"$or": [{"type": "dir"}, {"metadata.user.s": "v"}]}, True),
        ({"$and": [{"type": "file"}, {"$or": [{"type": "dir"}]}]}, False),
        ({"filename": "/a/**"}, True),
        ({"filename": "/a/*"}, False),
        ({"filename": "/a/b/*.jpg"}, True),
    ],
)
def test_dql_match(flt, expected):
    assert dql_match(DOC, flt) is expected


@pytest.mark.parametrize(
    "flt",
    [
        {"type": {"$regex": "f"}},
        {"$nor": [{"type": "file"}]},
        {"$or": []},
        {"$and": {"type": "file"}},
        {"type": {"$in": "file"}},
        {"type": {"$gt": {"a": 1}}},
        {"type": {"$eq": "file", "x": 1}},
        [],
    ],
)
def test_dql_rejects_bad_filters(flt):
    with pytest.raises(DqlError):
        dql_match(DOC, flt)
