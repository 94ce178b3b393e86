"""``polyburn events``: what a Dataloop webhook call means, and who may make one.

Dataloop calls ``POST /dataloop`` with the JSON of the resource that triggered (an item or an
annotation). The receiver (:mod:`polyburn.receiver`, the HTTP side) authenticates the call with a
:class:`Verifier`, derives the change with :func:`parse_change`, and emits

* ``dataloop.annotation.<action>`` for an annotation, ``dataloop.item.annotated`` (or
  ``dataloop.item.<action>``) for an item, where ``<action>`` is the ``?action=`` query value
  (``created``, ``updated``, ...) or ``changed`` when there is none;
* resource ``{"prefect.resource.id": "dataloop.item.<item-id>", "dataloop.item.id": <item-id>,
  "dataloop.dataset.id": <dataset-id>}`` (no dataset label when the JSON has no ``datasetId``).

The ``on-annotation`` deployment's trigger listens for those events.

Authentication (either or both; a request must pass the one it uses):

* **HMAC** (``POLYBURN_WEBHOOK_SECRET`` or the Prefect Secret block named by
  ``POLYBURN_WEBHOOK_SECRET_BLOCK``): headers ``X-Polyburn-Timestamp: <unix seconds>`` and
  ``X-Polyburn-Signature: sha256=<hex>``, the HMAC-SHA256 of ``<timestamp>.<raw body>``. The
  timestamp must be within ±5 minutes and each signature is accepted once (replay cache).
* **Static token** (``POLYBURN_WEBHOOK_TOKEN`` or ``POLYBURN_WEBHOOK_TOKEN_BLOCK``):
  ``Authorization: Bearer <token>`` or ``?token=<token>``. This is what a Dataloop webhook can do
  (it has a URL and an HTTP method, no headers and no signing); it proves knowledge of the token,
  not freshness, so anyone who sees the URL can replay or forge calls (see the README's
  "Events from Dataloop" section).

Unauthenticated calls get 401 and emit nothing. Accepted calls get 202: the event is queued to the
Prefect API (:func:`emit_to_prefect`), which delivers it in the background. Secrets, tokens,
signatures and query strings are never logged.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from polyburn.errors import ConfigError

log = logging.getLogger("polyburn.events")

SIGNATURE_HEADER = "X-Polyburn-Signature"
TIMESTAMP_HEADER = "X-Polyburn-Timestamp"
#: Largest accepted difference between the signed timestamp and this machine's clock.
MAX_SKEW_SECONDS = 300
#: Largest request body read (an item or annotation JSON is a few kB).
MAX_BODY_BYTES = 1_000_000
#: Shortest accepted HMAC secret or token, in bytes.
MIN_SECRET_BYTES = 16
HOOK_PATH = "/dataloop"

_ACTION = re.compile(r"[a-z][a-z0-9_-]{0,31}")
_ID = re.compile(r"[^\x00-\x1f\x7f]{1,512}")


# --------------------------------------------------------------------------- signatures


def sign(secret: bytes, timestamp: str, body: bytes) -> str:
    """The ``X-Polyburn-Signature`` value of ``body`` sent at ``timestamp`` (unix seconds, as
    sent in ``X-Polyburn-Timestamp``): ``sha256=`` + hex HMAC-SHA256 of ``timestamp.body``."""
    mac = hmac.new(secret, timestamp.encode("ascii") + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


class ReplayCache:
    """Signatures seen recently, each kept until its timestamp leaves the accepted window.

    Thread-safe. Holds at most ``max_entries``; when full (after dropping expired entries) a new
    signature is refused rather than an old one forgotten, so a replay is never let through.
    """

    def __init__(self, max_entries: int = 100_000, clock: Callable[[], float] = time.time):
        self._expiry: dict[str, float] = {}
        self._lock = threading.Lock()
        self._max = max_entries
        self._clock = clock

    def add(self, key: str, expires_at: float) -> bool:
        """Remember ``key`` until ``expires_at``; False when it was already there (a replay) or
        the cache is full."""
        with self._lock:
            now = self._clock()
            if key in self._expiry and self._expiry[key] > now:
                return False
            if len(self._expiry) >= self._max:
                self._expiry = {k: t for k, t in self._expiry.items() if t > now}
                if len(self._expiry) >= self._max:
                    return False
            self._expiry[key] = expires_at
            return True


@dataclass
class Verifier:
    """Checks a request's credentials; holds the secret and token, which never leave it.

    ``check`` returns None when the request is authenticated, else a short reason for the log
    (never containing a secret, token or signature).
    """

    secret: bytes | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    clock: Callable[[], float] = time.time
    max_skew: int = MAX_SKEW_SECONDS
    replays: ReplayCache = field(default_factory=ReplayCache)

    def __post_init__(self) -> None:
        if not self.secret and not self.token:
            raise ConfigError(
                "no webhook credentials: set POLYBURN_WEBHOOK_SECRET (HMAC) and/or "
                "POLYBURN_WEBHOOK_TOKEN (static token), or the *_BLOCK variants"
            )
        for name, value in (("secret", self.secret), ("token", self.token)):
            if value and len(value) < MIN_SECRET_BYTES:
                raise ConfigError(f"the webhook {name} must be at least {MIN_SECRET_BYTES} bytes")

    def check(
        self, headers: Mapping[str, str], query: Mapping[str, list[str]], body: bytes
    ) -> str | None:
        """None when authenticated, else why not. A request carrying a signature is judged by
        it alone; otherwise by its token."""
        signature = headers.get(SIGNATURE_HEADER)
        if signature is not None:
            return self._check_signature(signature, headers.get(TIMESTAMP_HEADER), body)
        presented = _bearer(headers.get("Authorization")) or single(query.get("token"))
        if presented is not None:
            return self._check_token(presented)
        return "no credentials"

    def _check_signature(self, signature: str, timestamp: str | None, body: bytes) -> str | None:
        if not self.secret:
            return "signature given but no HMAC secret configured"
        if timestamp is None or not is_number(timestamp):
            return "missing or malformed timestamp"
        sent = int(timestamp)
        if abs(self.clock() - sent) > self.max_skew:
            return "stale timestamp"
        expected = sign(self.secret, timestamp, body)
        if not hmac.compare_digest(expected.encode(), signature.strip().encode()):
            return "bad signature"
        if not self.replays.add(expected, sent + self.max_skew):
            return "replayed signature"
        return None

    def _check_token(self, presented: str) -> str | None:
        if not self.token:
            return "token given but no token configured"
        if not hmac.compare_digest(self.token.encode(), presented.encode()):
            return "bad token"
        return None


def is_number(text: str) -> bool:
    """True for a short string of ASCII digits (a unix timestamp, a Content-Length)."""
    return text.isascii() and text.isdigit() and len(text) <= 12


def _bearer(value: str | None) -> str | None:
    if not value:
        return None
    scheme, _, credentials = value.partition(" ")
    return credentials.strip() if scheme.lower() == "bearer" and credentials.strip() else None


def single(values: list[str] | None) -> str | None:
    """The value of a query parameter given exactly once, else None."""
    return values[0] if values and len(values) == 1 else None


def load_verifier() -> Verifier:
    """A Verifier with the webhook secret and token resolved by
    :func:`polyburn.settings.credential` (a Prefect Secret block named by a ``*_BLOCK`` setting,
    else the value; loaded once, now). ConfigError when neither is set."""
    from polyburn.settings import credential

    secret = credential("webhook_secret").secret
    token = credential("webhook_token").secret
    return Verifier(
        secret=secret.get_secret_value().encode() if secret else None,
        token=token.get_secret_value() if token else None,
    )


# --------------------------------------------------------------------------- payloads


@dataclass(frozen=True)
class DataloopChange:
    """What a webhook call says changed: the Prefect event to emit for it."""

    event: str
    item_id: str
    dataset_id: str | None
    kind: str  # "item" or "annotation"
    annotation_id: str | None = None

    @property
    def resource(self) -> dict[str, str]:
        """The event's resource: the item."""
        resource = {"prefect.resource.id": f"dataloop.item.{self.item_id}"}
        resource["dataloop.item.id"] = self.item_id
        if self.dataset_id:
            resource["dataloop.dataset.id"] = self.dataset_id
        return resource

    @property
    def payload(self) -> dict[str, str]:
        payload = {"kind": self.kind}
        if self.annotation_id:
            payload["annotation_id"] = self.annotation_id
        return payload


