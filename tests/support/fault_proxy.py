"""A deterministic fault-injecting HTTP/1.1 proxy for retry tests (stdlib only).

:class:`FaultProxy` listens on ``127.0.0.1`` (ephemeral port) and forwards every request to one
upstream ``host:port``; point a client's ``endpoint_url`` at :attr:`FaultProxy.endpoint_url`.

Contract:

* One request per connection. ``Connection: close`` is forced towards the upstream and towards the
  client, so every boto3 attempt (including retries) opens its own connection and is one entry in
  :attr:`FaultProxy.seen`.
* Request bodies are forwarded byte for byte with their framing: ``Content-Length`` bodies as is,
  ``Transfer-Encoding: chunked`` bodies chunk by chunk with their trailers (``aws-chunked``
  content encoding is opaque payload to the proxy). ``Expect: 100-continue`` is answered by the
  proxy itself and removed from the forwarded headers (SigV4 never signs ``Expect``).
* The whole request is read before the fault for it is decided and applied, so a fault always
  hits a request that the client has completely sent.
* Faults are scheduled with :meth:`FaultProxy.add`. For each request, the first rule (in the order
  added) whose regex matches ``"METHOD /path?query"`` and which has uses left is consumed; the
  request is otherwise forwarded untouched.

Fault kinds (what the client sees):

``reset``     TCP RST (``SO_LINGER`` 0) instead of a response.
``close``     orderly close (FIN) without any response.
``stall``     nothing for ``stall_s`` seconds, then a close without response.
``latency``   the real response, ``delay_s`` seconds late.
``http503``   ``503 SlowDown`` S3 error XML (not forwarded upstream).
``http500``   ``500 InternalError`` S3 error XML (not forwarded upstream).
``truncate``  the real status and headers, then only ``truncate_bytes`` bytes of the body, then
              a close (so the body is shorter than its ``Content-Length``).
"""

from __future__ import annotations

import contextlib
import random
import re
import socket
import struct
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO, Literal, NamedTuple, Self, get_args
from xml.sax.saxutils import escape

__all__ = ["FaultKind", "FaultProxy", "FaultRule", "SeenRequest"]

FaultKind = Literal["reset", "close", "stall", "latency", "http503", "http500", "truncate"]
_FAULT_KINDS: frozenset[str] = frozenset(get_args(FaultKind))

_MAX_LINE = 64 * 1024
_MAX_HEADERS = 200
_COPY_CHUNK = 64 * 1024
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "expect"}

_ERROR_BODIES: dict[str, tuple[int, str, str, str]] = {
    "http503": (503, "Service Unavailable", "SlowDown", "Please reduce your request rate."),
    "http500": (
        500,
        "Internal Server Error",
        "InternalError",
        "We encountered an internal error. Please try again.",
    ),
}


class SeenRequest(NamedTuple):
    """One request received by the proxy, with the fault applied to it (``None`` = forwarded)."""

    method: str
    target: str
    fault: FaultKind | None


@dataclass
class FaultRule:
    """A scheduled fault; ``remaining`` is ``None`` for a rule that never runs out."""

    kind: FaultKind
    pattern: re.Pattern[str] | None
    remaining: int | None
    delay_s: float = 0.0
    stall_s: float = 0.0
    truncate_bytes: int = 0
    probability: float = 1.0
    hits: int = field(default=0)

    def matches(self, request_line: str) -> bool:
        return self.pattern is None or self.pattern.search(request_line) is not None


class _ProtocolError(Exception):
    """Malformed HTTP from the client or upstream; the connection is dropped."""


