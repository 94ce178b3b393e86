"""The s3:// destination against a real S3 server (the session's SeaweedFS), with faults injected
by the in-repo proxy.

The destination is configured the way users configure it: through the environment (boto3's
default credential chain and ``AWS_ENDPOINT_URL``, never an ``endpoint_url`` argument). Requests
are counted at the proxy; botocore's retry backoff is 0 s where ``no_retry_backoff`` is used.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import numpy as np
import pytest
from botocore.awsrequest import AWSResponse

from polyburn.batching import batches_of
from polyburn.cli import main
from polyburn.dataloop_json import parse_item
from polyburn.destinations.s3 import S3Destination, UnsafeKeyError, parse_s3_uri
from polyburn.encode import decode_mask
from polyburn.errors import ConfigError, TransientError
from polyburn.model import ItemRef
from polyburn.parallel import ITEM_RETRIES
from polyburn.params import MaskOptions, RunParameters
from polyburn.pipeline import process_item
from polyburn.sources import open_source
from tests.support.fault_proxy import FaultProxy
from tests.support.oracle import EXAMPLES, same_output
from tests.support.s3_fixtures import stored_objects
from tests.support.weed import WeedServer

ALL_MODES = ["semantic", "instance", "binary"]
PREFIX = "runs/r1"
STATE_KEYS = {"manifest.jsonl", ".polyburn/destination-id", ".polyburn/write-check"}


def is_state(key: str) -> bool:
    """A run-state object (manifest, item records and leases, tokens), not an output."""
    return key == "manifest.jsonl" or key.startswith(".polyburn/")


def output_uploads(proxy, bucket: str) -> list[str]:
    """The uploads through ``proxy`` of anything but the per-item state (records, leases)."""
    return [k for k in uploads(proxy, bucket) if k == "manifest.jsonl" or not is_state(k)]


# ---------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True)
def _fresh_destination_cache():
    """tasks.common caches one destination per URI and process; a test changes the endpoint."""
    from tasks.common import _destination

    _destination.cache_clear()
    yield
    _destination.cache_clear()


def run_flow(source: Path, destination: str, batch_size: int = 5, verify: bool = False) -> dict:
    from flows.polygons_to_masks import polygons_to_masks_params

    params = RunParameters(
        source=str(source),
        destination=destination,
        options=MaskOptions(modes=ALL_MODES, verify=verify),
        batch_size=batch_size,
    )
    state = polygons_to_masks_params(params, return_state=True)
    summary = state.result(raise_on_failure=False)
    assert isinstance(summary, dict), summary
    return summary


def stored(weed_server: WeedServer, bucket: str, prefix: str = PREFIX) -> dict[str, bytes]:
    return stored_objects(weed_server, bucket, prefix)


def local_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def proxied(proxy: FaultProxy, method: str, bucket: str, prefix: str = PREFIX) -> list[str]:
    """Relative keys of the ``method`` requests the proxy saw under ``bucket/prefix/``."""
    head = f"/{bucket}/{prefix}/"
    keys = []
    for seen in proxy.requests(f"^{method} "):
        path = unquote(urlsplit(seen.target).path)
        if path.startswith(head):
            keys.append(path[len(head) :])
    return keys


def uploads(proxy: FaultProxy, bucket: str) -> list[str]:
    """Keys PUT through the proxy, without the up-front write check (an empty conditional PUT
    that the server refuses with 412 once the object exists)."""
    return [k for k in proxied(proxy, "PUT", bucket) if k != ".polyburn/write-check"]


def error_response(status: int, code: str):
    """A botocore ``before-send`` handler answering every request with an S3 error."""

    class Raw:
        def __init__(self, data: bytes) -> None:
            self._data = io.BytesIO(data)

        def stream(self, **_: Any):
            yield self._data.read()

        def read(self, *args: Any, **_: Any) -> bytes:
            return self._data.read(*args)

    body = f"<Error><Code>{code}</Code><Message>denied</Message></Error>".encode()

    def handler(request, **_: Any):
        return AWSResponse(request.url, status, {"Content-Type": "application/xml"}, Raw(body))

    return handler


def intercept(destination: S3Destination, monkeypatch, answer: Callable[[Any], Any]) -> list:
    """Every HTTP request of ``destination``'s client, botocore's or the lean path's, goes
    through ``answer(request)`` first: a response it returns is what the client receives;
    None sends the request. Returns the list of (method, key, path) of every request."""
    session = destination.client._endpoint.http_session
    real = session.send
    seen = []

    def send(request):
        path = unquote(urlsplit(request.url).path)
        seen.append((request.method, path.rpartition(f"/{PREFIX}/")[2], request))
        response = answer(request)
        return real(request) if response is None else response

    monkeypatch.setattr(session, "send", send)
    return seen


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, prefect_api):
    """The example export burned into a local folder: the reference for S3 runs."""
    dest = tmp_path_factory.mktemp("local-masks")
    summary = run_flow(EXAMPLES / "export", str(dest))
    assert summary["failed"] == 0
    files = local_files(dest)
    masks = {k: v for k, v in files.items() if not is_state(k)}
    return dest, masks


# ---------------------------------------------------------------------------- full runs


@pytest.mark.usefixtures("prefect_api")
def test_full_run_matches_a_local_run(weed_server, s3_bucket, s3_env, local_run):
    local_dir, local_masks = local_run
    summary = run_flow(EXAMPLES / "export", f"s3://{s3_bucket}/{PREFIX}/")
    assert summary["failed"] == 0 and summary["items"] == 13

    objects = stored(weed_server, s3_bucket)
    assert {k for k in objects if not is_state(k)} == set(local_masks)
    assert set(objects) >= STATE_KEYS
    for key, data in local_masks.items():
        assert same_output(key, objects[key], data), key
    for key in (k for k in local_masks if k.startswith("semantic/")):  # and the pixels
        np.testing.assert_array_equal(
            decode_mask(objects[key], "png"), decode_mask(local_masks[key], "png")
        )

    client = weed_server.client()
    manifest = [json.loads(line) for line in objects["manifest.jsonl"].decode().splitlines()]
    local_manifest = (local_dir / "manifest.jsonl").read_text().splitlines()
    assert len(manifest) == len(local_manifest) == 13

    def comparable(record: dict) -> dict:
        return {k: v for k, v in record.items() if k not in ("seconds", "outputs")}

    for s3_record, line in zip(manifest, local_manifest, strict=True):
        assert comparable(s3_record) == comparable(json.loads(line))
        for output in s3_record["outputs"]:
            head = client.head_object(
                Bucket=s3_bucket, Key=f"{PREFIX}/{output['key']}", ChecksumMode="ENABLED"
            )
            digest = hashlib.sha256(objects[output["key"]]).digest()
            assert head["ChecksumSHA256"] == base64.b64encode(digest).decode()
            assert head["Metadata"] == {
                "item-id": s3_record["item"],
                "revision": s3_record["revision"],
                "sha256": output["sha256"],
            }
            ext = output["key"].rsplit(".", 1)[1]
            assert head["ContentType"] == {"png": "image/png", "json": "application/json"}[ext]
    for key in ("label_map.json", "manifest.jsonl"):
        head = client.head_object(Bucket=s3_bucket, Key=f"{PREFIX}/{key}", ChecksumMode="ENABLED")
        assert (
            head["ChecksumSHA256"]
            == base64.b64encode(hashlib.sha256(objects[key]).digest()).decode()
        )


@pytest.mark.usefixtures("prefect_api")
def test_rerun_uploads_nothing_and_a_changed_item_reuploads_only_itself(
    weed_server, s3_bucket, s3_env, fault_proxy, tmp_path
):
    source = tmp_path / "export"
    shutil.copytree(EXAMPLES / "export", source)
    uri = f"s3://{s3_bucket}/{PREFIX}"
    s3_env(fault_proxy.endpoint_url)
    first = run_flow(source, uri, batch_size=5)
    assert first["failed"] == 0
    masks = {k for k in stored(weed_server, s3_bucket) if not is_state(k)} - {"label_map.json"}
    assert set(output_uploads(fault_proxy, s3_bucket)) == masks | {
        "label_map.json",
        "manifest.jsonl",
    }

    # Other batches (one of all 13 items, so Prefect's batch cache cannot answer): each item's
    # record says its masks are stored with the same sha256 and size, so no mask is sent again
    # nor even compared (no HEAD).
    fault_proxy.clear()
    second = run_flow(source, uri, batch_size=100)
    assert second["failed"] == 0 and second["outputs_written"] == 0
    assert output_uploads(fault_proxy, s3_bucket) == []  # no record changed, so no manifest
    burned = {k for k in masks if k.split("/")[0] in ("semantic", "instance", "binary")}
    assert burned.isdisjoint(proxied(fault_proxy, "HEAD", s3_bucket))

    # A run asked to verify compares every mask with the bucket (a HEAD each), sends none.
    fault_proxy.clear()
    verified = run_flow(source, uri, batch_size=100, verify=True)
    # (seen once in a full suite on a loaded machine: one output written; name it if it recurs)
    sent = output_uploads(fault_proxy, s3_bucket)
    assert verified["failed"] == 0 and verified["outputs_written"] == 0, (verified, sent)
    assert sent == []
    assert masks <= set(proxied(fault_proxy, "HEAD", s3_bucket))

    # A mask deleted from the bucket by hand: the next run (other batches, so nothing comes from
    # Prefect's cache) trusts the records, then finds the mask gone and writes it again.
    weed_server.client().delete_object(
        Bucket=s3_bucket, Key=f"{PREFIX}/semantic/street/scene_001.png"
    )
    fault_proxy.clear()
    restored = run_flow(source, uri, batch_size=7)
    assert restored["failed"] == 0 and restored["cached_batches"] == 0
    # (its record already said what is stored again: neither it nor the manifest changes)
    assert set(output_uploads(fault_proxy, s3_bucket)) == {"semantic/street/scene_001.png"}
    assert "semantic/street/scene_001.png" in stored(weed_server, s3_bucket)

    # Drop the only person annotation of scene_003: exactly its objects are uploaded again.
    path = source / "json" / "street" / "scene_003.json"
    item = json.loads(path.read_text())
    item["annotations"] = [a for a in item["annotations"] if a["label"] != "person"]
    path.write_text(json.dumps(item))
    fault_proxy.clear()
    third = run_flow(source, uri, batch_size=100)
    assert third["failed"] == 0
    records = {
        r["path"]: r
        for r in map(json.loads, stored(weed_server, s3_bucket)["manifest.jsonl"].splitlines())
    }
    scene_003 = {o["key"] for o in records["street/scene_003"]["outputs"]}
    assert all(k.endswith(("street/scene_003.png", "street/scene_003.json")) for k in scene_003)
    assert set(output_uploads(fault_proxy, s3_bucket)) == scene_003 | {"manifest.jsonl"}
    assert "binary/person/street/scene_003.png" not in stored(weed_server, s3_bucket)
    assert len(fault_proxy.requests(r"^POST .*\?delete")) == 1


@pytest.mark.usefixtures("prefect_api")
def test_a_cached_rerun_restores_an_object_deleted_from_the_bucket(
    weed_server, s3_bucket, s3_env, fault_proxy
):
    """Prefect's batch cache does not hide a deleted object: one listing of the prefix finds it
    missing, its item is burned again, and only that object is uploaded (its record, hence the
    manifest, already said what is stored again)."""
    uri = f"s3://{s3_bucket}/{PREFIX}"
    s3_env(fault_proxy.endpoint_url)
    assert run_flow(EXAMPLES / "export", uri, batch_size=5)["failed"] == 0
    key = "semantic/street/scene_002.png"
    original = stored(weed_server, s3_bucket)[key]
    weed_server.client().delete_object(Bucket=s3_bucket, Key=f"{PREFIX}/{key}")
    fault_proxy.clear()
    second = run_flow(EXAMPLES / "export", uri, batch_size=5)
    refs = sorted(open_source(str(EXAMPLES / "export")).list_items(), key=lambda ref: ref.path)
    assert second["cached_batches"] == len(batches_of(refs, 5)) and second["failed"] == 0
    assert stored(weed_server, s3_bucket)[key] == original
    assert set(output_uploads(fault_proxy, s3_bucket)) == {key}
    assert len(fault_proxy.requests(r"^GET .*list-type=2")) >= 1


@pytest.mark.usefixtures("prefect_api")
def test_killed_run_resumes_without_duplicates_or_gaps(
    weed_server, s3_bucket, s3_env, fault_proxy, local_run
):
    """SIGKILL a ``polyburn run`` while one upload hangs, then run again to completion."""
    import prefect.settings

    _, local_masks = local_run
    uri = f"s3://{s3_bucket}/{PREFIX}"
    stalled = rf"^PUT /{s3_bucket}/{PREFIX}/semantic/street/scene_002\.png"
    fault_proxy.add("stall", times=1, match=stalled, stall_s=120)
    env = dict(os.environ)
    env.update(
        AWS_ENDPOINT_URL=fault_proxy.endpoint_url,
        POLYBURN_S3_READ_TIMEOUT="120",
        PREFECT_API_URL=str(prefect.settings.PREFECT_API_URL.value()),
    )
    command = [sys.executable, "-c", "import sys; from polyburn.cli import main; sys.exit(main())"]
    args = ["run", str(EXAMPLES / "export"), uri, "--mode", ",".join(ALL_MODES), "--no-progress"]
    process = subprocess.Popen(
        command + args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 90
        while not fault_proxy.requests(stalled):
            assert process.poll() is None, process.communicate()[0].decode()[-2000:]
            assert time.monotonic() < deadline, "the run never reached the stalled upload"
            time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=30)
    assert process.returncode == -signal.SIGKILL

    before = stored(weed_server, s3_bucket)
    assert "manifest.jsonl" not in before  # written last: never by a run that did not finish
    done_before = {k for k in before if not is_state(k)}
    assert "label_map.json" in done_before and done_before < set(local_masks)
    assert "semantic/street/scene_002.png" not in before

    fault_proxy.clear()
    s3_env(fault_proxy.endpoint_url)
    summary = run_flow(EXAMPLES / "export", uri, batch_size=100)
    assert summary["failed"] == 0

    after = stored(weed_server, s3_bucket)
    assert {k for k in after if not is_state(k)} == set(local_masks)  # no gap, nothing extra
    assert all(after[k] == v for k, v in local_masks.items())
    sent = output_uploads(fault_proxy, s3_bucket)
    assert len(sent) == len(set(sent))  # no object uploaded twice
    assert set(sent) == set(local_masks) - done_before | {"manifest.jsonl"}
    assert sent[-1] == "manifest.jsonl"  # after every object it lists was confirmed
    for line in after["manifest.jsonl"].decode().splitlines():
        for output in json.loads(line)["outputs"]:
            assert hashlib.sha256(after[output["key"]]).hexdigest() == output["sha256"]


# ---------------------------------------------------------------------------- checksums


def test_server_verifies_the_checksum_and_rejects_a_corrupted_upload(
    weed_server, s3_bucket, s3_env
):
    destination = S3Destination.from_uri(f"s3://{s3_bucket}/{PREFIX}")
    data = os.urandom(4096)
    attempts = []

    def corrupt(params, **_):  # flip one byte after our checksum was computed
        raw = params["body"].read()
        params["body"] = io.BytesIO(bytes([raw[0] ^ 0xFF]) + raw[1:])

    def count(request, **_):
        attempts.append(request.url)

    destination.client.meta.events.register("before-call.s3.PutObject", corrupt)
    destination.client.meta.events.register("before-send.s3.PutObject", count)
    with pytest.raises(TransientError) as excinfo:
        destination.put("semantic/a.png", data, "image/png", {"item-id": "i", "revision": "r"})
    assert str(excinfo.value) == (
        f"s3://{s3_bucket}/{PREFIX}/semantic/a.png: write failed after 5 attempt(s): "
        "HTTP 400 BadDigest"
    )
    assert len(attempts) == 5 and "semantic/a.png" not in stored(weed_server, s3_bucket)

    once = []  # corrupted in transit once: sent again, stored intact

    def corrupt_once(params, **kwargs):
        if not once:
            once.append(1)
            corrupt(params, **kwargs)

    destination.client.meta.events.unregister("before-call.s3.PutObject", corrupt)
    destination.client.meta.events.register("before-call.s3.PutObject", corrupt_once)
    assert destination.put("semantic/b.png", data, "image/png", {})
    assert stored(weed_server, s3_bucket)["semantic/b.png"] == data
    assert len(attempts) == 7

    destination.client.meta.events.unregister("before-call.s3.PutObject", corrupt_once)
    assert destination.put("semantic/a.png", data, "image/png", {"item-id": "i", "revision": "r"})
    head = weed_server.client().head_object(
        Bucket=s3_bucket, Key=f"{PREFIX}/semantic/a.png", ChecksumMode="ENABLED"
    )
    assert head["ChecksumSHA256"] == base64.b64encode(hashlib.sha256(data).digest()).decode()
    assert stored(weed_server, s3_bucket)["semantic/a.png"] == data
    # same bytes and provenance: skipped; new revision: uploaded again
    assert not destination.put(
        "semantic/a.png", data, "image/png", {"item-id": "i", "revision": "r"}
    )
    assert destination.put("semantic/a.png", data, "image/png", {"item-id": "i", "revision": "r2"})


# ---------------------------------------------------------------------------- faults


@pytest.mark.usefixtures("no_retry_backoff")
@pytest.mark.parametrize(
    ("kind", "times", "options"),
    [
        ("reset", 2, {}),
        ("close", 2, {}),
        ("stall", 1, {"stall_s": 3}),
        ("http503", 4, {}),  # 4 failures + 1 success = the whole budget of 5
        ("http500", 2, {}),
    ],
)
def test_each_put_fault_heals_within_the_budget(
    s3_bucket, s3_env, fault_proxy, kind, times, options, weed_server
):
    s3_env(fault_proxy.endpoint_url, max_attempts=5, read_timeout=1)
    destination = S3Destination.from_uri(f"s3://{s3_bucket}/{PREFIX}")
    fault_proxy.add(kind, times=times, match=rf"^PUT /{s3_bucket}/{PREFIX}/x\.png", **options)
    assert destination.put("x.png", b"png bytes", "image/png", {})
    # each fault cost one attempt and the next one healed it (a stall, too: read_timeout cut it)
    assert [s.fault for s in fault_proxy.requests(r"^PUT .*/x\.png")] == [kind] * times + [None]
    assert stored(weed_server, s3_bucket)["x.png"] == b"png bytes"


@pytest.mark.usefixtures("no_retry_backoff")
def test_truncated_and_failed_reads_heal(weed_server, s3_bucket, s3_env, fault_proxy):
    payload = json.dumps({f"label-{i}": i for i in range(2000)}).encode()
    weed_server.client().put_object(Bucket=s3_bucket, Key=f"{PREFIX}/label_map.json", Body=payload)
    s3_env(fault_proxy.endpoint_url, max_attempts=5)
    destination = S3Destination.from_uri(f"s3://{s3_bucket}/{PREFIX}")
    fault_proxy.add("truncate", times=2, match=r"^GET .*label_map", truncate_bytes=100)
    fault_proxy.add("http503", times=1, match=r"^GET .*label_map")
    assert destination.get("label_map.json") == payload
    faults = [s.fault for s in fault_proxy.requests(r"^GET .*label_map")]
    assert faults == ["truncate", "truncate", "http503", None]
    assert destination.get("manifest.jsonl") is None

    fault_proxy.clear()
    fault_proxy.add("truncate", times=None, match=r"^GET .*label_map", truncate_bytes=100)
    with pytest.raises(TransientError) as excinfo:
        destination.get("label_map.json")
    assert str(excinfo.value) == (
        f"s3://{s3_bucket}/{PREFIX}/label_map.json: read failed after 5 attempts "
        "(ResponseStreamingError)"
    )
    assert len(fault_proxy.requests(r"^GET .*label_map")) == 5


@pytest.mark.usefixtures("no_retry_backoff")
def test_a_fault_beyond_the_budget_is_a_one_line_transient_error(s3_bucket, s3_env, fault_proxy):
    s3_env(fault_proxy.endpoint_url, max_attempts=3)
    destination = S3Destination.from_uri(f"s3://{s3_bucket}/{PREFIX}")
    fault_proxy.add("reset", times=None, match=r"^PUT .*/y\.png")
    with pytest.raises(TransientError) as excinfo:
        destination.put("y.png", b"data", "image/png", {})
    message = str(excinfo.value)
    assert f"s3://{s3_bucket}/{PREFIX}/y.png: write failed" in message
    assert "\n" not in message and os.environ["AWS_SECRET_ACCESS_KEY"] not in message
    assert len(fault_proxy.requests(r"^PUT .*/y\.png")) == 3


@pytest.mark.usefixtures("prefect_api", "no_retry_backoff")
def test_an_item_whose_upload_outlasts_botocore_is_retried_and_counted(
    weed_server, s3_bucket, s3_env, fault_proxy
):
    s3_env(fault_proxy.endpoint_url, max_attempts=3)
    fault_proxy.add("http503", times=4, match=r"^PUT .*/semantic/street/scene_003\.")
    summary = run_flow(EXAMPLES / "export", f"s3://{s3_bucket}/{PREFIX}")
    assert summary["failed"] == 0
    assert summary["item_retries"] == 1  # 3 botocore attempts failed, the item's retry healed
    assert summary["io_retries"] == 1  # ... after one more botocore retry of its own
    assert len(fault_proxy.requests(r"^PUT .*/semantic/street/scene_003\.")) == 5
    records = [
        json.loads(line) for line in stored(weed_server, s3_bucket)["manifest.jsonl"].splitlines()
    ]
    assert {r["path"]: r.get("retries", 0) for r in records}["street/scene_003"] == 1


@pytest.mark.usefixtures("prefect_api", "no_retry_backoff")
def test_an_item_whose_uploads_never_heal_fails_alone(
    weed_server, s3_bucket, s3_env, fault_proxy, local_run, caplog
):
    _, local_masks = local_run
    s3_env(fault_proxy.endpoint_url, max_attempts=5)
    uri = f"s3://{s3_bucket}/{PREFIX}"
    masks_of_003 = r"^PUT [^?]*/(semantic|instance|binary)/[^?]*street/scene_003\."
    fault_proxy.add("http503", times=None, match=masks_of_003)
    summary = run_flow(EXAMPLES / "export", uri)
    assert (summary["ok"], summary["failed"]) == (12, 1)
    (failure,) = summary["failures"]
    assert failure["path"] == "street/scene_003"
    assert failure["error"] == (
        f"street/scene_003: s3://{s3_bucket}/{PREFIX}/semantic/street/scene_003.png: "
        "write failed after 5 attempt(s): HTTP 503 SlowDown"
    )
    # botocore's 5 attempts, then polyburn's item-level retries, 5 attempts each
    assert len(fault_proxy.requests(masks_of_003)) == 5 * (1 + ITEM_RETRIES)
    objects = stored(weed_server, s3_bucket)
    records = [json.loads(line) for line in objects["manifest.jsonl"].splitlines()]
    assert {r["path"] for r in records if r["status"] == "failed"} == {"street/scene_003"}
    assert not [k for k in objects if "scene_003" in k and not is_state(k)]
    assert {k for k in objects if not is_state(k)} == {
        k for k in local_masks if "scene_003" not in k
    }

    fault_proxy.clear()  # the next run redoes exactly the missing item
    with caplog.at_level(logging.DEBUG, logger="polyburn.s3"):
        again = run_flow(EXAMPLES / "export", uri, batch_size=4)
    assert again["failed"] == 0
    why = [r.getMessage() for r in caplog.records if r.getMessage().startswith("uploading")]
    sent = set(output_uploads(fault_proxy, s3_bucket))
    redone = {k for k in sent if "scene_003" in k or k == "manifest.jsonl"}
    assert {k.rsplit("/", 1)[-1] for k in redone} == {
        "scene_003.png",
        "scene_003.json",
        "manifest.jsonl",
    }, why
    # the split of scene_003 (ML subset validation) lists it now that it is ok
    redone |= {k for k in sent if k.startswith("splits/")}
    assert {k for k in redone if k.startswith("splits/")} == {"splits/validation.txt"}, why
    assert b"street/scene_003\n" in stored(weed_server, s3_bucket)["splits/validation.txt"]
    # Nothing else is sent, unless the encoder compressed a mask into other bytes (see
    # same_output): then the object is replaced by the same mask, never by another one.
    after = stored(weed_server, s3_bucket)
    for key in sent - redone:
        assert same_output(key, after[key], objects[key]), (key, why)


@pytest.mark.usefixtures("prefect_api", "no_retry_backoff")
def test_prefect_task_retry_takes_over_when_botocore_gives_up(
    weed_server, s3_bucket, s3_env, fault_proxy
):
    """Five 503s on the manifest exhaust botocore's five attempts; the task retry succeeds."""
    s3_env(fault_proxy.endpoint_url, max_attempts=5)
    fault_proxy.add("http503", times=5, match=r"^PUT .*/manifest\.jsonl")
    summary = run_flow(EXAMPLES / "export", f"s3://{s3_bucket}/{PREFIX}", batch_size=100)
    assert summary["failed"] == 0
    faults = [s.fault for s in fault_proxy.requests(r"^PUT .*/manifest\.jsonl")]
    assert faults == ["http503"] * 5 + [None]
    assert "manifest.jsonl" in stored(weed_server, s3_bucket)


