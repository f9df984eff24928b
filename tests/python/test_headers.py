"""What serin does to request and response headers, seen from both ends."""

from __future__ import annotations

import json
import socket
import time

import pytest

from conftest import Serin
from upstream import Upstream, header


def test_connection_named_headers_are_dropped(serin: Serin) -> None:
    """Headers named in `Connection` and other hop-by-hop headers do not reach the
    upstream; ordinary headers do."""
    with serin.client() as client:
        resp = client.get(
            "/echo",
            headers={
                "connection": "keep-alive, x-hop",
                "x-hop": "secret",
                "keep-alive": "timeout=5",
                "x-end-to-end": "kept",
            },
        )
    assert resp.status_code == 200
    echo = resp.json()
    assert header(echo, "x-end-to-end") == "kept"
    for name in ("x-hop", "keep-alive"):
        assert header(echo, name) is None, name


def test_forwarded_for_is_appended(serin: Serin) -> None:
    """An incoming `X-Forwarded-For` is extended with the client's address."""
    with serin.client() as client:
        echo = client.get("/echo", headers={"x-forwarded-for": "203.0.113.7"}).json()
    assert header(echo, "x-forwarded-for") == "203.0.113.7, 127.0.0.1"


def test_path_and_query_preserved(serin: Serin) -> None:
    """The path and query reach the upstream exactly as the client sent them."""
    with serin.client() as client:
        echo = client.get("/echo/a%20b/c?x=1&y=%2F&x=2").json()
    assert echo["path"] == "/echo/a%20b/c?x=1&y=%2F&x=2"


@pytest.mark.parametrize("http2", [False, True], ids=["http1.1", "h2c"])
def test_head_request(serin: Serin, http2: bool) -> None:
    """HEAD gets the upstream's status and Content-Length with no body."""
    with serin.client(http2=http2) as client:
        resp = client.head("/")
    assert resp.status_code == 200
    assert resp.headers["content-length"] == str(len("stable"))
    assert resp.content == b""


def test_oversized_request_head_is_431(serin: Serin) -> None:
    """Request headers beyond 64 KiB get 431 from serin."""
    with serin.client() as client:
        resp = client.get("/", headers={"x-big": "a" * 70_000})
    assert resp.status_code == 431


def test_http2_cookie_crumbs_joined_for_http1_upstream(serin: Serin) -> None:
    """An HTTP/2 client (as browsers do) may send each cookie in its own `cookie`
    field; the HTTP/1.1 upstream must see them as one `Cookie` header."""
    with serin.client(http2=True) as client:
        resp = client.get("/echo", headers=[("cookie", "a=1"), ("cookie", "b=2")])
    assert resp.status_code == 200
    cookies = [v for k, v in resp.json()["headers"] if k == "cookie"]
    assert cookies == ["a=1; b=2"]


def test_http2_cookie_crumbs_route_on_override(serin: Serin) -> None:
    """The `serin-canary` cookie is honoured when it arrives in its own HTTP/2
    `cookie` field."""
    with serin.client(http2=True) as client:
        for _ in range(10):
            resp = client.get(
                "/", headers=[("cookie", "a=1"), ("cookie", "serin-canary=always")]
            )
            assert resp.headers["x-serin-upstream"] == "canary"


def raw_exchange(addr: str, request: bytes, body: bytes = b"", timeout: float = 5.0) -> tuple[bytes, bytes]:
    """Sends a raw HTTP/1.1 request head; returns (what came before the body was
    sent, the rest up to the connection's close)."""
    host, port = addr.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(request)
        early = b""
        if body:
            early = sock.recv(65536)
            sock.sendall(body)
        rest = b""
        while chunk := sock.recv(65536):
            rest += chunk
    return early, rest


def test_expect_100_continue(serin: Serin) -> None:
    """A client that sends `Expect: 100-continue` (as curl does for large uploads)
    gets `100 Continue` at once, then the upstream's answer to the full body."""
    started = time.monotonic()
    early, rest = raw_exchange(
        serin.proxy_addr,
        b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
        b"Expect: 100-continue\r\nConnection: close\r\n\r\n",
        body=b"hello",
    )
    assert early.startswith(b"HTTP/1.1 100 Continue\r\n"), early
    assert time.monotonic() - started < 1.0, "curl would have waited 1 s"
    head, _, body = (early + rest).split(b"\r\n\r\n", 1)[1].partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    assert b'"bytes": 5' in body


def test_http10_client(serin: Serin) -> None:
    """An HTTP/1.0 client without Host gets an HTTP/1.0 answer and the body."""
    _, answer = raw_exchange(serin.proxy_addr, b"GET / HTTP/1.0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.0 200"), answer[:100]
    assert answer.endswith(b"\r\n\r\nstable")


def test_pipelined_requests(serin: Serin) -> None:
    """Two pipelined HTTP/1.1 requests get two answers, in order."""
    _, answer = raw_exchange(
        serin.proxy_addr,
        b"GET /echo/1 HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /echo/2 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    assert answer.count(b"HTTP/1.1 200") == 2
    assert answer.index(b'"/echo/1"') < answer.index(b'"/echo/2"')


@pytest.mark.parametrize("status", [204, 304])
@pytest.mark.parametrize("http2", [False, True], ids=["http1.1", "h2c"])
def test_bodiless_statuses(serin: Serin, http2: bool, status: int) -> None:
    """204 and 304 reach the client without a body, and the connection goes on."""
    with serin.client(http2=http2) as client:
        resp = client.get("/", params={"status": status})
        assert resp.status_code == status
        assert resp.content == b""
        assert "transfer-encoding" not in resp.headers
        resp = client.get("/")
        assert (resp.status_code, resp.text) == (200, "stable")


def test_http11_without_host_is_400(serin: Serin, upstreams: tuple[Upstream, Upstream]) -> None:
    """An HTTP/1.1 request without a Host header gets 400 and is not forwarded."""
    stable, _ = upstreams
    _, answer = raw_exchange(serin.proxy_addr, b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400"), answer[:100]
    assert stable.hits == 0


def test_malformed_requests_are_400(serin: Serin, upstreams: tuple[Upstream, Upstream]) -> None:
    """A garbage request line, or two different Content-Lengths, get 400 and reach
    no upstream."""
    stable, _ = upstreams
    for request in (
        b"GARBAGE\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde",
    ):
        _, answer = raw_exchange(serin.proxy_addr, request)
        assert answer.startswith(b"HTTP/1.1 400"), answer[:100]
    assert stable.hits == 0


def test_te_and_content_length_not_both_forwarded(serin: Serin) -> None:
    """A request with both `Transfer-Encoding: chunked` and `Content-Length` (a
    smuggling pattern) is never forwarded with both."""
    _, answer = raw_exchange(
        serin.proxy_addr,
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
        b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n0\r\n\r\n",
    )
    if answer.startswith(b"HTTP/1.1 400"):
        return  # rejecting it is fine too
    assert answer.startswith(b"HTTP/1.1 200"), answer[:100]
    echo = json.loads(answer.split(b"\r\n\r\n", 1)[1])
    names = [k for k, _ in echo["headers"]]
    assert not ("content-length" in names and "transfer-encoding" in names), names
