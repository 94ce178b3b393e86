"""Loopback fake of the Dataloop REST API ("fake gate") for tests.

The REAL ``dtlpy`` client is pointed at this server (see ``tests/support/dataloop_client.py``).
It is written from scratch on the standard library (``http.server.ThreadingHTTPServer``) and
binds ``127.0.0.1`` on an ephemeral port. Nothing here talks to the network.

Store
    projects, datasets (``metadata.system.recipes``), recipes (``ontologyIds``), ontologies
    (``roots``), items (item JSON, see docs/dataloop.md §2a) and annotations (§2b). Every id is a
    24-hex ObjectId-like string (4-byte timestamp, fixed 5-byte "machine" part, 3-byte counter), so
    ids sort ascending with creation order and keyset paging by ``id`` works.

Routes (all under ``/api/v1``; everything else is a 404 recorded in ``gate.unknown_routes``)
    GET    /users/me                     401 unless the bearer token was ``allow_token``-ed
    GET    /projects/{id}
    GET    /datasets/{id}
    POST   /datasets/{id}/query          resource items|annotations, DQL filter, join, sort, paging;
                                         with ``"delete": true`` (annotations) deletes every match
                                         and answers ``{"affected": <count>}``
    POST   /datasets/{id}/export         JSON export (command finishes immediately)
    GET    /commands/{id}
    GET    /items/{id}
    GET    /items/{id}/stream            bytes given to ``add_item(content=...)`` / export output
    GET    /items/{id}/annotations       plain list (not used by dtlpy's ``annotations.list``)
    POST   /items/{id}/annotations       JSON list (or one object) -> list of created annotations
    GET    /annotations/{id}
    PUT    /annotations/{id}             partial JSON (dtlpy sends a diff), deep-merged
    DELETE /annotations/{id}
    GET    /recipes/{id}
    GET    /ontologies/{id}

Every route requires ``Authorization: Bearer <token>`` with an allowed token (401 otherwise).

DQL subset (``dql_match``): ``$and``, ``$or``, ``$in``, ``$nin``, ``$gt``, ``$gte``, ``$lt``,
``$lte``, ``$ne``, ``$eq``, ``$exists``, plain equality (Mongo-like: an array field equals a
scalar when it contains it; a missing field equals ``None``), dotted paths (``metadata.user.x``),
and Dataloop's glob equality for ``filename``/``dir`` (``"/a/**"``: ``**`` matches anything,
``*`` and ``?`` do not cross ``/``). Any other ``$operator`` or a malformed body is an HTTP 400
with a JSON ``message``.

Fault injection: ``gate.inject(route_regex, kind, times=N, ...)``; see ``FakeGate.inject``.
``gate.short_deletes(n)`` makes the next bulk delete remove (and count) at most ``n`` matches.

Latency: ``gate.latency = 0.05`` delays every request by 50 ms before it is handled (a remote API
in the same region); requests are served concurrently, each on its own thread. ``gate.requests``
logs every request (count them per route with ``requests_to``).
"""

from __future__ import annotations

import base64
import copy
import io
import json
import math
import mimetypes
import operator
import posixpath
import re
import socket
import struct
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

API_PREFIX = "/api/v1"
DEFAULT_EMAIL = "fake@example.com"
TEN_YEARS = 10 * 365 * 86400
FAULT_KINDS = ("http429", "http500", "http503", "http400", "stall", "reset", "lost_response")

__all__ = [
    "API_PREFIX",
    "DqlError",
    "FakeGate",
    "Fault",
    "GateRequest",
    "dql_match",
    "make_fake_jwt",
]


# --------------------------------------------------------------------------------------------
# auth helpers
# --------------------------------------------------------------------------------------------
def make_fake_jwt(
    email: str = DEFAULT_EMAIL, *, ttl_seconds: int = TEN_YEARS, **claims: Any
) -> str:
    """Unsigned JWT (``alg: none``) that dtlpy accepts offline.

    dtlpy decodes the token without verifying the signature and requires ``exp > now + 60 s``
    before every request; ``email`` is needed by ``dl.info()`` (and so by annotation delete).
    """
    import jwt  # PyJWT, a dtlpy dependency

    payload = {"email": email, "exp": int(time.time()) + int(ttl_seconds), **claims}
    return jwt.encode(payload, key=None, algorithm="none")


def _jwt_claims(token: str | None) -> dict[str, Any]:
    """Claims of a JWT without any verification ({} when not a JWT)."""
    if not token:
        return {}
    parts = token.split(".")
    if len(parts) < 2:
        return {}
    try:
        raw = parts[1] + "=" * (-len(parts[1]) % 4)
        claims = json.loads(base64.urlsafe_b64decode(raw.encode()))
    except (ValueError, UnicodeDecodeError):
        return {}
    return claims if isinstance(claims, dict) else {}


# --------------------------------------------------------------------------------------------
# DQL matcher
# --------------------------------------------------------------------------------------------
class DqlError(ValueError):
    """A filter/query the fake cannot (or the real server would not) accept -> HTTP 400."""


_MISSING = object()
_GLOB_FIELDS = frozenset({"filename", "dir"})
_ORDER_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "$gt": operator.gt,
    "$gte": operator.ge,
    "$lt": operator.lt,
    "$lte": operator.le,
}


def _resolve(doc: Any, path: str) -> tuple[bool, list[Any]]:
    """Values at a dotted path. Lists are traversed element-wise (Mongo style)."""
    current: list[Any] = [doc]
    for part in path.split("."):
        nxt: list[Any] = []
        for value in current:
            if isinstance(value, Mapping):
                if part in value:
                    nxt.append(value[part])
            elif isinstance(value, list):
                if part.isdigit():
                    idx = int(part)
                    if idx < len(value):
                        nxt.append(value[idx])
                else:
                    for element in value:
                        if isinstance(element, Mapping) and part in element:
                            nxt.append(element[part])
        current = nxt
        if not current:
            return False, []
    return True, current


def _candidates(values: list[Any]) -> list[Any]:
    """A field value plus, for arrays, each element (Mongo equality semantics)."""
    out: list[Any] = []
    for value in values:
        out.append(value)
        if isinstance(value, list):
            out.extend(value)
    return out


def _glob_regex(pattern: str) -> re.Pattern[str]:
    out = []
    i = 0
    while i < len(pattern):
        ch = pattern[i]
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if ch == "*":
            out.append("[^/]*")
        elif ch == "?":
            out.append("[^/]")
        else:
            out.append(re.escape(ch))
        i += 1
    return re.compile("".join(out) + r"\Z")


