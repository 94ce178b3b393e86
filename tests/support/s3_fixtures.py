"""Pytest fixtures for tests against a real S3 server (SeaweedFS), with optional fault injection.

Import them into a conftest with ``from tests.support.s3_fixtures import *`` (or list this module
in ``pytest_plugins``).

* ``weed_server`` (session): one running :class:`~tests.support.weed.WeedServer` per session.
* ``s3_bucket`` (function): name of a fresh, empty, uniquely named bucket on that server; it is
  emptied (objects and unfinished multipart uploads) and deleted afterwards.
* ``fault_proxy`` (function): a started :class:`~tests.support.fault_proxy.FaultProxy` in front
  of the session server, with no faults scheduled; pass ``fault_proxy.endpoint_url`` to
  ``weed_server.client(endpoint_url=...)``.
* ``s3_env`` (function): points boto3's default chain at the session server through the
  environment, as users configure it; call it with a proxy's endpoint and ``POLYBURN_S3_*``
  settings (``s3_env(proxy.endpoint_url, concurrency=8)``) to change them.
* ``no_retry_backoff`` (function): makes botocore's standard-mode retry backoff 0 s so that retry
  tests run fast; retry decisions and attempt counts are unchanged.
"""

from __future__ import annotations

import os
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from botocore.retries.standard import ExponentialBackoff

from tests.support.fault_proxy import FaultProxy
from tests.support.weed import WeedServer

__all__ = ["fault_proxy", "no_retry_backoff", "s3_bucket", "s3_env", "weed_server"]


@pytest.fixture(scope="session")
def weed_server() -> Iterator[WeedServer]:
    """A ``weed mini`` S3 server shared by the whole session, stopped at its end."""
    server = WeedServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(weed_server: WeedServer) -> Iterator[str]:
    """Create a bucket named ``polyburn-test-<12 hex>``, yield its name, then delete it."""
    name = f"polyburn-test-{uuid.uuid4().hex[:12]}"
    client = weed_server.client()
    client.create_bucket(Bucket=name)
    yield name
    try:
        _empty_bucket(client, name)
        client.delete_bucket(Bucket=name)
    except Exception as exc:  # teardown must not mask the test's own outcome
        warnings.warn(f"could not delete test bucket {name}: {exc!r}", stacklevel=1)


def aws_env(weed_server: WeedServer, endpoint: str | None = None) -> dict[str, str]:
    """The environment boto3's default chain needs to reach the session's S3 server (or, with
    ``endpoint``, a proxy in front of it)."""
    return {
        "AWS_ACCESS_KEY_ID": weed_server.access_key,
        "AWS_SECRET_ACCESS_KEY": weed_server.secret_key,
        "AWS_DEFAULT_REGION": weed_server.region,
        "AWS_ENDPOINT_URL": endpoint or weed_server.endpoint_url,
        "AWS_EC2_METADATA_DISABLED": "true",
    }


def stored_objects(weed_server: WeedServer, bucket: str, prefix: str) -> dict[str, bytes]:
    """Every object of ``bucket``, read directly (not via a proxy): key relative to ``prefix/``
    → bytes. Fails if an object lies outside ``prefix/``."""
    client = weed_server.client()
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            assert obj["Key"].startswith(prefix + "/"), obj["Key"]
            body = client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
            out[obj["Key"][len(prefix) + 1 :]] = body
    return out


@pytest.fixture
def fault_proxy(weed_server: WeedServer) -> Iterator[FaultProxy]:
    """A fault-injecting proxy in front of the session's S3 server, stopped after the test."""
    with FaultProxy(weed_server.host, weed_server.s3_port) as proxy:
        yield proxy


@pytest.fixture
def no_retry_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make botocore standard-mode retries sleep 0 s between attempts (for this test only)."""
    monkeypatch.setattr(ExponentialBackoff, "delay_amount", lambda self, context: 0)


def _empty_bucket(client: Any, bucket: str) -> None:
    """Abort unfinished multipart uploads and delete every object of ``bucket``."""
    for upload in client.list_multipart_uploads(Bucket=bucket).get("Uploads", []):
        client.abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys = [{"Key": obj["Key"]} for obj in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})


@pytest.fixture
def s3_env(monkeypatch: pytest.MonkeyPatch, weed_server: WeedServer, tmp_path: Path):
    """Point boto3's default chain at the test server (or a proxy) through the environment."""
    for name in list(os.environ):
        if name.startswith(("POLYBURN_S3_", "AWS_")) or name == "POLYBURN_AWS_CREDENTIALS_BLOCK":
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))

    def configure(endpoint: str | None = None, **polyburn: Any) -> None:
        for name, value in aws_env(weed_server, endpoint).items():
            monkeypatch.setenv(name, value)
        for name, value in polyburn.items():
            monkeypatch.setenv(f"POLYBURN_S3_{name.upper()}", str(value))

    configure()
    return configure
