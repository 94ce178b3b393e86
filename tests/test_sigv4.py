"""polyburn's SigV4 signer against botocore's S3SigV4Auth: the same request at the same instant
must get the same headers, in the same order, byte for byte."""

from __future__ import annotations

import datetime
import hashlib
import itertools
from urllib.parse import quote, urlsplit

import botocore.auth
import pytest
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials as BotoCredentials
from botocore.credentials import ReadOnlyCredentials

from polyburn.destinations import sigv4
from polyburn.destinations.s3_put import LeanPut

INSTANT = datetime.datetime(2026, 12, 5, 9, 41, 7)
TIMESTAMP = "20261205T094107Z"
BODY = b"\x89PNG" + bytes(range(256)) * 9
CHECKSUM = {
    "request_algorithm": {"in": "header", "name": "x-amz-checksum-sha256", "algorithm": "sha256"}
}

URLS = [
    "http://127.0.0.1:8333/bucket",  # path style, a port
    "https://bucket.s3.eu-west-1.amazonaws.com",  # virtual host, default port
    "https://s3.eu-west-1.amazonaws.com:443/bucket",  # default port written out
    "http://[::1]:9000/bucket",  # IPv6
    "http://MinIO.Example.org:80/Bucket",  # upper case host, default port
]
KEYS = [
    "masks/semantic/a.png",
    "masks/semantic/a b+c=d~e%41 ü/x.png",
    "p/(1)&'!$*,;:@.png",
]
HEADERS = [
    {"Content-Type": "image/png", "x-amz-meta-sha256": "ab" * 32},
    {
        "Content-Type": "application/json",
        "x-amz-sdk-checksum-algorithm": "SHA256",
        "x-amz-checksum-sha256": "q1w2e3r4t5y6u7i8o9p0",
        "x-amz-meta-item-id": "  6512  spaced   out ",
        "If-None-Match": "*",
        "User-Agent": "Boto3/1.0 md/polyburn",
        "Expect": "100-continue",
    },
    {"content-type": "text/plain", "If-Match": '"0f00"', "X-Amz-Meta-Mixed-Case": "Yes"},
]
CREDENTIALS = [
    ("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", None),
    ("ASIATEMPORARY", "secret/with+chars", "FwoGZXIvYXdzEJr//////////token=="),
]


def botocore_headers(
    url: str, headers: dict, credentials: tuple, region: str, s3_config: dict | None
) -> list[tuple[str, str]]:
    request = AWSRequest("PUT", url, headers=dict(headers), data=BODY)
    request.context.update(
        client_config=Config(s3=s3_config), checksum=CHECKSUM, has_streaming_input=True
    )
    botocore.auth.S3SigV4Auth(BotoCredentials(*credentials), "s3", region).add_auth(request)
    return list(request.prepare().headers.items())


@pytest.fixture
def frozen_botocore(monkeypatch):
    monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda: INSTANT)


@pytest.mark.parametrize("url", URLS)
def test_signed_headers_are_botocores_for_every_kind_of_request(frozen_botocore, url):
    region = "eu-west-1"
    keys = sigv4.SigningKeys(region)
    for key, headers, credentials, s3_config in itertools.product(
        KEYS, HEADERS, CREDENTIALS, [None, {"payload_signing_enabled": True}]
    ):
        full_url = f"{url}/{quote(key, safe='/~')}"
        expected = botocore_headers(full_url, headers, credentials, region, s3_config)
        payload = dict(expected)["X-Amz-Content-SHA256"]
        signed = sigv4.sign(
            "PUT",
            sigv4.host_of(full_url),
            urlsplit(full_url).path,
            headers,
            None if payload == "UNSIGNED-PAYLOAD" else hashlib.sha256(BODY).hexdigest(),
            ReadOnlyCredentials(*credentials),
            keys,
            TIMESTAMP,
        )
        signed["Content-Length"] = str(len(BODY))
        assert list(signed.items()) == expected, (full_url, headers, credentials)


def test_a_wrong_secret_or_day_changes_the_signature():
    keys = sigv4.SigningKeys("us-east-1")
    args = ("PUT", "h", "/b/k", {"Content-Type": "x"}, "0" * 64)
    one = sigv4.sign(*args, ReadOnlyCredentials("A", "s1", None), keys, TIMESTAMP)["Authorization"]
    other = sigv4.sign(*args, ReadOnlyCredentials("A", "s2", None), keys, TIMESTAMP)[
        "Authorization"
    ]
    later = sigv4.sign(*args, ReadOnlyCredentials("A", "s1", None), keys, "20261206T000000Z")
    assert one != other and one != later["Authorization"]
    assert (
        sigv4.sign(*args, ReadOnlyCredentials("A", "s1", None), keys, TIMESTAMP)["Authorization"]
        == one
    )


class _Client:
    """What LeanPut reads of a botocore client, with an S3 config."""

    def __init__(self, s3_config):
        class Meta:
            config = Config(s3=s3_config, retries={"mode": "standard", "total_max_attempts": 3})

            class service_model:
                @staticmethod
                def operation_model(name):
                    return None

        class Signer:
            _credentials = BotoCredentials("AKID", "secret")

        class Endpoint:
            http_session = None

        self.meta = Meta
        self._request_signer = Signer
        self._endpoint = Endpoint


@pytest.mark.parametrize(
    "base_url, s3_config, checksummed",
    list(
        itertools.product(
            ["http://127.0.0.1:8333/bucket", "https://bucket.s3.amazonaws.com"],
            [None, {"payload_signing_enabled": True}, {"payload_signing_enabled": False}],
            [True, False],
        )
    ),
)
def test_the_lean_put_signs_the_payload_when_botocore_would(
    frozen_botocore, monkeypatch, base_url, s3_config, checksummed
):
    monkeypatch.setattr("polyburn.destinations.s3_put.time.strftime", lambda fmt, _=None: TIMESTAMP)
    lean = LeanPut(_Client(s3_config), base_url, "us-east-1", "agent/1", 3)
    headers = {"Content-Type": "image/png"}
    if checksummed:
        headers["x-amz-checksum-sha256"] = "c2hh"
    url = f"{base_url}/a%20b.png"
    prepared = lean._signed(url, BODY, headers, hashlib.sha256(BODY).hexdigest())
    expected = botocore_headers(
        url, {**headers, "User-Agent": "agent/1"}, ("AKID", "secret", None), "us-east-1", s3_config
    )
    assert list(prepared.headers.items()) == expected
    assert prepared.url == url and prepared.body == BODY and prepared.method == "PUT"
