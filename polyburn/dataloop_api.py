"""The one module that imports ``dtlpy``: session set-up, throttling and retries for Dataloop.

Everything polyburn sends to Dataloop goes through :func:`request` (or :func:`call` for a bare SDK
call). The contract:

* **Session** (:func:`session`): made once per process and API key, on a private
  :class:`dtlpy.ApiClient` (its own cookie file; the SDK's module-level ``dl.client_api`` is left
  alone). Before ``import dtlpy``:

  - ``DATALOOP_PATH`` is pointed at a private temp folder (mode 0700, removed at exit) unless the
    operator set it, so the SDK's cookie file, which holds tokens in plain text, never lands in a
    shared home;
  - the ``dtlpy`` logger is set to WARNING, stops propagating, and its handlers are replaced by
    one that re-logs each record as a single redacted line at DEBUG on ``polyburn.dataloop.sdk``.
    The SDK's DEBUG file log and its stderr handler never see a record, so Prefect's console and
    the CLI stay clean.

* **Credentials**: the API key comes from the Prefect ``Secret`` block named by
  ``DATALOOP_API_KEY_BLOCK`` when set, else from ``DATALOOP_API_KEY`` (resolved by
  :func:`polyburn.settings.credential`, like every credential); never from code. Dataloop API
  keys are JWTs; ``ApiClient.login_api_key`` sets the key as the bearer token and checks it with
  ``GET /users/me``. The key and the token are redacted from every message polyburn produces.

* **Endpoint**: ``DATALOOP_GATE_URL`` (``https://host`` or ``https://host/api/v1``, for private
  deployments) is registered with ``add_environment`` and selected with ``setenv``; without it the
  SDK's ``prod`` gate is used.

* **Retries** (:func:`call`): HTTP 429 (with or without ``Retry-After``; the header is honoured up
  to ``POLYBURN_DATALOOP_MAX_RETRY_AFTER`` s), 408, every 5xx, timeouts and connection resets are
  retried with exponential backoff and jitter: attempt *n* sleeps a uniform random time in
  ``[d/2, d]`` with ``d = min(BACKOFF_MAX, BACKOFF_BASE * 2**(n-1))``, for at most
  ``POLYBURN_DATALOOP_ATTEMPTS`` attempts (default 6; base 0.5 s, cap 20 s: about 8-16 s of sleep
  in all). Then :class:`~polyburn.errors.TransientError` is raised. The SDK's own urllib3 retries
  are switched off on polyburn's client (they would multiply the budget: 5 hidden retries with
  0-16 s sleeps per attempt, and none for 500 or a 429 without ``Retry-After``), and each request
  has a (connect, read) timeout of ``(10, POLYBURN_DATALOOP_TIMEOUT)`` s (default 60) instead of
  the SDK's fixed 120 s. Any other 4xx fails at once with :class:`DataloopError`, whose one-line
  message carries the server's ``message``. Requests go through ``ApiClient.gen_request``, which
  returns a 400 to the caller, never through ``PagedEntities`` (which turns a 400 into an
  empty page).

* **Throttling** (:func:`throttled`): inside a Prefect flow or task run, when the Prefect global
  concurrency limit named by ``POLYBURN_DATALOOP_LIMIT`` (default ``dataloop-api``) exists and is
  active, every attempt spends one slot: of a rate limit (a slot decay: ``limit`` is the burst,
  ``slot_decay_per_second`` the sustained calls/s) taken with ``rate_limit`` several at a time
  (see :func:`throttled`), or of a concurrency limit (no decay: a cap on calls in flight) held
  with ``concurrency`` while the request runs.
  Worker processes that a run starts (polyburn's burn pool) have no run context: they throttle
  when ``PREFECT_API_URL`` names the server (the production set-up), and not otherwise.
  Whether the limit exists is looked up once per ``POLYBURN_DATALOOP_LIMIT_TTL`` s (default 60)
  and process, not per call: asking Prefect on every call would cost one API round trip per
  Dataloop call, plus a warning per call when the limit is missing. Outside a run, or with no such
  limit, it is a no-op. An operator creates or changes the limit with::

      prefect gcl create dataloop-api --limit 10 --slot-decay-per-second 5   # 5 calls/s, burst 10
      prefect gcl update dataloop-api --limit 20 --slot-decay-per-second 10
      prefect gcl update dataloop-api --disable                              # pause throttling
      prefect gcl create dataloop-api --limit 8                              # 8 calls in flight
      prefect gcl delete dataloop-api

  A running process sees a change within ``POLYBURN_DATALOOP_LIMIT_TTL`` seconds.

  Measured on the test harness (Prefect 3.9.1 on SQLite, loopback fake gate, a loaded
  shared machine): a Dataloop call costs 1.1-1.5 ms with no limit configured and 1.1-1.9 ms when
  the limit is missing (the look-up is cached); without the cache every call would pay a limit
  look-up (4-20 ms) or, calling ``rate_limit`` blindly, 12-32 ms plus one "limit does not exist"
  warning per call. With a rate limit, one acquisition is ~10 ms typically but 0.3-2.3 s when
  SQLite is locked (Prefect answers 503 and its client retries after ~2 s): 60-150 ms per call
  on average with one slot per acquisition, 2.6-3.8 ms with 10 (``POLYBURN_DATALOOP_LIMIT_BATCH``;
  default a quarter of the limit, at most 10). A concurrency limit (acquire, lease, release) cost
  55-185 ms per call: prefer a rate limit, and a Postgres-backed Prefect server when it is on.

* **Requests in flight** (:func:`in_flight`): at most ``POLYBURN_DATALOOP_CONCURRENCY``
  (default 8) requests of one process are on the wire at once; each attempt holds one slot of a
  process-wide semaphore while it runs (not while it sleeps before a retry). The Prefect limit
  above still caps the whole fleet. :func:`concurrency` is the setting, which callers also use
  to size the threads that keep that many requests in flight.

* **SDK cost**: ``gen_request``'s decorator walks the Python stack with ``inspect.stack()``
  before each request (1-3 ms inside a Prefect task, measured); :func:`request` calls the
  undecorated method and does the decorator's token check itself.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import email.utils
import hashlib
import logging
import os
import random
import re
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any, TypeVar
from urllib.parse import urlsplit

from polyburn import settings as config
from polyburn.errors import ConfigError, PolyburnError, TransientError

log = logging.getLogger("polyburn.dataloop")
_sdk_log = logging.getLogger("polyburn.dataloop.sdk")

T = TypeVar("T")

ENV_API_KEY = "DATALOOP_API_KEY"
ENV_API_KEY_BLOCK = "DATALOOP_API_KEY_BLOCK"
ENV_GATE_URL = "DATALOOP_GATE_URL"
CONNECT_TIMEOUT = 10.0
PAGE_SIZE_MAX = 1000

_RETRY_STATUS = frozenset({408, 429})
_PROCESS_RUN_ID = uuid.uuid4().hex


# ------------------------------------------------------------------------------------ errors
class DataloopError(PolyburnError):
    """Dataloop refused a request (a 4xx other than 408/429), or answered nonsense.

    ``status`` is the HTTP status (None when there was no response). The message is one line:
    what polyburn was doing, the status and the server's own message; it never holds a secret.
    """

    def __init__(self, message: str, status: int | None = None) -> None:
        self.status = status
        super().__init__(_one_line(redact(message)))


class DataloopNotFound(DataloopError):
    """HTTP 404: the dataset, item or annotation does not exist (or is not visible to the key)."""


class _Retryable(Exception):
    """A transient failure inside :func:`call`; ``retry_after`` is the server's hint in seconds."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


