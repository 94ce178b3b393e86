"""The HTTP side of ``polyburn events``: a Starlette app served by uvicorn.

Routes:

* ``POST /dataloop`` (also ``/dataloop/``): the webhook. The body is read only up to
  ``max_body_bytes``: a ``Content-Length`` above it gets 413 before any of the body is read, and
  a body without one (chunked) gets 413 as soon as it grows past it, without reading the rest.
  The headers must arrive within ``request_timeout`` seconds of the connection (or of the
  previous response), else the connection is closed; the whole body within ``request_timeout``
  seconds more, else 408. A slow sender only holds its own connection. Then authentication
  (:class:`polyburn.events.Verifier`; 401), the payload (:func:`polyburn.events.parse_change`;
  400), and the event is handed to ``emit`` (in a worker thread): 202 with
  ``{"event", "resource"}``, or 503 when it was not accepted.
* ``GET /healthz``: 200 ``{"status": "ok", "version": <polyburn's version>}``.
* Anything else: 404 (405 for a known path with another method), JSON.

Shutdown (SIGTERM or SIGINT, see :func:`serve`): stop accepting connections, let accepted
requests finish (at most ``shutdown_timeout`` seconds), then ``flush`` — by default, deliver every
queued event to Prefect — before the process exits.

Nothing here logs a request line, query string, header value or body: uvicorn's access log is
off, and a rejected call is logged with the peer address and the verifier's reason only.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import anyio
import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol

from polyburn import version
from polyburn.events import (
    HOOK_PATH,
    MAX_BODY_BYTES,
    Emitter,
    PayloadError,
    Verifier,
    emit_to_prefect,
    is_number,
    parse_change,
    single,
)

log = logging.getLogger("polyburn.events")

#: Seconds a client may take to send its request's headers, and again its body.
REQUEST_TIMEOUT_SECONDS = 15.0
#: Seconds accepted requests may take to finish once shutdown starts.
SHUTDOWN_TIMEOUT_SECONDS = 30.0
#: Seconds to deliver the queued events to Prefect at shutdown.
FLUSH_TIMEOUT_SECONDS = 60.0
#: Connections served at once; more get 503 (uvicorn's ``limit_concurrency``).
MAX_CONNECTIONS = 500


@dataclass(frozen=True)
class ReceiverOptions:
    """How ``polyburn events`` listens; the CLI options of the same names."""

    host: str = "127.0.0.1"
    port: int = 8787
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    max_body_bytes: int = MAX_BODY_BYTES
    request_timeout: float = REQUEST_TIMEOUT_SECONDS
    shutdown_timeout: float = SHUTDOWN_TIMEOUT_SECONDS
    max_connections: int = MAX_CONNECTIONS

    @property
    def scheme(self) -> str:
        """``https`` when a certificate is given, else ``http``."""
        return "https" if self.ssl_certfile else "http"


class _TooLarge(Exception):
    """The body is larger than the limit."""


def flush_prefect_events(timeout: float = FLUSH_TIMEOUT_SECONDS) -> None:
    """Deliver every event queued by ``emit_event`` to the Prefect API (at most ``timeout``
    seconds) and stop the events worker. Call from a thread without a running event loop."""
    from prefect.events.worker import EventsWorker

    EventsWorker.drain_all(timeout=timeout, at_exit=False)


def create_app(
    verifier: Verifier,
    emit: Emitter = emit_to_prefect,
    *,
    options: ReceiverOptions | None = None,
    flush: Callable[[], None] = flush_prefect_events,
) -> Starlette:
    """The receiver's ASGI app, with the body limit and request timeout of ``options`` (serve it
    with :func:`build_server` and the same options). ``emit`` is called in a worker thread with
    each accepted change; ``flush`` in a worker thread once, when the app shuts down (after the
    server stopped taking requests)."""
    options = options or ReceiverOptions()
    max_body_bytes, request_timeout = options.max_body_bytes, options.request_timeout

    async def receive_hook(request: Request) -> Response:
        peer = request.client.host if request.client else "?"
        try:
            body = await _read_body(request, max_body_bytes, request_timeout)
        except _TooLarge:
            return _reply(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"error": "body too large"})
        except TimeoutError:
            log.warning("body from %s not received within %s s", peer, request_timeout)
            return _reply(HTTPStatus.REQUEST_TIMEOUT, {"error": "body not received in time"})
        except ClientDisconnect:
            log.warning("%s disconnected before sending its body", peer)
            return _reply(HTTPStatus.BAD_REQUEST, {"error": "incomplete body"})
        query = parse_qs(request.url.query, keep_blank_values=True)
        reason = verifier.check(request.headers, query, body)
        if reason is not None:
            log.warning("rejected POST %s from %s: %s", request.url.path, peer, reason)
            return _reply(HTTPStatus.UNAUTHORIZED, {"error": "unauthorized"})
        try:
            change = parse_change(body, single(query.get("action")))
        except PayloadError as exc:
            log.warning("bad payload from %s: %s", peer, exc)
            return _reply(HTTPStatus.BAD_REQUEST, {"error": str(exc)})
        try:
            event_id = await run_in_threadpool(emit, change)
        except Exception as exc:  # the emitter's failure is the caller's 503, not a crash
            log.error("emitting %s for item %s failed: %r", change.event, change.item_id, exc)
            event_id = None
        if event_id is None:
            log.error("Prefect did not accept %s for item %s", change.event, change.item_id)
            return _reply(HTTPStatus.SERVICE_UNAVAILABLE, {"error": "event not emitted"})
        log.info("emitted %s for item %s (event %s)", change.event, change.item_id, event_id)
        return _reply(
            HTTPStatus.ACCEPTED,
            {"event": change.event, "resource": change.resource["prefect.resource.id"]},
        )

    async def healthz(request: Request) -> Response:
        return _reply(HTTPStatus.OK, {"status": "ok", "version": version()})

    async def http_error(request: Request, exc: Exception) -> Response:
        status = HTTPStatus(exc.status_code if isinstance(exc, HTTPException) else 500)
        return _reply(status, {"error": status.phrase.lower()})

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        log.info("flushing queued events")
        await anyio.to_thread.run_sync(flush)
        log.info("stopped")

    return Starlette(
        routes=[
            Route(HOOK_PATH, receive_hook, methods=["POST"]),
            Route(HOOK_PATH + "/", receive_hook, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
        ],
        exception_handlers={HTTPException: http_error},
        lifespan=lifespan,
    )


async def _read_body(request: Request, limit: int, timeout: float) -> bytes:
    """The request body, or _TooLarge as soon as it is known to exceed ``limit`` bytes (from
    Content-Length, before reading; else while reading). TimeoutError after ``timeout`` s."""
    length = request.headers.get("content-length")
    if length is not None and is_number(length) and int(length) > limit:
        raise _TooLarge
    chunks: list[bytes] = []
    size = 0
    with anyio.fail_after(timeout):
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _TooLarge
            chunks.append(chunk)
    return b"".join(chunks)


def _reply(status: HTTPStatus, body: dict[str, Any]) -> Response:
    return JSONResponse(body, status_code=status.value, headers=_NO_CACHE)


_NO_CACHE = {"Cache-Control": "no-store"}


class _HeadersInTime(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, closing a connection on which no request has begun
    ``header_timeout`` seconds after it opened or after its last response (uvicorn waits for
    the first request's headers for ever, so idle or slow-header connections would pile up)."""

    header_timeout: float = REQUEST_TIMEOUT_SECONDS

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._timer.cancel()
        super().connection_lost(exc)

    def _arm(self) -> None:
        previous = getattr(self, "_timer", None)
        if previous is not None:
            previous.cancel()
        self._timer = self.loop.call_later(self.header_timeout, self._late, self.cycle)

    def _late(self, cycle_when_armed: Any) -> None:
        if self.cycle is cycle_when_armed and not self.transport.is_closing():
            host = self.client[0] if self.client else "?"
            log.warning("no request from %s within %s s: closing", host, self.header_timeout)
            self.transport.close()


