"""How upstream failures look to a client: 502, 504, and the stable fallback."""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Iterator

import httpx
import pytest

from conftest import Serin, SerinFactory
from upstream import Upstream, closed_port


@pytest.fixture
def dead_canary_url() -> Iterator[str]:
    """A canary URL whose port refuses connections."""
    sock, port = closed_port()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        sock.close()


def test_refused_canary_post_is_502(
    start_serin: SerinFactory, upstreams: tuple[Upstream, Upstream], dead_canary_url: str
) -> None:
    """With the canary at 100% and its port closed, a POST gets 502 from serin
    (it is not replayed), while a GET is answered by stable and says
    `x-serin-fallback: canary`."""
    stable, _ = upstreams
    serin = start_serin(stable.url, dead_canary_url)
    serin.set_weight(100)
    with serin.client() as client:
        resp = client.post("/", content=b"payload")
        assert resp.status_code == 502
        assert resp.headers["x-serin-upstream"] == "canary"

        resp = client.get("/")
        assert (resp.status_code, resp.text) == (200, "stable")
        assert resp.headers["x-serin-upstream"] == "stable"
        assert resp.headers["x-serin-fallback"] == "canary"
    assert stable.hits == 1, "only the GET reached stable"


def test_reset_by_canary_is_502(serin: Serin, upstreams: tuple[Upstream, Upstream]) -> None:
    """A canary that resets the connection without answering: 502 for a POST,
    fallback to stable for a GET."""
    _, canary = upstreams
    canary.broken = True
    serin.set_weight(100)
    with serin.client() as client:
        resp = client.post("/", content=b"x")
        assert resp.status_code == 502
        resp = client.get("/")
        assert (resp.status_code, resp.text) == (200, "stable")
        assert resp.headers["x-serin-fallback"] == "canary"


def test_canary_5xx_get_falls_back(serin: Serin, upstreams: tuple[Upstream, Upstream]) -> None:
    """A canary answering 503 to a GET is replaced by stable's answer; a POST
    gets the canary's own 503."""
    _, canary = upstreams
    canary.status = 503
    serin.set_weight(100)
    with serin.client() as client:
        resp = client.get("/")
        assert (resp.status_code, resp.text) == (200, "stable")
        assert resp.headers["x-serin-fallback"] == "canary"
        resp = client.post("/", content=b"x")
        assert (resp.status_code, resp.text) == (503, "canary")
        assert "x-serin-fallback" not in resp.headers


TIMEOUT_CONFIG = """
[timeouts]
response = "300ms"
"""


@pytest.mark.parametrize("http2", [False, True], ids=["http1.1", "h2c"])
def test_slow_upstream_is_504(
    start_serin: SerinFactory, upstreams: tuple[Upstream, Upstream], http2: bool
) -> None:
    """With `[timeouts] response = "300ms"`, an upstream that takes 3 s to answer
    gets the client a 504 after roughly 300 ms, not 3 s; a quick one still works."""
    stable, canary = upstreams
    serin = start_serin(stable.url, canary.url, config=TIMEOUT_CONFIG)
    with serin.client(http2=http2) as client:
        started = time.monotonic()
        resp = client.get("/", params={"delay_ms": 3000})
        elapsed = time.monotonic() - started
        assert resp.status_code == 504
        assert resp.headers["x-serin-upstream"] == "stable"
        assert 0.25 <= elapsed < 2.0, elapsed

        resp = client.get("/", params={"delay_ms": 50})
        assert (resp.status_code, resp.text) == (200, "stable")


@pytest.fixture
def blackhole_url() -> Iterator[str]:
    """A URL whose connects hang: a listener that never accepts, with its
    backlog already full (Linux then drops further SYNs)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(3):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        fillers.append(s)
    probe = socket.socket()
    probe.settimeout(0.5)
    try:
        probe.connect(("127.0.0.1", port))
        hangs = False
    except (socket.timeout, OSError):
        hangs = True
    finally:
        probe.close()
    try:
        if not hangs:
            pytest.skip("this kernel completes connects beyond a full backlog")
        yield f"http://127.0.0.1:{port}"
    finally:
        for s in fillers:
            s.close()
        listener.close()


def test_connect_timeout_is_504(
    start_serin: SerinFactory, upstreams: tuple[Upstream, Upstream], blackhole_url: str
) -> None:
    """With `[timeouts] connect = "300ms"`, an upstream whose connects hang gets the
    client a 504 after about 300 ms."""
    _, canary = upstreams
    serin = start_serin(blackhole_url, canary.url, config='[timeouts]\nconnect = "300ms"\n')
    with serin.client() as client:
        started = time.monotonic()
        resp = client.post("/", content=b"x")
        elapsed = time.monotonic() - started
    assert resp.status_code == 504
    assert 0.25 <= elapsed < 2.0, elapsed


def test_overload_is_503(start_serin: SerinFactory, upstreams: tuple[Upstream, Upstream]) -> None:
    """With `[limits] max_inflight = 2`, six concurrent slow requests: two are
    served, the others get 503 at once."""
    stable, canary = upstreams
    serin = start_serin(stable.url, canary.url, config="[limits]\nmax_inflight = 2\n")

    async def run() -> list[int]:
        async with httpx.AsyncClient(
            base_url=serin.proxy_url, trust_env=False, timeout=10.0
        ) as client:
            responses = await asyncio.gather(
                *(client.get("/", params={"delay_ms": 500}) for _ in range(6))
            )
            return sorted(r.status_code for r in responses)

    assert asyncio.run(run()) == [200, 200, 503, 503, 503, 503]
    with serin.client() as client:
        assert client.get("/").status_code == 200, "the limit frees up afterwards"


def test_slow_client_headers_are_cut_off(
    start_serin: SerinFactory, upstreams: tuple[Upstream, Upstream]
) -> None:
    """With `[timeouts] header_read = "300ms"`, a client that never finishes its
    request head is disconnected after about 300 ms (no upstream request)."""
    stable, canary = upstreams
    serin = start_serin(stable.url, canary.url, config='[timeouts]\nheader_read = "300ms"\n')
    host, port = serin.proxy_addr.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5.0) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
        started = time.monotonic()
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
        elapsed = time.monotonic() - started
    assert 0.25 <= elapsed < 3.0, elapsed
    assert data == b"" or data.startswith(b"HTTP/1.1 408"), data[:100]
    assert stable.hits == 0


def paced(pieces: int, size: int, interval: float) -> Iterator[bytes]:
    """A slow client's body: ``pieces`` pieces of ``size`` bytes, ``interval`` apart."""
    for i in range(pieces):
        if i:
            time.sleep(interval)  # the client's pace, not a wait for serin
        yield b"u" * size


@pytest.mark.parametrize("http2", [False, True], ids=["http1.1", "h2c"])
def test_slow_upload_is_not_a_504(
    start_serin: SerinFactory, upstreams: tuple[Upstream, Upstream], http2: bool
) -> None:
    """With `[timeouts] response = "300ms"`, a client whose upload takes ~1 s to an
    upstream that answers as soon as it has the body gets a 200, not a 504."""
    stable, canary = upstreams
    serin = start_serin(stable.url, canary.url, config=TIMEOUT_CONFIG)
    with serin.client(http2=http2) as client:
        resp = client.post("/upload", content=paced(6, 1000, 0.2))
    assert resp.status_code == 200, resp.text
    assert resp.json()["bytes"] == 6000
