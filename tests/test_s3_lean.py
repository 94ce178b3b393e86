"""The lean ``PutObject`` path (``polyburn/destinations/s3_put.py``) against the session's
SeaweedFS: it stores what botocore stores, fails as botocore fails, retries within the same
bounds, shrinks the in-flight window, and never puts a credential into an error.

Faults are injected below both paths, on the client's own connection pool
(:func:`intercept`), or by the in-repo fault proxy.
"""

from __future__ import annotations

import base64
import concurrent.futures
import hashlib
from typing import Any

import pytest
from botocore.credentials import Credentials
from botocore.exceptions import ClientError

from polyburn.destinations.s3 import S3Destination
from polyburn.destinations.s3_put import LeanPut
from polyburn.errors import ConfigError, PolyburnError, TransientError
from tests.test_s3 import error_response, intercept, proxied, stored

PREFIX = "runs/r1"
META = {"item-id": "i-1", "revision": "r-1"}


def learned(destination: S3Destination) -> LeanPut:
    """A destination past its first small PUT (sent by botocore, which the lean path learns
    its URL and signing region from)."""
    destination.put_record(".polyburn/records/first.json", b"{}")
    assert destination._learner.lean is not None
    return destination._learner.lean


def botocore_put_events(destination: S3Destination) -> list:
    sent: list = []
    destination.client.meta.events.register(
        "before-send.s3.PutObject", lambda request, **_: sent.append(request.url)
    )
    return sent


def test_small_puts_go_lean_and_store_what_botocore_stores(weed_server, s3_bucket, s3_env):
    destination = S3Destination.from_uri(f"s3://{s3_bucket}/{PREFIX}")
    botocore_sent = botocore_put_events(destination)
    data = b"\x89PNG" + bytes(range(256)) * 40
    destination.put_new("semantic/by-botocore.png", data, "image/png", META)  # learns
    assert len(botocore_sent) == 1 and destination._learner.lean is not None
    keys = ["semantic/lean.png", "semantic/a b+c=d~e%41 ü/x.png", "semantic/(1)&'!$*,;:@.png"]
    for key in keys:
        destination.put_new(key, data, "image/png", META)
    assert destination.create(".polyburn/claims/c.json", b'{"c": 1}') is not None
    assert len(botocore_sent) == 1  # none of those went through botocore's pipeline

    client = weed_server.client()
    objects = stored(weed_server, s3_bucket)
    heads = {}
    for key in ["semantic/by-botocore.png", *keys]:
        assert objects[key] == data  # stored under exactly that key
        head = client.head_object(Bucket=s3_bucket, Key=f"{PREFIX}/{key}", ChecksumMode="ENABLED")
        heads[key] = (head["ContentType"], head["Metadata"], head["ChecksumSHA256"], head["ETag"])
    assert all(h == heads[keys[0]] for h in heads.values())  # type, metadata, checksum, ETag
    checksum = base64.b64encode(hashlib.sha256(data).digest()).decode()
    assert heads[keys[0]][:3] == (
        "image/png",
        {**META, "sha256": hashlib.sha256(data).hexdigest()},
        checksum,
    )


def test_conditional_writes_keep_their_meaning_on_the_lean_path(weed_server, s3_bucket, s3_env):
    destination = S3Destination.from_uri(f"s3://{s3_bucket}/{PREFIX}")
    learned(destination)
    tag = destination.create("lock.json", b'{"v": 1}')
    assert tag is not None and destination.create("lock.json", b'{"v": 2}') is None  # 412
    assert destination.replace("lock.json", b'{"v": 3}', '"0000"') is None  # wrong tag: 412
    new_tag = destination.replace("lock.json", b'{"v": 3}', tag)
    assert new_tag not in (None, tag)
    assert destination.get_tagged("lock.json") == (b'{"v": 3}', new_tag)


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (403, "AccessDenied"),
        (403, ""),  # an empty <Code>: botocore reads None
        (403, "SignatureDoesNotMatch"),
        (404, "NoSuchBucket"),
        (400, "InvalidArgument"),
        (400, "BadDigest"),  # sent again, then a TransientError
        (501, "NotImplemented"),
    ],
)
def test_lean_errors_read_as_botocore_errors_do(s3_bucket, s3_env, status, code):
    """The same answer to a PUT gives the same one-line error (and the same number of
    attempts) through the lean path and through botocore."""
    messages = {}
    for path in ("lean", "botocore"):
        destination = S3Destination.from_uri(f"s3://{s3_bucket}/{PREFIX}/{path}")
        learned(destination)
        if path == "botocore":
            destination._learner.lean, destination._learner.off = None, True
        fake = error_response(status, code)

        def answer(request, fake=fake):
            return fake(request) if request.method == "PUT" else None

        with pytest.MonkeyPatch.context() as patch:
            seen = intercept(destination, patch, answer)
            with pytest.raises(PolyburnError) as excinfo:
                destination.put_new("semantic/x.png", b"1", "image/png", META)
        text = str(excinfo.value).replace(f"/{path}/", "/")
        messages[path] = (type(excinfo.value), text, len(seen))
    assert messages["lean"] == messages["botocore"]
    kind, text, attempts = messages["lean"]
    assert kind in (ConfigError, TransientError, PolyburnError) and "\n" not in text
    if code == "AccessDenied":
        assert kind is ConfigError and "write denied" in text