# ---------------------------------------------------------------------------- keys


class _HostileSource:
    """Items whose paths and ids come from an attacker-controlled export."""

    uri = "hostile"

    def __init__(self, paths: list[str]) -> None:
        self.template = json.loads((EXAMPLES / "export/json/street/scene_001.json").read_text())
        self.paths = paths

    def load(self, ref: ItemRef, max_pixels: int):
        data = dict(self.template, id=f"id\x00\n\u00fc{ref.path[:20]}")
        return parse_item(data, ref.path, max_pixels=max_pixels)

    def labels(self) -> None:
        return None


def test_hostile_item_names_stay_under_the_prefix(weed_server, s3_bucket, s3_env):
    client = weed_server.client()
    client.put_object(Bucket=s3_bucket, Key="runs/r1-sibling/canary", Body=b"c")
    destination = S3Destination.from_uri(f"s3://{s3_bucket}/{PREFIX}")
    hostile = [
        "../../x",
        "/abs/olute",
        "a/../../b",
        "..\\..\\win",
        "ctl\x00\x1f\x7fname",
        "n" * 300,
        "\u00e9" * 150,
        "%2E%2E/pct",
        "./.",
        "/".join(["d" * 190] * 6),  # each segment fine, the whole key over 1024 bytes
    ]
    source = _HostileSource(hostile)
    labels = sorted({a["label"] for a in source.template["annotations"] if "label" in a})
    label_map = {label: k for k, label in enumerate(labels, start=1)}
    options = MaskOptions(modes=ALL_MODES)
    records = {
        path: process_item(ItemRef("", path, path), source, destination, options, label_map)
        for path in hostile
    }
    failed = {p: r.error for p, r in records.items() if r.status != "ok"}
    assert set(failed) == {"./.", hostile[-1]}
    assert "item path has no file name" in failed["./."]
    assert "S3 allows 1024" in failed[hostile[-1]]

    keys = [o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket)["Contents"]]
    outside = [k for k in keys if not k.startswith(f"{PREFIX}/")]
    assert outside == ["runs/r1-sibling/canary"]
    assert client.get_object(Bucket=s3_bucket, Key=outside[0])["Body"].read() == b"c"
    for key in keys:
        parts = key.split("/")
        assert not {".", "..", ""} & set(parts), key
        assert not any(ord(c) < 0x20 or c in "\x7f\\" for c in key), key
        assert all(len(p.encode()) <= 255 for p in parts), key  # fits a file name
    written = sum(len(r.outputs or []) for r in records.values())
    kept = [k for k in keys if k.startswith(f"{PREFIX}/.polyburn/records/")]
    assert len(kept) == len(records) - len(failed)  # a record per item that got one
    # canary + write-check + every output + the records, nothing else
    assert len(keys) == 1 + 1 + written + len(kept)
    head = client.head_object(Bucket=s3_bucket, Key=f"{PREFIX}/semantic/%2E%2E/%2E%2E/x.png")
    assert head["Metadata"]["item-id"] == "id%00%0A%C3%BC../../x"

    for bad in ("../escape", "a/../../escape", "/abs", "a//b", "a\\b", "x\x00", "\udcff"):
        with pytest.raises(UnsafeKeyError):
            destination.put(bad, b"x", "text/plain", {})
        with pytest.raises(UnsafeKeyError):
            destination.get(bad)
    assert len(client.list_objects_v2(Bucket=s3_bucket)["Contents"]) == len(keys)


