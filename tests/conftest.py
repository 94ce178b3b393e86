"""Shared fixtures. Servers start once per test session, never per test."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile


def _private_home(variable: str, prefix: str) -> None:
    """Point ``variable`` at a fresh temp folder removed when the session ends, unless the
    environment already sets it."""
    if variable not in os.environ:
        os.environ[variable] = folder = tempfile.mkdtemp(prefix=prefix)
        atexit.register(shutil.rmtree, folder, True)


# Keep Prefect's and dtlpy's state out of the user's home, before either is imported.
_private_home("PREFECT_HOME", "polyburn-prefect-")
_private_home("DATALOOP_PATH", "polyburn-dtlpy-")
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