def _equals(path: str, found: bool, values: list[Any], target: Any) -> bool:
    if not found:
        return target is None
    cands = _candidates(values)
    if path.rsplit(".", 1)[-1] in _GLOB_FIELDS and isinstance(target, str) and "*" in target:
        rx = _glob_regex(target)
        return any(isinstance(c, str) and rx.match(c) for c in cands)
    return any(_same(c, target) for c in cands)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return a == b


def _comparable(a: Any, b: Any) -> bool:
    number = (int, float)
    if isinstance(a, bool) or isinstance(b, bool):
        return False
    if isinstance(a, number) and isinstance(b, number):
        return True
    return isinstance(a, str) and isinstance(b, str)


def _apply_operator(path: str, found: bool, values: list[Any], op: str, arg: Any) -> bool:
    if op == "$eq":
        return _equals(path, found, values, arg)
    if op == "$ne":
        return not _equals(path, found, values, arg)
    if op in ("$in", "$nin"):
        if not isinstance(arg, list):
            raise DqlError(f"{op} needs an array, got {type(arg).__name__}")
        hit = any(_equals(path, found, values, target) for target in arg)
        return hit if op == "$in" else not hit
    if op in _ORDER_OPS:
        if isinstance(arg, (dict, list)) or arg is None:
            raise DqlError(f"{op} needs a scalar, got {json.dumps(arg)}")
        fn = _ORDER_OPS[op]
        return any(_comparable(c, arg) and fn(c, arg) for c in _candidates(values))
    if op == "$exists":
        return found == bool(arg)
    raise DqlError(f"unknown operator {op!r} on field {path!r}")


def dql_match(doc: Mapping[str, Any], flt: Any) -> bool:
    """True when ``doc`` matches the DQL filter ``flt``; raises DqlError on a bad filter."""
    if not isinstance(flt, Mapping):
        raise DqlError(f"filter must be an object, got {type(flt).__name__}")
    for key, cond in flt.items():
        if key in ("$and", "$or"):
            if not isinstance(cond, list) or not all(isinstance(c, Mapping) for c in cond):
                raise DqlError(f"{key} needs an array of objects")
            if key == "$and":
                if not all(dql_match(doc, c) for c in cond):
                    return False
            else:
                if not cond:
                    raise DqlError("$or needs a non-empty array")
                if not any(dql_match(doc, c) for c in cond):
                    return False
        elif key.startswith("$"):
            raise DqlError(f"unknown top-level operator {key!r}")
        else:
            if not key:
                raise DqlError("empty field name")
            found, values = _resolve(doc, key)
            if isinstance(cond, Mapping) and any(str(k).startswith("$") for k in cond):
                if not all(str(k).startswith("$") for k in cond):
                    raise DqlError(f"cannot mix operators and fields for {key!r}")
                for op, arg in cond.items():
                    if not _apply_operator(key, found, values, op, arg):
                        return False
            elif not _equals(key, found, values, cond):
                return False
    return True


def _validate_filter(flt: Any) -> None:
    """Run the matcher once on an empty document so bad operators fail even on empty sets."""

    def walk(node: Any) -> None:
        if not isinstance(node, Mapping):
            raise DqlError(f"filter must be an object, got {type(node).__name__}")
        for key, cond in node.items():
            if key in ("$and", "$or"):
                if not isinstance(cond, list):
                    raise DqlError(f"{key} needs an array of objects")
                if key == "$or" and not cond:
                    raise DqlError("$or needs a non-empty array")
                for sub in cond:
                    walk(sub)
            elif key.startswith("$"):
                raise DqlError(f"unknown top-level operator {key!r}")
            elif isinstance(cond, Mapping) and any(str(k).startswith("$") for k in cond):
                for op, arg in cond.items():
                    _apply_operator(key, False, [], op, arg)

    walk(flt)


# --------------------------------------------------------------------------------------------
# request log and faults
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GateRequest:
    """One request as the gate saw it.

    ``path`` is the URL path without the query string (it includes ``/api/v1``); ``body`` is the
    parsed JSON body or None; ``status`` is None when the connection was dropped without a
    response (fault kinds ``reset`` / ``stall`` with ``then="close"|"reset"``).
    """

    method: str
    path: str
    body: Any
    status: int | None
    query: dict[str, list[str]] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    fault: str | None = None


@dataclass
class Fault:
    """An injected fault. ``remaining`` None means unlimited; ``hits`` counts applications."""

    pattern: re.Pattern[str]
    kind: str
    remaining: int | None
    method: str | None = None
    retry_after: str | None = None
    seconds: float = 0.0
    then: str = "respond"
    message: str = "injected fault"
    hits: int = 0
    after: int = 0  # let this many matching requests through before the fault applies
    body: re.Pattern[str] | None = None  # only requests whose raw body matches

    def matches(self, method: str, path: str, body: str = "") -> bool:
        if self.remaining is not None and self.remaining <= 0:
            return False
        if self.method is not None and self.method != method:
            return False
        if self.body is not None and self.body.search(body) is None:
            return False
        return self.pattern.search(path) is not None