def test_remove_deletes_in_chunks_and_ignores_missing_keys(weed_server, s3_bucket, s3_env):
    destination = S3Destination.from_uri(f"s3://{s3_bucket}/{PREFIX}")
    destination.put("binary/a/x.png", b"1", "image/png", {})
    destination.put("binary/b/x.png", b"2", "image/png", {})
    calls = []
    destination.client.meta.events.register(
        "before-call.s3.DeleteObjects", lambda params, **_: calls.append(params)
    )
    missing = [f"binary/none/{i}.png" for i in range(2400)]
    destination.remove(["binary/a/x.png", *missing])
    assert len(calls) == 3
    assert set(stored(weed_server, s3_bucket)) == {"binary/b/x.png", ".polyburn/write-check"}


# ---------------------------------------------------------------------------- fail fast


def test_wrong_credentials_or_missing_bucket_fail_in_one_line_without_secrets(
    s3_bucket, s3_env, monkeypatch, capsys
):
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    export = str(EXAMPLES / "export")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-" + secret[:8])

    def flow_started(*args, **kwargs):
        raise AssertionError("the flow started: the S3 check did not fail before Prefect")

    monkeypatch.setattr("flows.polygons_to_masks.polygons_to_masks_params", flow_started)
    assert main(["run", export, f"s3://{s3_bucket}/{PREFIX}", "--no-progress"]) == 2
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and out == ""
    assert err.startswith(f"polyburn: error: S3 bucket '{s3_bucket}' at http://127.0.0.1:")
    assert "credentials rejected (SignatureDoesNotMatch)" in err and "(env)" in err
    assert "wrong-" not in err and secret not in err

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "no-such-key")
    assert main(["run", export, f"s3://{s3_bucket}/{PREFIX}", "--no-progress"]) == 2
    out, err = capsys.readouterr()
    assert "credentials rejected (InvalidAccessKeyId)" in err and err.count("\n") == 1

    s3_env()
    assert main(["run", export, "s3://polyburn-no-such-bucket/x", "--no-progress"]) == 2
    out, err = capsys.readouterr()
    assert "S3 bucket 'polyburn-no-such-bucket' does not exist at http://127.0.0.1:" in err
    assert err.count("\n") == 1 and secret not in err + out


