"""The webhook receiver (``polyburn events``): payloads, authentication, HTTP behaviour, load,
TLS and shutdown.

The first part serves the real app with uvicorn in this process (one server for the module, on
loopback) with a recording emitter, so the tests see exactly what would be emitted. The second
part runs ``polyburn events`` as a subprocess against the session's real Prefect server
(``prefect_server`` in conftest) and reads the events back from Prefect's events API.
"""

from __future__ import annotations

import json
import logging
import signal
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

import httpx
import pytest

from polyburn.errors import ConfigError
from polyburn.events import (
    SIGNATURE_HEADER,
    DataloopChange,
    PayloadError,
    ReplayCache,
    Verifier,
    parse_change,
)
from polyburn.receiver import ReceiverOptions, build_server, create_app
from tests.support.prefect_server import PrefectServer, stop_process
from tests.support.processes import start_events, wait_for, wait_healthy
from tests.support.tls import self_signed
from tests.support.webhook_load import (
    SlowClient,
    deliver,
    item_body,
    received_events,
    signed,
)

REPO = Path(__file__).resolve().parents[1]
SECRET = "hmac-secret-for-tests-0123456789"
TOKEN = "static-token-for-tests-0123456789"
LIMIT = 10_000  # the in-process receiver's body limit
REQUEST_TIMEOUT = 2.0  # the in-process receiver's request timeout
VERSION = version("polyburn")  # the installed package's metadata, which /healthz reports


# ============================================================== payloads and credentials


def test_parse_change_reads_annotations_and_items():
    annotation = json.dumps({"id": "a1", "itemId": "i1", "datasetId": "d1", "type": "segment"})
    change = parse_change(annotation.encode(), "Created")
    assert change == DataloopChange(
        event="dataloop.annotation.created",
        item_id="i1",
        dataset_id="d1",
        kind="annotation",
        annotation_id="a1",
    )
    assert change.resource == {
        "prefect.resource.id": "dataloop.item.i1",
        "dataloop.item.id": "i1",
        "dataloop.dataset.id": "d1",
    }
    item = parse_change(json.dumps({"item": {"id": "i2", "datasetId": "d2"}}).encode())
    assert (item.event, item.item_id, item.dataset_id) == ("dataloop.item.annotated", "i2", "d2")
    local = parse_change(b'{"id": "street/scene_001"}')
    assert local.resource == {
        "prefect.resource.id": "dataloop.item.street/scene_001",
        "dataloop.item.id": "street/scene_001",
    }
    for bad in [b"not json", b"[1]", b'{"name": "x"}', b'{"id": 7}', b'{"itemId": "../x"}']:
        with pytest.raises(PayloadError):
            parse_change(bad)
    with pytest.raises(PayloadError):
        parse_change(b'{"id": "i"}', "Drop Table")


def test_replay_cache_forgets_expired_and_never_evicts_live_entries():
    now = [1000.0]
    cache = ReplayCache(max_entries=2, clock=lambda: now[0])
    assert cache.add("a", 1100) and not cache.add("a", 1100)
    assert cache.add("b", 1200)
    assert not cache.add("c", 1300)  # full of live entries: refuse, do not evict
    now[0] = 1150.0
    assert cache.add("c", 1300)  # "a" expired and was dropped
    assert not cache.add("b", 1200)  # still live: a replay


def test_receiver_needs_credentials_and_the_cli_needs_an_api_and_sane_options(
    monkeypatch, capsys, tmp_path
):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from polyburn.cli import main

    with pytest.raises(ConfigError, match="no webhook credentials"):
        Verifier()
    with pytest.raises(ConfigError, match="at least 16 bytes"):
        Verifier(secret=b"short")
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        assert main(["events", "--port", "0"]) == 2
    assert "needs PREFECT_API_URL" in capsys.readouterr().err

    monkeypatch.setenv("POLYBURN_WEBHOOK_TOKEN", TOKEN)
    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        for args, message in [
            (["--ssl-keyfile", str(tmp_path / "k.pem")], "needs --ssl-certfile"),
            (["--ssl-certfile", str(tmp_path / "missing.pem")], "no such file"),
            (["--max-body-bytes", "0"], "--max-body-bytes must be positive"),
            (["--request-timeout", "-1"], "--request-timeout must be positive"),
        ]:
            assert main(["events", "--port", "0", *args]) == 2
            assert message in capsys.readouterr().err


# ============================================================== in-process receiver


@dataclass
class Recorder:
    """The in-process receiver's emitter and flush: what they were given."""

    emitted: list[DataloopChange] = field(default_factory=list)
    flushes: int = 0

    def emit(self, change: DataloopChange) -> str | None:
        if change.item_id.startswith("refused-"):
            return None  # as emit_event does when Prefect's events are off
        self.emitted.append(change)
        return f"event-{len(self.emitted)}"

    def flush(self) -> None:
        self.flushes += 1