class _Head(NamedTuple):
    start_line: str
    headers: list[tuple[str, str]]

    def get(self, name: str) -> str | None:
        lname = name.lower()
        for key, value in self.headers:
            if key.lower() == lname:
                return value
        return None

    def is_chunked(self) -> bool:
        encoding = self.get("transfer-encoding")
        return encoding is not None and encoding.strip().lower().endswith("chunked")

    def content_length(self) -> int | None:
        value = self.get("content-length")
        if value is None:
            return None
        try:
            length = int(value.strip())
        except ValueError as exc:
            raise _ProtocolError(f"bad Content-Length {value!r}") from exc
        if length < 0:
            raise _ProtocolError(f"bad Content-Length {value!r}")
        return length

    def serialize(self) -> bytes:
        """Start line and headers minus hop-by-hop ones, plus ``Connection: close``."""
        lines = [self.start_line]
        lines += [f"{k}: {v}" for k, v in self.headers if k.lower() not in _HOP_BY_HOP]
        lines.append("Connection: close")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class FaultProxy:
    """Threaded HTTP forward proxy to ``upstream_host:upstream_port`` with scheduled faults.

    See the module docstring for the forwarding and fault contract. Thread-safe: rules may be
    added and :attr:`seen` read while requests are in flight.

    Args:
        upstream_host: upstream address, e.g. ``"127.0.0.1"``.
        upstream_port: upstream TCP port.
        io_timeout_s: socket timeout for client and upstream I/O.
    """

    def __init__(
        self, upstream_host: str, upstream_port: int, *, io_timeout_s: float = 30.0
    ) -> None:
        self._upstream = (upstream_host, upstream_port)
        self._io_timeout_s = io_timeout_s
        self._lock = threading.Lock()
        self._random = random.Random(1234)  # probabilistic faults repeat from run to run
        self._rules: list[FaultRule] = []
        self._seen: list[SeenRequest] = []
        self._stopping = threading.Event()
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._workers: set[threading.Thread] = set()
        self._sockets: set[socket.socket] = set()  # open client and upstream connections

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> Self:
        """Bind ``127.0.0.1:0`` and start accepting in a daemon thread."""
        if self._listener is not None:
            raise RuntimeError("FaultProxy already started")
        listener = socket.create_server(("127.0.0.1", 0), backlog=64)
        listener.settimeout(0.05)  # lets the accept loop notice stop() promptly
        self._listener = listener
        self._stopping.clear()
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name=f"fault-proxy-{self.port}", daemon=True
        )
        self._accept_thread.start()
        return self

    def stop(self) -> None:
        """Stop accepting, abort in-flight connections (stalls end at once) and join threads."""
        listener, self._listener = self._listener, None
        if listener is None:
            return
        self._stopping.set()
        if self._accept_thread is not None:
            self._accept_thread.join(timeout=5)
        listener.close()
        with self._lock:
            sockets, workers = list(self._sockets), list(self._workers)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for worker in workers:
            worker.join(timeout=5)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ public API
    @property
    def port(self) -> int:
        if self._listener is None:
            raise RuntimeError("FaultProxy is not running; call start() first")
        return int(self._listener.getsockname()[1])

    @property
    def endpoint_url(self) -> str:
        """``http://127.0.0.1:<proxy port>``; use it as the client's ``endpoint_url``."""
        return f"http://127.0.0.1:{self.port}"

    def add(
        self,
        kind: FaultKind,
        *,
        times: int | None = 1,
        match: str | None = None,
        delay_s: float = 0.5,
        stall_s: float = 5.0,
        truncate_bytes: int = 0,
        probability: float = 1.0,
    ) -> FaultRule:
        """Schedule ``kind`` for the next ``times`` requests matching ``match``.

        Args:
            kind: one of :data:`FaultKind`.
            times: how many matching requests get the fault; ``None`` means all of them.
            match: regex searched in ``"METHOD /path?query"`` (e.g. ``r"^PUT "``,
                ``r"partNumber=2"``); ``None`` matches every request.
            delay_s: extra latency for ``latency``.
            stall_s: how long ``stall`` holds the connection before closing it.
            truncate_bytes: body bytes that ``truncate`` lets through.
            probability: chance that a matching request gets the fault (seeded, so a soak
                run is repeatable); 1.0 means every one.

        Returns:
            The rule; its ``hits`` and ``remaining`` show how often it fired.
        """
        if kind not in _FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; expected one of {sorted(_FAULT_KINDS)}")
        if times is not None and times < 1:
            raise ValueError("times must be >= 1 or None")
        if delay_s < 0 or stall_s < 0 or truncate_bytes < 0:
            raise ValueError("delay_s, stall_s and truncate_bytes must be >= 0")
        rule = FaultRule(
            kind=kind,
            pattern=re.compile(match) if match is not None else None,
            remaining=times,
            delay_s=delay_s,
            stall_s=stall_s,
            truncate_bytes=truncate_bytes,
            probability=probability,
        )
        with self._lock:
            self._rules.append(rule)
        return rule

    @property
    def seen(self) -> list[SeenRequest]:
        """Snapshot of all requests received so far, in arrival order."""
        with self._lock:
            return list(self._seen)

    def requests(self, match: str | None = None) -> list[SeenRequest]:
        """The entries of :attr:`seen` whose ``"METHOD target"`` matches regex ``match``."""
        pattern = re.compile(match) if match is not None else None
        return [s for s in self.seen if pattern is None or pattern.search(f"{s.method} {s.target}")]

    def clear(self) -> None:
        """Forget both the scheduled faults and the :attr:`seen` log."""
        with self._lock:
            self._rules.clear()
            self._seen.clear()

    # ------------------------------------------------------------------ internals
    def _accept_loop(self) -> None:
        listener = self._listener
        assert listener is not None
        while not self._stopping.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            worker = threading.Thread(target=self._serve, args=(client,), daemon=True)
            with self._lock:
                self._workers.add(worker)
                self._sockets.add(client)
            worker.start()

    def _take_fault(self, method: str, target: str) -> FaultRule | None:
        request_line = f"{method} {target}"
        with self._lock:
            chosen: FaultRule | None = None
            for rule in self._rules:
                if (
                    rule.remaining != 0
                    and rule.matches(request_line)
                    and (rule.probability >= 1.0 or self._random.random() < rule.probability)
                ):
                    chosen = rule
                    rule.hits += 1
                    if rule.remaining is not None:
                        rule.remaining -= 1
                    break
            self._seen.append(SeenRequest(method, target, chosen.kind if chosen else None))
            return chosen

    def _serve(self, client: socket.socket) -> None:
        """Handle one connection: read one request, apply its fault or forward it, close."""
        client.settimeout(self._io_timeout_s)
        reader = client.makefile("rb")
        reset = False
        try:
            reset = self._handle(client, reader)
        except (OSError, _ProtocolError):
            pass  # client or upstream went away or spoke nonsense: just drop the connection
        finally:
            reader.close()
            if reset:  # linger 0 turns close() into an RST
                with contextlib.suppress(OSError):
                    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            else:
                with contextlib.suppress(OSError):
                    client.shutdown(socket.SHUT_WR)
            client.close()
            with self._lock:
                self._sockets.discard(client)
                self._workers.discard(threading.current_thread())

    def _handle(self, client: socket.socket, reader: BinaryIO) -> bool:
        """Serve one request; return True if the connection must be closed with an RST."""
        head = _read_head(reader)
        if head is None:
            return False
        method, target = _parse_request_line(head.start_line)
        if (head.get("expect") or "").strip().lower() == "100-continue":
            client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        body = b"".join(_iter_body(reader, head, is_request=True))
        rule = self._take_fault(method, target)
        if rule is None:
            self._forward(client, head, body, method)
            return False
        match rule.kind:
            case "reset":
                return True
            case "close":
                pass
            case "stall":
                self._stopping.wait(rule.stall_s)
            case "latency":
                self._stopping.wait(rule.delay_s)
                self._forward(client, head, body, method)
            case "truncate":
                self._forward(client, head, body, method, body_limit=rule.truncate_bytes)
            case "http503" | "http500":
                client.sendall(_error_response(rule.kind, method, target))
        return False

    def _forward(
        self,
        client: socket.socket,
        head: _Head,
        body: bytes,
        method: str,
        *,
        body_limit: int | None = None,
    ) -> None:
        """Send the request upstream and relay the response (at most ``body_limit`` body bytes)."""
        with socket.create_connection(self._upstream, timeout=self._io_timeout_s) as upstream:
            with self._lock:
                self._sockets.add(upstream)
            try:
                _relay(client, upstream, head, body, method, body_limit=body_limit)
            finally:
                with self._lock:
                    self._sockets.discard(upstream)


