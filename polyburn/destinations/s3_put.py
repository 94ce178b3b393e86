"""A lean ``PutObject`` for small in-memory bodies: botocore's credentials, connection pool and
retry rules, without botocore's per-call machinery and with a cheaper signer.

Why: a burn worker sends two ``PutObject`` per item into S3 (the mask and the item's record).
Through ``client.put_object`` each costs 1.6-1.9 ms of client CPU (``bench/s3_put_cost.py``),
about half of it botocore's per-call machinery: parameter validation, serialization, endpoint
ruleset resolution, a dozen event emissions, the retry handler, response parsing. The request
itself (sign, send, read the status) costs the rest: 0.8-1.1 ms with botocore's signer, of which
the signature was about half; :mod:`polyburn.destinations.sigv4` computes the same one for much
less. Config knobs (``parameter_validation``, checksum settings) change nothing measurable.

Contract of :class:`LeanPut`:

* **Learned from botocore, never guessed.** The object URL (endpoint, virtual-host or path
  style, FIPS, dual-stack, accelerate, a region redirect) and the signing region are taken from
  a ``PutObject`` that botocore itself sent successfully for this destination
  (:meth:`LeanPut.learn`, from a ``before-send`` hook). Until then, and whenever the learned
  request is not a plain SigV4 ``s3`` request (unsigned, S3 Express session auth, a URL with a
  query, or a key that does not map onto the URL), every request goes through botocore.
* **Signed as botocore signs it** (:mod:`polyburn.destinations.sigv4`, checked header for
  header against :class:`botocore.auth.S3SigV4Auth`) with the client's own credentials object
  (refreshed as botocore refreshes it): the payload is signed over plain HTTP (with the SHA-256
  already computed for the checksum) and ``UNSIGNED-PAYLOAD`` over HTTPS, unless the client's
  S3 config sets ``payload_signing_enabled``, as botocore does.
* **Sent on the client's own connection pool** (``URLLib3Session.send``: proxies, TLS
  verification, timeouts, and urllib3 errors mapped to botocore's exceptions).
* **Retried by botocore's ``standard`` rules** (:class:`botocore.retries.standard.
  StandardRetryConditions` and :class:`~botocore.retries.standard.ExponentialBackoff`, with the
  client's ``total_max_attempts``), with ``on_attempt`` told of every failed attempt (the
  in-flight window shrinks) and ``on_done`` of the attempts a response took (as botocore's
  ``after-call`` hook tells it). botocore's retry quota (a token bucket per client) is not
  shared: the in-flight window is the back-pressure.
* **Errors look like botocore's**: an HTTP error becomes :class:`botocore.exceptions.
  ClientError` with the S3 error ``Code`` and ``Message`` (nothing else of the body: never a
  signature, string-to-sign or key id), ``HTTPStatusCode`` and ``RetryAttempts``; a connection
  failure is botocore's own exception. A redirect (the bucket answers from another region)
  raises :class:`Unsupported`: the caller sends that request through botocore, whose region
  redirector handles it, and stops using the lean path.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import quote, urlsplit

from botocore.awsrequest import AWSPreparedRequest
from botocore.exceptions import ClientError, HTTPClientError, NoCredentialsError
from botocore.parsers import create_parser
from botocore.retries.standard import (
    ExponentialBackoff,
    RetryContext,
    RetryEventAdapter,
    StandardRetryConditions,
    ThrottlingErrorDetector,
)

from polyburn.destinations import sigv4

_CREDENTIAL_SCOPE = re.compile(r"^AWS4-HMAC-SHA256 Credential=[^/]+/\d{8}/([^/]+)/s3/aws4_request,")
_ERROR_PARSER = create_parser("rest-xml")
_REDIRECT_STATUS = frozenset({301, 307})
_REDIRECT_CODES = frozenset(
    {"PermanentRedirect", "TemporaryRedirect", "AuthorizationHeaderMalformed"}
)


class Unsupported(Exception):
    """This request must go through botocore (a redirect); the lean path is turned off."""


def quote_key(key: str) -> str:
    """A key as botocore puts it in a URL path (``Key+``: ``/`` and ``~`` kept)."""
    return quote(key, safe="/~")


class LeanPut:
    """``PutObject`` of bytes on ``client``'s pool, signer and retry rules (module docstring)."""

    def __init__(
        self,
        client: Any,
        base_url: str,
        region: str,
        user_agent: str | None,
        max_attempts: int,
    ) -> None:
        self._credentials = client._request_signer._credentials
        self._http = client._endpoint.http_session
        self._config = client.meta.config
        self._operation = client.meta.service_model.operation_model("PutObject")
        self.base_url = base_url
        self.region = region
        self._user_agent = user_agent
        self.max_attempts = max_attempts
        self._policy_checker = StandardRetryConditions(max_attempts=max_attempts)
        self._backoff = ExponentialBackoff(
            service_name="s3", throttling_detector=ThrottlingErrorDetector(RetryEventAdapter())
        )
        self._host = sigv4.host_of(base_url)
        self._base_path = urlsplit(base_url).path
        self._keys = sigv4.SigningKeys(region)
        s3_config = getattr(self._config, "s3", None) or {}
        self._payload_signing = s3_config.get("payload_signing_enabled")

    @classmethod
    def learn(cls, client: Any, request: Any, key: str) -> LeanPut | None:
        """A LeanPut for ``client`` from a ``PutObject`` of ``key`` (full key) that botocore
        sent (its prepared ``request``); None when that request is not one this path can
        repeat, or the client lacks what it needs."""
        try:
            credentials = client._request_signer._credentials
            client._endpoint.http_session.send  # noqa: B018 - present on botocore clients
            config = client.meta.config
        except AttributeError:
            return None
        retries = getattr(config, "retries", None) or {}
        if credentials is None or retries.get("mode") != "standard":  # no mode: env or legacy
            return None
        if getattr(config, "signature_version", None) not in (None, "s3v4", "v4"):
            return None
        headers = request.headers
        authorization = headers.get("Authorization") or ""
        if isinstance(authorization, bytes):
            authorization = authorization.decode("ascii", "replace")
        scope = _CREDENTIAL_SCOPE.match(authorization)
        if scope is None or any(name.lower().startswith("x-amz-s3session") for name in headers):
            return None
        url = request.url
        parts = urlsplit(url)
        suffix = "/" + quote_key(key)
        if parts.query or parts.fragment or not url.endswith(suffix):
            return None
        if parts.scheme not in ("http", "https"):
            return None
        if "total_max_attempts" in retries:
            attempts = int(retries["total_max_attempts"])
        elif "max_attempts" in retries:
            attempts = int(retries["max_attempts"]) + 1
        else:
            attempts = 3  # botocore's standard-mode default
        agent = headers.get("User-Agent")
        if isinstance(agent, bytes):
            agent = agent.decode("ascii", "replace")
        return cls(client, url[: -len(suffix)], scope.group(1), agent, attempts)

    def put(
        self,
        key: str,
        body: bytes,
        headers: Mapping[str, str],
        payload_sha256: str,
        on_attempt: Callable[[int | None, Exception | None], None],
        on_done: Callable[[int], None],
    ) -> dict[str, Any]:
        """``PUT`` ``body`` at ``key`` (the full key) with ``headers`` (content type, checksum,
        metadata, conditions); returns ``{"ETag": ..., "ResponseMetadata": ...}``.

        Raises ClientError (an HTTP error, after the retries its kind allows), a botocore
        connection exception (after its retries), NoCredentialsError, or Unsupported.
        """
        url = self.base_url + "/" + quote_key(key)
        attempt = 0
        while True:
            attempt += 1
            response, caught = None, None
            try:
                response = self._http.send(self._signed(url, body, headers, payload_sha256))
            except (HTTPClientError, ConnectionError) as exc:
                caught = exc
            if response is not None and response.status_code < 300:
                on_done(attempt)
                return {
                    "ETag": response.headers.get("ETag"),
                    "ResponseMetadata": _metadata(response, attempt),
                }
            parsed = None if response is None else _parse_error(response, attempt, self._operation)
            if parsed is not None and (
                response.status_code in _REDIRECT_STATUS
                or parsed["Error"]["Code"] in _REDIRECT_CODES
            ):
                raise Unsupported(parsed["Error"]["Code"])
            on_attempt(response.status_code if response is not None else None, caught)
            context = RetryContext(
                attempt_number=attempt,
                operation_model=self._operation,
                parsed_response=parsed,
                http_response=response,
                caught_exception=caught,
            )
            if self._policy_checker.is_retryable(context):
                time.sleep(self._backoff.delay_amount(context))
                continue
            if caught is not None:
                raise caught
            on_done(attempt)
            raise ClientError(parsed, "PutObject")

    def _signed(self, url: str, body: bytes, headers: Mapping[str, str], sha256: str) -> Any:
        """The request, signed (:mod:`polyburn.destinations.sigv4`) and prepared as botocore
        prepares it: the given headers, ``User-Agent``, the signature's headers, then
        ``Content-Length``."""
        if self._credentials is None:
            raise NoCredentialsError()
        frozen = self._credentials.get_frozen_credentials()
        if frozen is None or frozen.access_key is None:
            raise NoCredentialsError()
        given = dict(headers)
        if self._user_agent:
            given["User-Agent"] = self._user_agent
        payload = sha256 if self._signs_payload(given) else None
        signed = sigv4.sign(
            "PUT",
            self._host,
            self._base_path + url[len(self.base_url) :],
            given,
            payload,
            frozen,
            self._keys,
            time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()),
        )
        signed["Content-Length"] = str(len(body))
        return AWSPreparedRequest("PUT", url, signed, body, False, {})

    def _signs_payload(self, headers: Mapping[str, str]) -> bool:
        """botocore's rule for a checksummed upload: the explicit ``payload_signing_enabled``
        of the client's S3 config, else signed over HTTP and not over HTTPS when the checksum
        header is there (TLS and the checksum protect the body)."""
        if self._payload_signing is not None:
            return self._payload_signing
        if not self.base_url.startswith("https"):
            return True
        return not any(name.lower() == "x-amz-checksum-sha256" for name in headers)