class _HttpError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "FakeDataloopGate/1.0"
    gate: FakeGate  # set on the per-gate subclass

    def setup(self) -> None:
        super().setup()
        # headers and body go out in two writes; without NODELAY, Nagle + delayed ACK add ~40 ms
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        self._dispatch("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self._dispatch("PUT")

    def do_PATCH(self) -> None:  # noqa: N802
        self._dispatch("PATCH")

    def do_DELETE(self) -> None:  # noqa: N802
        self._dispatch("DELETE")

    # ---------------------------------------------------------------------------------------
    def _dispatch(self, method: str) -> None:
        gate = self.gate
        split = urlsplit(self.path)
        path = split.path
        query = parse_qs(split.query, keep_blank_values=True)
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length > 0 else b""
        body: Any = None
        body_error: str | None = None
        if raw:
            try:
                body = json.loads(raw)
            except (ValueError, UnicodeDecodeError) as exc:
                body_error = f"malformed JSON body: {exc}"
        headers = {k.lower(): v for k, v in self.headers.items()}
        gate._enter()
        try:
            self._handle(method, path, query, body, body_error, headers, raw)
        finally:
            gate._leave()

    def _handle(
        self,
        method: str,
        path: str,
        query: dict[str, list[str]],
        body: Any,
        body_error: str | None,
        headers: dict[str, str],
        raw: bytes,
    ) -> None:
        gate = self.gate

        def record(status: int | None, fault: str | None = None) -> None:
            gate._record(GateRequest(method, path, body, status, query, headers, fault))

        if gate.latency > 0:
            time.sleep(gate.latency)
        fault = gate._take_fault(method, path, raw.decode("utf-8", "replace"))
        if fault is not None and fault.kind != "lost_response" and self._apply_fault(fault, record):
            return

        try:
            token = _bearer(headers.get("authorization"))
            if not gate._token_ok(token):
                raise _HttpError(401, "Unauthorized: unknown or missing bearer token")
            if body_error is not None:
                raise _HttpError(400, body_error)
            status, payload, extra = gate._route(method, path, query, body, token)
        except _HttpError as exc:
            status, payload, extra = exc.status, {"status": exc.status, "message": exc.message}, {}
        except DqlError as exc:
            status, payload, extra = 400, {"status": 400, "message": f"Bad query: {exc}"}, {}
        except Exception as exc:  # a bug in the fake: surface it loudly
            gate.errors.append(traceback.format_exc())
            status, payload, extra = 500, {"status": 500, "message": f"fake gate bug: {exc!r}"}, {}
        if fault is not None and fault.kind == "lost_response":
            # the request WAS applied; only the answer is lost (connection reset, no response)
            record(None, "lost_response")
            self._drop(reset=True)
            return
        record(status)
        self._send(status, payload, extra)

    def _apply_fault(self, fault: Fault, record: Callable[..., None]) -> bool:
        """Apply ``fault``; True when the request is finished (no normal response)."""
        kind = fault.kind
        if kind == "stall":
            time.sleep(fault.seconds)
            if fault.then == "respond":
                return False
            record(None, f"stall+{fault.then}")
            self._drop(reset=fault.then == "reset")
            return True
        if kind == "reset":
            record(None, "reset")
            self._drop(reset=True)
            return True
        status = int(kind[4:])
        extra: dict[str, str] = {}
        if status == 429 and fault.retry_after is not None:
            extra["Retry-After"] = fault.retry_after
        record(status, kind)
        self._send(status, {"status": status, "message": fault.message}, extra)
        return True

    def _drop(self, *, reset: bool) -> None:
        self.close_connection = True
        conn = self.connection
        try:
            if reset:  # linger 0 -> the kernel answers with RST instead of FIN
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            else:
                conn.shutdown(socket.SHUT_RDWR)
            # the makefile() objects hold references; close them so the socket really closes now
            self.rfile.close()
            self.wfile.close()
            conn.close()
        except OSError:
            pass
        # http.server flushes/closes these after the handler returns: give it harmless sinks
        self.rfile = io.BytesIO()
        self.wfile = io.BytesIO()

    def _send(self, status: int, payload: Any, extra: Mapping[str, str]) -> None:
        if isinstance(payload, (bytes, bytearray)):
            data = bytes(payload)
            ctype = extra.get("Content-Type", "application/octet-stream")
        else:
            data = json.dumps(payload).encode()
            ctype = "application/json; charset=utf-8"
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        for key, value in extra.items():
            if key != "Content-Type":
                self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)


def _bearer(value: str | None) -> str | None:
    if not value:
        return None
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


# --------------------------------------------------------------------------------------------
# the gate
# --------------------------------------------------------------------------------------------
_ROUTES: list[tuple[str, re.Pattern[str], str]] = [
    (m, re.compile(p + r"\Z"), h)
    for m, p, h in [
        ("GET", r"/users/me", "_r_me"),
        ("GET", r"/projects/(?P<id>[^/]+)", "_r_project"),
        ("GET", r"/datasets/(?P<id>[^/]+)", "_r_dataset"),
        ("POST", r"/datasets/(?P<id>[^/]+)/query", "_r_query"),
        ("POST", r"/datasets/(?P<id>[^/]+)/export", "_r_export"),
        ("GET", r"/commands/(?P<id>[^/]+)", "_r_command"),
        ("GET", r"/items/(?P<id>[^/]+)", "_r_item"),
        ("GET", r"/items/(?P<id>[^/]+)/stream", "_r_item_stream"),
        ("GET", r"/items/(?P<id>[^/]+)/annotations", "_r_item_annotations"),
        ("POST", r"/items/(?P<id>[^/]+)/annotations", "_r_create_annotations"),
        ("GET", r"/annotations/(?P<id>[^/]+)", "_r_annotation"),
        ("PUT", r"/annotations/(?P<id>[^/]+)", "_r_update_annotation"),
        ("DELETE", r"/annotations/(?P<id>[^/]+)", "_r_delete_annotation"),
        ("GET", r"/recipes/(?P<id>[^/]+)", "_r_recipe"),
        ("GET", r"/ontologies/(?P<id>[^/]+)", "_r_ontology"),
    ]
]

_ANNOTATION_SERVER_KEYS = (
    "id",
    "url",
    "item",
    "dataset",
    "itemId",
    "datasetId",
    "creator",
    "createdAt",
    "updatedAt",
    "updatedBy",
    "hash",
)