@dataclass
class InProcess:
    base: str
    recorder: Recorder
    clock: list[float]

    @property
    def hook(self) -> str:
        return f"{self.base}/dataloop"


def run_in_thread(app, options: ReceiverOptions) -> tuple[str, threading.Thread, object]:
    """Serve ``app`` with uvicorn in a thread: (base URL, thread, uvicorn server)."""
    server, sock = build_server(app, options)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    return f"http://127.0.0.1:{sock.getsockname()[1]}", thread, server


@pytest.fixture(scope="module")
def in_process() -> Iterator[InProcess]:
    """One in-process receiver (HMAC and token, body limit LIMIT, body timeout REQUEST_TIMEOUT)
    with a recording emitter and a clock the tests set, for the module."""
    recorder = Recorder()
    clock = [time.time()]
    verifier = Verifier(secret=SECRET.encode(), token=TOKEN, clock=lambda: clock[0])
    options = ReceiverOptions(port=0, max_body_bytes=LIMIT, request_timeout=REQUEST_TIMEOUT)
    app = create_app(verifier, recorder.emit, options=options, flush=recorder.flush)
    base, thread, server = run_in_thread(app, options)
    try:
        yield InProcess(base, recorder, clock)
    finally:
        server.should_exit = True
        thread.join(30)
    assert not thread.is_alive()
    assert recorder.flushes == 1  # the lifespan flushed once, at shutdown


@pytest.fixture
def receiver(in_process) -> InProcess:
    """The module's receiver with its clock at now and nothing recorded yet."""
    in_process.clock[0] = time.time()
    in_process.recorder.emitted.clear()
    return in_process


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def test_receiver_accepts_a_signed_call_once(receiver):
    item = unique("i1")
    body = json.dumps({"id": "a1", "itemId": item, "datasetId": "d1"}).encode()
    headers = signed(body, SECRET)
    response = httpx.post(receiver.hook + "?action=updated", content=body, headers=headers)
    assert response.status_code == 202
    assert response.json() == {
        "event": "dataloop.annotation.updated",
        "resource": f"dataloop.item.{item}",
    }
    assert [c.item_id for c in receiver.recorder.emitted] == [item]
    assert httpx.post(receiver.hook, content=body, headers=headers).status_code == 401  # replay
    assert len(receiver.recorder.emitted) == 1


def test_receiver_rejects_unsigned_badly_signed_stale_and_tampered_calls(receiver, caplog):
    url, clock = receiver.hook, receiver.clock
    body = item_body(unique("i1"))
    stale = signed(body, SECRET, at=clock[0] - 301)
    future = signed(body, SECRET, at=clock[0] + 301)
    tampered = signed(item_body(unique("i2")), SECRET)
    wrong_key = signed(body, "another-secret-0123456789")
    no_timestamp = {SIGNATURE_HEADER: signed(body, SECRET)[SIGNATURE_HEADER]}
    with caplog.at_level(logging.INFO, logger="polyburn.events"):
        for headers in [{}, stale, future, tampered, wrong_key, no_timestamp]:
            response = httpx.post(url, content=body, headers=headers)
            assert response.status_code == 401, headers
            assert response.json() == {"error": "unauthorized"}
        assert httpx.post(url + "?token=nope", content=body).status_code == 401
        bearer = {"Authorization": "Bearer nope"}
        assert httpx.post(url, content=body, headers=bearer).status_code == 401
    assert receiver.recorder.emitted == []
    logged = caplog.text
    assert SECRET not in logged and TOKEN not in logged and "sha256=" not in logged
    assert "stale timestamp" in logged and "bad signature" in logged


def test_receiver_token_mode_and_request_hygiene(receiver, caplog):
    url, base = receiver.hook, receiver.base
    body = item_body(unique("i1"))
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    with caplog.at_level(logging.DEBUG):
        assert httpx.post(f"{url}?token={TOKEN}", content=body).status_code == 202
        assert httpx.post(url + "/", content=body, headers=bearer).status_code == 202
        assert httpx.post(url, content=b"{oops", headers=bearer).status_code == 400
        refused = httpx.post(url, content=item_body("refused-1"), headers=bearer)
        assert (refused.status_code, refused.json()) == (503, {"error": "event not emitted"})
        assert httpx.post(f"{base}/x", content=body).json() == {"error": "not found"}
        assert httpx.get(url).status_code == 405
        health = httpx.get(f"{base}/healthz")
        assert (health.status_code, health.json()) == (200, {"status": "ok", "version": VERSION})
    assert len(receiver.recorder.emitted) == 2
    server_side = [
        r.getMessage() for r in caplog.records if r.name.startswith(("polyburn", "uvicorn"))
    ]
    assert any("did not accept" in line for line in server_side)
    assert not [line for line in server_side if TOKEN in line or "token=" in line]


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_the_access_log_stays_off_after_prefect_configures_logging(receiver):
    """``polyburn events`` imports Prefect (which calls dictConfig) after uvicorn has set up its
    loggers; uvicorn's access log, whose lines hold ``?token=``, must stay silent."""
    from prefect.logging.configuration import setup_logging

    setup_logging(incremental=False)
    access = logging.getLogger("uvicorn.access")
    lines, level = Lines(), access.level
    access.addHandler(lines)
    access.setLevel(logging.DEBUG)
    try:
        body = item_body(unique("access"))
        assert httpx.post(f"{receiver.hook}?token={TOKEN}", content=body).status_code == 202
    finally:
        access.removeHandler(lines)
        access.setLevel(level)
    assert lines.lines == []