def test_denied_list_or_write_is_reported_up_front(weed_server, s3_bucket, s3_env):
    for operation, expected in [
        ("ListObjectsV2", "list denied (HTTP 403 AccessDenied; needs s3:ListBucket"),
        ("PutObject", "write denied (HTTP 403 AccessDenied; needs s3:PutObject"),
    ]:
        client = weed_server.client()
        client.meta.events.register(
            f"before-send.s3.{operation}", error_response(403, "AccessDenied")
        )
        with pytest.raises(ConfigError, match=r"^s3://.*") as excinfo:
            S3Destination.from_uri(f"s3://{s3_bucket}/{PREFIX}", client=client)
        assert expected in str(excinfo.value) and s3_bucket in str(excinfo.value)


def test_a_forbidden_head_uploads_and_a_rejected_put_names_the_cause(
    weed_server, s3_bucket, s3_env, caplog
):
    client = weed_server.client()
    client.meta.events.register("before-send.s3.HeadObject", error_response(403, ""))
    destination = S3Destination.from_uri(f"s3://{s3_bucket}/{PREFIX}", client=client)
    assert destination.put("a.png", b"1", "image/png", {})
    assert destination.put("a.png", b"1", "image/png", {})  # cannot compare: uploads again
    assert sum("HEAD answered 403" in r.getMessage() for r in caplog.records) == 1

    wrong = weed_server.client(secret_key="wrong", retries={"total_max_attempts": 1})
    destination = S3Destination.from_uri(f"s3://{s3_bucket}/{PREFIX}", client=wrong, check=False)
    with pytest.raises(ConfigError, match=r"credentials rejected \(SignatureDoesNotMatch\)"):
        destination.put("b.png", b"2", "image/png", {})


