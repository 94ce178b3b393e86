"""Shared fixtures. Servers start once per test session, never per test."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

# Keep Prefect's state out of the user's home, before Prefect is imported, and remove it when
# the session ends. dtlpy's (DATALOOP_PATH) is isolated the same way by
# tests.support.dataloop_client, imported below before anything imports dtlpy.
if "PREFECT_HOME" not in os.environ:
    os.environ["PREFECT_HOME"] = _PREFECT_HOME = tempfile.mkdtemp(prefix="polyburn-prefect-")
    atexit.register(shutil.rmtree, _PREFECT_HOME, True)
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("POLYBURN_ITEM_RETRY_DELAY", "0.01")  # item-level retries, without waits

import pytest  # noqa: E402

from tests.support.gate_fixtures import *  # noqa: E402,F403
from tests.support.oracle import EXAMPLES  # noqa: E402
from tests.support.s3_fixtures import *  # noqa: E402,F403
from tests.support.settings import SettingsMonkeyPatch  # noqa: E402


@pytest.fixture
def monkeypatch():
    """pytest's ``monkeypatch``, with the settings forgotten whenever the environment changes."""
    patch = SettingsMonkeyPatch()
    yield patch
    patch.undo()


@pytest.fixture(scope="session")
def prefect_api():
    """A real Prefect API (the test harness's temporary server), started once per session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """A real ``prefect server start`` (every service, SQLite in a temporary home), started once
    per session; clients reach it through ``prefect_server.client_env()``."""
    from tests.support.prefect_server import start_prefect_server

    server = start_prefect_server(tmp_path_factory.mktemp("prefect-server"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def examples():
    return EXAMPLES