def _relay(
    client: socket.socket,
    upstream: socket.socket,
    head: _Head,
    body: bytes,
    method: str,
    *,
    body_limit: int | None,
) -> None:
    """Send one request upstream; copy the response back (at most ``body_limit`` body bytes)."""
    # The upstream may answer early (e.g. an error) and stop reading: relay that answer.
    with contextlib.suppress(OSError):
        upstream.sendall(head.serialize() + body)
    with upstream.makefile("rb") as up_reader:
        response = _read_head(up_reader)
        if response is None:
            raise _ProtocolError("upstream closed without a response")
        client.sendall(response.serialize())
        status = _parse_status(response.start_line)
        if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
            return
        remaining = body_limit
        for piece in _iter_body(up_reader, response, is_request=False):
            out = piece if remaining is None else piece[:remaining]
            if out:
                client.sendall(out)
            if remaining is not None:
                remaining -= len(out)
                if remaining == 0:
                    return


def _read_line(reader: BinaryIO) -> bytes:
    line = reader.readline(_MAX_LINE + 1)
    if len(line) > _MAX_LINE:
        raise _ProtocolError("line too long")
    return line


def _read_head(reader: BinaryIO) -> _Head | None:
    """Read a start line and headers; ``None`` on a clean EOF before the start line."""
    start = _read_line(reader)
    if not start:
        return None
    if not start.endswith(b"\n"):
        raise _ProtocolError("truncated start line")
    headers: list[tuple[str, str]] = []
    while True:
        line = _read_line(reader)
        if not line.endswith(b"\n"):
            raise _ProtocolError("truncated headers")
        if line in (b"\r\n", b"\n"):
            break
        if len(headers) >= _MAX_HEADERS:
            raise _ProtocolError("too many headers")
        name, sep, value = line.decode("latin-1").partition(":")
        if not sep:
            raise _ProtocolError(f"bad header line {line!r}")
        headers.append((name.strip(), value.strip()))
    return _Head(start.decode("latin-1").rstrip("\r\n"), headers)