def test_endpoint_that_cannot_be_reached_is_a_transient_one_liner(s3_bucket, s3_env):
    s3_env("http://127.0.0.1:9", max_attempts=2, connect_timeout=0.5)
    with pytest.raises(TransientError) as excinfo:
        S3Destination.from_uri(f"s3://{s3_bucket}/{PREFIX}")
    assert str(excinfo.value) == (
        f"cannot reach the S3 endpoint for bucket '{s3_bucket}' at http://127.0.0.1:9 (2 attempts)"
    )


# ---------------------------------------------------------------------------- configuration


def test_uri_and_settings_are_validated():
    assert parse_s3_uri("s3://bucket") == ("bucket", "")
    assert parse_s3_uri("s3://bucket//a//b/") == ("bucket", "a/b")
    for bad in ("s3://", "s3://a", "s3://bad/bucket/../x", "s3://b_k/./x", "s3://bk/a\x00"):
        with pytest.raises(ConfigError):
            parse_s3_uri(bad)


def test_settings_from_the_environment(s3_env, s3_bucket, monkeypatch):
    s3_env(max_attempts=7, read_timeout=3, connect_timeout=2, max_pool=4)
    destination = S3Destination.from_uri(f"s3://{s3_bucket}")
    config = destination.client.meta.config
    assert config.retries == {"mode": "standard", "total_max_attempts": 7}
    assert (config.read_timeout, config.connect_timeout, config.max_pool_connections) == (3, 2, 4)
    assert config.s3 == {"addressing_style": "path"}  # a custom endpoint
    assert destination.max_attempts == 7 and destination.uri == f"s3://{s3_bucket}"
    monkeypatch.setenv("POLYBURN_S3_MAX_ATTEMPTS", "0")
    with pytest.raises(ConfigError, match="POLYBURN_S3_MAX_ATTEMPTS must be at least 1"):
        S3Destination.from_uri(f"s3://{s3_bucket}")


