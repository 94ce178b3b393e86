"""Long-running polyburn processes for tests and benches: started in their own session (so that
:func:`tests.support.prefect_server.stop_process` stops them and their children), output to a log
file, and waited on until their health URL answers."""

from __future__ import annotations

import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]


def start_process(command: Sequence[str], env: Mapping[str, str], log: Path) -> subprocess.Popen:
    """Start ``command`` in the repository with ``env``, stdout and stderr to ``log``."""
    with log.open("wb") as out:
        return subprocess.Popen(
            list(command),
            cwd=REPO,
            env=dict(env),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


def start_cli(args: Sequence[str], env: Mapping[str, str], log: Path) -> subprocess.Popen:
    """``polyburn ARGS`` as a process (see :func:`start_process`)."""
    return start_process([sys.executable, "-m", "polyburn.cli", *args], env, log)


def start_events(
    env: Mapping[str, str], root: Path, *args: str
) -> tuple[subprocess.Popen, int, Path]:
    """``polyburn events --port <free port> ARGS`` with ``env`` (a Prefect server's client
    environment and the webhook credentials) and its own PREFECT_HOME under ``root``:
    (process, port, log)."""
    from tests.support.prefect_server import free_port

    root.mkdir(parents=True, exist_ok=True)
    log = root / "events.log"
    port = free_port()
    env = {**env, "PREFECT_HOME": str(root / "home")}
    return start_cli(["events", "--port", str(port), *args], env, log), port, log


def wait_for(
    what: str, check: Callable[[], Any], timeout: float, every: float = 0.5, log: Path | None = None
) -> Any:
    """``check()``'s first truthy value, polling; fails with ``what`` (and ``log``'s tail)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:]) if log else ""
    pytest.fail(f"timed out after {timeout} s waiting for {what}\n{tail}")


def wait_healthy(
    url: str,
    process: subprocess.Popen,
    log: Path,
    *,
    verify: ssl.SSLContext | bool = True,
    timeout: float = 60,
) -> None:
    """Return once ``GET url`` answers 200; RuntimeError with the log's tail when the process
    exits or ``timeout`` seconds pass first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        try:
            if httpx.get(url, timeout=1, verify=verify).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    tail = log.read_text(errors="replace")[-3000:]
    raise RuntimeError(f"{url} not healthy (exit code {process.poll()}):\n{tail}")
