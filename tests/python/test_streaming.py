"""Large bodies stream through serin intact, both ways."""

from __future__ import annotations

import hashlib
from typing import Iterator

import pytest

from conftest import Serin
from upstream import BLOB, expected_sha256

SIZE = 20 * 1024 * 1024
PIECE = 256 * 1024


def pieces(size: int) -> Iterator[bytes]:
    """The first ``size`` bytes of BLOB, as a generator (so httpx sends it chunked)."""
    view = memoryview(BLOB)
    for start in range(0, size, PIECE):
        yield bytes(view[start : min(start + PIECE, size)])


@pytest.mark.parametrize("http2", [False, True], ids=["http1.1", "h2c"])
def test_upload_20mb_streamed(serin: Serin, http2: bool) -> None:
    """A 20 MB POST from a generator (chunked over HTTP/1.1, DATA frames over
    HTTP/2) arrives at the upstream byte for byte."""
    with serin.client(http2=http2, timeout=30.0) as client:
        resp = client.post("/upload", content=pieces(SIZE))
    assert resp.status_code == 200, resp.text
    got = resp.json()
    assert got["name"] == "stable"
    assert got["bytes"] == SIZE
    assert got["sha256"] == expected_sha256(SIZE)


@pytest.mark.parametrize("http2", [False, True], ids=["http1.1", "h2c"])
def test_download_20mb_streamed(serin: Serin, http2: bool) -> None:
    """A 20 MB chunked response read with `iter_bytes` arrives byte for byte."""
    digest = hashlib.sha256()
    total = 0
    with serin.client(http2=http2, timeout=30.0) as client:
        with client.stream("GET", f"/big?bytes={SIZE}") as resp:
            assert resp.status_code == 200
            assert resp.headers["x-serin-upstream"] == "stable"
            for data in resp.iter_bytes():
                digest.update(data)
                total += len(data)
    assert total == SIZE
    assert digest.hexdigest() == expected_sha256(SIZE)


def test_streaming_keeps_connection_usable(serin: Serin) -> None:
    """After a large upload and download, the same keep-alive connection still works."""
    with serin.client(timeout=30.0) as client:
        assert client.post("/upload", content=pieces(4 * PIECE)).json()["bytes"] == 4 * PIECE
        with client.stream("GET", f"/big?bytes={3 * PIECE + 7}") as resp:
            assert sum(len(d) for d in resp.iter_bytes()) == 3 * PIECE + 7
        resp = client.get("/")
        assert (resp.status_code, resp.text) == (200, "stable")