# ------------------------------------------------------------------------------------ secrets
_secrets: set[str] = set()
_secrets_lock = threading.Lock()


def redact(text: str) -> str:
    """``text`` with every known secret (API key, token, and their non-trivial parts) masked."""
    with _secrets_lock:
        secrets = sorted(_secrets, key=len, reverse=True)
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, "***")
    return text


def _remember_secret(secret: str) -> None:
    """Register a secret for :func:`redact`; for a JWT also its claims and signature segments
    (the header segment is the same for every token of an issuer, so it is no secret)."""
    with _secrets_lock:
        _secrets.add(secret)
        for part in secret.split(".")[1:]:
            if len(part) >= 16:
                _secrets.add(part)


def _one_line(text: str, limit: int = 500) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ------------------------------------------------------------------------------------ import
_import_lock = threading.Lock()
_dl: ModuleType | None = None


class _ForwardHandler(logging.Handler):
    """Re-logs dtlpy records as one redacted DEBUG line each (no traceback) on our logger."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a broken SDK log call must never break a request
            return
        if _sdk_log.isEnabledFor(logging.DEBUG):
            _sdk_log.debug("dtlpy %s: %s", record.levelname, _one_line(redact(message)))


def _quiet_sdk_logger() -> None:
    logger = logging.getLogger("dtlpy")
    logger.setLevel(logging.WARNING)
    logger.propagate = False
    if not any(isinstance(h, _ForwardHandler) for h in logger.handlers) or len(logger.handlers) > 1:
        # replaces the SDK's stderr and DEBUG-file handlers when it was imported before us;
        # the SDK itself needs handlers[0] to exist (it sets its level from the cookie)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
            with contextlib.suppress(Exception):
                handler.close()
        logger.addHandler(_ForwardHandler(logging.DEBUG))


_home: str | None = None


def _private_home() -> str:
    """``DATALOOP_PATH``: the operator's value, else a fresh 0700 temp folder removed at exit
    (exported, since dtlpy reads the variable itself when it is imported)."""
    global _home
    current = config.settings().dataloop_path or _home
    if current:
        return current
    _home = tempfile.mkdtemp(prefix="polyburn-dtlpy-")
    os.environ["DATALOOP_PATH"] = _home
    atexit.register(shutil.rmtree, _home, True)
    return _home


def dtlpy() -> ModuleType:
    """The ``dtlpy`` module, imported with a private ``DATALOOP_PATH`` and a quiet logger."""
    global _dl
    if _dl is not None:
        return _dl
    with _import_lock:
        if _dl is None:
            _private_home()
            _quiet_sdk_logger()  # before the import: the SDK adds its handlers only if none
            import dtlpy as dl

            _quiet_sdk_logger()
            _dl = dl
    return _dl


# ------------------------------------------------------------------------------------ policy
@dataclass(frozen=True)
class RetryPolicy:
    """How hard :func:`call` tries: the ``POLYBURN_DATALOOP_*`` settings."""

    attempts: int = 6
    backoff_base: float = 0.5
    backoff_max: float = 20.0
    max_retry_after: float = 60.0
    timeout: float = 60.0

    @classmethod
    def from_env(cls) -> RetryPolicy:
        current = config.settings()
        return cls(
            attempts=current.dataloop_attempts,
            backoff_base=current.dataloop_backoff_base,
            backoff_max=current.dataloop_backoff_max,
            max_retry_after=current.dataloop_max_retry_after,
            timeout=current.dataloop_timeout,
        )

    def delay(self, attempt: int, retry_after: float | None) -> float:
        """Seconds to sleep after failed attempt ``attempt`` (1-based)."""
        ceiling = min(self.backoff_max, self.backoff_base * 2 ** (attempt - 1))
        backoff = random.uniform(ceiling / 2, ceiling)
        if retry_after is not None:
            return max(min(retry_after, self.max_retry_after), backoff)
        return backoff


# ------------------------------------------------------------------------------------ session
@dataclass
class Session:
    """A logged-in polyburn client: ``dl`` is the module, ``client`` a private ApiClient."""

    dl: ModuleType
    client: Any
    fingerprint: tuple[str, str, str]
    environment: str
    http: Any  # the requests.Session installed on ``client``


_session_lock = threading.Lock()
_session: Session | None = None


def session() -> Session:
    """The process's Dataloop session for the current key and gate, logging in when needed.

    Raises ConfigError (one line, no secret) when no key is configured, the key is not a JWT the
    SDK accepts, Dataloop rejects it, or the gate URL is malformed; TransientError when the gate
    stays unreachable through the retry budget.
    """
    global _session
    fingerprint = _fingerprint()
    current = _session
    if current is not None and current.fingerprint == fingerprint:
        return current
    with _session_lock:
        if _session is not None and _session.fingerprint == fingerprint:
            return _session
        _session = _connect(fingerprint)
        return _session


def reset_session() -> None:
    """Forget the current session (the next call logs in again)."""
    global _session
    with _session_lock:
        _session = None


def _fingerprint() -> tuple[str, str, str]:
    current = config.settings()
    block = current.dataloop_api_key_block or ""
    gate = current.dataloop_gate_url or ""
    if block:
        return ("block", block, gate)
    secret = current.dataloop_api_key
    key = secret.get_secret_value().strip() if secret is not None else ""
    digest = hashlib.sha256(key.encode()).hexdigest() if key else ""
    return ("env", digest, gate)


def _api_key(fingerprint: tuple[str, str, str]) -> str:
    resolved = config.credential("dataloop_api_key")
    key = resolved.secret.get_secret_value().strip() if resolved.secret is not None else ""
    origin = resolved.origin or ENV_API_KEY
    if not key:
        raise ConfigError(
            f"no Dataloop API key: set {ENV_API_KEY} or name a Prefect Secret block in "
            f"{ENV_API_KEY_BLOCK} (was empty: {origin})"
        )
    _remember_secret(key)
    return key


def _connect(fingerprint: tuple[str, str, str]) -> Session:
    key = _api_key(fingerprint)
    dl = dtlpy()
    home = _private_home()
    cookie = os.path.join(home, f"polyburn-{os.getpid()}-{uuid.uuid4().hex[:8]}.json")
    client = dl.ApiClient(cookie_filepath=cookie)
    atexit.register(_remove_quietly, cookie)
    # the SDK shares its DEFAULT_ENVIRONMENTS dict between clients: give this one its own copy
    client.environments = copy.deepcopy(client.environments)
    client.verbose.disable_progress_bar = True
    environment = _select_environment(client, fingerprint[2])
    http = _install_http(client)
    try:
        call(lambda: _login(client, key), "login (GET /users/me)")
    except Exception:
        client.token = ""  # never leave a rejected key in the cookie
        _remove_quietly(cookie)
        raise
    return Session(dl, client, fingerprint, environment, http)


def _login(client: Any, key: str) -> None:
    try:
        client.login_api_key(key)
    except ValueError:
        # login_api_key raises ValueError for any non-2xx; its response tells which one
        response = client.last_response
        status = getattr(response, "status_code", None)
        _raise_for_response(response, "login (GET /users/me)", auth=True, status=status)
        raise DataloopError("Dataloop login failed", status) from None


def _select_environment(client: Any, gate: str) -> str:
    if not gate:
        client.setenv("prod")
        return client.environment
    parts = urlsplit(gate)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"{ENV_GATE_URL} must be an http(s) URL, not {gate!r}")
    path = parts.path.rstrip("/")
    if not re.search(r"/api/v\d+$", path):
        path += "/api/v1"
    base = f"{parts.scheme}://{parts.netloc}"
    api = base + path
    alias = "polyburn-" + hashlib.sha256(api.encode()).hexdigest()[:10]
    known = client.environments.get(api)
    if not known or known.get("alias") != alias:
        client.add_environment(environment=api, alias=alias, gate_url=base)
    client.setenv(alias)
    return api


def _install_http(client: Any) -> Any:
    """A requests.Session without urllib3 retries and with polyburn's timeouts, on ``client``."""
    import requests
    from requests.adapters import HTTPAdapter
    from urllib3.util.retry import Retry

    class _Adapter(HTTPAdapter):
        def send(self, request, stream=False, timeout=None, verify=True, cert=None, proxies=None):
            read = RetryPolicy.from_env().timeout
            return super().send(
                request,
                stream=stream,
                timeout=(min(CONNECT_TIMEOUT, read), read),
                verify=verify,
                cert=cert,
                proxies=proxies,
            )

    http = requests.Session()
    adapter = _Adapter(
        max_retries=Retry(total=0, connect=0, read=0, redirect=3, status=0, raise_on_status=False),
        pool_connections=8,
        pool_maxsize=32,
    )
    http.mount("http://", adapter)
    http.mount("https://", adapter)
    client.session = http
    return http