def _drop(record: logging.LogRecord) -> bool:
    return False


def build_server(app: Starlette, options: ReceiverOptions) -> tuple[uvicorn.Server, socket.socket]:
    """A uvicorn server for ``app`` and its bound listening socket (port 0 picks a free port;
    ``sock.getsockname()`` tells which). Run it with ``server.run(sockets=[sock])``.

    uvicorn's access log is silenced with a filter that drops every record, because
    ``access_log=False`` only unhooks its handlers, and a later ``logging.config.dictConfig``
    (Prefect's, when it is first imported) hooks it up again: its lines hold ``?token=``.
    """

    class Protocol(_HeadersInTime):
        header_timeout = options.request_timeout

    access = logging.getLogger("uvicorn.access")
    if _drop not in access.filters:
        access.addFilter(_drop)
    config = uvicorn.Config(
        app,
        host=options.host,
        port=options.port,
        ssl_certfile=str(options.ssl_certfile) if options.ssl_certfile else None,
        ssl_keyfile=str(options.ssl_keyfile) if options.ssl_keyfile else None,
        http=Protocol,
        lifespan="on",
        access_log=False,  # its lines hold the request line, with ?token=
        log_config=None,  # the process's logging configuration applies
        server_header=False,
        proxy_headers=False,
        limit_concurrency=options.max_connections,
        timeout_graceful_shutdown=options.shutdown_timeout,
    )
    return uvicorn.Server(config), config.bind_socket()


def serve(app: Starlette, options: ReceiverOptions, on_ready: Callable[[str], None]) -> None:
    """Serve ``app`` until SIGTERM or SIGINT, then shut down gracefully (see the module
    docstring). ``on_ready`` gets the hook URL once the socket is bound."""
    server, sock = build_server(app, options)
    host, port = sock.getsockname()[:2]
    on_ready(f"{options.scheme}://{host}:{port}{HOOK_PATH}")
    server.run(sockets=[sock])