def _metadata(response: Any, attempt: int) -> dict[str, Any]:
    return {
        "HTTPStatusCode": response.status_code,
        "HTTPHeaders": {k.lower(): v for k, v in response.headers.items()},
        "RequestId": response.headers.get("x-amz-request-id", ""),
        "RetryAttempts": attempt - 1,
    }


def _parse_error(response: Any, attempt: int, operation: Any) -> dict[str, Any]:
    """botocore's reading of an S3 error response (its own parser, so every odd body reads as
    botocore reads it), keeping only ``Code`` and ``Message``: an error body can also carry the
    string to sign, the canonical request and the access key id."""
    parsed = _ERROR_PARSER.parse(
        {
            "status_code": response.status_code,
            "headers": response.headers,
            "body": response.content or b"",
        },
        operation.output_shape,
    )
    error = parsed.get("Error") or {}
    return {
        "Error": {"Code": error.get("Code"), "Message": error.get("Message")},
        "ResponseMetadata": _metadata(response, attempt),
    }


class Learner:
    """Watches botocore's ``PutObject`` requests of one destination until one of them can be
    repeated by a :class:`LeanPut` (see :meth:`LeanPut.learn`)."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self._local = threading.local()
        self.lean: LeanPut | None = None
        self.off = False

    def watch(self, key: str) -> None:
        """The next ``before-send`` of ``PutObject`` in this thread is for full key ``key``."""
        self._local.key = key
        self._local.request = None

    def before_send(self, request: Any, **_: Any) -> None:
        """botocore hook (``before-send.s3.PutObject``): keep this thread's last attempt."""
        if getattr(self._local, "key", None) is not None:
            self._local.request = request

    def sent(self) -> None:
        """The watched call succeeded: learn from its last attempt (the one that went through)."""
        key, request = getattr(self._local, "key", None), getattr(self._local, "request", None)
        self._local.key = self._local.request = None
        if self.lean is None and not self.off and key is not None and request is not None:
            self.lean = LeanPut.learn(self._client, request, key)

    def forget(self) -> None:
        self._local.key = self._local.request = None


__all__ = ["LeanPut", "Learner", "Unsupported", "quote_key"]
