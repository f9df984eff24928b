"""What a user sees with httpx over HTTP/1.1 and HTTP/2 (h2c, prior knowledge)."""

from __future__ import annotations

import pytest

from conftest import Serin
from upstream import header


@pytest.mark.parametrize("http2", [False, True], ids=["http1.1", "h2c"])
def test_plain_request_reaches_stable(serin: Serin, http2: bool) -> None:
    """A plain GET through serin gets 200, the stable upstream's body, and
    `x-serin-upstream: stable`, in the HTTP version the client spoke."""
    with serin.client(http2=http2) as client:
        for _ in range(3):  # and again on the same connection
            resp = client.get("/")
            assert resp.status_code == 200
            assert resp.http_version == ("HTTP/2" if http2 else "HTTP/1.1")
            assert resp.text == "stable"
            assert resp.headers["x-serin-upstream"] == "stable"


@pytest.mark.parametrize("http2", [False, True], ids=["http1.1", "h2c"])
def test_request_headers_forwarded(serin: Serin, http2: bool) -> None:
    """The upstream sees the client's Host and headers, X-Forwarded-For/-Proto,
    and a request id that the client gets back in `x-request-id`."""
    with serin.client(http2=http2) as client:
        resp = client.get("/echo", headers={"x-custom": "hello", "x-request-id": "req-42"})
        assert resp.status_code == 200
        echo = resp.json()
        assert echo["name"] == "stable"
        assert header(echo, "x-custom") == "hello"
        assert header(echo, "host") == serin.proxy_addr
        assert header(echo, "x-forwarded-for") == "127.0.0.1"
        assert header(echo, "x-forwarded-proto") == "http"
        assert header(echo, "x-request-id") == "req-42"
        assert resp.headers["x-request-id"] == "req-42"

        resp = client.get("/echo")
        generated = header(resp.json(), "x-request-id")
        assert generated, "serin adds a request id when the client sent none"
        assert resp.headers["x-request-id"] == generated


def test_canary_body_over_both_protocols(serin: Serin) -> None:
    """With the canary at 100%, both HTTP/1.1 and HTTP/2 clients get the canary."""
    serin.set_weight(100)
    for http2 in (False, True):
        with serin.client(http2=http2) as client:
            resp = client.get("/")
            assert (resp.status_code, resp.text) == (200, "canary")
            assert resp.headers["x-serin-upstream"] == "canary"
