"""An S3 (or S3-compatible) destination: ``s3://bucket/prefix``.

Layout: the same keys as a local folder (``semantic/…``, ``instance/…``, ``binary/<label>/…``,
``label_map.json``, ``manifest.jsonl``, ``.polyburn/…``), each under ``prefix/``.

Contracts
---------
* **Client.** One boto3 client per destination, shared by every thread (boto3 clients are
  thread-safe; sessions are not, so the session is used once, at construction). Credentials come
  from a Prefect ``AwsCredentials`` block when ``POLYBURN_AWS_CREDENTIALS_BLOCK`` names one (needs
  the optional ``prefect-aws`` package), else from boto3's default chain (environment, shared
  config/credentials files, SSO, container and instance roles). The endpoint is boto3's own
  resolution (``AWS_ENDPOINT_URL_S3``, ``AWS_ENDPOINT_URL``, ``endpoint_url`` in the profile) or the
  block's client parameters. A custom endpoint gets path-style addressing unless
  ``POLYBURN_S3_ADDRESSING_STYLE`` says otherwise. Retries are botocore's ``standard`` mode with
  an explicit ``total_max_attempts`` (``POLYBURN_S3_MAX_ATTEMPTS``, default 5), with connect/read
  timeouts (``POLYBURN_S3_CONNECT_TIMEOUT``, ``POLYBURN_S3_READ_TIMEOUT``) and a connection pool
  sized for the flow's threads (``POLYBURN_S3_MAX_POOL``). A block's own botocore ``config``
  overrides these per option.
* **Requests in flight.** Each process keeps up to ``POLYBURN_S3_CONCURRENCY`` requests in
  flight (default: the connection pool's size): the flow burns that many items of a batch at
  once per process (:attr:`S3Destination.concurrent_items`), and reads many objects at once
  (:meth:`S3Destination.get_many`). The bound is an :class:`~polyburn.inflight.InFlightWindow`:
  a throttled (``503 SlowDown``, 429), failed (5xx) or reset request halves it, and requests
  that go through grow it back, so a store that pushes back gets fewer requests, not more.
* **Up-front check** (:meth:`S3Destination.from_uri` with ``check=True``): one
  ``ListObjectsV2`` under the prefix (bucket exists, credentials valid, ``s3:ListBucket``) and one
  empty conditional ``PutObject`` (``If-None-Match: *``) of ``prefix/.polyburn/write-check``
  (``s3:PutObject``; after the first run the server answers 412 and nothing is written). Any
  failure raises :class:`~polyburn.errors.ConfigError` (bucket, credentials, permission) or
  :class:`~polyburn.errors.TransientError` (endpoint unreachable), in one line that names the
  bucket and never a secret.
* **put** compares first: a ``HEAD`` (checksum mode on) skips the upload when the stored object
  has the same SHA-256 (the server's ``ChecksumSHA256``, else our ``sha256`` user metadata), size,
  content type and provenance metadata (``item-id``, ``revision``). Otherwise one ``PutObject``
  with ``ChecksumSHA256`` computed here, which the server verifies against the bytes it received
  (a mismatch is rejected with ``BadDigest`` and nothing is stored; put sends again, within the
  same attempt budget). A PUT is atomic: readers see the old object or
  the new one, never a partial one. A HEAD answered 403 (no ``s3:GetObject``) cannot prove
  anything, so the object is uploaded (one warning per destination); the PUT then succeeds or
  fails with an error code that names the cause.
* **Keys** can never leave the prefix: every key is checked (no empty, ``.`` or ``..`` segment, no
  leading slash, no backslash, no control character, valid UTF-8, at most 1024 bytes with the
  prefix); a bad key raises :class:`UnsafeKeyError` (a :class:`~polyburn.errors.PolyburnError`,
  so only its item fails).
* **Errors.** Missing bucket, rejected credentials and denied access raise ``ConfigError``
  (not retried by the Prefect tasks). Throttling, 5xx, resets, timeouts and truncated bodies that
  outlast botocore's attempts raise ``TransientError`` (retried by the Prefect tasks that write
  run-level objects; a mask item that hits it is reported failed and redone by the next run).
"""

from __future__ import annotations

import base64
import concurrent.futures
import hashlib
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO, TypeVar
from urllib.parse import urlsplit

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    EndpointConnectionError,
    FlexibleChecksumError,
    IncompleteReadError,
    NoCredentialsError,
    PartialCredentialsError,
    ReadTimeoutError,
    ResponseStreamingError,
)

from polyburn.destinations.base import (
    JSON_CONTENT_TYPE,
    FileDestination,
    KnownBytes,
    OutputRecord,
    StoredEntry,
    text_content_type,
)
from polyburn.errors import ConfigError, PolyburnError, TransientError
from polyburn.inflight import InFlightWindow

log = logging.getLogger("polyburn.s3")
T = TypeVar("T")

