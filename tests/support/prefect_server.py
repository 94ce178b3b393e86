"""A real ``prefect server start`` for tests: SQLite in a temporary PREFECT_HOME, a free port on
127.0.0.1, stopped by PID.

Unlike ``prefect_test_harness`` this is a separate server process with every service (scheduler,
triggers, proactive evaluation), so deployments served from another process, schedules and
event triggers behave as in production. Nothing here touches the calling process's Prefect
settings: clients get the server through :meth:`PrefectServer.client_env`.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx

#: Settings that must not leak from the developer's shell into the server or its clients.
_SCRUBBED = ("PREFECT_API_URL", "PREFECT_API_KEY", "PREFECT_PROFILE", "PREFECT_API_AUTH_STRING")


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """``os.environ`` without Prefect API settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED}
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    env.update(extra or {})
    return env


def stop_process(process: subprocess.Popen, timeout: float = 15) -> None:
    """Stop a process started with ``start_new_session=True`` and everything it started: SIGINT
    to its process group (Prefect's graceful stop), then SIGKILL after ``timeout``."""
    if process.poll() is not None:
        return
    for sig, wait in ((signal.SIGINT, timeout), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


@dataclass
class PrefectServer:
    """A running server; ``api_url`` ends with ``/api``."""

    api_url: str
    home: Path
    log_path: Path
    process: subprocess.Popen

    def client_env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """Environment for a client subprocess of this server (its own PREFECT_HOME)."""
        return clean_env({"PREFECT_API_URL": self.api_url, **(extra or {})})

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        stop_process(self.process)


def start_prefect_server(
    home: Path, *, timeout: float = 150, extra_env: Mapping[str, str] | None = None
) -> PrefectServer:
    """Start ``prefect server start`` with its database in ``home`` and wait until
    ``/api/health`` answers. Raises RuntimeError (with the server log's tail) if it does not
    within ``timeout`` seconds; the process is stopped then."""
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = clean_env(
        {
            "PREFECT_HOME": str(home),
            "PREFECT_UI_ENABLED": "false",
            "PREFECT_SERVER_LOGGING_LEVEL": "WARNING",
            **(extra_env or {}),
        }
    )
    log_path = home / "server.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "prefect",
                "server",
                "start",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--no-ui",
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    server = PrefectServer(
        api_url=f"http://127.0.0.1:{port}/api", home=home, log_path=log_path, process=process
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"prefect server exited ({process.returncode}):\n{server.log_tail()}"
            )
        try:
            if httpx.get(f"{server.api_url}/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    server.stop()
    raise RuntimeError(f"prefect server not healthy after {timeout} s:\n{server.log_tail()}")
