"""Fixtures: scripted Python upstreams and the real ``serin`` binary.

Everything listens on 127.0.0.1 with port 0; serin's ports are read from the
two lines it prints on stdout at startup. Nothing is built here: the binary
comes from ``SERIN_BIN`` (default ``$CARGO_TARGET_DIR/debug/serin`` when that
is set, else ``target/debug/serin`` under the repo root).
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import httpx
import pytest

from upstream import Upstream

REPO_ROOT = Path(__file__).resolve().parents[2]
STARTUP_DEADLINE = 10.0

_ADMIN_LINE = re.compile(r"^serin: control API listening on (\S+)")
_PROXY_LINE = re.compile(r"^serin: proxy listening on (\S+)")


def serin_bin() -> Path:
    """The binary under test (never built by the fixtures)."""
    explicit = os.environ.get("SERIN_BIN")
    if explicit:
        path = Path(explicit)
        return path if path.is_absolute() else REPO_ROOT / path
    target = os.environ.get("CARGO_TARGET_DIR")
    if target:
        path = Path(target)
        return (path if path.is_absolute() else REPO_ROOT / path) / "debug" / "serin"
    return REPO_ROOT / "target" / "debug" / "serin"


def wait_until(
    check: Callable[[], bool], timeout: float, what: str, interval: float = 0.01
) -> None:
    """Polls ``check`` until it is true; fails the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class Serin:
    """A running ``serin run``: proxy and control API addresses, clients, logs."""

    def __init__(
        self,
        proc: subprocess.Popen[str],
        admin_addr: str,
        proxy_addr: str,
        log_path: Path,
        token: Optional[str],
    ) -> None:
        self.proc = proc
        self.admin_addr = admin_addr
        self.proxy_addr = proxy_addr
        self.admin_url = f"http://{admin_addr}"
        self.proxy_url = f"http://{proxy_addr}"
        self.log_path = log_path
        self.token = token
        headers = {"authorization": f"Bearer {token}"} if token else {}
        self.admin = httpx.Client(
            base_url=self.admin_url, headers=headers, timeout=10.0, trust_env=False
        )

    def client(self, http2: bool = False, **kwargs: object) -> httpx.Client:
        """An httpx client for the proxy: HTTP/1.1, or HTTP/2 with prior knowledge."""
        kwargs.setdefault("timeout", 10.0)
        return httpx.Client(
            base_url=self.proxy_url,
            http1=not http2,
            http2=http2,
            trust_env=False,
            **kwargs,  # type: ignore[arg-type]
        )

    def status(self) -> dict:
        resp = self.admin.get("/status")
        assert resp.status_code == 200, resp.text
        return resp.json()

    def set_weight(self, percent: float) -> dict:
        resp = self.admin.put("/weight", json={"canary": percent})
        assert resp.status_code == 200, resp.text
        return resp.json()

    def cli(self, *args: str, timeout: float = 15.0) -> subprocess.CompletedProcess[str]:
        """Runs the binary as a CLI client of this instance's control API."""
        argv = [str(serin_bin()), *args, "--admin", self.admin_addr]
        if self.token:
            argv += ["--token", self.token]
        env = {k: v for k, v in os.environ.items() if not k.startswith("SERIN_")}
        return subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, env=env, check=False
        )

    def logs(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-8000:]
        except OSError:
            return ""

    def stop(self) -> None:
        self.admin.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


def _pump(stream, lines: "queue.Queue[Optional[str]]") -> None:
    """Copies serin's stdout into a queue (and keeps draining it afterwards)."""
    for line in stream:
        lines.put(line.rstrip("\n"))
    lines.put(None)


SerinFactory = Callable[..., Serin]


@pytest.fixture
def upstreams() -> Iterator[tuple[Upstream, Upstream]]:
    """Two scripted upstreams named ``stable`` and ``canary``."""
    stable, canary = Upstream("stable"), Upstream("canary")
    try:
        yield stable, canary
    finally:
        stable.close()
        canary.close()


@pytest.fixture
def start_serin(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[SerinFactory]:
    """Starts ``serin run`` instances; every one is stopped (or killed) at teardown."""
    binary = serin_bin()
    if not binary.is_file():
        pytest.fail(
            f"serin binary not found at {binary}: run `cargo build -p serin-control` "
            "or set SERIN_BIN"
        )
    started: list[Serin] = []
    request.node.serin_instances = started  # for the failure report below

    def start(
        stable: Optional[str],
        canary: Optional[str],
        *,
        config: Optional[str] = None,
        token: Optional[str] = None,
        state_dir: Optional[Path] = None,
        extra: Sequence[str] = (),
        env: Optional[dict[str, str]] = None,
    ) -> Serin:
        """Starts serin; ``stable``/``canary`` None leave those flags out (for the
        config file or ``env`` to provide), ``extra`` adds flags, ``env`` adds
        environment variables (the caller's SERIN_* are never inherited)."""
        n = len(started)
        state_dir = state_dir or tmp_path / f"state-{n}"
        argv = [
            str(binary), "run",
            "--listen", "127.0.0.1:0",
            "--admin", "127.0.0.1:0",
            "--state-dir", str(state_dir),
        ]
        if stable is not None:
            argv += ["--stable", stable]
        if canary is not None:
            argv += ["--canary", canary]
        if config is not None:
            config_path = tmp_path / f"serin-{n}.toml"
            config_path.write_text(config)
            argv += ["--config", str(config_path)]
        if token is not None:
            argv += ["--admin-token", token]
        argv += list(extra)
        # Only what the command line says: no SERIN_* from the caller's environment.
        child_env = {k: v for k, v in os.environ.items() if not k.startswith("SERIN_")}
        child_env.setdefault("NO_COLOR", "1")
        child_env.update(env or {})
        log_path = tmp_path / f"serin-{n}.log"
        log = open(log_path, "w")
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            env=child_env,
        )
        log.close()
        lines: "queue.Queue[Optional[str]]" = queue.Queue()
        threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True).start()

        admin_addr = proxy_addr = None
        seen: list[str] = []
        deadline = time.monotonic() + STARTUP_DEADLINE
        try:
            while proxy_addr is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("no 'proxy listening' line in time")
                try:
                    line = lines.get(timeout=min(left, 0.2))
                except queue.Empty:
                    continue
                if line is None:
                    raise RuntimeError(f"serin exited with {proc.wait(timeout=5)}")
                seen.append(line)
                if m := _ADMIN_LINE.match(line):
                    admin_addr = m.group(1)
                elif m := _PROXY_LINE.match(line):
                    proxy_addr = m.group(1)
            if admin_addr is None:
                raise RuntimeError("'proxy listening' came before 'control API listening'")
        except (TimeoutError, RuntimeError) as e:
            proc.kill()
            proc.wait(timeout=5)
            pytest.fail(
                f"serin did not start: {e}\nargv: {argv}\nstdout: {seen}\n"
                f"stderr:\n{log_path.read_text(errors='replace')[-4000:]}"
            )
        serin = Serin(proc, admin_addr, proxy_addr, log_path, token)
        started.append(serin)
        return serin

    try:
        yield start
    finally:
        for serin in started:
            serin.stop()


@pytest.fixture
def serin(
    start_serin: SerinFactory, upstreams: tuple[Upstream, Upstream]
) -> Serin:
    """serin in front of the two upstreams with the default config (canary at 0%)."""
    stable, canary = upstreams
    return start_serin(stable.url, canary.url)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    """On a failure, attach the serin logs of that test to the report."""
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed:
        for n, instance in enumerate(getattr(item, "serin_instances", [])):
            report.sections.append((f"serin #{n} stderr (tail)", instance.logs()))
