"""What serin does to request and response headers, seen from both ends."""

from __future__ import annotations

import pytest

from conftest import Serin
from upstream import header


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
