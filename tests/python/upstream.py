"""Scriptable upstream HTTP/1.1 servers for the Python client suite.

Each :class:`Upstream` is a stdlib ``ThreadingHTTPServer`` on 127.0.0.1, port 0,
serving with keep-alive (serin pools its upstream connections). A test scripts
it through plain attributes:

* ``status`` / ``delay`` -- the status of every answer and the time slept
  before sending the response headers (also per request: ``?status=503``,
  ``?delay_ms=800``);
* ``broken`` -- answer nothing: the connection is reset (serin must say 502).

Routes (any method):

* ``/echo``, ``/echo/...`` -- JSON: name, method, path and the request headers;
* ``/upload``             -- reads the whole body (Content-Length or chunked) and
  answers JSON ``{"name", "bytes", "sha256", "chunked"}``;
* ``/big?bytes=N``        -- streams the first N bytes of :data:`BLOB`, chunked
  (``&framing=length``: with Content-Length; ``&truncate=M``: the connection
  is closed after M bytes of body);
* anything else           -- the server's name as a ``text/plain`` body
  (``?close=1``: answered with ``Connection: close``, then closed).

``responded`` counts answers written; ``aborted`` counts requests whose body was cut short.
``recorded`` lists every request received (method, path, headers, small bodies).
``idle_timeout`` closes keep-alive connections idle for longer; ``connections``
and ``closed_connections`` count accepted and finished connections.
"""

from __future__ import annotations

import hashlib
import json
import random
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from dataclasses import dataclass
from typing import Optional
from urllib.parse import parse_qs, urlsplit

#: Deterministic pseudo-random payload used by the streaming tests (20 MiB + slack).
BLOB: bytes = random.Random(0x5E41).randbytes(21 * 1024 * 1024)

_CHUNK = 64 * 1024
_RECORD_LIMIT = 1024 * 1024


@dataclass
class Recorded:
    """One request as the upstream received it (body kept up to 1 MiB)."""

    method: str
    path: str
    headers: list[tuple[str, str]]
    body: bytes


