"""The `serin` command line as an operator uses it: configuration precedence,
`serin check`, and the client subcommands."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from conftest import Serin, SerinFactory, serin_bin
from upstream import Upstream, closed_port


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SERIN_")}
    return subprocess.run(
        [str(serin_bin()), *args], capture_output=True, text=True, timeout=15, env=env, check=False
    )


def test_environment_configures_run(
    start_serin: SerinFactory, upstreams: tuple[Upstream, Upstream]
) -> None:
    """`SERIN_STABLE`, `SERIN_CANARY` and `SERIN_CANARY_WEIGHT` alone configure
    `serin run`: with weight 100 from the environment, clients reach the canary."""
    stable, canary = upstreams
    serin = start_serin(
        None,
        None,
        env={"SERIN_STABLE": stable.url, "SERIN_CANARY": canary.url, "SERIN_CANARY_WEIGHT": "100"},
    )
    assert serin.status()["canary_weight"] == 100
    with serin.client() as client:
        assert client.get("/").text == "canary"


def test_flags_beat_environment_beat_file(
    start_serin: SerinFactory, upstreams: tuple[Upstream, Upstream]
) -> None:
    """The starting weight comes from the flag over `SERIN_CANARY_WEIGHT` over the
    config file's `canary_weight`."""
    stable, canary = upstreams
    config = f'canary_weight = 10\n[stable]\nurl = "{stable.url}"\n[canary]\nurl = "{canary.url}"\n'
    from_file = start_serin(None, None, config=config)
    assert from_file.status()["canary_weight"] == 10
    from_env = start_serin(None, None, config=config, env={"SERIN_CANARY_WEIGHT": "20"})
    assert from_env.status()["canary_weight"] == 20
    from_flag = start_serin(
        None, None, config=config, env={"SERIN_CANARY_WEIGHT": "20"}, extra=["--canary-weight", "30"]
    )
    assert from_flag.status()["canary_weight"] == 30


def test_check_names_the_bad_key(tmp_path: Path) -> None:
    """`serin check` accepts a good config (exit 0) and, for a bad one, exits
    non-zero naming the key."""
    good = tmp_path / "good.toml"
    good.write_text('[stable]\nurl = "http://127.0.0.1:8081"\n[canary]\nurl = "http://127.0.0.1:8082"\n')
    out = run_cli("check", "--config", str(good))
    assert out.returncode == 0, out.stderr
    assert "ok" in out.stdout

    bad = tmp_path / "bad.toml"
    bad.write_text(good.read_text() + "[judge]\nmax_error_rate = 7\n")
    out = run_cli("check", "--config", str(bad))
    assert out.returncode != 0
    assert "judge.max_error_rate" in out.stderr, out.stderr


def test_cli_rollout_promote_rollback(serin: Serin) -> None:
    """`serin rollout --steps 10,50,100 --hold 60s`, `serin promote` and `serin rollback`
    drive the phases, and `--admin http://ADDR` works as well as `ADDR`."""
    out = serin.cli("rollout", "--steps", "10,50,100", "--hold", "60s")
    assert out.returncode == 0, out.stderr
    status = serin.status()
    assert (status["phase"], status["canary_weight"]) == ("progressing", 10)
    assert serin.cli("promote").returncode == 0
    assert serin.status()["phase"] == "promoted"
    argv = [str(serin_bin()), "rollback", "--admin", serin.admin_url]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=15, check=False)
    assert out.returncode == 0, out.stderr
    assert serin.status()["phase"] == "rolled_back"


def test_cli_token(start_serin: SerinFactory, upstreams: tuple[Upstream, Upstream]) -> None:
    """Against a token-protected API, `serin weight` without `--token` fails with
    the server's 401 message; with it, it succeeds."""
    stable, canary = upstreams
    serin = start_serin(stable.url, canary.url, token="s3cret")
    out = run_cli("weight", "40", "--admin", serin.admin_addr)
    assert out.returncode != 0
    assert "401" in out.stderr and "bearer" in out.stderr.lower(), out.stderr
    assert serin.status()["canary_weight"] == 0
    out = serin.cli("weight", "40")  # passes --token
    assert out.returncode == 0, out.stderr
    assert serin.status()["canary_weight"] == 40


def test_cli_unreachable_admin() -> None:
    """A client subcommand aimed at a closed port exits non-zero and says it cannot
    reach serin."""
    sock, port = closed_port()
    try:
        out = run_cli("status", "--admin", f"127.0.0.1:{port}")
    finally:
        sock.close()
    assert out.returncode != 0
    assert "cannot reach" in out.stderr, out.stderr
