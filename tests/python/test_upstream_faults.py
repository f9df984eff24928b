"""Upstreams that close connections or cut bodies short: what the client sees."""

from __future__ import annotations

import hashlib

import httpx
import pytest

from conftest import Serin, SerinFactory, wait_until
from upstream import Upstream, expected_sha256

SIZE = 4 * 1024 * 1024


@pytest.mark.parametrize("framing", ["chunked", "length"])
@pytest.mark.parametrize("http2", [False, True], ids=["http1.1", "h2c"])
def test_truncated_response_is_not_passed_off_as_complete(
    serin: Serin, http2: bool, framing: str
) -> None:
    """When the upstream dies after 1 MB of a 4 MB body, the client gets an error
    while reading, never a short body that looks complete."""
    got = 0
    with serin.client(http2=http2) as client:
        with pytest.raises(httpx.TransportError):
            with client.stream(
                "GET", "/big", params={"bytes": SIZE, "truncate": 1 << 20, "framing": framing}
            ) as resp:
                assert resp.status_code == 200
                for data in resp.iter_bytes():
                    got += len(data)
        assert got < SIZE
        # serin is still serving.
        resp = client.get("/")
        assert (resp.status_code, resp.text) == (200, "stable")


def test_upstream_connection_close_is_honoured(serin: Serin) -> None:
    """An upstream that answers `Connection: close` and hangs up each time: every
    following request, POSTs included, still gets a 200 (no stale pooled connection)."""
    with serin.client() as client:
        for _ in range(20):
            resp = client.get("/", params={"close": 1})
            assert (resp.status_code, resp.text) == (200, "stable")
            assert "close" not in resp.headers.get("connection", ""), (
                "the upstream's Connection header is hop-by-hop"
            )
            resp = client.post("/", content=b"order")
            assert (resp.status_code, resp.text) == (200, "stable")


def test_upstream_idle_close_is_not_a_502(serin: Serin, upstreams: tuple[Upstream, Upstream]) -> None:
    """An upstream that closes keep-alive connections idle for 200 ms: a POST sent
    after that close still gets a 200, not a 502 from a dead pooled connection."""
    stable, _ = upstreams
    stable.idle_timeout = 0.2
    with serin.client() as client:
        for _ in range(3):
            closed = stable.closed_connections
            resp = client.post("/", content=b"order")
            assert (resp.status_code, resp.text) == (200, "stable")
            wait_until(
                lambda: stable.closed_connections > closed, 5.0, "the upstream to close the idle connection"
            )
        resp = client.post("/", content=b"order")
        assert (resp.status_code, resp.text) == (200, "stable")


@pytest.mark.parametrize("http2", [False, True], ids=["http1.1", "h2c"])
def test_client_abandoning_download_leaves_serin_healthy(serin: Serin, http2: bool) -> None:
    """A client that hangs up in the middle of a 20 MB download does not hurt the
    next client: its full download is intact."""
    size = 20 * 1024 * 1024
    for _ in range(3):
        with serin.client(http2=http2) as client:
            with client.stream("GET", "/big", params={"bytes": size}) as resp:
                assert resp.status_code == 200
                next(resp.iter_bytes())
    digest, total = hashlib.sha256(), 0
    with serin.client(http2=http2, timeout=30.0) as client:
        with client.stream("GET", "/big", params={"bytes": size}) as resp:
            for data in resp.iter_bytes():
                digest.update(data)
                total += len(data)
    assert (total, digest.hexdigest()) == (size, expected_sha256(size))


TIMEOUT_CONFIG = '[timeouts]\nresponse = "300ms"\n'


def test_no_desync_after_timeout(
    start_serin: SerinFactory, upstreams: tuple[Upstream, Upstream]
) -> None:
    """After a 504 (the upstream answers later, on the connection serin gave up on),
    the next requests get their own answers, never the late one."""
    stable, canary = upstreams
    serin = start_serin(stable.url, canary.url, config=TIMEOUT_CONFIG)
    with serin.client() as client:
        for n in range(3):
            responded = stable.responded
            resp = client.get(f"/echo/late-{n}", params={"delay_ms": 600})
            assert resp.status_code == 504
            wait_until(lambda: stable.responded > responded, 5.0, "the late answer")
            for tag in ("a", "b"):
                resp = client.get(f"/echo/{n}-{tag}")
                assert resp.status_code == 200
                assert resp.json()["path"] == f"/echo/{n}-{tag}"


def test_no_desync_after_client_gives_up(serin: Serin, upstreams: tuple[Upstream, Upstream]) -> None:
    """A client that gives up on a slow request (its own timeout) leaves no late
    answer behind for the next client."""
    stable, _ = upstreams
    for n in range(3):
        responded = stable.responded
        with serin.client(timeout=0.1) as impatient:
            with pytest.raises(httpx.TimeoutException):
                impatient.get(f"/echo/abandoned-{n}", params={"delay_ms": 400})
        wait_until(lambda: stable.responded > responded, 5.0, "the abandoned answer")
        with serin.client() as client:
            for tag in ("a", "b"):
                resp = client.get(f"/echo/{n}-{tag}")
                assert resp.status_code == 200
                assert resp.json()["path"] == f"/echo/{n}-{tag}"