def test_lean_retries_are_bounded_and_shrink_the_window(
    weed_server, s3_bucket, s3_env, fault_proxy, no_retry_backoff
):
    s3_env(fault_proxy.endpoint_url, max_attempts=4)
    destination = S3Destination.from_uri(f"s3://{s3_bucket}/{PREFIX}")
    learned(destination)
    assert destination._learner.lean.max_attempts == 4
    window = destination.window

    fault_proxy.clear()
    fault_proxy.add("http503", times=10, match=r"^PUT .*/throttled\.png")
    with pytest.raises(TransientError) as excinfo:
        destination.put_new("semantic/throttled.png", b"1", "image/png", META)
    assert str(excinfo.value).endswith("write failed after 4 attempt(s): HTTP 503 SlowDown")
    assert proxied(fault_proxy, "PUT", s3_bucket) == ["semantic/throttled.png"] * 4
    assert window.cuts >= 1 and window.window < window.ceiling

    fault_proxy.clear()
    before = destination.retries_in_this_thread()
    fault_proxy.add("reset", times=2, match=r"^PUT .*/reset\.png")
    destination.put_new("semantic/reset.png", b"2", "image/png", META)
    assert proxied(fault_proxy, "PUT", s3_bucket) == ["semantic/reset.png"] * 3
    assert destination.retries_in_this_thread() == before + 2
    assert stored(weed_server, s3_bucket)["semantic/reset.png"] == b"2"

    fault_proxy.clear()
    fault_proxy.add("reset", times=10, match=r"^PUT .*/gone\.png")
    with pytest.raises(TransientError, match=r"write failed after up to 4 attempts"):
        destination.put_new("semantic/gone.png", b"3", "image/png", META)
    assert len(proxied(fault_proxy, "PUT", s3_bucket)) == 4
    assert "semantic/gone.png" not in stored(weed_server, s3_bucket)


def test_a_corrupted_lean_upload_is_refused_and_sent_again(
    weed_server, s3_bucket, s3_env, monkeypatch
):
    destination = S3Destination.from_uri(f"s3://{s3_bucket}/{PREFIX}")
    learned(destination)
    corrupt = [1]

    def flip(request):  # one byte flipped after signing: the server's checksum catches it
        if request.method == "PUT" and corrupt:
            corrupt.pop()
            request.body = bytes([request.body[0] ^ 0xFF]) + request.body[1:]
        return None

    seen = intercept(destination, monkeypatch, flip)
    destination.put_new("semantic/c.png", b"abc" * 100, "image/png", META)
    assert [key for method, key, _ in seen if method == "PUT"] == ["semantic/c.png"] * 2
    assert stored(weed_server, s3_bucket)["semantic/c.png"] == b"abc" * 100


