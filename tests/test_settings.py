"""polyburn.settings: the variable names users have keep working, bad values fail with one line
that names the variable and never a secret, credentials resolve by one precedence, and the
reference table in docs/configuration.md is the one the model generates."""

from __future__ import annotations

import logging
import sys
import types
from pathlib import Path

import pytest

from polyburn import settings as config
from polyburn.errors import ConfigError
from polyburn.settings import Settings, credential, markdown_table

ROOT = Path(__file__).resolve().parents[1]

#: Every name documented before the settings model existed (README, docs, module docstrings).
DOCUMENTED = [
    "DATALOOP_API_KEY",
    "DATALOOP_API_KEY_BLOCK",
    "DATALOOP_GATE_URL",
    "DATALOOP_PATH",
    "POLYBURN_AWS_CREDENTIALS_BLOCK",
    "POLYBURN_DATALOOP_ATTEMPTS",
    "POLYBURN_DATALOOP_BACKOFF_BASE",
    "POLYBURN_DATALOOP_BACKOFF_MAX",
    "POLYBURN_DATALOOP_CONCURRENCY",
    "POLYBURN_DATALOOP_LIMIT",
    "POLYBURN_DATALOOP_LIMIT_BATCH",
    "POLYBURN_DATALOOP_LIMIT_TTL",
    "POLYBURN_DATALOOP_MAX_RETRY_AFTER",
    "POLYBURN_DATALOOP_PAGE_SIZE",
    "POLYBURN_DATALOOP_TIMEOUT",
    "POLYBURN_DEBOUNCE_SECONDS",
    "POLYBURN_DESTINATION",
    "POLYBURN_ENGINE",
    "POLYBURN_ITEM_RETRY_DELAY",
    "POLYBURN_LEASE_SECONDS",
    "POLYBURN_LEASE_WAIT_SECONDS",
    "POLYBURN_MODES",
    "POLYBURN_NIGHTLY_CRON",
    "POLYBURN_S3_ADDRESSING_STYLE",
    "POLYBURN_S3_CONCURRENCY",
    "POLYBURN_S3_CONNECT_TIMEOUT",
    "POLYBURN_S3_MAX_ATTEMPTS",
    "POLYBURN_S3_MAX_POOL",
    "POLYBURN_S3_READ_TIMEOUT",
    "POLYBURN_SERVE_LIMIT",
    "POLYBURN_SHARD_POLL_SECONDS",
    "POLYBURN_SHARD_START_TIMEOUT",
    "POLYBURN_SOURCE",
    "POLYBURN_STATE_DIR",
    "POLYBURN_TIMEZONE",
    "POLYBURN_WEBHOOK_SECRET",
    "POLYBURN_WEBHOOK_SECRET_BLOCK",
    "POLYBURN_WEBHOOK_TOKEN",
    "POLYBURN_WEBHOOK_TOKEN_BLOCK",
]


def test_every_documented_variable_is_a_setting_under_its_old_name():
    names = {config.env_name(field) for field in Settings.model_fields}
    assert set(DOCUMENTED) <= names
    values = {
        "DATALOOP_API_KEY": "k",
        "DATALOOP_GATE_URL": "https://gate.example",
        "POLYBURN_S3_MAX_ATTEMPTS": "7",
        "POLYBURN_DATALOOP_CONCURRENCY": "3",
        "POLYBURN_ENGINE": "rasterio",
        "POLYBURN_MODES": "semantic, instance",
        "POLYBURN_LEASE_SECONDS": "",  # empty: the default
    }
    current = Settings.from_env(values)
    assert current.dataloop_api_key.get_secret_value() == "k"
    assert current.dataloop_gate_url == "https://gate.example"
    assert (current.s3_max_attempts, current.dataloop_concurrency) == (7, 3)
    assert current.engine == "rasterio" and current.modes == ("semantic", "instance")
    assert current.lease_seconds == 300
    assert Settings.from_env({"POLYBURN_DATALOOP_LIMIT": ""}).dataloop_limit == ""  # off