def test_credentials_block_needs_prefect_aws(s3_env, s3_bucket, monkeypatch):
    monkeypatch.setenv("POLYBURN_AWS_CREDENTIALS_BLOCK", "masks-bucket")
    monkeypatch.setitem(sys.modules, "prefect_aws", None)  # as if not installed
    with pytest.raises(ConfigError) as excinfo:
        S3Destination.from_uri(f"s3://{s3_bucket}")
    assert str(excinfo.value) == (
        "POLYBURN_AWS_CREDENTIALS_BLOCK=masks-bucket needs the prefect-aws package "
        "(pip install prefect-aws), or unset it to use boto3's default credential chain"
    )


def test_credentials_block_session_endpoint_and_config_are_used(
    weed_server, s3_bucket, s3_env, monkeypatch
):
    """The block glue, with a stand-in for prefect_aws (not a dependency, see S3.md): the
    block's session, endpoint and botocore config are used; the environment's are not."""
    import types

    import boto3
    from botocore.config import Config

    loaded = []

    class FakeParameters:
        def get_params_override(self):
            return {
                "endpoint_url": weed_server.endpoint_url,
                "config": Config(read_timeout=7, s3={"addressing_style": "path"}),
            }

    class FakeAwsCredentials:
        aws_client_parameters = FakeParameters()

        @classmethod
        def load(cls, name):
            loaded.append(name)
            return cls()

        def get_boto3_session(self):
            return boto3.session.Session(
                aws_access_key_id=weed_server.access_key,
                aws_secret_access_key=weed_server.secret_key,
                region_name=weed_server.region,
            )

    monkeypatch.setitem(
        sys.modules, "prefect_aws", types.SimpleNamespace(AwsCredentials=FakeAwsCredentials)
    )
    monkeypatch.setenv("POLYBURN_AWS_CREDENTIALS_BLOCK", "masks-bucket")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # the block's endpoint wins
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    destination = S3Destination.from_uri(f"s3://{s3_bucket}/{PREFIX}")
    assert loaded == ["masks-bucket"]
    assert destination.client.meta.endpoint_url == weed_server.endpoint_url
    assert destination.client.meta.config.read_timeout == 7
    assert destination.client.meta.config.retries["total_max_attempts"] == 5
    assert destination.credentials_source == "the Prefect block 'masks-bucket'"
    assert destination.put("k.json", b"{}", "application/json", {})
    assert destination.get("k.json") == b"{}"


