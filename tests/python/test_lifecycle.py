"""The rollout lifecycle and the process, as an operator sees them: rollback,
promote, restarts with saved state, SIGTERM, bad configs and the sticky split."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx

from conftest import Serin, SerinFactory, serin_bin, wait_until
from upstream import Upstream


def upstream_of(client: httpx.Client, n: int = 20, **kwargs: object) -> set[str]:
    seen = set()
    for _ in range(n):
        resp = client.get("/", **kwargs)  # type: ignore[arg-type]
        assert resp.status_code == 200
        seen.add(resp.headers["x-serin-upstream"])
    return seen


def test_rollback_closes_canary_even_to_overrides(serin: Serin) -> None:
    """`POST /rollback` sends everything to stable, even requests that ask for the
    canary with `x-serin-canary: always`; `PUT /weight` opens it again."""
    serin.set_weight(100)
    resp = serin.admin.post("/rollback")
    assert resp.status_code == 200
    assert resp.json()["phase"] == "rolled_back"
    assert resp.json()["canary_weight"] == 0
    with serin.client() as client:
        assert upstream_of(client) == {"stable"}
        assert upstream_of(client, headers={"x-serin-canary": "always"}) == {"stable"}
        assert upstream_of(client, headers={"cookie": "serin-canary=always"}) == {"stable"}
        serin.set_weight(0)
        assert upstream_of(client, headers={"x-serin-canary": "always"}) == {"canary"}
    history = serin.admin.get("/history").json()
    assert [t["phase"] for t in history][-2:] == ["rolled_back", "manual"], history
    assert all(t["actor"] in ("api", "startup") for t in history), history


def test_promote_sends_everything_to_canary(serin: Serin) -> None:
    """`POST /promote`: phase `promoted`, weight 100, every request on the canary."""
    resp = serin.admin.post("/promote")
    assert resp.status_code == 200
    assert resp.json()["phase"] == "promoted"
    assert resp.json()["canary_weight"] == 100
    with serin.client(http2=True) as client:
        assert upstream_of(client) == {"canary"}


def test_rollout_starts_at_first_step(serin: Serin) -> None:
    """`POST /rollout` with steps starts `progressing` at the first step; pause and
    resume move between `paused` and `progressing` without changing the weight."""
    resp = serin.admin.post("/rollout", json={"steps": [10, 50, 100], "hold": "60s"})
    assert resp.status_code == 200, resp.text
    status = resp.json()
    assert status["phase"] == "progressing"
    assert status["canary_weight"] == 10
    assert status["steps"] == [10, 50, 100]
    assert serin.admin.post("/pause").json()["phase"] == "paused"
    assert serin.status()["canary_weight"] == 10
    assert serin.admin.post("/resume").json()["phase"] == "progressing"


def test_state_survives_restart(
    start_serin: SerinFactory, upstreams: tuple[Upstream, Upstream], tmp_path: Path
) -> None:
    """A weight set by hand is still in force after serin restarts on the same
    state dir, and clients are split accordingly."""
    stable, canary = upstreams
    state = tmp_path / "shared-state"
    first = start_serin(stable.url, canary.url, state_dir=state)
    first.set_weight(100)
    first.stop()
    assert first.proc.returncode == 0, "SIGTERM is a clean exit"

    second = start_serin(stable.url, canary.url, state_dir=state)
    status = second.status()
    assert (status["phase"], status["canary_weight"]) == ("manual", 100)
    with second.client() as client:
        assert upstream_of(client) == {"canary"}


def test_rollback_survives_restart(
    start_serin: SerinFactory, upstreams: tuple[Upstream, Upstream], tmp_path: Path
) -> None:
    """A rolled-back canary stays rolled back and closed (even to overrides) after
    serin restarts: a restart never reopens a bad canary."""
    stable, canary = upstreams
    state = tmp_path / "shared-state"
    first = start_serin(stable.url, canary.url, state_dir=state)
    first.set_weight(40)
    assert first.admin.post("/rollback").status_code == 200
    first.stop()

    second = start_serin(stable.url, canary.url, state_dir=state, extra=["--canary-weight", "50"])
    status = second.status()
    assert (status["phase"], status["canary_weight"]) == ("rolled_back", 0)
    with second.client() as client:
        assert upstream_of(client, headers={"x-serin-canary": "always"}) == {"stable"}


def test_corrupt_state_starts_safe(
    start_serin: SerinFactory, upstreams: tuple[Upstream, Upstream], tmp_path: Path
) -> None:
    """An unreadable state file does not stop serin: the canary starts at 0 and
    traffic flows to stable."""
    stable, canary = upstreams
    state = tmp_path / "corrupt-state"
    state.mkdir()
    (state / "state.json").write_text("{ this is not json")
    serin = start_serin(
        stable.url, canary.url, state_dir=state, extra=["--canary-weight", "50"]
    )
    assert serin.status()["canary_weight"] == 0
    with serin.client() as client:
        assert upstream_of(client) == {"stable"}


def test_sigterm_lets_inflight_request_finish(
    serin: Serin, upstreams: tuple[Upstream, Upstream]
) -> None:
    """SIGTERM while a slow request is in flight: the client still gets its 200,
    then serin exits 0."""
    stable, _ = upstreams
    result: dict[str, object] = {}

    def slow_request() -> None:
        with serin.client() as client:
            try:
                resp = client.get("/", params={"delay_ms": 700})
                result["status"], result["body"] = resp.status_code, resp.text
            except httpx.HTTPError as e:
                result["error"] = repr(e)

    before = stable.hits
    worker = threading.Thread(target=slow_request)
    worker.start()
    wait_until(lambda: stable.hits > before, 5.0, "the request to reach stable")
    serin.proc.send_signal(signal.SIGTERM)
    worker.join(timeout=10)
    assert result == {"status": 200, "body": "stable"}
    assert serin.proc.wait(timeout=10) == 0


def test_invalid_config_exits_before_binding(tmp_path: Path) -> None:
    """`serin run` with a bad config value exits non-zero and names the key."""
    config = tmp_path / "bad.toml"
    config.write_text('[timeouts]\nresponse = "soon"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("SERIN_")}
    out = subprocess.run(
        [
            str(serin_bin()), "run", "--config", str(config),
            "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0",
            "--stable", "http://127.0.0.1:1", "--canary", "http://127.0.0.1:2",
            "--state-dir", str(tmp_path / "state"),
        ],
        capture_output=True, text=True, timeout=15, env=env, check=False,
    )
    assert out.returncode != 0
    assert "timeouts.response" in out.stderr, out.stderr
    assert "listening" not in out.stdout


def test_public_admin_needs_token(tmp_path: Path) -> None:
    """serin refuses to start with a non-loopback admin address and no token."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SERIN_")}
    out = subprocess.run(
        [
            str(serin_bin()), "run",
            "--listen", "127.0.0.1:0", "--admin", "0.0.0.0:0",
            "--stable", "http://127.0.0.1:1", "--canary", "http://127.0.0.1:2",
            "--state-dir", str(tmp_path / "state"),
        ],
        capture_output=True, text=True, timeout=15, env=env, check=False,
    )
    assert out.returncode != 0
    assert "token" in out.stderr.lower(), out.stderr
    assert "listening" not in out.stdout