def test_the_process_reads_the_environment_once(monkeypatch):
    monkeypatch.setenv("POLYBURN_S3_MAX_POOL", "4")
    first = config.settings()
    assert first.s3_max_pool == 4
    import os

    os.environ["POLYBURN_S3_MAX_POOL"] = "5"  # behind the settings' back: not seen
    try:
        assert config.settings() is first
    finally:
        monkeypatch.setenv("POLYBURN_S3_MAX_POOL", "4")
    assert config.override(dataloop_concurrency=2).dataloop_concurrency == 2
    assert config.settings().dataloop_concurrency == 2 and config.settings().s3_max_pool == 4


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"POLYBURN_S3_MAX_ATTEMPTS": "0"}, "POLYBURN_S3_MAX_ATTEMPTS must be at least 1, not '0'"),
        ({"POLYBURN_DATALOOP_TIMEOUT": "soon"}, "POLYBURN_DATALOOP_TIMEOUT must be a number"),
        ({"POLYBURN_SERVE_LIMIT": "4.5"}, "POLYBURN_SERVE_LIMIT must be an integer"),
        ({"POLYBURN_ENGINE": "gdal"}, "POLYBURN_ENGINE must be 'kernel' or 'rasterio'"),
        ({"POLYBURN_DATALOOP_PAGE_SIZE": "5000"}, "POLYBURN_DATALOOP_PAGE_SIZE must be at most"),
    ],
)
def test_a_bad_value_is_one_line_naming_the_variable(values, message):
    with pytest.raises(ConfigError) as caught:
        Settings.from_env(values)
    assert str(caught.value).startswith(message)
    assert "\n" not in str(caught.value)


def test_secrets_stay_out_of_reprs_and_messages(caplog):
    secret = "sk-SENTINEL-0123456789abcdef"
    current = Settings.from_env(
        {
            "DATALOOP_API_KEY": secret,
            "POLYBURN_WEBHOOK_SECRET": secret,
            "POLYBURN_WEBHOOK_TOKEN": secret,
        }
    )
    assert secret not in repr(current) and secret not in str(current)
    assert secret not in repr(credential("webhook_token", current))
    assert secret not in str(current.model_dump())


def test_credentials_resolve_block_then_value_then_nothing(monkeypatch, caplog):
    loaded = []

    class FakeSecret:
        def __init__(self, name):
            self.name = name

        @classmethod
        def load(cls, name):
            if name == "missing":
                raise ValueError("Unable to find block document named missing")
            loaded.append(name)
            return cls(name)

        def get(self):
            return f"from-{self.name}"

    monkeypatch.setattr("prefect.blocks.system.Secret", FakeSecret)
    pairs = [
        ("dataloop_api_key", "DATALOOP_API_KEY"),
        ("webhook_secret", "POLYBURN_WEBHOOK_SECRET"),
        ("webhook_token", "POLYBURN_WEBHOOK_TOKEN"),
    ]
    for which, name in pairs:
        nothing = credential(which, Settings.from_env({}))
        assert nothing.secret is None and nothing.block is None
        value = credential(which, Settings.from_env({name: "plain"}))
        assert value.secret.get_secret_value() == "plain" and value.origin == name
        with caplog.at_level(logging.WARNING, logger="polyburn.settings"):
            both = credential(which, Settings.from_env({name: "plain", f"{name}_BLOCK": "b"}))
        assert both.secret.get_secret_value() == "from-b"  # the block wins
        assert f"{name} is ignored" in caplog.text
        with pytest.raises(ConfigError, match=f"{name}_BLOCK from Prefect Secret block 'missing'"):
            credential(which, Settings.from_env({name: "plain", f"{name}_BLOCK": "missing"}))

    class FakeAwsCredentials:
        @classmethod
        def load(cls, name):
            return cls()

        def get_boto3_session(self):
            return "session"

    monkeypatch.setitem(
        sys.modules, "prefect_aws", types.SimpleNamespace(AwsCredentials=FakeAwsCredentials)
    )
    assert credential("aws", Settings.from_env({})).block is None  # boto3's chain
    aws = credential("aws", Settings.from_env({"POLYBURN_AWS_CREDENTIALS_BLOCK": "masks"}))
    assert isinstance(aws.block, FakeAwsCredentials) and aws.origin == "the Prefect block 'masks'"


def test_the_docs_table_is_the_generated_one():
    page = (ROOT / "docs/configuration.md").read_text()
    start = page.index("-->\n", page.index("<!-- generated")) + len("-->\n")
    end = page.index("<!-- end of generated table -->")
    assert page[start:end].strip() == markdown_table().strip(), (
        "docs/configuration.md is stale: paste markdown_table() between the markers"
    )