ENV_BLOCK = "POLYBURN_AWS_CREDENTIALS_BLOCK"
ENV_MAX_ATTEMPTS = "POLYBURN_S3_MAX_ATTEMPTS"
ENV_CONNECT_TIMEOUT = "POLYBURN_S3_CONNECT_TIMEOUT"
ENV_READ_TIMEOUT = "POLYBURN_S3_READ_TIMEOUT"
ENV_MAX_POOL = "POLYBURN_S3_MAX_POOL"
ENV_ADDRESSING_STYLE = "POLYBURN_S3_ADDRESSING_STYLE"
ENV_CONCURRENCY = "POLYBURN_S3_CONCURRENCY"

DEFAULT_MAX_ATTEMPTS = 5
DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_READ_TIMEOUT = 60.0
DEFAULT_MAX_POOL = 32
DEFAULT_CONCURRENCY = DEFAULT_MAX_POOL  # requests in flight per process: one per pooled connection
SMALL_BODY = 1 << 20  # uploads up to this size skip Expect: 100-continue
RANGE_SLACK = 4  # a ranged listing stops after this many times the objects wanted
FEW_KEYS = 1000  # up to this many keys are checked by folder, more by listing the prefix
_CONGESTION_STATUS = frozenset({429, 500, 502, 503, 504})
WRITE_CHECK_KEY = ".polyburn/write-check"
MAX_KEY_BYTES = 1024  # S3's limit for a whole object key
DELETE_CHUNK = 1000  # DeleteObjects takes at most 1000 keys
_MAX_META_VALUE = 256

_BUCKET = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{1,254}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_META_UNSAFE = re.compile(r"[^\x20-\x24\x26-\x7e]")  # printable ASCII except '%'
_AUTH_CODES = frozenset(
    {
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "ExpiredTokenException",
        "InvalidToken",
        "TokenRefreshRequired",
        "AuthorizationHeaderMalformed",
        "InvalidClientTokenId",
        "MissingSecurityHeader",
    }
)
_DENIED_CODES = frozenset({"AccessDenied", "AllAccessDisabled", "AccountProblem", "Forbidden"})
_BUCKET_CODES = frozenset({"NoSuchBucket", "PermanentRedirect"})
_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestLimitExceeded",
        "TooManyRequests",
        "RequestTimeout",
        "RequestTimeoutException",
        "InternalError",
        "ServiceUnavailable",
        "OperationAborted",
    }
)
# The bytes that arrived differ from those sent (corrupted or cut in transit): put sends again.
_RESEND_CODES = frozenset({"BadDigest", "XAmzContentSHA256Mismatch", "IncompleteBody"})
# Errors while reading a response body: botocore does not retry these itself.
_BODY_ERRORS = (
    IncompleteReadError,
    ResponseStreamingError,
    ReadTimeoutError,
    ConnectionClosedError,
    FlexibleChecksumError,
)


class UnsafeKeyError(PolyburnError, ValueError):
    """A destination key that could leave the prefix or is not a valid S3 key."""