class FakeGate:
    """In-memory fake Dataloop gate serving the real dtlpy client over loopback HTTP.

    Usage::

        gate = FakeGate().start()
        token = make_fake_jwt()
        gate.allow_token(token)
        ds_id = gate.add_dataset("ds", labels={"car": "#ff0000"})
        item = gate.add_item(ds_id, "/a/img.jpg", width=64, height=48, annotations=[...])
        ...
        gate.stop()

    All public methods are thread-safe.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, user_email: str = DEFAULT_EMAIL):
        self.default_email = user_email
        self._lock = threading.RLock()
        self._allowed_tokens: set[str] = set()
        self._faults: list[Fault] = []
        self.requests: list[GateRequest] = []
        self.unknown_routes: list[tuple[str, str]] = []
        self.errors: list[str] = []  # tracebacks of bugs inside the fake (answered with 500)
        self.latency = 0.0  # seconds every request waits before it is handled
        self.in_flight = 0  # requests being handled now
        self.max_in_flight = 0  # the most handled at once (reset with clear_requests)
        self._short_deletes: int | None = None
        # store
        self.projects: dict[str, dict[str, Any]] = {}
        self.datasets: dict[str, dict[str, Any]] = {}
        self.recipes: dict[str, dict[str, Any]] = {}
        self.ontologies: dict[str, dict[str, Any]] = {}
        self.items: dict[str, dict[str, Any]] = {}
        self.annotations: _AnnotationStore = _AnnotationStore()
        self.commands: dict[str, dict[str, Any]] = {}
        self._blobs: dict[str, bytes] = {}
        self._default_project: str | None = None
        # ids / clock
        self._machine = uuid.uuid4().int & ((1 << 40) - 1)
        self._counter = 0
        self._last_ts = 0
        self._last_ms = 0
        # server
        handler = type("_GateHandler", (_Handler,), {"gate": self})
        self._server = _Server((host, port), handler)
        self.host, self.port = self._server.server_address[:2]
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------------------- lifecycle
    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def api_url(self) -> str:
        """The dtlpy "environment": ``http://127.0.0.1:PORT/api/v1``."""
        return self.base_url + API_PREFIX

    def start(self) -> FakeGate:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._server.serve_forever,
                kwargs={"poll_interval": 0.05},
                name=f"fake-gate-{self.port}",
                daemon=True,
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> FakeGate:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---------------------------------------------------------------------------- auth
    def allow_token(self, token: str) -> str:
        with self._lock:
            self._allowed_tokens.add(token)
        return token

    def revoke_token(self, token: str) -> None:
        with self._lock:
            self._allowed_tokens.discard(token)

    def _token_ok(self, token: str | None) -> bool:
        with self._lock:
            return token is not None and token in self._allowed_tokens

    # ---------------------------------------------------------------------------- faults
    def inject(
        self,
        route: str,
        kind: str,
        times: int | None = 1,
        *,
        method: str | None = None,
        retry_after: float | int | str | None = None,
        seconds: float = 0.0,
        then: str = "respond",
        message: str = "injected fault",
        after: int = 0,
        body: str | None = None,
    ) -> Fault:
        """Make the next ``times`` requests whose path matches ``route`` fail.

        ``route`` is a regex searched in the request path (without query string, including
        ``/api/v1``), e.g. ``r"/datasets/[^/]+/query$"``. ``method`` optionally restricts it
        (``"POST"``). ``times=None`` means until ``clear_faults()``. Kinds:

        * ``http429`` -- 429; with ``retry_after`` (seconds) a ``Retry-After`` header is sent,
          without it the header is absent (dtlpy/urllib3 only retry a 429 that has the header).
        * ``http500`` / ``http503`` / ``http400`` -- that status with ``{"message": message}``
          (any ``httpNNN`` works).
        * ``stall`` -- sleep ``seconds``, then ``then``: ``"respond"`` (serve normally),
          ``"close"`` (FIN, no response) or ``"reset"`` (RST, no response).
        * ``reset`` -- abort the connection (RST) without any response.
        * ``lost_response`` -- serve the request normally (it takes effect), then abort the
          connection (RST) instead of answering: a client cannot tell whether it was applied.

        ``after=N`` lets the first N matching requests through untouched (e.g. fail only the
        second upload batch). ``body`` (a regex) restricts the fault to requests whose raw body
        matches it (e.g. the bulk query naming one item id). Faults are checked before
        authentication; the first matching fault wins.
        """
        if not (
            kind in ("stall", "reset", "lost_response") or re.fullmatch(r"http[1-5]\d\d", kind)
        ):
            raise ValueError(f"unknown fault kind {kind!r}; expected one of {FAULT_KINDS}")
        if then not in ("respond", "close", "reset"):
            raise ValueError("then must be 'respond', 'close' or 'reset'")
        if times is not None and times < 1:
            raise ValueError("times must be >= 1 or None")
        if after < 0:
            raise ValueError("after must be >= 0")
        ra = None
        if retry_after is not None:
            ra = retry_after if isinstance(retry_after, str) else f"{retry_after:g}"
        fault = Fault(
            pattern=re.compile(route),
            kind=kind,
            remaining=times,
            method=method.upper() if method else None,
            retry_after=ra,
            seconds=float(seconds),
            then=then,
            message=message,
            after=after,
            body=re.compile(body) if body is not None else None,
        )
        with self._lock:
            self._faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()
            self._short_deletes = None

    def short_deletes(self, at_most: int) -> None:
        """The next bulk delete (a query with ``"delete": true``) removes and counts at most
        ``at_most`` of its matches (the rest stay), as a server that gave up part way."""
        with self._lock:
            self._short_deletes = at_most

    def _take_fault(self, method: str, path: str, body: str = "") -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.matches(method, path, body):
                    if fault.after > 0:
                        fault.after -= 1
                        continue
                    if fault.remaining is not None:
                        fault.remaining -= 1
                    fault.hits += 1
                    return fault
        return None

    # ---------------------------------------------------------------------------- request log
    def _record(self, req: GateRequest) -> None:
        with self._lock:
            self.requests.append(req)

    def clear_requests(self) -> None:
        with self._lock:
            self.requests.clear()
            self.unknown_routes.clear()
            self.max_in_flight = self.in_flight

    def _enter(self) -> None:
        with self._lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def _leave(self) -> None:
        with self._lock:
            self.in_flight -= 1

    def requests_to(self, route: str, method: str | None = None) -> list[GateRequest]:
        """Logged requests whose path matches the regex ``route`` (and ``method``)."""
        rx = re.compile(route)
        with self._lock:
            return [
                r
                for r in self.requests
                if rx.search(r.path) and (method is None or r.method == method.upper())
            ]

    # ---------------------------------------------------------------------------- ids / clock
    def new_id(self) -> str:
        """A fresh 24-hex id, strictly greater than every id issued before by this gate."""
        with self._lock:
            self._last_ts = max(self._last_ts, int(time.time()))
            self._counter += 1
            if self._counter >= 1 << 24:
                self._counter = 0
                self._last_ts += 1
            return f"{self._last_ts:08x}{self._machine:010x}{self._counter:06x}"

    def now_iso(self) -> str:
        """Strictly increasing ISO-8601 UTC timestamps with millisecond precision (``...Z``)."""
        with self._lock:
            ms = max(int(time.time() * 1000), self._last_ms + 1)
            self._last_ms = ms
        dt = datetime.fromtimestamp(ms / 1000, tz=UTC)
        return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"

    # ---------------------------------------------------------------------------- populate
    def add_project(self, name: str = "fake-project") -> str:
        with self._lock:
            pid = self.new_id()
            now = self.now_iso()
            self.projects[pid] = {
                "id": pid,
                "name": name,
                "url": f"{self.api_url}/projects/{pid}",
                "creator": self.default_email,
                "createdAt": now,
                "updatedAt": now,
                "role": "owner",
                "isBlocked": False,
                "org": None,
                "feedbackQueue": None,
                "accountId": None,
                "contributors": [],
            }
            if self._default_project is None:
                self._default_project = pid
            return pid

    def add_dataset(
        self,
        name: str,
        labels: Mapping[str, str] | Iterable[Mapping[str, Any]] | None = None,
        *,
        project_id: str | None = None,
    ) -> str:
        """Create a dataset with one recipe and one ontology; returns the dataset id.

        ``labels`` is either ``{tag: "#rrggbb"}`` or a list of ontology roots, in the wire form
        ``{"value": {"tag", "displayLabel", "color", ...}, "children": [...]}`` or the short form
        ``{"tag", "color", "children": [...]}``.
        """
        with self._lock:
            if project_id is None:
                project_id = self._default_project or self.add_project()
            if project_id not in self.projects:
                raise KeyError(f"unknown project {project_id}")
            roots = _normalise_roots(labels)
            now = self.now_iso()
            oid, rid, did = self.new_id(), self.new_id(), self.new_id()
            self.ontologies[oid] = {
                "id": oid,
                "title": f"{name}-ontology",
                "url": f"{self.api_url}/ontologies/{oid}",
                "creator": self.default_email,
                "roots": roots,
                "attributes": [],
                "metadata": {"attributes": [], "system": {"projectIds": [project_id]}},
                "createdAt": now,
                "updatedAt": now,
                "updatedBy": self.default_email,
            }
            self.recipes[rid] = {
                "id": rid,
                "title": f"{name}-recipe",
                "url": f"{self.api_url}/recipes/{rid}",
                "creator": self.default_email,
                "projectIds": [project_id],
                "ontologyIds": [oid],
                "description": None,
                "instructions": None,
                "examples": [],
                "customActions": [],
                "uiSettings": {},
                "metadata": {"system": {}},
                "createdAt": now,
                "updatedAt": now,
                "updatedBy": self.default_email,
            }
            self.datasets[did] = {
                "id": did,
                "name": name,
                "url": f"{self.api_url}/datasets/{did}",
                "items": f"{self.api_url}/datasets/{did}/items",
                "creator": self.default_email,
                "projects": [project_id],
                "createdAt": now,
                "updatedAt": now,
                "updatedBy": self.default_email,
                "metadata": {"system": {"recipes": [rid]}},
                "directoryTree": {"dirs": []},
                "readableType": "Dataset",
                "accessLevel": "owner",
                "readonly": False,
                "driver": None,
                "itemsCount": 0,
                "annotated": 0,
                "annotationsCount": 0,
                "indexDriver": "v2",
                "export": {},
                "isSyncing": False,
            }
            self._ensure_dir(did, "/")
            return did

    def add_item(
        self,
        dataset_id: str,
        filename: str,
        width: int | None,
        height: int | None,
        annotations: Iterable[Mapping[str, Any]] | None = None,
        *,
        metadata: Mapping[str, Any] | None = None,
        content: bytes | None = None,
        hidden: bool = False,
    ) -> dict[str, Any]:
        """Create a file item (plus its ``dir`` items) and its annotations; returns item JSON.

        ``metadata`` is deep-merged over the defaults (e.g. ``{"user": {...}}`` or
        ``{"system": {"exif": {"Orientation": 6}}}``). ``width``/``height`` may be None, like
        real items that lack them. ``annotations`` are annotation-JSON-like dicts; at least
        ``type`` and ``label`` (missing server fields are filled in as on upload).
        """
        with self._lock:
            if dataset_id not in self.datasets:
                raise KeyError(f"unknown dataset {dataset_id}")
            path = "/" + filename.lstrip("/")
            directory = posixpath.dirname(path) or "/"
            self._ensure_dir(dataset_id, directory)
            name = posixpath.basename(path)
            system: dict[str, Any] = {
                "originalname": name,
                "mimetype": mimetypes.guess_type(name)[0] or "application/octet-stream",
                "size": len(content) if content is not None else 0,
                "encoding": "7bit",
                "isBinary": True,
                "refs": [],
                "taskStatusLog": [],
                "height": height,
                "width": width,
                "channels": 3,
            }
            meta: dict[str, Any] = {"system": system}
            if metadata:
                _deep_merge(meta, copy.deepcopy(dict(metadata)))
            item = self._new_item(dataset_id, path, "file", meta, hidden=hidden)
            if content is not None:
                self._blobs[item["id"]] = bytes(content)
            for ann in annotations or ():
                self._create_annotation(item["id"], ann, self.default_email)
            return self._item_view(item["id"])

    def add_annotations(
        self, item_id: str, annotations: Iterable[Mapping[str, Any]], *, creator: str | None = None
    ) -> list[dict[str, Any]]:
        with self._lock:
            return [
                copy.deepcopy(self._create_annotation(item_id, a, creator or self.default_email))
                for a in annotations
            ]

    def annotations_of(self, item_id: str) -> list[dict[str, Any]]:
        """Stored annotation JSONs of an item, in creation (= id) order."""
        with self._lock:
            return [copy.deepcopy(a) for a in self.annotations.of_item(item_id)]

    def item_json(self, item_id: str) -> dict[str, Any]:
        with self._lock:
            return self._item_view(item_id)

    def update_item(self, item_id: str, **fields: Any) -> dict[str, Any]:
        """Overwrite top-level item fields (deep-merging ``metadata``); bumps ``updatedAt``."""
        with self._lock:
            item = self.items[item_id]
            meta = fields.pop("metadata", None)
            if meta is not None:
                _deep_merge(item["metadata"], copy.deepcopy(meta))
            item.update(copy.deepcopy(fields))
            if "updatedAt" not in fields:
                item["updatedAt"] = self.now_iso()
            return self._item_view(item_id)

    # ---------------------------------------------------------------------------- internals
    def _ensure_dir(self, dataset_id: str, directory: str) -> None:
        if directory != "/":
            self._ensure_dir(dataset_id, posixpath.dirname(directory) or "/")
        for item in self.items.values():
            if (
                item["datasetId"] == dataset_id
                and item["type"] == "dir"
                and item["filename"] == directory
            ):
                return
        self._new_item(dataset_id, directory, "dir", {"system": {}})

    def _new_item(
        self, dataset_id: str, path: str, kind: str, meta: dict[str, Any], *, hidden: bool = False
    ) -> dict[str, Any]:
        iid = self.new_id()
        now = self.now_iso()
        if kind == "dir":
            directory = posixpath.dirname(path) if path != "/" else ""
            name = posixpath.basename(path)
        else:
            directory = posixpath.dirname(path) or "/"
            name = posixpath.basename(path)
        url = f"{self.api_url}/items/{iid}"
        item = {
            "id": iid,
            "datasetId": dataset_id,
            "url": url,
            "dataset": f"{self.api_url}/datasets/{dataset_id}",
            "createdAt": now,
            "updatedAt": now,
            "updatedBy": self.default_email,
            "creator": self.default_email,
            "dir": directory,
            "filename": path,
            "name": name,
            "type": kind,
            "hidden": hidden,
            "metadata": meta,
            "annotated": False,
            "annotationsCount": 0,
            "stream": f"{url}/stream",
            "thumbnail": f"{url}/thumbnail",
            "annotations": f"{url}/annotations",
        }
        self.items[iid] = item
        if kind == "file":
            self.datasets[dataset_id]["itemsCount"] += 1
        return item

    def _item_view(self, item_id: str) -> dict[str, Any]:
        item = self.items.get(item_id)
        if item is None:
            raise _HttpError(404, f"Item not found: {item_id}")
        out = copy.deepcopy(item)
        n = len(self.annotations.of_item(item_id))
        out["annotationsCount"] = n
        out["annotated"] = n > 0
        return out

    def _dataset_view(self, dataset_id: str) -> dict[str, Any]:
        ds = self.datasets.get(dataset_id)
        if ds is None:
            raise _HttpError(404, f"Dataset not found: {dataset_id}")
        out = copy.deepcopy(ds)
        anns = [a for a in self.annotations.values() if a["datasetId"] == dataset_id]
        out["annotationsCount"] = len(anns)
        out["annotated"] = len({a["itemId"] for a in anns})
        return out

    def _create_annotation(
        self, item_id: str, given: Mapping[str, Any], creator: str
    ) -> dict[str, Any]:
        item = self.items.get(item_id)
        if item is None:
            raise _HttpError(404, f"Item not found: {item_id}")
        if not isinstance(given, Mapping):
            raise _HttpError(400, "each annotation must be a JSON object")
        if not isinstance(given.get("type"), str) or not given.get("type"):
            raise _HttpError(400, "annotation 'type' is required")
        if not isinstance(given.get("label"), str):
            raise _HttpError(400, "annotation 'label' is required")
        ann: dict[str, Any] = copy.deepcopy(dict(given))
        for key in _ANNOTATION_SERVER_KEYS:
            if ann.get(key) is None:
                ann.pop(key, None)
        aid = self.new_id()
        now = self.now_iso()
        dataset_id = item["datasetId"]
        meta = ann.get("metadata") if isinstance(ann.get("metadata"), dict) else {}
        system = meta.get("system") if isinstance(meta.get("system"), dict) else {}
        meta["system"] = system
        meta.setdefault("user", {})
        for key, value in {
            "status": None,
            "parentId": None,
            "clientId": str(uuid.uuid4()),
            "automated": False,
            "attributes": {},
            "system": False,
            "itemLinks": [],
            "snapshots_": [],
        }.items():
            system.setdefault(key, value)
        ann["metadata"] = meta
        if "coordinates" in ann:
            ann["coordinates"] = _normalise_coordinates(ann["type"], ann["coordinates"])
        if ann.get("attributes") is None:
            ann["attributes"] = []
        ann_creator = ann.get("creator") or creator
        server = {
            "id": aid,
            "datasetId": dataset_id,
            "itemId": item_id,
            "url": f"{self.api_url}/annotations/{aid}",
            "item": item["url"],
            "dataset": f"{self.api_url}/datasets/{dataset_id}",
            "creator": ann_creator,
            "createdAt": ann.get("createdAt") or now,
            "updatedBy": ann.get("updatedBy") or ann_creator,
            "updatedAt": ann.get("updatedAt") or now,
            "hash": ann.get("hash")
            or f"{dataset_id}_{item_id}_{ann['label']}_{ann_creator}_{system.get('objectId')}",
        }
        ann.update(server)
        ann.setdefault("source", "sdk")
        self.annotations[aid] = ann
        item["updatedAt"] = now
        return ann

    # ---------------------------------------------------------------------------- routing
    def _route(
        self,
        method: str,
        path: str,
        query: dict[str, list[str]],
        body: Any,
        token: str | None,
    ) -> tuple[int, Any, dict[str, str]]:
        if path.startswith(API_PREFIX + "/"):
            sub = path[len(API_PREFIX) :]
            for m, rx, handler_name in _ROUTES:
                if m != method:
                    continue
                match = rx.match(sub)
                if match:
                    with self._lock:
                        result = getattr(self, handler_name)(
                            match.groupdict().get("id"), body, query, token
                        )
                    if isinstance(result, tuple):
                        return result
                    return 200, result, {}
        with self._lock:
            self.unknown_routes.append((method, path))
        raise _HttpError(404, f"fake gate: no route for {method} {path}")

    def _email(self, token: str | None) -> str:
        return str(_jwt_claims(token).get("email") or self.default_email)

    def _r_me(self, _id: Any, body: Any, query: Any, token: str | None) -> Any:
        email = self._email(token)
        return {
            "id": email,
            "email": email,
            "username": email,
            "name": email.split("@")[0],
            "firstName": "Fake",
            "lastName": "User",
            "createdAt": "2020-01-01T00:00:00.000Z",
            "updatedAt": "2020-01-01T00:00:00.000Z",
            "avatar": None,
            "type": "user",
        }

    def _r_project(self, pid: str, body: Any, query: Any, token: Any) -> Any:
        if pid not in self.projects:
            raise _HttpError(404, f"Project not found: {pid}")
        return copy.deepcopy(self.projects[pid])

    def _r_dataset(self, did: str, body: Any, query: Any, token: Any) -> Any:
        return self._dataset_view(did)

    def _r_recipe(self, rid: str, body: Any, query: Any, token: Any) -> Any:
        if rid not in self.recipes:
            raise _HttpError(404, f"Recipe not found: {rid}")
        return copy.deepcopy(self.recipes[rid])

    def _r_ontology(self, oid: str, body: Any, query: Any, token: Any) -> Any:
        if oid not in self.ontologies:
            raise _HttpError(404, f"Ontology not found: {oid}")
        return copy.deepcopy(self.ontologies[oid])

    def _r_item(self, iid: str, body: Any, query: Any, token: Any) -> Any:
        return self._item_view(iid)

    def _r_item_stream(self, iid: str, body: Any, query: Any, token: Any) -> Any:
        if iid not in self.items:
            raise _HttpError(404, f"Item not found: {iid}")
        blob = self._blobs.get(iid)
        if blob is None:
            raise _HttpError(404, f"Item has no content: {iid}")
        mimetype = self.items[iid]["metadata"].get("system", {}).get("mimetype")
        return 200, blob, {"Content-Type": mimetype or "application/octet-stream"}

    def _r_item_annotations(self, iid: str, body: Any, query: Any, token: Any) -> Any:
        if iid not in self.items:
            raise _HttpError(404, f"Item not found: {iid}")
        return self.annotations_of(iid)

    def _r_create_annotations(self, iid: str, body: Any, query: Any, token: Any) -> Any:
        if iid not in self.items:
            raise _HttpError(404, f"Item not found: {iid}")
        if isinstance(body, Mapping):
            body = [body]
        if not isinstance(body, list) or not body:
            raise _HttpError(400, "body must be a non-empty JSON list of annotations")
        for ann in body:  # validate all before creating any
            if (
                not isinstance(ann, Mapping)
                or not isinstance(ann.get("type"), str)
                or not ann["type"]
                or not isinstance(ann.get("label"), str)
            ):
                raise _HttpError(400, "each annotation needs a string 'type' and 'label'")
        creator = self._email(token)
        return [copy.deepcopy(self._create_annotation(iid, a, creator)) for a in body]

    def _r_annotation(self, aid: str, body: Any, query: Any, token: Any) -> Any:
        if aid not in self.annotations:
            raise _HttpError(404, f"Annotation not found: {aid}")
        return copy.deepcopy(self.annotations[aid])

    def _r_update_annotation(self, aid: str, body: Any, query: Any, token: Any) -> Any:
        ann = self.annotations.get(aid)
        if ann is None:
            raise _HttpError(404, f"Annotation not found: {aid}")
        if not isinstance(body, Mapping):
            raise _HttpError(400, "body must be a JSON object")
        patch = {k: v for k, v in copy.deepcopy(dict(body)).items() if k not in _FROZEN_KEYS}
        if "coordinates" in patch:
            patch["coordinates"] = _normalise_coordinates(
                patch.get("type") or ann["type"], patch["coordinates"]
            )
        _deep_merge(ann, patch)
        now = self.now_iso()
        ann["updatedAt"] = now
        ann["updatedBy"] = self._email(token)
        self.items[ann["itemId"]]["updatedAt"] = now
        return copy.deepcopy(ann)

    def _r_delete_annotation(self, aid: str, body: Any, query: Any, token: Any) -> Any:
        ann = self.annotations.pop(aid, None)
        if ann is None:
            raise _HttpError(404, f"Annotation not found: {aid}")
        self.items[ann["itemId"]]["updatedAt"] = self.now_iso()
        return {}

    # -- query --------------------------------------------------------------------------------
    def _r_query(self, did: str, body: Any, query: Any, token: Any) -> Any:
        if did not in self.datasets:
            raise _HttpError(404, f"Dataset not found: {did}")
        return self.run_query(did, body)

    def run_query(self, dataset_id: str, body: Any) -> dict[str, Any]:
        """Evaluate a ``/datasets/{id}/query`` body (raises DqlError for a 400)."""
        if not isinstance(body, Mapping):
            raise DqlError("query body must be a JSON object")
        resource = body.get("resource", "items")
        flt = body.get("filter", {})
        if flt is None:
            flt = {}
        _validate_filter(flt)
        page = body.get("page", 0)
        page_size = body.get("pageSize", 1000)
        for name, value, low in (("page", page, 0), ("pageSize", page_size, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise DqlError(f"{name} must be an integer >= {low}, got {json.dumps(value)}")
        if page_size > 1000:
            raise DqlError("pageSize must be <= 1000")
        sort = body.get("sort") or {}
        if not isinstance(sort, Mapping):
            raise DqlError("sort must be an object")
        for key, direction in sort.items():
            if direction not in ("ascending", "descending", 1, -1):
                raise DqlError(f"bad sort direction {direction!r} for {key!r}")
        join = body.get("join")
        join_filter = None
        if join:
            if resource != "items":
                raise DqlError("join is only supported on resource 'items'")
            if not isinstance(join, Mapping) or not isinstance(join.get("filter", {}), Mapping):
                raise DqlError("join must be an object with a 'filter' object")
            on = join.get("on") or {}
            if not isinstance(on, Mapping) or on.get("resource", "annotations") != "annotations":
                raise DqlError("join.on.resource must be 'annotations'")
            join_filter = join.get("filter") or {}
            _validate_filter(join_filter)

        def annotations_of(item_id: str) -> list[dict[str, Any]]:
            return [a for a in self.annotations.of_item(item_id) if a["datasetId"] == dataset_id]

        if resource == "items":
            docs = []
            for item in self.items.values():
                if item["datasetId"] == dataset_id:
                    n = len(annotations_of(item["id"]))
                    docs.append({**item, "annotationsCount": n, "annotated": n > 0})
        elif resource == "annotations":
            item_ids = _item_ids_of(flt)  # some items' annotations: use the index, not a full scan
            ids = _pinned(flt, "id")
            if item_ids is not None:
                docs = [a for item_id in item_ids for a in annotations_of(item_id)]
            elif ids is not None:
                docs = [
                    a
                    for a in (self.annotations.get(i) for i in ids)
                    if a is not None and a["datasetId"] == dataset_id
                ]
            else:
                docs = [a for a in self.annotations.values() if a["datasetId"] == dataset_id]
        else:
            raise DqlError(f"unsupported resource {resource!r}")

        matched = [d for d in docs if dql_match(d, flt)]
        if join_filter is not None:
            matched = [
                d
                for d in matched
                if any(dql_match(a, join_filter) for a in annotations_of(d["id"]))
            ]
        matched.sort(key=lambda d: d["id"])
        for key, direction in reversed(list(sort.items())):
            descending = direction in ("descending", -1)
            matched.sort(key=lambda d, k=key: _sort_key(d, k), reverse=descending)

        if body.get("delete") is True:
            if resource != "annotations":
                raise DqlError("the fake gate deletes annotations only")
            if self._short_deletes is not None:
                matched, self._short_deletes = matched[: self._short_deletes], None
            now = self.now_iso()
            for doc in matched:
                self.annotations.pop(doc["id"], None)
                self.items[doc["itemId"]]["updatedAt"] = now
            return {"affected": len(matched)}

        total = len(matched)
        start = page * page_size
        chunk = matched[start : start + page_size]
        return {
            "totalItemsCount": total,
            "totalPagesCount": math.ceil(total / page_size) if total else 0,
            "hasNextPage": start + page_size < total,
            "items": copy.deepcopy(chunk),
        }

    # -- export -------------------------------------------------------------------------------
    def _r_export(self, did: str, body: Any, query: Any, token: Any) -> Any:
        if did not in self.datasets:
            raise _HttpError(404, f"Dataset not found: {did}")
        if not isinstance(body, Mapping):
            raise _HttpError(400, "export body must be a JSON object")
        items_query = dict(body.get("itemsQuery") or {})
        items_query.setdefault("filter", {"$and": [{"hidden": False}, {"type": "file"}]})
        items_query.update({"resource": "items", "page": 0, "pageSize": 1000})
        if not items_query.get("join"):
            items_query.pop("join", None)
        ann_query = body.get("annotationsQuery")
        include = (body.get("annotations") or {}).get("include", True)
        items: list[dict[str, Any]] = []
        page = 0
        while True:
            items_query["page"] = page
            res = self.run_query(did, items_query)
            items.extend(res["items"])
            if not res["hasNextPage"]:
                break
            page += 1
        out = []
        for item in items:
            entry = copy.deepcopy(item)
            if include:
                anns = self.annotations.of_item(item["id"])
                if ann_query:
                    flt = ann_query.get("filter") or {}
                    _validate_filter(flt)
                    anns = [a for a in anns if dql_match(a, flt)]
                entry["annotations"] = copy.deepcopy(anns)
            out.append(entry)
        blob = json.dumps(out).encode()
        export_ds = self._export_dataset()
        name = f"/exports/{did}_{self.new_id()}.json"
        self._ensure_dir(export_ds, "/exports")
        item = self._new_item(
            export_ds,
            name,
            "file",
            {"system": {"mimetype": "application/json", "size": len(blob), "refs": []}},
        )
        self._blobs[item["id"]] = blob
        cid = self.new_id()
        now = self.now_iso()
        command = {
            "id": cid,
            "url": f"{self.api_url}/commands/{cid}",
            "status": "success",
            "type": "ExportDatasetAsJson",
            "progress": 100,
            "createdAt": now,
            "updatedAt": now,
            "spec": {"outputItemId": item["id"], "datasetId": did},
            "error": None,
        }
        self.commands[cid] = command
        return copy.deepcopy(command)

    def _export_dataset(self) -> str:
        for did, ds in self.datasets.items():
            if ds["name"] == "Binaries":
                return did
        return self.add_dataset("Binaries")

    def _r_command(self, cid: str, body: Any, query: Any, token: Any) -> Any:
        if cid not in self.commands:
            raise _HttpError(404, f"Command not found: {cid}")
        return copy.deepcopy(self.commands[cid])


def _item_ids_of(flt: Mapping[str, Any]) -> list[str] | None:
    """The item ids a filter pins with a top-level ``{"itemId": "<id>"}`` or
    ``{"itemId": {"$in": [...]}}`` (alone or in ``$and``)."""
    return _pinned(flt, "itemId")


def _pinned(flt: Mapping[str, Any], key: str) -> list[str] | None:
    """The values a filter pins ``key`` to with a top-level ``{key: "<v>"}`` or
    ``{key: {"$in": [...]}}`` (alone or in ``$and``); the filter is still applied to them."""
    clauses = [flt, *(c for c in flt.get("$and", []) if isinstance(c, Mapping))]
    for clause in clauses:
        value = clause.get(key)
        if isinstance(value, str):
            return [value]
        if isinstance(value, Mapping) and set(value) == {"$in"} and isinstance(value["$in"], list):
            return sorted({v for v in value["$in"] if isinstance(v, str)})
    return None


class _AnnotationStore(dict):
    """``annotation id -> annotation JSON`` that also keeps ``item id -> annotation ids`` (in
    creation order) in step, whichever way tests add or remove entries."""

    def __init__(self) -> None:
        super().__init__()
        self._by_item: dict[Any, dict[str, None]] = {}

    def __setitem__(self, key: str, value: dict[str, Any]) -> None:
        if key in self:
            self._unindex(key, dict.__getitem__(self, key))
        super().__setitem__(key, value)
        self._by_item.setdefault(value.get("itemId"), {})[key] = None

    def __delitem__(self, key: str) -> None:
        value = dict.__getitem__(self, key)
        super().__delitem__(key)
        self._unindex(key, value)

    def pop(self, key: str, *default: Any) -> Any:
        if key in self:
            value = dict.__getitem__(self, key)
            del self[key]
            return value
        if default:
            return default[0]
        raise KeyError(key)

    def popitem(self) -> tuple[str, dict[str, Any]]:
        key = next(reversed(self))
        return key, self.pop(key)

    def setdefault(self, key: str, default: Any = None) -> Any:
        if key not in self:
            self[key] = default
        return dict.__getitem__(self, key)

    def update(self, *args: Any, **kwargs: Any) -> None:
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def clear(self) -> None:
        super().clear()
        self._by_item.clear()

    def of_item(self, item_id: str) -> list[dict[str, Any]]:
        """The item's annotations, oldest first."""
        return [dict.__getitem__(self, k) for k in self._by_item.get(item_id, ())]

    def _unindex(self, key: str, value: Mapping[str, Any]) -> None:
        ids = self._by_item.get(value.get("itemId"))
        if ids is not None:
            ids.pop(key, None)
            if not ids:
                del self._by_item[value.get("itemId")]


_FROZEN_KEYS = frozenset({"id", "itemId", "datasetId", "url", "item", "dataset", "creator"})


def _sort_key(doc: Mapping[str, Any], key: str) -> tuple[int, Any]:
    found, values = _resolve(doc, key)
    if not found or values[0] is None:
        return (0, "")
    value = values[0]
    if isinstance(value, bool):
        return (1, int(value))
    if isinstance(value, (int, float)):
        return (1, value)
    return (2, str(value))


def _deep_merge(dst: dict[str, Any], src: Mapping[str, Any]) -> dict[str, Any]:
    for key, value in src.items():
        if isinstance(value, Mapping) and isinstance(dst.get(key), dict):
            _deep_merge(dst[key], value)
        else:
            dst[key] = value
    return dst


def _point(p: Any) -> Any:
    if (
        isinstance(p, (list, tuple))
        and len(p) in (2, 3)
        and all(isinstance(v, (int, float)) for v in p)
    ):
        return {"x": p[0], "y": p[1], "z": p[2] if len(p) == 3 else 0}
    return p


def _normalise_coordinates(kind: str, coords: Any) -> Any:
    """Accept ``(x, y)`` pairs as a convenience; leave wire-form coordinates untouched."""
    if kind in ("segment", "polyline") and isinstance(coords, list):
        return [[_point(p) for p in ring] if isinstance(ring, list) else ring for ring in coords]
    if kind == "box" and isinstance(coords, list):
        return [_point(p) for p in coords]
    if kind == "point":
        return _point(coords)
    return coords


def _normalise_roots(labels: Any) -> list[dict[str, Any]]:
    if labels is None:
        return []
    if isinstance(labels, Mapping):
        return [_root({"tag": tag, "color": color}) for tag, color in labels.items()]
    return [_root(r) for r in labels]


def _root(node: Mapping[str, Any]) -> dict[str, Any]:
    value = dict(node.get("value", node))
    if "tag" not in value:
        raise ValueError(f"ontology root needs a tag: {node!r}")
    value.pop("children", None)
    value.setdefault("displayLabel", value["tag"])
    value.setdefault("color", "#ffffff")
    value.setdefault("attributes", [])
    value.setdefault("displayData", {})
    children = node.get("children") or []
    return {"value": value, "children": [_root(c) for c in children]}
