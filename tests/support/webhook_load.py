"""Webhook deliveries for the receiver's tests and bench: signed calls from many concurrent clients
over real HTTP, a client that sends its body one byte a second, and the events Prefect received.

Used by ``tests/test_events.py`` and ``bench/webhook_receiver.py``. The secret is the caller's; it
is only used to sign and never printed.
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httpx

from polyburn.events import SIGNATURE_HEADER, TIMESTAMP_HEADER, sign


def signed(body: bytes, secret: str, at: float | None = None) -> dict[str, str]:
    """Headers that sign ``body`` with ``secret`` at ``at`` (unix seconds; now by default)."""
    timestamp = str(int(time.time() if at is None else at))
    return {
        TIMESTAMP_HEADER: timestamp,
        SIGNATURE_HEADER: sign(secret.encode(), timestamp, body),
        "Content-Type": "application/json",
    }


def item_body(item: str, dataset: str = "ds-load") -> bytes:
    """A Dataloop item JSON for ``item``."""
    return json.dumps({"id": item, "datasetId": dataset}).encode()


@dataclass(frozen=True)
class Delivery:
    """One webhook call: its item, the HTTP status (0 when the call failed), seconds from the
    start of sending to the full response, and when it ended (``time.monotonic``)."""

    item: str
    status: int
    seconds: float
    ended: float
    error: str = ""


def deliver(
    url: str,
    secret: str,
    items: Sequence[str],
    clients: int,
    *,
    verify: ssl.SSLContext | bool = True,
    timeout: float = 60,
) -> list[Delivery]:
    """Send one signed call per item from ``clients`` concurrent clients (each its own
    connection, taking the next item from a shared queue); the deliveries in item order."""
    return asyncio.run(_deliver(url, secret, items, clients, verify, timeout))


async def _deliver(url, secret, items, clients, verify, timeout) -> list[Delivery]:
    queue: asyncio.Queue[str] = asyncio.Queue()
    for item in items:
        queue.put_nowait(item)
    done: dict[str, Delivery] = {}
    # One TLS context for all clients, and every client built before the first call: building
    # one costs tens of ms of this loop's time, which would count in the calls already started.
    context = verify if isinstance(verify, ssl.SSLContext) else httpx.create_ssl_context(verify)
    limits = httpx.Limits(max_connections=1)
    https = [
        httpx.AsyncClient(verify=context, timeout=timeout, limits=limits) for _ in range(clients)
    ]

    async def client(http: httpx.AsyncClient) -> None:
        async with http:
            while not queue.empty():
                item = queue.get_nowait()
                body = item_body(item)
                headers = signed(body, secret)
                started = time.perf_counter()
                try:
                    response = await http.post(url, content=body, headers=headers)
                    status, error = response.status_code, ""
                except httpx.HTTPError as exc:
                    status, error = 0, type(exc).__name__
                seconds = time.perf_counter() - started
                done[item] = Delivery(item, status, seconds, time.monotonic(), error)

    await asyncio.gather(*(client(http) for http in https))
    return [done[item] for item in items]


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values``, nearest-rank."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 1))))
    return ordered[rank - 1]


@dataclass
class SlowClient:
    """A raw HTTP/1.1 POST whose body goes out one byte every ``interval`` seconds until
    :meth:`hurry` is called, then all at once. Runs in its own thread after :meth:`start`."""

    url: str
    body: bytes
    headers: dict[str, str]
    interval: float = 1.0
    ssl_context: ssl.SSLContext | None = None
    sent_slowly: int = 0
    status: int | None = None
    ended: float | None = None
    error: str = ""
    _hurry: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> SlowClient:
        """Start sending, in a thread; returns self."""
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def hurry(self) -> None:
        """Send the rest of the body now."""
        self._hurry.set()

    def join(self, timeout: float) -> None:
        """Wait at most ``timeout`` seconds for the response."""
        assert self._thread is not None
        self._thread.join(timeout)

    @property
    def sending(self) -> bool:
        """Still sending: neither answered nor failed."""
        return self.ended is None

    def _run(self) -> None:
        parts = urlsplit(self.url)
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        head = [f"POST {target} HTTP/1.1", f"Host: {parts.netloc}", "Connection: close"]
        head += [f"{k}: {v}" for k, v in self.headers.items()]
        head.append(f"Content-Length: {len(self.body)}")
        try:
            with self._connect(parts.hostname, parts.port) as sock:
                sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
                position = 0
                while position < len(self.body) and not self._hurry.wait(self.interval):
                    sock.sendall(self.body[position : position + 1])
                    position += 1
                    self.sent_slowly = position
                sock.sendall(self.body[position:])
                response = b""
                while chunk := sock.recv(65536):
                    response += chunk
            self.status = int(response.split(b" ", 2)[1])
        except (OSError, IndexError, ValueError) as exc:
            self.error = type(exc).__name__
        finally:
            self.ended = time.monotonic()

    def _connect(self, host: str, port: int) -> socket.socket:
        sock = socket.create_connection((host, port), timeout=300)
        if self.ssl_context is None:
            return sock
        return self.ssl_context.wrap_socket(sock, server_hostname=host)


def received_events(api_url: str, resource_prefix: str) -> list[dict]:
    """Every event the Prefect API holds whose resource id starts with ``resource_prefix``."""
    with httpx.Client(timeout=30) as http:
        response = http.post(
            f"{api_url}/events/filter",
            json={"filter": {"resource": {"id_prefix": [resource_prefix]}}, "limit": 50},
        )
        response.raise_for_status()
        page = response.json()
        events = list(page["events"])
        while page.get("next_page"):
            response = http.get(page["next_page"])
            response.raise_for_status()
            page = response.json()
            events += page["events"]
    return events