class S3Destination(FileDestination):
    """Masks, label map and manifest under ``s3://bucket/prefix`` (see the module docstring).

    Parameters
    ----------
    bucket : str
        The bucket name.
    prefix : str
        Key prefix without leading or trailing slash ("" for the bucket root); already validated
        by :meth:`from_uri`.
    client : botocore S3 client
        Shared by all threads.
    max_attempts : int
        Attempts per request (the client's ``total_max_attempts``); also bounds re-reads of a
        truncated response body in :meth:`get`.
    credentials_source : str
        Where the credentials came from ("env", "shared-credentials-file", "block 'x'", ...),
        named in credential errors instead of any credential.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str,
        client: Any,
        *,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        credentials_source: str = "the boto3 default chain",
        concurrency: int = DEFAULT_CONCURRENCY,
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self._key_prefix = f"{self.prefix}/" if self.prefix else ""
        self.client = client
        self.max_attempts = max_attempts
        self.credentials_source = credentials_source
        self.uri = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self._endpoint = _public_endpoint(getattr(client.meta, "endpoint_url", ""))
        self._closed = threading.Event()
        self._head_denied = threading.Event()
        self._retries = threading.local()
        self.concurrent_items = concurrency
        self.window = InFlightWindow(concurrency)
        self._readers: concurrent.futures.ThreadPoolExecutor | None = None
        self._readers_lock = threading.Lock()
        client.meta.events.register("after-call.s3", self._count_retries)
        client.meta.events.register("needs-retry.s3", self._watch_attempt)
        client.meta.events.register_last("before-call.s3", _no_expect_for_small_bodies)

    def _count_retries(self, parsed: Mapping[str, Any] | None = None, **_: Any) -> None:
        """botocore hook: add the call's retry attempts to this thread's count; a call that
        went through at its first attempt grows the in-flight window."""
        attempts = ((parsed or {}).get("ResponseMetadata") or {}).get("RetryAttempts") or 0
        self._retries.count = getattr(self._retries, "count", 0) + int(attempts)
        if not attempts:
            self.window.succeeded()

    def _watch_attempt(
        self, response: Any = None, caught_exception: Exception | None = None, **_: Any
    ) -> None:
        """botocore hook, after every attempt: a reset, a timeout, a throttle or a 5xx shrinks
        the in-flight window (botocore then decides the retry itself)."""
        status = response[0].status_code if response is not None else None
        if caught_exception is not None or status in _CONGESTION_STATUS:
            self.window.congested()

    def retries_in_this_thread(self) -> int:
        return getattr(self._retries, "count", 0)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_uri(cls, uri: str, *, check: bool = True, client: Any | None = None) -> S3Destination:
        """Open ``s3://bucket[/prefix]``; with ``check``, prove access first (one LIST, one
        conditional empty PUT).

        ``client`` replaces the client built from the environment (tests, benchmarks); its
        ``total_max_attempts`` should then match ``POLYBURN_S3_MAX_ATTEMPTS``.

        Raises
        ------
        ConfigError
            Bad URI, prefix or environment settings; prefect-aws missing for a block; missing
            bucket, rejected credentials or denied access (with ``check``).
        TransientError
            The endpoint could not be reached within the retry budget (with ``check``).
        """
        bucket, prefix = parse_s3_uri(uri)
        max_attempts = _env_int(ENV_MAX_ATTEMPTS, DEFAULT_MAX_ATTEMPTS, minimum=1)
        pool = _env_int(ENV_MAX_POOL, DEFAULT_MAX_POOL, minimum=1)
        concurrency = _env_int(ENV_CONCURRENCY, pool, minimum=1)
        source = "client given"
        if client is None:
            client, source = _make_client(bucket, max_attempts)
        destination = cls(
            bucket,
            prefix,
            client,
            max_attempts=max_attempts,
            credentials_source=source,
            concurrency=concurrency,
        )
        if check:
            destination.check()
        return destination

    def check(self) -> None:
        """Fail fast on a missing bucket, bad credentials or missing list/write permission.

        Uses only ``s3:ListBucket`` (a LIST limited to the prefix, so a policy conditioned on
        ``s3:prefix`` allows it) and ``s3:PutObject`` (``If-None-Match: *`` on
        ``prefix/.polyburn/write-check``: created empty once, refused with 412 afterwards; the
        authorization is evaluated before the condition, so a 412 proves the write is allowed).
        """
        try:
            self.client.list_objects_v2(Bucket=self.bucket, Prefix=self._key_prefix, MaxKeys=1)
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, "list", "") from None
        key = self._object_key(WRITE_CHECK_KEY)
        try:
            self.client.put_object(
                Bucket=self.bucket,
                Key=key,
                Body=b"",
                ContentType="text/plain",
                IfNoneMatch="*",
            )
        except ClientError as exc:
            if _precondition_failed(exc):
                return  # already there: the write was authorized, then refused by the condition
            if (
                _status(exc) == 501 or _code(exc) == "NotImplemented"
            ):  # a store without conditional writes
                try:
                    self.client.put_object(
                        Bucket=self.bucket, Key=key, Body=b"", ContentType="text/plain"
                    )
                except (ClientError, BotoCoreError) as again:
                    raise self._error(again, "write", WRITE_CHECK_KEY) from None
                return
            raise self._error(exc, "write", WRITE_CHECK_KEY) from None
        except BotoCoreError as exc:
            raise self._error(exc, "write", WRITE_CHECK_KEY) from None

    # ------------------------------------------------------------------ FileDestination
    def put(self, key: str, data: bytes, content_type: str, metadata: Mapping[str, str]) -> bool:
        """Store ``data`` at ``prefix/key`` unless the stored object is already identical.

        Identical means same size, same SHA-256 (server checksum, else our ``sha256``
        metadata), same content type and the same values for every key of ``metadata`` (so a
        new annotation revision re-uploads the item's objects even when a mask's bytes did not
        change, keeping the provenance right). Returns True when uploaded, False when skipped.

        Raises UnsafeKeyError, ConfigError or TransientError (see the module docstring).
        """
        return self._upload(key, data, len(data), hashlib.sha256(data), content_type, metadata)

    def write_file(self, key: str, source: Path) -> OutputRecord:
        """:meth:`put` of a local file (the manifest) without reading it into memory: one
        streamed ``PutObject`` (S3 takes up to 5 GiB in one), with the same comparison first."""
        digest = hashlib.sha256()
        with open(source, "rb") as handle:
            while block := handle.read(1 << 20):
                digest.update(block)
            size = handle.tell()
            written = self._upload(key, handle, size, digest, text_content_type(key), {})
        return OutputRecord(key, digest.hexdigest(), size, written)

    def _upload(
        self,
        key: str,
        body: bytes | BinaryIO,
        size: int,
        digest: Any,
        content_type: str,
        metadata: Mapping[str, str],
    ) -> bool:
        full = self._object_key(key)
        hexdigest = digest.hexdigest()
        checksum = base64.b64encode(digest.digest()).decode("ascii")
        wanted = {_meta_key(k): _meta_value(v) for k, v in metadata.items()}
        wanted["sha256"] = hexdigest
        stored = self._head(full, key)
        why = _why_different(stored, size, checksum, hexdigest, content_type, wanted)
        if why is None:
            return False
        log.debug("uploading %s: %s", full, why)
        self._send(key, body, size, digest, content_type, wanted)
        return True

    def _send(
        self,
        key: str,
        body: bytes | BinaryIO,
        size: int,
        digest: Any,
        content_type: str,
        metadata: Mapping[str, str],
        **condition: str,
    ) -> str:
        """One checksummed ``PutObject`` (sent again when the bytes arrived damaged); returns
        the new object's ETag. With a ``condition`` (``IfMatch``/``IfNoneMatch``), raises
        _PreconditionFailed when the server refuses it."""
        full = self._object_key(key)
        checksum = base64.b64encode(digest.digest()).decode("ascii")
        for attempt in range(1, self.max_attempts + 1):
            if not isinstance(body, bytes):
                body.seek(0)
            try:
                with self.window:
                    response = self.client.put_object(
                        Bucket=self.bucket,
                        Key=full,
                        Body=body,
                        ContentLength=size,
                        ContentType=content_type,
                        ChecksumAlgorithm="SHA256",
                        ChecksumSHA256=checksum,
                        Metadata=dict(metadata),
                        **condition,
                    )
                return response["ETag"]
            except ClientError as exc:
                if condition and _precondition_failed(exc):
                    raise _PreconditionFailed(key) from None
                if _code(exc) in _RESEND_CODES and attempt < self.max_attempts:
                    log.debug("sending %s again: %s (attempt %d)", full, _code(exc), attempt)
                    continue
                attempts = attempt if _code(exc) in _RESEND_CODES else None
                raise self._error(exc, "write", key, attempts) from None
            except BotoCoreError as exc:
                raise self._error(exc, "write", key) from None
        raise AssertionError("unreachable")

    def read_file(self, key: str, target: Path) -> bool:
        """:meth:`get` into a local file, streamed in 1 MiB blocks (the manifest can be large)."""

        def save(body: Any) -> bool:
            with open(target, "wb") as handle:
                for block in body.iter_chunks(1 << 20):
                    handle.write(block)
            return True

        return self._fetch(key, save) or False

    def get(self, key: str) -> bytes | None:
        """The bytes at ``prefix/key`` or None when there is no such object.

        The response is checked against its stored checksum when the server returns one. A
        body cut short (or failing its checksum) is requested again, up to ``max_attempts``
        times, then raises TransientError.
        """
        return self._fetch(key, lambda body: body.read())

    def _fetch(
        self, key: str, consume: Callable[[Any], T], with_etag: bool = False
    ) -> T | tuple[T, str] | None:
        """``consume(body)`` of the object at ``prefix/key`` (None when there is none), with
        :meth:`get`'s checks and re-reads; ``consume`` must read the body to its end."""
        full = self._object_key(key)
        last: Exception | None = None
        for attempt in range(1, self.max_attempts + 1):
            with self.window:
                try:  # the request itself: botocore has already retried what is retryable
                    response = self.client.get_object(
                        Bucket=self.bucket, Key=full, ChecksumMode="ENABLED"
                    )
                except ClientError as exc:
                    if _code(exc) in ("NoSuchKey", "404", "NotFound"):
                        return None
                    raise self._error(exc, "read", key) from None
                except BotoCoreError as exc:
                    raise self._error(exc, "read", key) from None
                body = response["Body"]  # not as a context manager: that yields the raw stream
                try:  # the body: botocore does not retry a cut or corrupted body, so we do
                    consumed = consume(body)  # reading to the end checks length and checksum
                    return (consumed, response["ETag"]) if with_etag else consumed
                except _BODY_ERRORS as exc:
                    last = exc
                    self.window.congested()
                    log.debug("re-reading %s after %s (attempt %d)", full, exc, attempt)
                finally:
                    body.close()
            if attempt < self.max_attempts:
                time.sleep(min(0.05 * 2 ** (attempt - 1), 1.0))
        raise TransientError(
            f"{self._where(key)}: read failed after {self.max_attempts} attempts "
            f"({type(last).__name__})"
        )

    def put_record(self, key: str, data: bytes) -> None:
        """One checksummed ``PutObject``, without the ``HEAD`` comparison of :meth:`put` (an
        item record changes whenever it is written)."""
        digest = hashlib.sha256(data)
        self._send(key, data, len(data), digest, JSON_CONTENT_TYPE, {"sha256": digest.hexdigest()})

    def put_new(
        self, key: str, data: bytes, content_type: str, metadata: Mapping[str, str]
    ) -> None:
        """One checksummed ``PutObject`` without the ``HEAD`` of :meth:`put` (the caller knows
        from the item's record that the stored object differs or is absent)."""
        wanted = {_meta_key(k): _meta_value(v) for k, v in metadata.items()}
        digest = hashlib.sha256(data)
        wanted["sha256"] = digest.hexdigest()
        self._send(key, data, len(data), digest, content_type, wanted)

    def get_many(self, keys: Sequence[str], known: KnownBytes | None = None) -> dict[str, bytes]:
        """The stored objects among ``keys``, read ``concurrent_items`` at a time. More than a
        few keys are first looked up in one listing of the key range they span (1,000 keys a
        request), so absent keys cost no request of their own, and a key whose listed ETag
        ``known`` has the bytes of (:class:`~polyburn.state.SnapshotRecords`) costs none."""
        wanted = sorted(set(keys))
        found = {}
        if len(wanted) > 2:
            present, covered = self._present(wanted)
            for key, tag in present.items():
                data = known(key, tag) if known is not None else None
                if data is not None:
                    found[key] = data
            wanted = [k for k in wanted if (k in present and k not in found) or k > covered]
        for key, data in zip(wanted, self._reader_pool().map(self.get, wanted), strict=True):
            if data is not None:
                found[key] = data
        return found

    def content_tag(self, data: bytes) -> str | None:
        """The ETag of a single-part upload of ``data``: its MD5, quoted (AWS without SSE-KMS
        or SSE-C, SeaweedFS, MinIO). Where a store tags otherwise, tags simply never match."""
        return f'"{hashlib.md5(data, usedforsecurity=False).hexdigest()}"'

    def _reader_pool(self) -> concurrent.futures.ThreadPoolExecutor:
        with self._readers_lock:
            if self._readers is None:
                self._readers = concurrent.futures.ThreadPoolExecutor(
                    self.concurrent_items, thread_name_prefix="polyburn-s3-read"
                )
            return self._readers

    def _present(self, wanted: list[str]) -> tuple[dict[str, str], str]:
        """(the keys of ``wanted`` (sorted) that are stored, with their ETags; the last key the
        listing covered).

        One ``ListObjectsV2`` of the range the keys span, from just before the first, stopped
        after the last, or once it has listed ``RANGE_SLACK`` times as many objects as are
        wanted (keys spread over a big prefix): the keys after the covered one are unknown.
        """
        first, last = wanted[0], wanted[-1]
        limit = RANGE_SLACK * max(len(wanted), 250)
        present: dict[str, str] = {}
        covered, listed = first[:-1], 0
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket,
                Prefix=self._key_prefix + os.path.commonprefix([first, last]),
                StartAfter=self._key_prefix + first[:-1],
            )
            for page in pages:
                for entry in page.get("Contents", ()):
                    key = entry["Key"][len(self._key_prefix) :]
                    if key > last:
                        return present, last
                    present[key] = entry.get("ETag", "")
                    covered, listed = key, listed + 1
                if listed >= limit:
                    return present, covered
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, "list", "") from None
        return present, last

    # ------------------------------------------------------------------ conditional writes
    def get_tagged(self, key: str) -> tuple[bytes, str] | None:
        """The object's bytes and its ETag."""
        return self._fetch(key, lambda body: body.read(), with_etag=True)

    def create(self, key: str, data: bytes) -> str | None:
        """``PutObject`` with ``If-None-Match: *`` (AWS S3, SeaweedFS ≥ 4.48, MinIO)."""
        return self._conditional_put(key, data, IfNoneMatch="*")

    def replace(self, key: str, data: bytes, tag: str) -> str | None:
        """``PutObject`` with ``If-Match: <tag>``."""
        return self._conditional_put(key, data, IfMatch=tag)

    def remove_if(self, key: str, tag: str) -> bool:
        """``DeleteObject`` with ``If-Match: <tag>``; a store that ignores the condition on
        deletes (some S3-compatible servers) deletes unconditionally."""
        try:
            with self.window:
                self.client.delete_object(
                    Bucket=self.bucket, Key=self._object_key(key), IfMatch=tag
                )
        except ClientError as exc:
            if _precondition_failed(exc) or _code(exc) in ("NoSuchKey", "404", "NotFound"):
                return False
            raise self._error(exc, "delete", key) from None
        except BotoCoreError as exc:
            raise self._error(exc, "delete", key) from None
        return True

    def _conditional_put(self, key: str, data: bytes, **condition: str) -> str | None:
        digest = hashlib.sha256(data)
        try:
            return self._send(
                key,
                data,
                len(data),
                digest,
                JSON_CONTENT_TYPE,
                {"sha256": digest.hexdigest()},
                **condition,
            )
        except _PreconditionFailed:
            return None

    def entries(self, prefix: str) -> list[StoredEntry]:
        """``ListObjectsV2`` under ``prefix``, 1,000 keys a request."""
        found = []
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self._key_prefix + prefix
            )
            for page in pages:
                for entry in page.get("Contents", ()):
                    found.append(_entry(entry, entry["Key"][len(self._key_prefix) :]))
        except ClientError as exc:
            raise self._error(exc, "list", "") from None
        except BotoCoreError as exc:
            raise self._error(exc, "list", "") from None
        return sorted(found)

    def missing(self, keys: Sequence[str]) -> set[str]:
        """Up to ``FEW_KEYS`` keys (a one-item run): a ``ListObjectsV2`` of each folder's key
        range, many in flight; more: one pass over the prefix (1,000 keys a page). Never a
        request per key."""
        wanted = set(keys)
        if len(wanted) > FEW_KEYS:
            return wanted - set(self.keys(""))
        folders: dict[str, list[str]] = {}
        for key in sorted(wanted):
            folders.setdefault(key.rpartition("/")[0], []).append(key)
        gone = set()
        for group, (present, covered) in zip(
            folders.values(), self._reader_pool().map(self._present, folders.values()), strict=True
        ):
            gone.update(k for k in group if k not in present and k <= covered)
            unknown = [k for k in group if k > covered]
            heads = self._reader_pool().map(lambda k: self._head(self._object_key(k), k), unknown)
            gone.update(k for k, head in zip(unknown, heads, strict=True) if head is None)
        return gone

    def keys(self, prefix: str) -> list[str]:
        """Keys under ``prefix`` (relative to the destination's prefix), by ``ListObjectsV2``."""
        return [entry.key for entry in self.entries(prefix)]

    def remove(self, keys: Sequence[str]) -> None:
        """Delete ``prefix/key`` for each key, 1000 per request; missing keys are fine."""
        fulls = [self._object_key(k) for k in keys]
        for start in range(0, len(fulls), DELETE_CHUNK):
            chunk = fulls[start : start + DELETE_CHUNK]
            try:
                response = self.client.delete_objects(
                    Bucket=self.bucket,
                    Delete={"Objects": [{"Key": k} for k in chunk], "Quiet": True},
                )
            except (ClientError, BotoCoreError) as exc:
                raise self._error(exc, "delete", chunk[0][len(self._key_prefix) :]) from None
            errors = [e for e in response.get("Errors", []) if e.get("Code") != "NoSuchKey"]
            if errors:
                first = errors[0]
                key = str(first.get("Key", ""))[len(self._key_prefix) :]
                fake = ClientError(
                    {"Error": {"Code": first.get("Code", ""), "Message": first.get("Message", "")}},
                    "DeleteObjects",
                )
                raise self._error(fake, "delete", key)

    def close(self) -> None:
        """Close the client's connections (idempotent)."""
        if not self._closed.is_set():
            self._closed.set()
            if self._readers is not None:
                self._readers.shutdown(wait=False)
            close = getattr(self.client, "close", None)
            if close is not None:
                close()

    def __repr__(self) -> str:
        return f"S3Destination({self.uri!r})"

    # ------------------------------------------------------------------ internals
    def _object_key(self, key: str) -> str:
        """``prefix/key`` after checking that ``key`` cannot leave the prefix."""
        if not isinstance(key, str) or not key:
            raise UnsafeKeyError(f"empty destination key under {self.uri}")
        shown = _show(key)
        if key.startswith("/") or "\\" in key or _CONTROL.search(key):
            raise UnsafeKeyError(f"unsafe destination key {shown} under {self.uri}")
        if any(part in ("", ".", "..") for part in key.split("/")):
            raise UnsafeKeyError(f"destination key {shown} would leave {self.uri}")
        full = self._key_prefix + key
        try:
            size = len(full.encode("utf-8"))
        except UnicodeEncodeError:
            raise UnsafeKeyError(f"destination key {shown} is not valid UTF-8") from None
        if size > MAX_KEY_BYTES:
            raise UnsafeKeyError(
                f"destination key {shown} is {size} bytes with the prefix; S3 allows "
                f"{MAX_KEY_BYTES}"
            )
        return full

    def _head(self, full: str, key: str) -> dict[str, Any] | None:
        try:
            with self.window:
                return self.client.head_object(Bucket=self.bucket, Key=full, ChecksumMode="ENABLED")
        except ClientError as exc:
            if _status(exc) == 404 or _code(exc) in ("NoSuchKey", "404", "NotFound"):
                return None  # a missing bucket is reported by the PUT that follows
            if _status(exc) == 403:
                # A HEAD error has no body, so no code: denied GetObject or bad credentials.
                # Upload anyway: the PUT either works (nothing can be skipped, said once) or
                # fails with a code that names the real cause.
                if not self._head_denied.is_set():
                    self._head_denied.set()
                    log.warning(
                        "%s: HEAD answered 403, so existing objects cannot be compared and "
                        "are uploaded again; grant s3:GetObject on the prefix",
                        self.uri,
                    )
                return None
            raise self._error(exc, "read", key) from None
        except BotoCoreError as exc:
            raise self._error(exc, "read", key) from None

    def _where(self, key: str) -> str:
        if not key:
            return self.uri
        return f"{self.uri}/{_show(key, quote=False)}"

    def _error(
        self, exc: Exception, op: str, key: str, attempts: int | None = None
    ) -> PolyburnError:
        """One line for a failed request: ConfigError, TransientError or PolyburnError.

        Names the bucket (and key), the endpoint when it is not AWS, the error code; never
        credentials or the server's message for credential errors.
        """
        at = f" at {self._endpoint}" if self._endpoint else ""
        where = self._where(key)
        if isinstance(exc, NoCredentialsError | PartialCredentialsError):
            return ConfigError(
                f"no usable AWS credentials for s3://{self.bucket} (set AWS_ACCESS_KEY_ID and "
                f"AWS_SECRET_ACCESS_KEY, AWS_PROFILE, an instance role, or {ENV_BLOCK})"
            )
        if isinstance(exc, ClientError):
            code, status = _code(exc), _status(exc)
            attempts = attempts or _attempts(exc)
            if code in _BUCKET_CODES:
                if code == "PermanentRedirect":
                    return ConfigError(
                        f"S3 bucket '{self.bucket}' is in another region; set AWS_DEFAULT_REGION"
                    )
                return ConfigError(f"S3 bucket '{self.bucket}' does not exist{at}")
            if code in _AUTH_CODES:
                return ConfigError(
                    f"S3 bucket '{self.bucket}'{at}: credentials rejected ({code}); check the "
                    f"AWS credentials from {self.credentials_source}"
                )
            if code in _DENIED_CODES or (status == 403 and code in ("403", "")):
                need = {"list": "s3:ListBucket", "read": "s3:GetObject", "write": "s3:PutObject"}
                perm = need.get(op, "s3:DeleteObject")
                hint = " or credentials rejected" if code in ("403", "") else ""
                return ConfigError(
                    f"{where}: {op} denied{hint} (HTTP 403 {code}; needs {perm} on bucket "
                    f"'{self.bucket}')"
                )
            if code in _TRANSIENT_CODES | _RESEND_CODES or status >= 500 or status == 429:
                return TransientError(
                    f"{where}: {op} failed after {attempts} attempt(s): HTTP {status} {code}"
                )
            message = " ".join(str(exc.response.get("Error", {}).get("Message", "")).split())
            return PolyburnError(f"{where}: {op} failed: HTTP {status} {code} {message}".strip())
        if isinstance(exc, EndpointConnectionError):
            return TransientError(
                f"cannot reach the S3 endpoint for bucket '{self.bucket}'{at} "
                f"({self.max_attempts} attempts)"
            )
        if isinstance(exc, BotoCoreError):  # resets, timeouts, truncated bodies
            return TransientError(
                f"{where}: {op} failed after up to {self.max_attempts} attempts: "
                f"{type(exc).__name__}"
            )
        return PolyburnError(f"{where}: {op} failed: {type(exc).__name__}")