def test_lean_errors_never_carry_credentials(weed_server, s3_bucket, s3_env, monkeypatch):
    destination = S3Destination.from_uri(f"s3://{s3_bucket}/{PREFIX}")
    lean = learned(destination)
    secret = "polyburn-wrong-secret-0123456789"
    monkeypatch.setattr(lean, "_credentials", Credentials(weed_server.access_key, secret))
    with pytest.raises(ConfigError) as excinfo:
        destination.put_new("semantic/x.png", b"1", "image/png", META)
    assert "credentials rejected (SignatureDoesNotMatch)" in str(excinfo.value)
    with pytest.raises(ClientError) as raw:  # the lean path's own exception, before mapping
        lean.put(f"{PREFIX}/x", b"1", {}, hashlib.sha256(b"1").hexdigest(), _none, _none)
    for text in (str(excinfo.value), repr(excinfo.value), str(raw.value), repr(raw.value.response)):
        assert secret not in text and weed_server.access_key not in text
        assert "AWS4-HMAC-SHA256" not in text and "Signature=" not in text


def test_a_redirect_goes_back_to_botocore_for_good(weed_server, s3_bucket, s3_env, monkeypatch):
    destination = S3Destination.from_uri(f"s3://{s3_bucket}/{PREFIX}")
    learned(destination)
    botocore_sent = botocore_put_events(destination)
    moved = [error_response(301, "PermanentRedirect")]
    intercept(destination, monkeypatch, lambda r: moved.pop()(r) if moved else None)
    destination.put_new("semantic/moved.png", b"m", "image/png", META)
    assert destination._learner.off and destination._learner.lean is None
    assert len(botocore_sent) == 1  # the same PUT, sent again by botocore
    destination.put_new("semantic/later.png", b"l", "image/png", META)
    assert len(botocore_sent) == 2
    assert stored(weed_server, s3_bucket)["semantic/moved.png"] == b"m"


def test_what_the_lean_path_will_not_repeat(weed_server, s3_bucket, s3_env):
    """A request botocore did not sign with SigV4 for s3, or whose URL does not end with the
    key, or with a query, is never learned from; big or streamed bodies stay on botocore."""
    client = weed_server.client()

    class Sent:
        def __init__(self, url: str, authorization: str | None) -> None:
            self.url = url
            self.headers = {"Authorization": authorization} if authorization else {}

    v4 = "AWS4-HMAC-SHA256 Credential=AKID/20261205/eu-west-1/s3/aws4_request, Signature=ab"
    ok = LeanPut.learn(
        client, Sent("https://b.s3.eu-west-1.amazonaws.com/p/a%20b.png", v4), "p/a b.png"
    )
    assert ok is not None and ok.region == "eu-west-1"
    assert ok.base_url == "https://b.s3.eu-west-1.amazonaws.com"
    for url, authorization, key in [
        ("https://b.s3.amazonaws.com/p/a.png", None, "p/a.png"),  # unsigned
        ("https://b.s3.amazonaws.com/p/a.png", "AWS AKID:sig", "p/a.png"),  # SigV2
        ("https://b.s3.amazonaws.com/p/a.png", v4.replace("/s3/", "/s3express/"), "p/a.png"),
        ("https://b.s3.amazonaws.com/p/a.png?x-id=PutObject", v4, "p/a.png"),
        ("https://b.s3.amazonaws.com/p/other.png", v4, "p/a.png"),
    ]:
        assert LeanPut.learn(client, Sent(url, authorization), key) is None
    legacy = weed_server.client(retries={"mode": "legacy", "total_max_attempts": 3})
    sent = Sent("https://b.s3.eu-west-1.amazonaws.com/p/a%20b.png", v4)
    assert LeanPut.learn(legacy, sent, "p/a b.png") is None  # other retry rules: botocore's

    destination = S3Destination.from_uri(f"s3://{s3_bucket}/{PREFIX}")
    learned(destination)
    botocore_sent = botocore_put_events(destination)
    destination.put_new("big.bin", b"x" * (1 << 20 | 1), "application/octet-stream", {})
    assert len(botocore_sent) == 1


def test_many_threads_share_the_lean_path(weed_server, s3_bucket, s3_env):
    destination = S3Destination.from_uri(f"s3://{s3_bucket}/{PREFIX}")
    learned(destination)
    keys = [f"semantic/{k:03d}.png" for k in range(200)]
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        list(pool.map(lambda k: destination.put_new(k, k.encode(), "image/png", META), keys))
    objects = stored(weed_server, s3_bucket)
    assert all(objects[k] == k.encode() for k in keys)
    assert destination.window.cuts == 0


def _none(*_: Any) -> None:
    return None