def test_the_dataset_command_assembles_the_same_files_on_s3_as_in_a_folder(
    weed_server, s3_bucket, s3_env, tmp_path
):
    """Items burned one by one (as event-driven runs do), then ``polyburn dataset``: the COCO
    files and splits read back from S3 are those of a local folder built the same way."""
    from polyburn.destinations.local import LocalDestination
    from polyburn.pipeline import write_label_map
    from polyburn.sources.local import LocalSource

    uri = f"s3://{s3_bucket}/{PREFIX}"
    source = LocalSource(EXAMPLES / "export")
    refs = list(source.list_items())
    labels = sorted({a.label for ref in refs for a in source.load(ref, 10**8).annotations})
    label_map = {label: k for k, label in enumerate(labels, start=1)}
    options = MaskOptions(modes=["coco"])
    for destination in (S3Destination.from_uri(uri), LocalDestination(tmp_path / "local")):
        write_label_map(destination, label_map)
        for ref in refs:
            assert process_item(ref, source, destination, options, label_map).status == "ok"
    assert main(["dataset", uri]) == 0
    assert main(["dataset", str(tmp_path / "local")]) == 0
    on_s3 = {
        k: v
        for k, v in stored(weed_server, s3_bucket).items()
        if k.startswith(("coco/instances", "splits/"))
    }
    local = {
        p.relative_to(tmp_path / "local").as_posix(): p.read_bytes()
        for p in [*(tmp_path / "local/coco").glob("*.json"), *(tmp_path / "local/splits").glob("*")]
    }
    assert on_s3 == local and "coco/instances_train.json" in on_s3
    coco = json.loads(on_s3["coco/instances.json"])
    # one image per image item, one per frame of the example's 16-frame video
    assert len(coco["images"]) == len(refs) - 1 + 16 and len(coco["annotations"]) > len(refs)