STICKY_CONFIG = """
[split]
sticky_header = "x-user"
"""


def test_sticky_users_only_grow(
    start_serin: SerinFactory, upstreams: tuple[Upstream, Upstream]
) -> None:
    """With `sticky_header = "x-user"`, each user always lands on the same upstream,
    about the weight's share of users is on the canary, and raising the weight
    keeps every canary user there."""
    stable, canary = upstreams
    serin = start_serin(stable.url, canary.url, config=STICKY_CONFIG)
    users = [f"user-{i}" for i in range(200)]

    def assignment(client: httpx.Client) -> dict[str, str]:
        out = {}
        for user in users:
            resp = client.get("/", headers={"x-user": user})
            assert resp.status_code == 200
            out[user] = resp.headers["x-serin-upstream"]
        return out

    with serin.client() as client:
        serin.set_weight(20)
        at20 = assignment(client)
        assert assignment(client) == at20, "a user's upstream does not change"
        on_canary = {u for u, t in at20.items() if t == "canary"}
        assert 15 <= len(on_canary) <= 70, len(on_canary)  # Binomial(200, 0.2): 40 ± 5.7
        serin.set_weight(50)
        at50 = assignment(client)
        assert on_canary <= {u for u, t in at50.items() if t == "canary"}


def test_http2_multiplexes_concurrent_requests(serin: Serin) -> None:
    """Twenty concurrent 300 ms requests on one HTTP/2 connection all succeed and
    finish together, not one after another."""

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(
            base_url=serin.proxy_url, http1=False, http2=True, trust_env=False, timeout=10.0
        ) as client:
            return await asyncio.gather(
                *(client.get("/", params={"delay_ms": 300}) for _ in range(20))
            )

    started = time.monotonic()
    responses = asyncio.run(run())
    elapsed = time.monotonic() - started
    assert [r.status_code for r in responses] == [200] * 20
    assert {r.http_version for r in responses} == {"HTTP/2"}
    assert elapsed < 1.5, f"20 × 300 ms took {elapsed:.2f}s"


def test_rollout_holds_without_traffic_then_promotes(serin: Serin) -> None:
    """A rollout with a 300 ms hold: without traffic the step holds and the reason
    says so; with traffic it steps to 100% and ends `promoted`."""
    resp = serin.admin.post("/rollout", json={"steps": [50, 100], "hold": "300ms"})
    assert resp.status_code == 200, resp.text
    wait_until(
        lambda: "holding" in serin.status()["reason"], 5.0, "the step to report it is holding"
    )
    status = serin.status()
    assert (status["phase"], status["canary_weight"]) == ("progressing", 50)
    assert "canary requests" in status["reason"], status["reason"]

    deadline = time.monotonic() + 15.0
    seen = set()
    with serin.client() as client:
        while serin.status()["phase"] != "promoted":
            assert time.monotonic() < deadline, serin.status()
            for _ in range(10):
                resp = client.get("/")
                assert resp.status_code == 200
                seen.add(resp.headers["x-serin-upstream"])
        assert upstream_of(client) == {"canary"}
    assert seen == {"stable", "canary"}
    history = serin.admin.get("/history").json()
    judged = [(t["to"], t["phase"]) for t in history if t["actor"] == "judge"]
    assert judged == [(100, "progressing"), (100, "promoted")], history
