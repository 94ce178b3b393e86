"""AWS Signature Version 4 of an S3 request, as :class:`botocore.auth.S3SigV4Auth` signs it.

Why not botocore's signer: it costs about 0.5 ms of CPU per request (``bench/s3_put_cost.py``:
header maps rebuilt three times, the four-step key derived again for every request, debug
logging calls), half of a small ``PutObject`` on the lean path. :func:`sign` computes the
same headers from plain strings, and :class:`SigningKeys` derives the key once per day,
region and secret.

Contract, the same as botocore's for an S3 request without a query string:

* **Canonical URI**: the URL's path exactly as it will be sent (S3 paths are not normalised;
  the caller quotes the key as botocore does, ``quote(key, safe="/~")``).
* **Signed headers**: every header given, lower-cased, except those botocore never signs
  (:data:`botocore.auth.SIGNED_HEADERS_BLACKLIST`: ``user-agent``, ``expect``...), plus
  ``host`` (from the URL, default port left out) and the ``x-amz-date``,
  ``x-amz-security-token`` (temporary credentials) and ``x-amz-content-sha256`` it adds.
  Values are trimmed and inner runs of spaces collapsed; names given twice in different case
  are joined with commas.
* **Payload**: the body's SHA-256 (hex), or ``UNSIGNED-PAYLOAD`` when the caller says the
  payload is not signed (botocore's rule for a checksummed upload over HTTPS).

``tests/test_sigv4.py`` checks every header against botocore's signer for the same request
and instant. Nothing here logs or raises with a credential in it.
"""

from __future__ import annotations

import hashlib
import hmac
import threading
from collections.abc import Mapping
from urllib.parse import urlsplit

from botocore.auth import SIGNED_HEADERS_BLACKLIST, UNSIGNED_PAYLOAD
from botocore.credentials import ReadOnlyCredentials

_NOT_SIGNED = frozenset(SIGNED_HEADERS_BLACKLIST)
_ALGORITHM = "AWS4-HMAC-SHA256"
_SET_HERE = frozenset(
    {"authorization", "x-amz-date", "x-amz-security-token", "x-amz-content-sha256"}
)
"""Headers :func:`sign` writes itself: one given is replaced."""


class SigningKeys:
    """The derived SigV4 signing keys of one region and service, by secret and day.

    Thread-safe; holds at most a few keys (a day changes, a secret rotates)."""

    def __init__(self, region: str, service: str = "s3") -> None:
        self.region = region
        self.service = service
        self._keys: dict[tuple[str, str], bytes] = {}
        self._lock = threading.Lock()

    def key(self, secret_key: str, day: str) -> bytes:
        """The signing key for ``day`` (``YYYYMMDD``, UTC)."""
        found = self._keys.get((secret_key, day))
        if found is not None:
            return found
        key = hmac.digest(f"AWS4{secret_key}".encode(), day.encode(), "sha256")
        for part in (self.region, self.service, "aws4_request"):
            key = hmac.digest(key, part.encode(), "sha256")
        with self._lock:
            if len(self._keys) >= 4:
                self._keys.clear()
            self._keys[(secret_key, day)] = key
        return key

    def scope(self, day: str) -> str:
        return f"{day}/{self.region}/{self.service}/aws4_request"


def host_of(url: str) -> str:
    """The ``Host`` header of a request to ``url`` as botocore signs it: the host lower-cased,
    an IPv6 address in brackets, the port only when it is not the scheme's default."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    if parts.port is not None and parts.port != {"http": 80, "https": 443}.get(parts.scheme):
        host = f"{host}:{parts.port}"
    return host


def sign(
    method: str,
    host: str,
    path: str,
    headers: Mapping[str, str],
    payload_sha256: str | None,
    credentials: ReadOnlyCredentials,
    keys: SigningKeys,
    timestamp: str,
) -> dict[str, str]:
    """``headers`` with the SigV4 headers added, in the order botocore adds them.

    ``host``: the ``Host`` header's value (no default port); ``path``: the request's path as
    sent, starting with ``/``; ``payload_sha256``: the body's SHA-256 in hex, or None for an
    unsigned payload; ``timestamp``: the signing instant, ``YYYYMMDDTHHMMSSZ`` (UTC).
    The result holds every header of ``headers`` (an ``Authorization``, ``X-Amz-Date`` or
    ``X-Amz-Security-Token`` given is replaced), then ``X-Amz-Date``, ``X-Amz-Security-Token``
    (with a session token), ``X-Amz-Content-SHA256`` and ``Authorization``.
    """
    signed = {k: v for k, v in headers.items() if k.lower() not in _SET_HERE}
    signed["X-Amz-Date"] = timestamp
    if credentials.token:
        signed["X-Amz-Security-Token"] = credentials.token
    signed["X-Amz-Content-SHA256"] = payload_sha256 or UNSIGNED_PAYLOAD

    canonical: dict[str, list[str]] = {}
    for name, value in signed.items():
        lower = name.lower()
        if lower not in _NOT_SIGNED:
            canonical.setdefault(lower, []).append(" ".join(value.split()))
    canonical.setdefault("host", [host])
    names = sorted(canonical)
    signed_names = ";".join(names)
    request = "\n".join(
        (
            method,
            path,
            "",
            "".join(f"{name}:{','.join(canonical[name])}\n" for name in names),
            signed_names,
            signed["X-Amz-Content-SHA256"],
        )
    )
    day = timestamp[:8]
    scope = keys.scope(day)
    to_sign = f"{_ALGORITHM}\n{timestamp}\n{scope}\n{hashlib.sha256(request.encode()).hexdigest()}"
    signature = hmac.new(keys.key(credentials.secret_key, day), to_sign.encode(), "sha256")
    signed["Authorization"] = (
        f"{_ALGORITHM} Credential={credentials.access_key}/{scope}, "
        f"SignedHeaders={signed_names}, Signature={signature.hexdigest()}"
    )
    return signed


__all__ = ["SigningKeys", "host_of", "sign"]
