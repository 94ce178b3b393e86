"""Point the REAL dtlpy client at a :class:`~tests.support.fake_gate.FakeGate`.

Import-order rule: dtlpy reads ``DATALOOP_PATH`` exactly once, at import time (its cookie with
environments and plaintext tokens, ``calls_counter.json`` and a DEBUG file log all live there,
default ``~/.dataloop``). :func:`isolate_dtlpy_home` therefore sets ``DATALOOP_PATH`` to a private
temp dir and must run BEFORE the first ``import dtlpy`` anywhere in the process. It is called when
this module is imported (so ``from tests.support.gate_fixtures import *`` in the root conftest is
early enough). A ``DATALOOP_PATH`` already pointing into the temp dir is kept; anything else is
replaced (the one made here is removed at exit), and if dtlpy was imported too early it raises,
so tests never write fake environments or tokens into a developer's real cookie.

dtlpy also installs DEBUG-level handlers on the ``"dtlpy"`` logger and leaves propagation on; we
turn propagation off so pytest/Prefect root handlers do not print every COOKIE.read line.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from types import ModuleType
from typing import Any

from tests.support.fake_gate import FakeGate, make_fake_jwt

DEFAULT_ALIAS = "polyburn-fake-gate"
_ISOLATED_ENV = "POLYBURN_TEST_DATALOOP_PATH"  # marks a DATALOOP_PATH we created


def isolate_dtlpy_home() -> str:
    """Give dtlpy a private ``DATALOOP_PATH`` and return it. Idempotent.

    An existing ``DATALOOP_PATH`` is kept only when it lies under the temp dir (e.g. one made
    here, inherited by a child process); anything else (unset, ``~/.dataloop``, a developer's
    custom location) is replaced by a fresh temp dir removed at exit. Must run before dtlpy is
    imported; if dtlpy is already imported with a non-temp home, raises RuntimeError instead of
    touching real state.
    """
    current = os.environ.get("DATALOOP_PATH")
    if current and (os.environ.get(_ISOLATED_ENV) == current or _under_tmp(current)):
        return current
    if "dtlpy" in sys.modules:
        raise RuntimeError(
            "dtlpy was imported before its DATALOOP_PATH was isolated; import"
            " tests.support.gate_fixtures (or set DATALOOP_PATH to a temp dir) first in conftest.py"
        )
    path = tempfile.mkdtemp(prefix="polyburn-dtlpy-")
    os.environ["DATALOOP_PATH"] = path
    os.environ[_ISOLATED_ENV] = path
    atexit.register(shutil.rmtree, path, True)
    return path


def _under_tmp(path: str) -> bool:
    tmp = os.path.realpath(tempfile.gettempdir())
    return os.path.commonpath([tmp, os.path.realpath(path)]) == tmp


isolate_dtlpy_home()


def import_dtlpy() -> ModuleType:
    """``import dtlpy`` with an isolated home and quiet logging (propagation off)."""
    isolate_dtlpy_home()
    logging.getLogger("dtlpy").propagate = False
    import dtlpy as dl

    logging.getLogger("dtlpy").propagate = False
    return dl


def connect_dtlpy(
    gate: FakeGate,
    token: str | None = None,
    *,
    alias: str | None = None,
) -> ModuleType:
    """Register ``gate`` as a dtlpy environment, switch to it and log in; returns ``dl``.

    ``token`` defaults to a fresh :func:`make_fake_jwt`; it is allowed on the gate. ``alias``
    defaults to ``polyburn-fake-gate-<port>`` (one per gate, so two gates never clash). Uses the
    module-level singleton client (``dl.client_api``), exactly like production code does.
    """
    dl = import_dtlpy()
    token = token or make_fake_jwt()
    alias = alias or f"{DEFAULT_ALIAS}-{gate.port}"
    gate.allow_token(token)
    dl.add_environment(environment=gate.api_url, alias=alias, gate_url=gate.base_url)
    dl.setenv(alias)
    dl.verbose.disable_progress_bar = True
    dl.login_token(token)  # GET /users/me; raises ValueError on 401
    check_token_accepted(dl)
    return dl


def check_token_accepted(dl: Any) -> None:
    """Assert the client's own pre-request check (JWT ``exp`` > now + 60 s) passes."""
    if dl.client_api.token_expired():
        raise AssertionError("dtlpy considers the fake token expired (needs exp > now + 60 s)")
    exp = _exp(dl.client_api.token)
    if exp is None or exp <= time.time() + 60:
        raise AssertionError(f"fake token exp={exp!r} is not > now + 60 s")


def _exp(token: str | None) -> float | None:
    import jwt

    if not token:
        return None
    claims = jwt.decode(token, options={"verify_signature": False, "verify_exp": False})
    exp = claims.get("exp")
    return float(exp) if exp is not None else None


@contextlib.contextmanager
def dtlpy_on_gate(
    gate: FakeGate, token: str | None = None, *, alias: str | None = None
) -> Iterator[ModuleType]:
    """Context manager form of :func:`connect_dtlpy`; restores the previous env/token on exit."""
    dl = import_dtlpy()
    prev_env = dl.client_api.environment
    prev_token = dl.client_api.token
    try:
        yield connect_dtlpy(gate, token, alias=alias)
    finally:
        with contextlib.suppress(Exception):
            if prev_env and prev_env != dl.client_api.environment:
                dl.setenv(prev_env)
            dl.client_api.token = prev_token
