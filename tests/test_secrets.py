"""Secrets never leak: run with sentinel credentials and scan every output a person or a system
could see — stdout/stderr, Prefect logs and artifacts, the manifest and label map, exception
messages and the repr of configuration objects."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.support.oracle import EXAMPLES

pytestmark = pytest.mark.usefixtures("prefect_api")


def prefect_outputs() -> str:
    """Every log line, artifact and flow-run parameter set the Prefect API holds."""
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, LogFilter

    def every(read, **kwargs):
        found, offset = [], 0
        while page := read(limit=200, offset=offset, **kwargs):
            found += page
            offset += len(page)
        return found

    with get_client(sync_client=True) as client:
        logs = every(client.read_logs, log_filter=LogFilter())
        artifacts = every(client.read_artifacts, artifact_filter=ArtifactFilter())
        runs = every(client.read_flow_runs)
    assert logs and artifacts and runs
    texts = [log.message for log in logs]
    texts += [json.dumps(a.data, default=str) + str(a.description) for a in artifacts]
    texts += [json.dumps(r.parameters, default=str) + str(r.state) for r in runs]
    return "\n".join(texts)


def cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    from prefect.settings import PREFECT_API_URL

    return subprocess.run(
        [sys.executable, "-m", "polyburn.cli", *args],
        env={**env, "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_LOGGING_LEVEL": "DEBUG"},
        capture_output=True,
        text=True,
        timeout=300,
    )


def scan(secret: str, *texts: str) -> None:
    for text in texts:
        assert secret not in text
        assert secret[:12] not in text  # no prefix of it either


def test_s3_secret_appears_in_no_output(weed_server, s3_bucket, tmp_path):
    secret = weed_server.secret_key
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": weed_server.access_key,
        "AWS_SECRET_ACCESS_KEY": secret,
        "AWS_DEFAULT_REGION": weed_server.region,
        "AWS_ENDPOINT_URL": weed_server.endpoint_url,
        "AWS_CONFIG_FILE": str(tmp_path / "none"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
    }
    ok = cli(
        [
            "run",
            str(EXAMPLES / "broken"),
            f"s3://{s3_bucket}/run",
            "--no-progress",
            "--json",
            "--labels",
            str(EXAMPLES / "broken" / "labels.json"),
        ],
        env,
    )
    assert ok.returncode == 1, ok.stderr  # the broken items failed, the rest went through
    wrong = cli(
        ["run", str(EXAMPLES / "export"), f"s3://{s3_bucket}/run", "--no-progress"],
        {**env, "AWS_SECRET_ACCESS_KEY": "wrong-" + secret},
    )
    assert wrong.returncode == 2 and s3_bucket in wrong.stderr
    assert len(wrong.stderr.strip().splitlines()) == 1 and "Traceback" not in wrong.stderr

    client = weed_server.client()
    stored = [
        client.get_object(Bucket=s3_bucket, Key=o["Key"])["Body"].read().decode("latin-1")
        for o in client.list_objects_v2(Bucket=s3_bucket)["Contents"]
    ]
    heads = [
        json.dumps(client.head_object(Bucket=s3_bucket, Key=o["Key"]), default=str)
        for o in client.list_objects_v2(Bucket=s3_bucket)["Contents"]
    ]
    scan(
        secret, ok.stdout, ok.stderr, wrong.stdout, wrong.stderr, prefect_outputs(), *stored, *heads
    )


def test_configuration_objects_do_not_show_secrets(weed_server, s3_bucket, monkeypatch):
    from polyburn.destinations.s3 import S3Destination

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", weed_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", weed_server.secret_key)
    monkeypatch.setenv("AWS_DEFAULT_REGION", weed_server.region)
    monkeypatch.setenv("AWS_ENDPOINT_URL", weed_server.endpoint_url)
    destination = S3Destination.from_uri(f"s3://{s3_bucket}/x")
    scan(weed_server.secret_key, repr(destination), str(destination), repr(vars(destination)))