def _remove_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


# ------------------------------------------------------------------------------------ calls
def call(
    fn: Callable[[], T],
    what: str,
    *,
    recover: Callable[[], T | None] | None = None,
) -> T:
    """Run ``fn`` (one Dataloop request) with throttling and retries; see the module docstring.

    ``fn`` signals a transient failure by raising a requests/urllib3 connection or timeout
    error, ``ConnectionError``/``TimeoutError``, a dtlpy exception with status 408/429/5xx, or
    (from :func:`request`) an internal retryable error. ``recover``, for requests that are not
    idempotent (an upload), runs after each transient failure: when it returns a value (the
    server did apply the request before the connection broke) that value is the result and
    nothing is re-sent.

    Raises
    ------
    TransientError
        The failure persisted through every attempt.
    DataloopError
        A non-retryable 4xx (``DataloopNotFound`` for 404).
    ConfigError
        The token is expired or not a JWT (dtlpy refuses to send anything then).
    """
    policy = RetryPolicy.from_env()
    started = time.monotonic()
    last = ""
    for attempt in range(1, policy.attempts + 1):
        retry_after: float | None = None
        try:
            with throttled(), in_flight():
                return fn()
        except _Retryable as exc:
            last, retry_after = str(exc), exc.retry_after
        except Exception as exc:  # noqa: BLE001 - classified below, re-raised when not transient
            last = _classify(exc, what)
        if recover is not None:
            recovered = recover()
            if recovered is not None:
                log.info("Dataloop %s: applied despite %s; not re-sent", what, last)
                return recovered
        if attempt == policy.attempts:
            break
        pause = policy.delay(attempt, retry_after)
        log.info(
            "Dataloop %s: %s; retry %d/%d in %.2f s",
            what,
            redact(last),
            attempt,
            policy.attempts - 1,
            pause,
        )
        time.sleep(pause)
    raise TransientError(
        _one_line(
            redact(
                f"Dataloop {what}: gave up after {policy.attempts} attempts in "
                f"{time.monotonic() - started:.1f} s: {last}"
            )
        )
    )


