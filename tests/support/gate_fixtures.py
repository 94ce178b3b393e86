"""pytest fixtures for the fake Dataloop gate; the root conftest does
``from tests.support.gate_fixtures import *``.

Importing this module isolates dtlpy's home (``DATALOOP_PATH`` -> private temp dir) before anything
imports dtlpy; see ``tests/support/dataloop_client.py``.

* ``fake_gate`` (session): one running :class:`FakeGate` for the whole test session. Tests share
  its store, so create your own dataset per test (``fake_gate.add_dataset(...)``) and never assume
  the store is empty; filter ``fake_gate.requests`` by your dataset/item ids or call
  ``fake_gate.clear_requests()`` first.
* ``dtlpy_client`` (function): the real ``dtlpy`` module, logged in to ``fake_gate`` with an
  unsigned fake JWT (login happens once per session). Before each test it re-selects the gate
  environment and token in case a test changed them; after each test it clears injected faults.
"""

from __future__ import annotations

from collections.abc import Iterator
from types import ModuleType

import pytest

from tests.support.dataloop_client import connect_dtlpy, import_dtlpy
from tests.support.fake_gate import FakeGate, make_fake_jwt

__all__ = ["fake_gate", "fake_gate_token", "_dtlpy_session", "dtlpy_client"]


@pytest.fixture(scope="session")
def fake_gate() -> Iterator[FakeGate]:
    gate = FakeGate().start()
    try:
        yield gate
    finally:
        gate.stop()


@pytest.fixture(scope="session")
def fake_gate_token(fake_gate: FakeGate) -> str:
    """The JWT the ``dtlpy_client`` fixture logs in with (allowed on ``fake_gate``)."""
    return fake_gate.allow_token(make_fake_jwt())


@pytest.fixture(scope="session")
def _dtlpy_session(fake_gate: FakeGate, fake_gate_token: str) -> ModuleType:
    return connect_dtlpy(fake_gate, fake_gate_token)


@pytest.fixture
def dtlpy_client(
    _dtlpy_session: ModuleType, fake_gate: FakeGate, fake_gate_token: str
) -> Iterator[ModuleType]:
    dl = import_dtlpy()
    if dl.client_api.environment != fake_gate.api_url:
        dl.setenv(fake_gate.api_url)
    if dl.client_api.token != fake_gate_token:
        dl.client_api.token = fake_gate_token
    try:
        yield dl
    finally:
        fake_gate.clear_faults()