def _parse_request_line(line: str) -> tuple[str, str]:
    parts = line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        raise _ProtocolError(f"bad request line {line!r}")
    return parts[0], parts[1]


def _parse_status(line: str) -> int:
    parts = line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise _ProtocolError(f"bad status line {line!r}")
    return int(parts[1])


def _iter_body(reader: BinaryIO, head: _Head, *, is_request: bool) -> Iterator[bytes]:
    """Yield a message body as raw wire bytes, framing (chunk sizes, trailers) included."""
    if head.is_chunked():
        yield from _iter_chunked(reader)
        return
    length = head.content_length()
    if length is None:
        if is_request:
            return  # a request without framing has no body
        length = -1  # response delimited by connection close
    while length != 0:
        piece = reader.read(_COPY_CHUNK if length < 0 else min(_COPY_CHUNK, length))
        if not piece:
            if length > 0:
                raise _ProtocolError("body shorter than Content-Length")
            return
        if length > 0:
            length -= len(piece)
        yield piece


def _iter_chunked(reader: BinaryIO) -> Iterator[bytes]:
    while True:
        size_line = _read_line(reader)
        if not size_line.endswith(b"\n"):
            raise _ProtocolError("truncated chunk size")
        yield size_line
        try:
            size = int(size_line.split(b";", 1)[0].strip(), 16)
        except ValueError as exc:
            raise _ProtocolError(f"bad chunk size {size_line!r}") from exc
        if size == 0:
            break
        data = reader.read(size + 2)  # chunk data + CRLF
        if len(data) != size + 2:
            raise _ProtocolError("truncated chunk")
        yield data
    while True:  # trailers, terminated by an empty line
        line = _read_line(reader)
        if not line.endswith(b"\n"):
            raise _ProtocolError("truncated trailers")
        yield line
        if line in (b"\r\n", b"\n"):
            return


def _error_response(kind: str, method: str, target: str) -> bytes:
    status, reason, code, message = _ERROR_BODIES[kind]
    request_id = uuid.uuid4().hex[:16].upper()
    resource = target.split("?", 1)[0]
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message>"
        f"<Resource>{escape(resource)}</Resource><RequestId>{request_id}</RequestId></Error>"
    ).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\n"
        "Content-Type: application/xml\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"x-amz-request-id: {request_id}\r\n"
        "Connection: close\r\n\r\n"
    ).encode("latin-1")
    return head if method == "HEAD" else head + body