def raw_exchange(base: str, head: str, parts: list[bytes], wait: float = 10) -> bytes:
    """Send ``head`` then ``parts`` on one connection without finishing the request, and return
    what the server answers within ``wait`` seconds (b"" when nothing)."""
    port = int(base.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as sock:
        try:
            sock.sendall(head.encode())
            for part in parts:
                sock.sendall(part)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed early; read what it said
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
                if b"\r\n\r\n" in answer and answer.endswith(b"}"):
                    break
        except (TimeoutError, ConnectionResetError):
            pass
    return answer


def head_of(length_header: str, auth: str = TOKEN) -> str:
    return (
        "POST /dataloop HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: Bearer {auth}\r\n{length_header}\r\n\r\n"
    )


def test_a_body_over_the_limit_is_refused_before_it_is_read(receiver):
    # A Content-Length over the limit: 413 at once, though none of the body was sent.
    answer = raw_exchange(receiver.base, head_of(f"Content-Length: {LIMIT + 1}"), [])
    assert answer.startswith(b"HTTP/1.1 413"), answer  # not the body timeout's 408
    # Chunked: 413 as soon as the body passes the limit, although it has not ended.
    chunk = b"%x\r\n%s\r\n" % (1000, b" " * 1000)
    answer = raw_exchange(
        receiver.base, head_of("Transfer-Encoding: chunked"), [chunk] * (LIMIT // 1000 + 1)
    )
    assert answer.startswith(b"HTTP/1.1 413"), answer
    # Up to the limit, chunked or not, a body is read.
    body = item_body(unique("chunked")).ljust(LIMIT)
    chunked = httpx.post(
        receiver.hook,
        content=iter([body[:5000], body[5000:]]),
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    assert chunked.status_code == 202
    too_big = httpx.post(receiver.hook, content=body + b" ", headers=signed(body + b" ", SECRET))
    assert too_big.status_code == 413
    assert len(receiver.recorder.emitted) == 1


def test_a_request_that_does_not_arrive_in_time_is_cut_off(receiver):
    started = time.monotonic()
    answer = raw_exchange(receiver.base, head_of("Content-Length: 50"), [b"{"], wait=30)
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert time.monotonic() - started >= REQUEST_TIMEOUT
    # Headers that never end: the connection is closed (uvicorn alone would wait for ever).
    port = int(receiver.base.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"POST /dataloop HTTP/1.1\r\nHost: x\r\n")
        assert sock.recv(1024) == b""  # closed by the server, not our 30 s timeout
    assert receiver.recorder.emitted == []


# ============================================================== against a real Prefect server


def start_receiver(server: PrefectServer, root: Path, *args: str):
    """``polyburn events`` (HMAC and token) against ``server``: (process, port, log)."""
    credentials = {"POLYBURN_WEBHOOK_SECRET": SECRET, "POLYBURN_WEBHOOK_TOKEN": TOKEN}
    return start_events(server.client_env(credentials), root, *args)


def exactly_once(server: PrefectServer, prefix: str, expected: int) -> Counter:
    """The events per resource under ``prefix`` once ``expected`` resources have arrived (and a
    few seconds more, so that late duplicates would show)."""

    def counts():
        found = Counter(
            e["resource"]["prefect.resource.id"] for e in received_events(server.api_url, prefix)
        )
        return found if len(found) >= expected else None

    wait_for(f"{expected} events under {prefix}", counts, 120, every=1)
    time.sleep(3)
    return counts()


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    return self_signed(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def tls_receiver(prefect_server, tls, tmp_path_factory):
    """``polyburn events`` over HTTPS (the self-signed certificate), with a body timeout long
    enough for the slow client: its hook URL."""
    root = tmp_path_factory.mktemp("events-tls")
    process, port, log = start_receiver(
        prefect_server,
        root,
        "--ssl-certfile",
        str(tls.certfile),
        "--ssl-keyfile",
        str(tls.keyfile),
        "--request-timeout",
        "300",
    )
    try:
        wait_healthy(f"https://127.0.0.1:{port}/healthz", process, log, verify=tls.client_context())
        yield f"https://127.0.0.1:{port}/dataloop", log
    finally:
        stop_process(process)
    assert SECRET not in log.read_text() and TOKEN not in log.read_text()


def test_tls_only_and_the_certificate_is_the_one_given(tls_receiver, tls):
    hook, _ = tls_receiver
    with pytest.raises(httpx.HTTPError):  # plain HTTP to the TLS port
        httpx.post(hook.replace("https:", "http:"), content=b"{}", timeout=5)
    with pytest.raises(httpx.ConnectError):  # a client that trusts only the system's CAs
        httpx.get(hook.replace("/dataloop", "/healthz"), timeout=5)
    answer = httpx.get(hook.replace("/dataloop", "/healthz"), verify=tls.client_context())
    assert answer.json() == {"status": "ok", "version": VERSION}  # the serving process's


def test_500_deliveries_from_50_clients_reach_prefect_exactly_once(
    prefect_server, tls_receiver, tls
):
    """Signed deliveries from 50 concurrent clients while one client sends its body a byte a
    second: every one is accepted, the others finish while the slow one is still sending,
    replays and bad signatures are refused, and Prefect holds one event per delivery."""
    hook, log = tls_receiver
    context = tls.client_context()
    run = uuid.uuid4().hex[:8]
    slow_body = item_body(f"load-{run}-slow")
    slow = SlowClient(hook, slow_body, signed(slow_body, SECRET), ssl_context=context).start()
    wait_for("the slow client's first bytes", lambda: slow.sent_slowly >= 2, 30)

    items = [f"load-{run}-{i}" for i in range(500)]
    done = deliver(hook, SECRET, items, clients=50, verify=context)
    assert Counter(d.status for d in done) == {202: 500}, [d for d in done if d.status != 202][:3]
    assert slow.sending and slow.sent_slowly < len(slow_body)  # it never held the others up
    slow.hurry()
    slow.join(60)
    assert (slow.status, slow.error) == (202, "")

    replayed = [f"load-{run}-replayed-{i}" for i in range(25)]
    with httpx.Client(verify=context) as http:
        for item in replayed:  # each accepted once, then refused with the same signature
            body = item_body(item)
            headers = signed(body, SECRET)
            assert http.post(hook, content=body, headers=headers).status_code == 202
            assert http.post(hook, content=body, headers=headers).status_code == 401
        for i in range(25):  # bad signatures
            body = item_body(f"load-{run}-forged-{i}")
            forged = {**signed(body, SECRET), SIGNATURE_HEADER: "sha256=" + "0" * 64}
            assert http.post(hook, content=body, headers=forged).status_code == 401

    delivered = [*items, f"load-{run}-slow", *replayed]
    counts = exactly_once(prefect_server, f"dataloop.item.load-{run}-", len(delivered))
    assert counts == Counter(f"dataloop.item.{item}" for item in delivered)  # none forged
    assert SECRET not in log.read_text()


def test_shutdown_finishes_accepted_requests_and_flushes_their_events(prefect_server, tmp_path):
    """SIGTERM while deliveries are in flight and a slow client is mid-body: the listener
    closes, the slow request still gets its 202, and every accepted event reaches Prefect."""
    process, port, log = start_receiver(prefect_server, tmp_path, "--request-timeout", "120")
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(f"{base}/healthz", process, log)
        run = uuid.uuid4().hex[:8]
        slow_body = item_body(f"stop-{run}-slow")
        slow = SlowClient(f"{base}/dataloop", slow_body, signed(slow_body, SECRET)).start()
        wait_for("the slow client's first bytes", lambda: slow.sent_slowly >= 1, 30)
        items = [f"stop-{run}-{i}" for i in range(200)]
        done = deliver(f"{base}/dataloop", SECRET, items, clients=20)
        process.send_signal(signal.SIGTERM)

        def refused() -> bool:
            try:
                httpx.get(f"{base}/healthz", timeout=1)
            except httpx.ConnectError:
                return True
            return False

        wait_for("the listener to close", refused, 15, log=log)
        assert slow.sending and process.poll() is None  # still serving the slow request
        slow.hurry()
        slow.join(30)
        assert (slow.status, slow.error) == (202, "")
        process.wait(60)
    finally:
        stop_process(process)
    accepted = [d.item for d in done if d.status == 202]
    assert len(accepted) == len(items)
    counts = exactly_once(prefect_server, f"dataloop.item.stop-{run}-", len(items) + 1)
    assert set(counts.values()) == {1} and len(counts) == len(items) + 1
    text = log.read_text()
    assert "flushing queued events" in text and "stopped" in text
    assert process.returncode in (0, -signal.SIGTERM), text[-2000:]
