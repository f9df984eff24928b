"""The judge as a client sees it: a canary that starts failing is rolled back,
and the CLI reports it."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import socket
import time
from typing import Callable

import httpx

from conftest import Serin, SerinFactory, wait_until
from upstream import Upstream

MAX_REQUESTS = 3000
DEADLINE = 20.0


def test_failing_canary_is_rolled_back(serin: Serin, upstreams: tuple[Upstream, Upstream]) -> None:
    """At weight 50, a canary that flips to 500s is reverted by the judge after
    a handful of failed POSTs (≤ 30 seen by clients); from then on only stable
    answers, and `serin status --json` says `rolled_back`."""
    stable, canary = upstreams
    serin.set_weight(50)
    failures = 0
    with serin.client() as client:
        # Healthy first: both upstreams serve.
        seen = set()
        for _ in range(40):
            resp = client.post("/", content=b"order")
            assert resp.status_code == 200
            seen.add(resp.headers["x-serin-upstream"])
        assert seen == {"stable", "canary"}

        canary.status = 500
        deadline = time.monotonic() + DEADLINE
        sent = 0
        status = serin.status()
        while status["phase"] != "rolled_back":
            assert sent < MAX_REQUESTS and time.monotonic() < deadline, (
                f"no rollback after {sent} requests: {status}"
            )
            resp = client.post("/", content=b"order")
            sent += 1
            if resp.status_code >= 500:
                failures += 1
                assert resp.headers["x-serin-upstream"] == "canary"
            status = serin.status()

        print(f"rollback after {sent} requests, {failures} failed: {status['reason']}")
        assert failures <= 30, f"{failures} failed responses before the revert"
        assert status["canary_weight"] == 0
        assert status["reason"], "the revert says why"

        for _ in range(50):
            resp = client.post("/", content=b"order")
            assert (resp.status_code, resp.text) == (200, "stable")
            assert resp.headers["x-serin-upstream"] == "stable"

    history = serin.admin.get("/history").json()
    assert any(t["phase"] == "rolled_back" and t["actor"] == "judge" for t in history), history
    metrics = serin.admin.get("/metrics").text
    assert 'serin_rollbacks_total{actor="judge"} 1' in metrics.splitlines()

    out = serin.cli("status", "--json")
    assert out.returncode == 0, out.stderr
    cli_status = json.loads(out.stdout)
    assert cli_status["phase"] == "rolled_back"
    assert cli_status["canary_weight"] == 0


def test_fixed_canary_can_be_retried(serin: Serin, upstreams: tuple[Upstream, Upstream]) -> None:
    """After the judge rolled a failing canary back, the fixed canary set to 50%
    again serves without being reverted on the old errors."""
    _, canary = upstreams
    serin.set_weight(50)
    canary.status = 500
    deadline = time.monotonic() + DEADLINE
    with serin.client() as client:
        while serin.status()["phase"] != "rolled_back":
            assert time.monotonic() < deadline, serin.status()
            client.post("/", content=b"order")
        canary.status = 200
        serin.set_weight(50)
        seen = set()
        for _ in range(100):
            resp = client.post("/", content=b"order")
            assert resp.status_code == 200
            seen.add(resp.headers["x-serin-upstream"])
    assert seen == {"stable", "canary"}
    status = serin.status()
    assert (status["phase"], status["canary_weight"]) == ("manual", 50), status["reason"]


def test_cli_weight_out_of_range(serin: Serin) -> None:
    """`serin weight 150` exits non-zero and prints the server's error on stderr;
    the weight does not change."""
    serin.set_weight(20)
    server_error = serin.admin.put("/weight", json={"canary": 150}).json()["error"]
    out = serin.cli("weight", "150")
    assert out.returncode != 0
    assert server_error in out.stderr, out.stderr
    assert out.stdout == ""
    assert serin.status()["canary_weight"] == 20


def test_cli_weight_and_status(serin: Serin) -> None:
    """`serin weight 25` sets the weight (phase manual) and `serin status` shows it."""
    out = serin.cli("weight", "25")
    assert out.returncode == 0, out.stderr
    assert serin.status()["canary_weight"] == 25
    out = serin.cli("status")
    assert out.returncode == 0, out.stderr
    assert "manual" in out.stdout and "25" in out.stdout


def test_slow_canary_is_rolled_back(
    start_serin: SerinFactory, upstreams: tuple[Upstream, Upstream]
) -> None:
    """With `--judge-max-p95 200ms`, a canary answering in 300 ms is rolled back
    for its latency (every request still succeeded), and stable takes over."""
    stable, canary = upstreams
    serin = start_serin(stable.url, canary.url, extra=["--judge-max-p95", "200ms"])
    canary.delay = 0.3
    serin.set_weight(100)

    async def batch() -> list[httpx.Response]:
        async with httpx.AsyncClient(
            base_url=serin.proxy_url, trust_env=False, timeout=10.0
        ) as client:
            return await asyncio.gather(*(client.get("/") for _ in range(25)))

    deadline = time.monotonic() + DEADLINE
    status = serin.status()
    batches = 0
    while status["phase"] != "rolled_back":
        assert batches < 10 and time.monotonic() < deadline, f"no rollback: {status}"
        responses = asyncio.run(batch())
        batches += 1
        assert all(r.status_code == 200 for r in responses)
        status = serin.status()
    assert "p95" in status["reason"], status["reason"]
    assert status["canary_weight"] == 0
    with serin.client() as client:
        resp = client.get("/")
        assert resp.headers["x-serin-upstream"] == "stable"


def test_failing_canary_get_blast_radius_is_zero(
    serin: Serin, upstreams: tuple[Upstream, Upstream]
) -> None:
    """At weight 50, a canary that flips to 500s costs GET clients nothing: each
    failed GET is replayed on stable (`x-serin-fallback: canary`), and the judge
    still rolls the canary back."""
    _, canary = upstreams
    serin.set_weight(50)
    canary.status = 500
    fallbacks = sent = 0
    deadline = time.monotonic() + DEADLINE
    with serin.client() as client:
        while serin.status()["phase"] != "rolled_back":
            assert sent < MAX_REQUESTS and time.monotonic() < deadline, serin.status()
            resp = client.get("/")
            sent += 1
            assert (resp.status_code, resp.text) == (200, "stable")
            fallbacks += resp.headers.get("x-serin-fallback") == "canary"
    assert fallbacks >= 1


def test_rollback_webhook_is_signed(
    start_serin: SerinFactory, upstreams: tuple[Upstream, Upstream]
) -> None:
    """A rollback POSTs a JSON event to the configured webhook, signed with
    `X-Serin-Signature: sha256=<HMAC-SHA256 of the body>`."""
    stable, canary = upstreams
    hooks = Upstream("hooks")
    try:
        config = f'[[webhook]]\nurl = "{hooks.url}/hook"\nsecret = "hush"\n'
        serin = start_serin(stable.url, canary.url, config=config)
        serin.set_weight(10)
        assert serin.admin.post("/rollback").status_code == 200

        def delivered() -> list:
            return [r for r in hooks.recorded if r.path == "/hook"]

        wait_until(lambda: bool(delivered()), 10.0, "the rollback webhook")
        hook = delivered()[0]
        assert hook.method == "POST"
        event = json.loads(hook.body)
        assert event["event"] == "rollback"
        assert event["phase"] == "rolled_back"
        assert event["canary_weight"] == 0
        for key in ("id", "at", "reason", "upstreams"):
            assert key in event, key
        signature = dict(hook.headers)["x-serin-signature"]
        expected = hmac.new(b"hush", hook.body, hashlib.sha256).hexdigest()
        assert signature == f"sha256={expected}"
    finally:
        hooks.close()


def holds_for(check: Callable[[], bool], duration: float, interval: float = 0.02) -> bool:
    """True if ``check`` stays true for ``duration`` seconds (polled)."""
    deadline = time.monotonic() + duration
    while time.monotonic() < deadline:
        if not check():
            return False
        time.sleep(interval)
    return check()


def test_client_aborted_uploads_do_not_roll_back_canary(
    serin: Serin, upstreams: tuple[Upstream, Upstream]
) -> None:
    """Twelve clients that start an upload to a healthy canary and hang up halfway
    (closed tabs, killed scripts) are not the canary's fault: it stays in place."""
    stable, canary = upstreams
    serin.set_weight(100)
    host, port = serin.proxy_addr.rsplit(":", 1)
    for i in range(12):
        # Once reverted (the bug), uploads go to stable instead: follow either.
        aborted = stable.aborted + canary.aborted
        with socket.create_connection((host, int(port)), timeout=5.0) as sock:
            sock.sendall(
                b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n" + b"a" * 1000
            )
            wait_until(lambda: stable.hits + canary.hits > i, 5.0, "the upload to arrive")
        wait_until(
            lambda: stable.aborted + canary.aborted > aborted, 5.0, "the upstream to see the cut"
        )
    assert holds_for(lambda: serin.status()["phase"] == "manual", 0.5), serin.status()["reason"]
    assert serin.status()["upstreams"]["canary"]["errors"] == 0
    assert stable.hits == 0, "every upload reached the canary"
    with serin.client() as client:
        assert client.get("/").headers["x-serin-upstream"] == "canary"
