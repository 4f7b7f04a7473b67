"""An HTTP/1.1 proxy on 127.0.0.1 in front of an S3 endpoint that drops or delays a fraction of requests.

Faults are drawn per request, not per connection, from a seeded generator:
- `drop`: the client connection is closed without an answer, half of the time before the request
  reaches the endpoint and half of the time after (the endpoint acted, the client never hears it);
- `delay`: the request waits `delay_s` seconds before it is forwarded.
The proxy answers `Expect: 100-continue` itself and forwards whole requests and responses
(Content-Length or chunked bodies), so it works for boto3, aiobotocore (DVC) and pyarrow's S3 client.
"""

from __future__ import annotations

import asyncio
import random
import threading
from collections import Counter
from urllib.parse import urlsplit


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str], until_eof: bool) -> bytes:
    """The raw body that follows a message head: Content-Length, chunked (kept chunked) or to EOF."""
    if headers.get("transfer-encoding", "").lower().endswith("chunked"):
        raw = bytearray()
        while True:
            line = await reader.readuntil(b"\r\n")
            raw += line
            size = int(line.split(b";")[0].strip(), 16)
            if size == 0:
                while True:  # trailers, then the empty line
                    trailer = await reader.readuntil(b"\r\n")
                    raw += trailer
                    if trailer == b"\r\n":
                        return bytes(raw)
            raw += await reader.readexactly(size + 2)
    if "content-length" in headers:
        return await reader.readexactly(int(headers["content-length"]))
    return await reader.read() if until_eof else b""


def _parse_head(head: bytes) -> tuple[str, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            key, _, value = line.partition(":")
            headers[key.strip().lower()] = value.strip()
    return lines[0], headers


def _without_expect(head: bytes) -> bytes:
    lines = head.split(b"\r\n")
    return b"\r\n".join(line for line in lines if not line.lower().startswith(b"expect:"))


class FlakyProxy:
    """Start with `with FlakyProxy("http://127.0.0.1:5000", drop=0.1) as proxy:`; clients use proxy.url."""

    def __init__(self, upstream: str, drop: float = 0.0, delay: float = 0.0, delay_s: float = 1.0, seed: int = 0):
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.drop, self.delay, self.delay_s = drop, delay, delay_s
        self.counts: Counter[str] = Counter()
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.base_events.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="flaky-proxy", daemon=True)
        self.url = ""

    def __enter__(self) -> FlakyProxy:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._connection, "127.0.0.1", 0), self._loop).result(10)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    def __exit__(self, *exc: object) -> None:
        async def close() -> None:
            assert self._server is not None
            self._server.close()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def set_faults(self, drop: float, delay: float) -> None:
        with self._lock:
            self.drop, self.delay = drop, delay

    def _draw(self) -> str:
        with self._lock:
            x = self._random.random()
            self.counts["requests"] += 1
            if x < self.drop:
                fault = "drop-before" if self._random.random() < 0.5 else "drop-after"
            elif x < self.drop + self.delay:
                fault = "delay"
            else:
                fault = "none"
            self.counts[fault] += 1
            return fault

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                request_line, headers = _parse_head(head)
                if headers.get("expect", "").lower() == "100-continue":
                    writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                    await writer.drain()
                    head = _without_expect(head)
                body = await _read_body(reader, headers, until_eof=False)
                fault = self._draw()
                if fault == "drop-before":
                    return
                if fault == "delay":
                    await asyncio.sleep(self.delay_s)
                if upstream is None:
                    upstream = await asyncio.open_connection(*self.upstream)
                answer, close = await self._forward(upstream, head + body, request_line.startswith("HEAD "))
                if fault == "drop-after":
                    return
                writer.write(answer)
                await writer.drain()
                if close or headers.get("connection", "").lower() == "close":
                    return
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            return
        finally:
            writer.close()
            if upstream is not None:
                upstream[1].close()

    @staticmethod
    async def _forward(upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter], request: bytes,
                       head_only: bool) -> tuple[bytes, bool]:
        """(the endpoint's whole answer, whether the connection ends with it)."""
        up_reader, up_writer = upstream
        up_writer.write(request)
        await up_writer.drain()
        while True:
            head = await up_reader.readuntil(b"\r\n\r\n")
            status_line, headers = _parse_head(head)
            status = int(status_line.split()[1])
            if status != 100:
                break
        bodiless = head_only or status in (204, 304) or 100 <= status < 200
        framed = "content-length" in headers or "chunked" in headers.get("transfer-encoding", "").lower()
        body = b"" if bodiless else await _read_body(up_reader, headers, until_eof=not framed)
        close = headers.get("connection", "").lower() == "close" or (not bodiless and not framed)
        return head + body, close