def _classify(exc: Exception, what: str) -> str:
    """A one-line reason when ``exc`` is transient; otherwise raise the polyburn error for it."""
    import requests
    import urllib3.exceptions

    if isinstance(exc, PolyburnError):
        raise exc
    transient_types = (
        requests.exceptions.ConnectionError,
        requests.exceptions.Timeout,
        requests.exceptions.ChunkedEncodingError,
        urllib3.exceptions.ProtocolError,
        urllib3.exceptions.TimeoutError,
        ConnectionError,
        TimeoutError,
    )
    if isinstance(exc, transient_types):
        return f"{type(exc).__name__}: {_one_line(redact(str(exc)), 200)}"
    status = getattr(exc, "status_code", None)
    if status is not None and type(exc).__module__.startswith("dtlpy"):
        message = _one_line(redact(str(getattr(exc, "message", "") or "")), 300)
        if str(status) == "600":
            raise ConfigError(
                "the Dataloop API key is expired or is not a JWT (dtlpy checks its 'exp' claim "
                "before sending anything)"
            ) from None
        code = int(status) if str(status).isdigit() else None
        if code is not None and (code in _RETRY_STATUS or 500 <= code <= 599):
            return f"HTTP {code}: {message}"
        error = DataloopNotFound if code == 404 else DataloopError
        raise error(f"Dataloop {what}: HTTP {status}: {message}", code) from None
    raise exc