def _no_expect_for_small_bodies(params: dict[str, Any], **_: Any) -> None:
    """botocore hook: no ``Expect: 100-continue`` on an upload of up to ``SMALL_BODY`` bytes.

    botocore asks every upload of a file-like body to wait for the server's go-ahead before
    sending it: a whole round trip per PUT, for masks and records of a few kilobytes. A small
    body costs less to send than that wait (a refused one is simply sent for nothing).
    """
    headers = params.get("headers") or {}
    if "Expect" in headers and _body_size(params.get("body")) <= SMALL_BODY:
        del headers["Expect"]


def _body_size(body: Any) -> int:
    if isinstance(body, bytes | bytearray):
        return len(body)
    try:
        position = body.tell()
        end = body.seek(0, os.SEEK_END)
        body.seek(position)
        return end - position
    except (AttributeError, OSError, ValueError):
        return SMALL_BODY + 1  # unknown: keep the header


def _entry(listed: Mapping[str, Any], key: str) -> StoredEntry:
    """A ``ListObjectsV2`` entry as a StoredEntry (``key`` relative to the prefix)."""
    return StoredEntry(key, listed["ETag"], listed["LastModified"].timestamp(), listed["Size"])


class _PreconditionFailed(Exception):
    """A conditional write refused by the server (412, or 409 for a concurrent one)."""