class PayloadError(ValueError):
    """The request body is not an item or annotation JSON we understand."""


def parse_change(body: bytes, action: str | None = None) -> DataloopChange:
    """The change a Dataloop webhook body describes.

    ``body`` is the JSON of the triggering resource: an annotation (``itemId``, ``datasetId``,
    ``id``) or an item (``id``, ``datasetId``); a wrapper object holding it under ``annotation``,
    ``item``, ``input``, ``data`` or ``resource`` is unwrapped. ``action`` (``Created``,
    ``updated``, ...) names the event; it is lower-cased. Raises PayloadError.
    """
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PayloadError(f"body is not JSON: {exc}") from None
    data = _unwrap(data)
    if action is not None:
        action = action.strip().lower()
        if not _ACTION.fullmatch(action):
            raise PayloadError("action must be a short lower-case word")
    dataset_id = _optional_id(data, "datasetId")
    if "itemId" in data:
        return DataloopChange(
            event=f"dataloop.annotation.{action or 'changed'}",
            item_id=_required_id(data, "itemId"),
            dataset_id=dataset_id,
            kind="annotation",
            annotation_id=_optional_id(data, "id"),
        )
    if "id" in data:
        return DataloopChange(
            event=f"dataloop.item.{action or 'annotated'}",
            item_id=_required_id(data, "id"),
            dataset_id=dataset_id,
            kind="item",
        )
    raise PayloadError("neither an annotation (itemId) nor an item (id)")


def _unwrap(data: Any) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise PayloadError("body must be a JSON object")
    if "itemId" in data or "id" in data:
        return data
    for key in ("annotation", "item", "input", "data", "resource"):
        inner = data.get(key)
        if isinstance(inner, dict):
            return _unwrap(inner)
    return data


def _required_id(data: Mapping[str, Any], key: str) -> str:
    value = _optional_id(data, key)
    if value is None:
        raise PayloadError(f"{key} is missing")
    return value


def _optional_id(data: Mapping[str, Any], key: str) -> str | None:
    value = data.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise PayloadError(f"{key} must be a non-empty string without control characters")
    if value.startswith("/") or ".." in value.split("/"):
        raise PayloadError(f"{key} must not be an absolute path or contain '..'")
    return value


# --------------------------------------------------------------------------- emitting


Emitter = Callable[[DataloopChange], str | None]


def emit_to_prefect(change: DataloopChange) -> str | None:
    """Queue the change's event to the configured Prefect API; the event id, or None when
    Prefect did not accept it (events disabled, bad event)."""
    from prefect.events import emit_event

    event = emit_event(event=change.event, resource=change.resource, payload=change.payload)
    return str(event.id) if event is not None else None