def request(
    method: str,
    path: str,
    *,
    what: str,
    json_body: Any = None,
    headers: Mapping[str, str] | None = None,
    recover: Callable[[], Any | None] | None = None,
) -> Any:
    """Send one request to the gate (``path`` below ``/api/v1``) through :func:`call`.

    Returns the decoded JSON body (None for an empty body). A 4xx raises DataloopError with the
    server's message (never swallowed, unlike the SDK's paging); 408/429/5xx and broken
    connections are retried.
    """
    current = session()

    def once() -> Any:
        client = current.client
        if client.session is not current.http:  # the SDK drops its session after a fork
            current.http = _install_http(client)
        if client.token_expired():  # what the SDK's decorator checks, without its stack walk
            raise ConfigError(
                "the Dataloop API key has expired (dtlpy needs its 'exp' more than 60 s ahead)"
            )
        _, response = _gen_request(
            client,
            req_type=method.lower(),
            path=path,
            json_req=json_body,
            headers=dict(headers) if headers else None,
            log_error=False,
        )
        _raise_for_response(response, what)
        if not response.content:
            return None
        try:
            return response.json()
        except ValueError:
            raise _Retryable(
                f"HTTP {response.status_code} with a body that is not JSON "
                f"({len(response.content)} bytes)"
            ) from None

    return call(once, what, recover=recover)