def _precondition_failed(exc: ClientError) -> bool:
    return _status(exc) in (409, 412) or _code(exc) in (
        "PreconditionFailed",
        "ConditionalRequestConflict",
    )


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b/`` → ``("bucket", "a/b")``; raises ConfigError for a bad bucket or a
    prefix with ``.``/``..`` segments, backslashes or control characters."""
    if not uri.startswith("s3://"):
        raise ConfigError(f"not an s3:// URI: {_show(uri)}")
    bucket, _, prefix = uri[5:].partition("/")
    if not _BUCKET.match(bucket):
        raise ConfigError(f"invalid S3 bucket name {_show(bucket)} in {_show(uri)}")
    parts = [p for p in prefix.split("/") if p]
    if any(p in (".", "..") or "\\" in p or _CONTROL.search(p) for p in parts):
        raise ConfigError(f"unsafe S3 prefix in {_show(uri)} (no '.', '..', '\\', controls)")
    return bucket, "/".join(parts)


def _make_client(bucket: str, max_attempts: int) -> tuple[Any, str]:
    """(S3 client, where its credentials come from) per the module docstring."""
    config = Config(
        retries={"mode": "standard", "total_max_attempts": max_attempts},
        connect_timeout=_env_float(ENV_CONNECT_TIMEOUT, DEFAULT_CONNECT_TIMEOUT),
        read_timeout=_env_float(ENV_READ_TIMEOUT, DEFAULT_READ_TIMEOUT),
        max_pool_connections=_env_int(ENV_MAX_POOL, DEFAULT_MAX_POOL, minimum=1),
    )
    style = os.environ.get(ENV_ADDRESSING_STYLE, "").strip().lower()
    if style and style not in ("auto", "path", "virtual"):
        raise ConfigError(f"{ENV_ADDRESSING_STYLE} must be auto, path or virtual, not {style!r}")
    block_name = os.environ.get(ENV_BLOCK, "").strip()
    if block_name:
        session, params, source = _block_session(block_name)
    else:
        session, params, source = boto3.session.Session(), {}, "the boto3 default chain"
    block_config = params.pop("config", None)
    if block_config is not None:
        config = config.merge(block_config)  # the block's explicit options win
    explicit_style = style or (getattr(block_config, "s3", None) or {}).get("addressing_style")
    if explicit_style:
        config = config.merge(Config(s3={"addressing_style": explicit_style}))
    try:
        client = session.client("s3", config=config, **params)
        if not explicit_style and _is_custom_endpoint(client.meta.endpoint_url):
            # S3-compatible stores (MinIO, SeaweedFS, Ceph) expect path-style addressing
            client = session.client(
                "s3", config=config.merge(Config(s3={"addressing_style": "path"})), **params
            )
    except BotoCoreError as exc:
        raise ConfigError(
            f"cannot create an S3 client for bucket '{bucket}': {type(exc).__name__}: {exc}"
        ) from None
    if not block_name:
        credentials = session.get_credentials()
        if credentials is not None and credentials.method:
            source = f"the boto3 default chain ({credentials.method})"
    return client, source


def _block_session(name: str) -> tuple[Any, dict[str, Any], str]:
    """(boto3 session, client parameters, label) from a Prefect AWS credentials block.

    ``name`` is an ``AwsCredentials`` block name, or ``<block-type-slug>/<name>`` for another
    credentials block with ``get_boto3_session()`` (e.g. ``minio-credentials/x``).
    """
    try:
        from prefect_aws import AwsCredentials
    except ImportError:
        raise ConfigError(
            f"{ENV_BLOCK}={name} needs the prefect-aws package (pip install prefect-aws), "
            "or unset it to use boto3's default credential chain"
        ) from None
    try:
        if "/" in name:
            from prefect.blocks.core import Block

            block = Block.load(name)
        else:
            block = AwsCredentials.load(name)
    except Exception as exc:  # noqa: BLE001 - prefect raises ValueError or HTTP errors
        raise ConfigError(
            f"cannot load the AWS credentials block {name!r}: {type(exc).__name__}"
        ) from None
    get_session = getattr(block, "get_boto3_session", None)
    if get_session is None:
        raise ConfigError(f"block {name!r} is not an AWS credentials block")
    parameters = getattr(block, "aws_client_parameters", None)
    params = dict(parameters.get_params_override()) if parameters is not None else {}
    return get_session(), params, f"the Prefect block {name!r}"


def _why_different(
    head: Mapping[str, Any] | None,
    size: int,
    checksum: str,
    hexdigest: str,
    content_type: str,
    wanted: Mapping[str, str],
) -> str | None:
    """Why the object HEAD described must be uploaded (a few words), or None when identical."""
    if head is None:
        return "not stored"
    if head.get("ContentLength") != size:
        return f"size {head.get('ContentLength')} != {size}"
    stored = head.get("ChecksumSHA256")
    metadata = {k.lower(): v for k, v in (head.get("Metadata") or {}).items()}
    if stored and "-" not in stored:  # a full-object checksum ("…=-N" is a multipart composite)
        if stored != checksum:
            return "SHA-256 checksum differs"
    elif metadata.get("sha256") != hexdigest:
        return "sha256 metadata differs"
    stored_type = (head.get("ContentType") or "").split(";")[0].strip()
    if stored_type != content_type:
        return f"content type {stored_type!r} != {content_type!r}"
    changed = sorted(k for k, v in wanted.items() if metadata.get(k) != v)
    return f"metadata differs: {', '.join(changed)}" if changed else None


def _meta_key(key: str) -> str:
    return re.sub(r"[^a-z0-9-]", "-", key.lower())


def _meta_value(value: Any) -> str:
    """User metadata travels as HTTP headers: printable ASCII, '%' and the rest %-encoded."""
    text = _META_UNSAFE.sub(
        lambda m: "".join(f"%{b:02X}" for b in m.group().encode("utf-8", "surrogatepass")),
        str(value),
    )
    return text[:_MAX_META_VALUE]


def _show(text: str, quote: bool = True) -> str:
    """A key or URI for a one-line message: controls escaped, long ones shortened."""
    shown = text.encode("unicode_escape").decode("ascii") if _CONTROL.search(text) else text
    if len(shown) > 160:
        shown = f"{shown[:100]}…{shown[-40:]}"
    return repr(shown) if quote else shown


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)


def _attempts(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("RetryAttempts") or 0) + 1


def _is_custom_endpoint(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    return not (host.endswith(".amazonaws.com") or host.endswith(".amazonaws.com.cn"))


def _public_endpoint(url: str) -> str:
    """The endpoint for messages when it is not AWS's, without any userinfo."""
    if not url or not _is_custom_endpoint(url):
        return ""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}"


def _env_int(name: str, default: int, minimum: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, not {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, not {value}")
    return value


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number of seconds, not {raw!r}") from None
    if not value > 0:
        raise ConfigError(f"{name} must be > 0, not {raw}")
    return value


__all__ = ["S3Destination", "UnsafeKeyError", "parse_s3_uri"]
