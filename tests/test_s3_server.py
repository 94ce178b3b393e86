"""Prove the S3 test infrastructure is real (SeaweedFS semantics) and that injected faults work.

Direct tests talk to the session ``weed_server``; proxy tests go through ``fault_proxy`` with
botocore's retry backoff set to 0 (``no_retry_backoff``), so they assert exact attempt counts
without sleeping.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import io
import os
import time
import urllib.parse

import pytest
from boto3.s3.transfer import TransferConfig
from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    IncompleteReadError,
    ResponseStreamingError,
)

from tests.support.fault_proxy import FaultKind, FaultProxy
from tests.support.weed import WeedServer

PAYLOAD = os.urandom(256 * 1024)


def _sha256_b64(data: bytes) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


def _error_code(exc: ClientError) -> str:
    return str(exc.response["Error"]["Code"])


# ---------------------------------------------------------------------------- real server


def test_put_get_round_trip_with_sha256_checksum(weed_server: WeedServer, s3_bucket: str) -> None:
    s3 = weed_server.client()
    put = s3.put_object(Bucket=s3_bucket, Key="a/b.bin", Body=PAYLOAD, ChecksumAlgorithm="SHA256")
    assert put["ChecksumSHA256"] == _sha256_b64(PAYLOAD)
    assert put["ETag"].strip('"') == hashlib.md5(PAYLOAD).hexdigest()

    got = s3.get_object(Bucket=s3_bucket, Key="a/b.bin", ChecksumMode="ENABLED")
    assert got["Body"].read() == PAYLOAD
    assert got["ChecksumSHA256"] == _sha256_b64(PAYLOAD)


def test_wrong_sha256_checksum_is_rejected(weed_server: WeedServer, s3_bucket: str) -> None:
    s3 = weed_server.client()
    with pytest.raises(ClientError) as excinfo:
        s3.put_object(
            Bucket=s3_bucket, Key="bad", Body=PAYLOAD, ChecksumSHA256=_sha256_b64(b"other")
        )
    assert _error_code(excinfo.value) == "BadDigest"
    assert "Contents" not in s3.list_objects_v2(Bucket=s3_bucket)


def test_if_none_match_star_refuses_overwrite(weed_server: WeedServer, s3_bucket: str) -> None:
    s3 = weed_server.client()
    s3.put_object(Bucket=s3_bucket, Key="once", Body=b"first", IfNoneMatch="*")
    with pytest.raises(ClientError) as excinfo:
        s3.put_object(Bucket=s3_bucket, Key="once", Body=b"second", IfNoneMatch="*")
    assert excinfo.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    assert _error_code(excinfo.value) == "PreconditionFailed"
    assert s3.get_object(Bucket=s3_bucket, Key="once")["Body"].read() == b"first"


@pytest.mark.parametrize(
    ("credentials", "expected_code"),
    [
        ({"secret_key": "not-the-secret"}, "SignatureDoesNotMatch"),
        ({"access_key": "no-such-key"}, "InvalidAccessKeyId"),
    ],
)
def test_bad_credentials_are_rejected(
    weed_server: WeedServer, s3_bucket: str, credentials: dict[str, str], expected_code: str
) -> None:
    s3 = weed_server.client(retries={"total_max_attempts": 1}, **credentials)
    with pytest.raises(ClientError) as excinfo:
        s3.put_object(Bucket=s3_bucket, Key="k", Body=b"x")
    assert _error_code(excinfo.value) == expected_code


def test_put_to_missing_bucket_is_no_such_bucket(weed_server: WeedServer) -> None:
    s3 = weed_server.client()
    with pytest.raises(ClientError) as excinfo:
        s3.put_object(Bucket="polyburn-test-does-not-exist", Key="k", Body=b"x")
    assert _error_code(excinfo.value) == "NoSuchBucket"
    names = [b["Name"] for b in s3.list_buckets()["Buckets"]]
    assert "polyburn-test-does-not-exist" not in names  # no silent auto-creation


# ---------------------------------------------------------------------------- fault proxy


@pytest.mark.usefixtures("no_retry_backoff")
@pytest.mark.parametrize("kind", ["reset", "close", "http503", "http500"])
def test_two_transient_faults_then_success(
    weed_server: WeedServer, s3_bucket: str, fault_proxy: FaultProxy, kind: FaultKind
) -> None:
    fault_proxy.add(kind, times=2, match=r"^PUT ")
    s3 = weed_server.client(
        endpoint_url=fault_proxy.endpoint_url, retries={"total_max_attempts": 5}
    )
    put = s3.put_object(Bucket=s3_bucket, Key="retried", Body=PAYLOAD)

    assert put["ResponseMetadata"]["RetryAttempts"] == 2
    puts = fault_proxy.requests(r"^PUT ")
    assert [p.fault for p in puts] == [kind, kind, None]
    direct = weed_server.client().get_object(Bucket=s3_bucket, Key="retried")
    assert direct["Body"].read() == PAYLOAD


@pytest.mark.usefixtures("no_retry_backoff")
def test_resets_exhaust_too_few_attempts(
    weed_server: WeedServer, s3_bucket: str, fault_proxy: FaultProxy
) -> None:
    """Negative control: the same two resets defeat a client allowed only two attempts."""
    fault_proxy.add("reset", times=2, match=r"^PUT ")
    s3 = weed_server.client(
        endpoint_url=fault_proxy.endpoint_url, retries={"total_max_attempts": 2}
    )
    with pytest.raises(ConnectionClosedError):
        s3.put_object(Bucket=s3_bucket, Key="never", Body=PAYLOAD)

    assert [p.fault for p in fault_proxy.requests(r"^PUT ")] == ["reset", "reset"]
    assert "Contents" not in weed_server.client().list_objects_v2(Bucket=s3_bucket)


@pytest.mark.usefixtures("no_retry_backoff")
def test_stall_hits_read_timeout_and_is_retried(
    weed_server: WeedServer, s3_bucket: str, fault_proxy: FaultProxy
) -> None:
    fault_proxy.add("stall", times=1, match=r"^PUT ", stall_s=5)
    s3 = weed_server.client(
        endpoint_url=fault_proxy.endpoint_url,
        read_timeout=1,
        retries={"total_max_attempts": 3},
    )
    started = time.monotonic()
    put = s3.put_object(Bucket=s3_bucket, Key="stalled", Body=b"x")
    elapsed = time.monotonic() - started

    assert put["ResponseMetadata"]["RetryAttempts"] == 1
    assert [p.fault for p in fault_proxy.requests(r"^PUT ")] == ["stall", None]
    # it waited out read_timeout, then retried: the stalled attempt never got its answer (a
    # stall that ran its 5 s would have answered it, with no retry)
    assert elapsed >= 1.0


def test_latency_delays_the_real_response(
    weed_server: WeedServer, s3_bucket: str, fault_proxy: FaultProxy
) -> None:
    weed_server.client().put_object(Bucket=s3_bucket, Key="slow", Body=b"x")
    fault_proxy.add("latency", times=1, match=r"^HEAD ", delay_s=0.4)
    s3 = weed_server.client(endpoint_url=fault_proxy.endpoint_url)
    started = time.monotonic()
    head = s3.head_object(Bucket=s3_bucket, Key="slow")
    assert time.monotonic() - started >= 0.4
    assert head["ContentLength"] == 1
    assert head["ResponseMetadata"]["RetryAttempts"] == 0


def test_truncated_get_body_is_detected(
    weed_server: WeedServer, s3_bucket: str, fault_proxy: FaultProxy
) -> None:
    weed_server.client().put_object(Bucket=s3_bucket, Key="big", Body=PAYLOAD)
    fault_proxy.add("truncate", times=1, match=r"^GET ", truncate_bytes=1000)
    s3 = weed_server.client(endpoint_url=fault_proxy.endpoint_url)
    response = s3.get_object(Bucket=s3_bucket, Key="big")
    assert response["ContentLength"] == len(PAYLOAD)  # headers arrived intact
    with pytest.raises((IncompleteReadError, ResponseStreamingError)):
        response["Body"].read()


@pytest.mark.usefixtures("no_retry_backoff")
def test_truncated_download_is_retried_by_s3transfer(
    weed_server: WeedServer, s3_bucket: str, fault_proxy: FaultProxy
) -> None:
    weed_server.client().put_object(Bucket=s3_bucket, Key="big", Body=PAYLOAD)
    fault_proxy.add("truncate", times=1, match=r"^GET ", truncate_bytes=1000)
    s3 = weed_server.client(endpoint_url=fault_proxy.endpoint_url)
    sink = io.BytesIO()
    s3.download_fileobj(s3_bucket, "big", sink)

    assert sink.getvalue() == PAYLOAD
    assert [p.fault for p in fault_proxy.requests(r"^GET ")] == ["truncate", None]


@pytest.mark.usefixtures("no_retry_backoff")
def test_multipart_upload_survives_part_faults(
    weed_server: WeedServer, s3_bucket: str, fault_proxy: FaultProxy
) -> None:
    """File-object uploads send ``Expect: 100-continue``; parts 1 and 2 each fail once."""
    data = os.urandom(5 * 1024 * 1024 + 4096)
    fault_proxy.add("http500", times=1, match=r"partNumber=1\b")
    fault_proxy.add("reset", times=1, match=r"partNumber=2\b")
    s3 = weed_server.client(
        endpoint_url=fault_proxy.endpoint_url, retries={"total_max_attempts": 3}
    )
    config = TransferConfig(multipart_threshold=5 * 1024 * 1024, multipart_chunksize=5 * 1024**2)
    s3.upload_fileobj(io.BytesIO(data), s3_bucket, "multi", Config=config)

    parts = fault_proxy.requests(r"^PUT .*partNumber=")
    assert sorted(p.fault or "" for p in parts) == ["", "", "http500", "reset"]
    head = weed_server.client().head_object(Bucket=s3_bucket, Key="multi")
    assert head["ETag"].strip('"').endswith("-2")
    got = weed_server.client().get_object(Bucket=s3_bucket, Key="multi")["Body"].read()
    assert got == data


def test_chunked_request_body_is_forwarded_faithfully(
    weed_server: WeedServer, s3_bucket: str, fault_proxy: FaultProxy
) -> None:
    """A presigned PUT with ``Transfer-Encoding: chunked`` reaches the server intact."""
    signer = weed_server.client(endpoint_url=fault_proxy.endpoint_url)
    url = signer.generate_presigned_url(
        "put_object", Params={"Bucket": s3_bucket, "Key": "chunked"}
    )
    parts = urllib.parse.urlsplit(url)
    pieces = [b"a" * 1000, os.urandom(70_000), b"z"]
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=10)
    try:
        conn.request("PUT", f"{parts.path}?{parts.query}", body=iter(pieces), encode_chunked=True)
        response = conn.getresponse()
        response.read()
    finally:
        conn.close()

    assert response.status == 200
    assert response.getheader("Connection") == "close"
    got = weed_server.client().get_object(Bucket=s3_bucket, Key="chunked")["Body"].read()
    assert got == b"".join(pieces)