def _gen_request(client: Any, **kwargs: Any) -> tuple[bool, Any]:
    """``ApiClient.gen_request`` without its ``token_expired_decorator``.

    The decorator runs ``inspect.stack()`` (reading the source of every frame) before each
    request to record the caller: 1-3 ms per request inside a Prefect task, measured. Its only
    other job, the token expiry check (and a refresh polyburn never uses: API keys have no refresh
    token), is done by :func:`request` itself. Falls back to the decorated method if the SDK
    changes shape.
    """
    method = getattr(type(client).gen_request, "__wrapped__", None)
    if method is None:
        return client.gen_request(**kwargs)
    return method(client, **kwargs)


def _raise_for_response(
    response: Any, what: str, *, auth: bool = False, status: int | None = None
) -> None:
    """Return for a 2xx; raise _Retryable for 408/429/5xx; DataloopError (ConfigError when
    ``auth``) for any other status."""
    status = status if status is not None else getattr(response, "status_code", None)
    if status is None:
        raise _Retryable("no response")
    if 200 <= status < 300:
        return
    message = _server_message(response)
    if status in _RETRY_STATUS or 500 <= status <= 599:
        raise _Retryable(f"HTTP {status}: {message}", _retry_after(response))
    reason = getattr(response, "reason", "") or ""
    status_text = f"HTTP {status} {reason}".strip()
    if auth and status in (400, 401, 403):
        raise ConfigError(
            _one_line(redact(f"Dataloop rejected the API key: {status_text}: {message}"))
        )
    text = f"Dataloop {what}: {status_text}: {message}"
    if status == 404:
        raise DataloopNotFound(text, status)
    raise DataloopError(text, status)


def _server_message(response: Any) -> str:
    try:
        data = response.json()
    except Exception:  # noqa: BLE001 - not JSON: use the text
        data = None
    if isinstance(data, Mapping):
        for key in ("message", "error", "detail"):
            if isinstance(data.get(key), str) and data[key].strip():
                return _one_line(redact(data[key]), 300)
    text = getattr(response, "text", "") or ""
    return _one_line(redact(text), 300) or "(no message)"


def _retry_after(response: Any) -> float | None:
    headers = getattr(response, "headers", None) or {}
    value = headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


# ------------------------------------------------------------------------------------ paging
def query_pages(
    dataset_id: str, body: Mapping[str, Any], what: str, page_size: int = PAGE_SIZE_MAX
) -> Iterator[list[dict[str, Any]]]:
    """Pages of ``POST /datasets/{id}/query`` results, keyset-paged the way dtlpy pages.

    ``body`` is a prepared DQL query (``dl.Filters().prepare()`` shape) whose ``filter`` is an
    ``$and`` list. Each request asks for ``page: 0``, ``sort: {"id": "ascending"}`` and, from the
    second page on, adds ``{"id": {"$gt": <last id of the previous page>}}``; paging stops at
    ``hasNextPage: false`` or an empty page. Only one page is held at a time. A response without
    an ``items`` list is a DataloopError, so an error can never pass for "no results".
    """
    template = copy.deepcopy(dict(body))
    flt = template.get("filter") or {}
    if set(flt) - {"$and"}:
        flt = {"$and": [flt]}
    template["filter"] = {"$and": list(flt.get("$and", []))}
    template.update(page=0, pageSize=max(1, min(PAGE_SIZE_MAX, page_size)))
    template["sort"] = {"id": "ascending"}
    last_id: str | None = None
    while True:
        page_body = copy.deepcopy(template)
        if last_id is not None:
            page_body["filter"]["$and"].append({"id": {"$gt": last_id}})
        result = _query(dataset_id, page_body, what)
        if not isinstance(result, Mapping) or not isinstance(result.get("items"), list):
            raise DataloopError(f"Dataloop {what}: the query response has no 'items' list")
        items = result["items"]
        if items:
            yield items
        if not items or not result.get("hasNextPage"):
            return
        next_id = items[-1].get("id") if isinstance(items[-1], Mapping) else None
        if not isinstance(next_id, str) or (last_id is not None and next_id <= last_id):
            raise DataloopError(f"Dataloop {what}: keyset paging did not advance past {last_id}")
        last_id = next_id