class Upstream:
    """One scripted upstream; ``url`` is ``http://127.0.0.1:PORT``."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.status = 200
        self.delay = 0.0
        self.broken = False
        self.idle_timeout: Optional[float] = None
        self.hits = 0
        self.connections = 0
        self.closed_connections = 0
        self.aborted = 0
        self.responded = 0
        self.recorded: list[Recorded] = []
        self._lock = threading.Lock()
        upstream = self

        class Handler(_Handler):
            server_upstream = upstream

        self._server = _Server(("127.0.0.1", 0), Handler)
        self.port: int = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.02},
            name=f"upstream-{name}",
            daemon=True,
        )
        self._thread.start()

    def count(self, field: str = "hits") -> None:
        with self._lock:
            setattr(self, field, getattr(self, field) + 1)

    def record(self, request: Recorded) -> None:
        with self._lock:
            self.recorded.append(request)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


class _Server(ThreadingHTTPServer):
    # socketserver's default backlog of 5 drops concurrent connects (the client
    # retries the SYN a second later): far too small for a proxy's pool.
    request_queue_size = 256
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # clients (serin) hanging up mid-request is part of the tests


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Buffer writes so that a small answer's head and body leave in one segment
    # (BaseHTTPRequestHandler flushes after each request); with the default
    # unbuffered writer they go out as two, and Nagle's algorithm with delayed
    # ACKs then adds ~40 ms to every request.
    wbufsize = 256 * 1024
    disable_nagle_algorithm = True
    server_upstream: Upstream  # set by the per-server subclass

    # Quiet: the default handler logs every request to stderr.
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass

    def setup(self) -> None:
        # Closes keep-alive connections idle longer than this (None: never).
        self.timeout = self.server_upstream.idle_timeout
        self.server_upstream.count("connections")
        super().setup()

    def finish(self) -> None:
        try:
            super().finish()
            self.connection.shutdown(socket.SHUT_WR)  # the FIN goes out now
        except OSError:
            pass
        finally:
            self.server_upstream.count("closed_connections")

    def handle_expect_100(self) -> bool:
        ok = super().handle_expect_100()
        self.wfile.flush()  # writes are buffered: send the 100 now
        return ok

    def do_GET(self) -> None:
        self._serve()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_GET

    def do_HEAD(self) -> None:
        self._serve(head=True)

    # === body handling ===

    def _read_body(self) -> tuple[int, str, bool, bytes]:
        """Reads the request body; returns (length, sha256 hex, was chunked, and
        the body itself when it is at most 1 MiB)."""
        digest = hashlib.sha256()
        total = 0
        kept: list[bytes] = []
        seen = 0

        def keep(data: bytes) -> None:
            nonlocal seen
            digest.update(data)
            if seen + len(data) <= _RECORD_LIMIT:
                kept.append(data)
            seen += len(data)

        def read_exactly(size: int, short: str) -> int:
            """Reads `size` body bytes (kept and hashed); raises `short` if they stop."""
            remaining = size
            while remaining:
                data = self.rfile.read(min(remaining, _CHUNK))
                if not data:
                    raise ConnectionError(short)
                keep(data)
                remaining -= len(data)
            return size

        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            while True:
                line = self.rfile.readline(1024)
                if not line:
                    raise ConnectionError("body ended inside a chunk header")
                size = int(line.split(b";", 1)[0].strip(), 16)
                if size == 0:
                    # Trailers, up to the blank line.
                    while self.rfile.readline(8192) not in (b"\r\n", b"\n", b""):
                        pass
                    return total, digest.hexdigest(), True, b"".join(kept)
                total += read_exactly(size, "body ended inside a chunk")
                self.rfile.readline(16)  # the CRLF after the chunk
        total += read_exactly(int(self.headers.get("Content-Length") or 0), "body ended early")
        return total, digest.hexdigest(), False, b"".join(kept)

    def _send(self, status: int, body: bytes, content_type: str, head: bool) -> None:
        self.send_response(status)
        self.send_header("X-Upstream-Name", self.server_upstream.name)
        if status in (204, 304) or status < 200:
            self.end_headers()  # no body, no Content-Length
            return
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    # === the router ===

    def _serve(self, head: bool = False) -> None:
        up = self.server_upstream
        up.count()
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        try:
            body_len, body_sha, chunked, body = self._read_body()
        except (ConnectionError, OSError, ValueError):
            up.count("aborted")  # the request body never arrived whole
            self.close_connection = True
            return
        up.record(
            Recorded(
                self.command,
                self.path,
                [(k.lower(), v) for k, v in self.headers.items()],
                body if body_len <= _RECORD_LIMIT else b"",
            )
        )

        if up.broken:
            # Reset the connection without a word.
            self.connection.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
            self.close_connection = True
            return

        delay = float(query["delay_ms"]) / 1000 if "delay_ms" in query else up.delay
        if delay > 0:
            time.sleep(delay)
        status = int(query.get("status", up.status))

        self._route(url.path, query, status, body_len, body_sha, chunked, head)
        self.wfile.flush()
        up.count("responded")

    def _route(
        self,
        path: str,
        query: dict[str, str],
        status: int,
        body_len: int,
        body_sha: str,
        chunked: bool,
        head: bool,
    ) -> None:
        up = self.server_upstream
        if path == "/echo" or path.startswith("/echo/"):
            payload = {
                "name": up.name,
                "method": self.command,
                "path": self.path,
                "headers": [[k.lower(), v] for k, v in self.headers.items()],
            }
            self._send(status, json.dumps(payload).encode(), "application/json", head)
        elif path == "/upload":
            payload = {"name": up.name, "bytes": body_len, "sha256": body_sha, "chunked": chunked}
            self._send(status, json.dumps(payload).encode(), "application/json", head)
        elif path == "/big":
            size = min(int(query.get("bytes", "0")), len(BLOB))
            truncate = int(query["truncate"]) if "truncate" in query else None
            self._stream(status, size, head, query.get("framing", "chunked"), truncate)
        else:
            if query.get("close"):
                self.close_connection = True
                self.send_response(status)
                self.send_header("Connection", "close")
                self.send_header("Content-Length", str(len(up.name)))
                self.end_headers()
                self.wfile.write(up.name.encode())
            else:
                self._send(status, up.name.encode(), "text/plain", head)

    def _stream(
        self, status: int, size: int, head: bool, framing: str, truncate: Optional[int]
    ) -> None:
        """Streams BLOB[:size], chunked or with Content-Length; with ``truncate``,
        stops after that many bytes and closes the connection mid-body."""
        chunked = framing == "chunked"
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Content-Length", str(size))
        self.send_header("X-Upstream-Name", self.server_upstream.name)
        self.end_headers()
        if head:
            return
        end = size if truncate is None else min(truncate, size)
        view = memoryview(BLOB)
        for start in range(0, end, _CHUNK):
            piece = view[start : min(start + _CHUNK, end)]
            if chunked:
                self.wfile.write(b"%x\r\n" % len(piece))
            self.wfile.write(piece)
            if chunked:
                self.wfile.write(b"\r\n")
        if truncate is not None:
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if chunked:
            self.wfile.write(b"0\r\n\r\n")


def closed_port() -> tuple[socket.socket, int]:
    """A loopback port that refuses connections: bound but never listening.

    Keep the returned socket open for as long as the port must stay closed
    (nobody else can take it meanwhile); close it afterwards.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    return sock, sock.getsockname()[1]


def expected_sha256(size: int) -> str:
    return hashlib.sha256(memoryview(BLOB)[:size]).hexdigest()


def header(echo: dict, name: str) -> Optional[str]:
    """The last value of request header ``name`` in an ``/echo`` answer."""
    values = [v for k, v in echo["headers"] if k == name.lower()]
    return values[-1] if values else None
