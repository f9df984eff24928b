"""TLS on the listener (ALPN h2 and http/1.1) with httpx, and the same checks
with curl, as users run them. Skipped where openssl or curl is missing."""

from __future__ import annotations

import hashlib
import json
import shutil
import ssl
import subprocess
from pathlib import Path

import pytest

from conftest import Serin, SerinFactory
from upstream import Upstream


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed P-256 certificate for 127.0.0.1 and localhost."""
    if not shutil.which("openssl"):
        pytest.skip("openssl not installed")
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec",
            "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", str(key), "-out", str(cert), "-days", "2",
            "-subj", "/CN=localhost",
            "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
        ],
        check=True, capture_output=True, timeout=30,
    )
    return cert, key


@pytest.fixture
def tls_serin(
    start_serin: SerinFactory, upstreams: tuple[Upstream, Upstream], tls_files: tuple[Path, Path]
) -> Serin:
    stable, canary = upstreams
    cert, key = tls_files
    serin = start_serin(stable.url, canary.url, config=f'[tls]\ncert = "{cert}"\nkey = "{key}"\n')
    serin.proxy_url = f"https://{serin.proxy_addr}"
    return serin


@pytest.mark.parametrize("http2", [False, True], ids=["http1.1", "h2"])
def test_tls_with_alpn(tls_serin: Serin, tls_files: tuple[Path, Path], http2: bool) -> None:
    """Over TLS, httpx negotiates h2 or http/1.1 by ALPN and gets the upstream's
    answer; `X-Forwarded-Proto` says https."""
    context = ssl.create_default_context(cafile=str(tls_files[0]))
    with tls_serin.client(http2=http2, verify=context) as client:
        resp = client.get("/echo")
    assert resp.status_code == 200
    assert resp.http_version == ("HTTP/2" if http2 else "HTTP/1.1")
    assert resp.headers["x-serin-upstream"] == "stable"
    headers = dict(resp.json()["headers"])
    assert headers["x-forwarded-proto"] == "https"


def curl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["curl", "-sS", "--max-time", "10", "--noproxy", "*", *args],
        capture_output=True, text=True, timeout=20, check=False,
    )


needs_curl = pytest.mark.skipif(not shutil.which("curl"), reason="curl not installed")


@needs_curl
@pytest.mark.parametrize("flag", ["--http1.1", "--http2-prior-knowledge"])
def test_curl(serin: Serin, flag: str) -> None:
    """`curl -i` (HTTP/1.1, or h2c with prior knowledge) shows a 200, the body and
    `x-serin-upstream`; with `x-serin-canary: always` it shows the canary."""
    out = curl("-i", flag, f"{serin.proxy_url}/")
    assert out.returncode == 0, out.stderr
    head, _, body = out.stdout.replace("\r\n", "\n").partition("\n\n")
    assert head.split()[1] == "200", head
    assert "x-serin-upstream: stable" in head.lower()
    assert body == "stable"
    out = curl(flag, "-H", "x-serin-canary: always", f"{serin.proxy_url}/")
    assert out.stdout == "canary"


@needs_curl
def test_curl_large_upload(serin: Serin, tmp_path: Path) -> None:
    """`curl --data-binary @file` of 5 MB (curl adds `Expect: 100-continue`)
    arrives whole."""
    data = tmp_path / "upload.bin"
    payload = bytes(range(256)) * (5 * 4096)
    data.write_bytes(payload)
    out = curl("--data-binary", f"@{data}", f"{serin.proxy_url}/upload")
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["bytes"] == len(payload)
    assert got["sha256"] == hashlib.sha256(payload).hexdigest()


@needs_curl
def test_curl_tls(tls_serin: Serin, tls_files: tuple[Path, Path]) -> None:
    """`curl --cacert` over TLS negotiates HTTP/2 and gets the stable body."""
    out = curl("--cacert", str(tls_files[0]), "-w", "\n%{http_version}", f"{tls_serin.proxy_url}/")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n") == ["stable", "2"]