def _query(dataset_id: str, body: Mapping[str, Any], what: str) -> Any:
    """One ``POST /datasets/{id}/query`` (a user query, as dtlpy marks ``dl.Filters``)."""
    return request(
        "POST",
        f"/datasets/{dataset_id}/query",
        what=what,
        json_body=body,
        headers={"user_query": "true"},
    )


def delete_query(dataset_id: str, body: Mapping[str, Any], what: str) -> int | None:
    """Delete what a DQL query matches: ``POST /datasets/{id}/query`` with ``"delete": true``
    (what ``dataset.annotations.delete(filters=...)`` sends). Returns the count the server says
    it deleted, or None when the reply carries none. Callers that must know what is gone check
    it (the count of a retried request, or a partial delete, is lower than what was asked)."""
    delete_body = copy.deepcopy(dict(body))
    delete_body["delete"] = True
    delete_body.pop("sort", None)
    result = _query(dataset_id, delete_body, what)
    if isinstance(result, Mapping):
        for key in ("affected", "deleted", "count", "totalItemsCount"):
            value = result.get(key)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
    return None


# ------------------------------------------------------------------------------------ in flight
_flight_lock = threading.Lock()
_flight: tuple[int, threading.BoundedSemaphore] | None = None


def concurrency() -> int:
    """Dataloop requests one process keeps in flight: ``POLYBURN_DATALOOP_CONCURRENCY``
    (default 8, at least 1)."""
    return config.settings().dataloop_concurrency


@contextlib.contextmanager
def in_flight() -> Iterator[None]:
    """Hold one of the process's :func:`concurrency` request slots while the block runs."""
    global _flight
    size = concurrency()
    with _flight_lock:
        if _flight is None or _flight[0] != size:
            _flight = (size, threading.BoundedSemaphore(size))
        semaphore = _flight[1]
    with semaphore:
        yield


# ------------------------------------------------------------------------------------ context
def run_id() -> str:
    """The Prefect flow run id when inside a run, else an id fixed for this process."""
    if "prefect" in sys.modules:
        with contextlib.suppress(Exception):
            from prefect.context import FlowRunContext, TaskRunContext

            flow_ctx = FlowRunContext.get()
            if flow_ctx is not None and flow_ctx.flow_run is not None:
                return str(flow_ctx.flow_run.id)
            task_ctx = TaskRunContext.get()
            if task_ctx is not None and task_ctx.task_run.flow_run_id is not None:
                return str(task_ctx.task_run.flow_run_id)
    return _PROCESS_RUN_ID


_datasets_of_items: OrderedDict[str, str] = OrderedDict()
_items_lock = threading.Lock()
_ITEMS_REMEMBERED = 10_000


def remember_item(item_id: str, dataset_id: str) -> None:
    """Record that ``item_id`` was read from ``dataset_id`` (a bounded, recent-first memory)."""
    with _items_lock:
        _datasets_of_items[item_id] = dataset_id
        _datasets_of_items.move_to_end(item_id)
        while len(_datasets_of_items) > _ITEMS_REMEMBERED:
            _datasets_of_items.popitem(last=False)


def dataset_of(item_id: str) -> str | None:
    """The dataset ``item_id`` was read from in this process, if remembered."""
    with _items_lock:
        return _datasets_of_items.get(item_id)


# ------------------------------------------------------------------------------------ throttle
@dataclass(frozen=True)
class LimitInfo:
    """What polyburn needs of a Prefect global concurrency limit."""

    mode: str  # "rate" (slot decay > 0) or "concurrency"
    limit: int
    decay: float  # slots per second


@dataclass
class _Reserve:
    """Rate-limit slots already taken from Prefect and not yet spent by a call."""

    slots: int = 0
    expires: float = 0.0


_limit_lock = threading.Lock()
_limit_infos: dict[str, tuple[float, LimitInfo | None]] = {}
_reserves: dict[str, _Reserve] = {}


def limit_name() -> str:
    """The Prefect global concurrency limit Dataloop calls take slots from ('' disables)."""
    return config.settings().dataloop_limit


def slots_per_acquire(info: LimitInfo) -> int:
    """How many rate-limit slots one Prefect round trip takes: ``POLYBURN_DATALOOP_LIMIT_BATCH``,
    else a quarter of the limit (at most 10), never more than the limit."""
    wanted = config.settings().dataloop_limit_batch or min(10, info.limit // 4)
    return max(1, min(int(wanted), info.limit))


@contextlib.contextmanager
def throttled() -> Iterator[None]:
    """Take a slot of the Dataloop limit for one request (a no-op without a run or a limit).

    Rate limits: slots are taken from Prefect ``slots_per_acquire`` at a time (one API round
    trip for that many calls) and spent locally; unspent slots lapse after the time the limit
    needs to decay them, so a burst never exceeds what the server granted. Concurrency limits:
    one slot is held around each request.
    """
    name = limit_name()
    info = limit_info(name) if name and _throttling_applies() else None
    if info is None:
        yield
    elif info.mode == "rate":
        _take_rate_slot(name, info)
        yield
    else:
        from prefect.concurrency.sync import concurrency

        with concurrency(name, occupy=1, strict=False):
            yield


def _take_rate_slot(name: str, info: LimitInfo) -> None:
    now = time.monotonic()
    with _limit_lock:
        reserve = _reserves.setdefault(name, _Reserve())
        if reserve.slots > 0 and now < reserve.expires:
            reserve.slots -= 1
            return
    from prefect.concurrency.sync import rate_limit

    batch = slots_per_acquire(info)
    rate_limit(name, occupy=batch, strict=False)
    if batch > 1:
        with _limit_lock:
            reserve = _reserves.setdefault(name, _Reserve())
            reserve.slots = max(reserve.slots, 0) + batch - 1
            reserve.expires = time.monotonic() + batch / info.decay


def forget_limits() -> None:
    """Drop the cached limit look-ups and reserved slots (the next call asks Prefect again)."""
    with _limit_lock:
        _limit_infos.clear()
        _reserves.clear()


def _throttling_applies() -> bool:
    """Inside a Prefect flow or task run; or in a worker process started by a run (a
    ``multiprocessing`` child, e.g. polyburn's burn pool) when ``PREFECT_API_URL`` names the
    server that holds the limit. Never elsewhere: a bare ``get_client()`` without an API URL
    would start an ephemeral Prefect server."""
    if _in_prefect_run():
        return True
    import multiprocessing

    return multiprocessing.parent_process() is not None and bool(
        os.environ.get("PREFECT_API_URL", "").strip()
    )


def _in_prefect_run() -> bool:
    if "prefect.context" not in sys.modules:
        return False
    from prefect.context import FlowRunContext, TaskRunContext

    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


def limit_info(name: str) -> LimitInfo | None:
    """The limit named ``name`` (None when missing or inactive), looked up at most once per
    ``POLYBURN_DATALOOP_LIMIT_TTL`` seconds per process."""
    ttl = config.settings().dataloop_limit_ttl
    now = time.monotonic()
    with _limit_lock:
        cached = _limit_infos.get(name)
        if cached is not None and now - cached[0] < ttl:
            return cached[1]
    info = _read_limit(name)
    with _limit_lock:
        _limit_infos[name] = (now, info)
    return info


def _read_limit(name: str) -> LimitInfo | None:
    try:
        from prefect.client.orchestration import get_client
        from prefect.exceptions import ObjectNotFound

        with get_client(sync_client=True) as client:
            try:
                limit = client.read_global_concurrency_limit_by_name(name)
            except ObjectNotFound:
                return None
    except Exception as exc:  # noqa: BLE001 - no Prefect API: run unthrottled, and say so
        log.warning("cannot read Prefect concurrency limit %r (%s); not throttling", name, exc)
        return None
    if not limit.active or limit.limit < 1:
        return None
    decay = float(limit.slot_decay_per_second or 0.0)
    return LimitInfo("rate" if decay > 0 else "concurrency", int(limit.limit), decay)
