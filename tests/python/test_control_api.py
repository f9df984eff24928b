"""The control API's answers to bad input and missing credentials."""

from __future__ import annotations

import httpx
import pytest

from conftest import Serin, SerinFactory
from upstream import Upstream


@pytest.mark.parametrize(
    "body",
    [b"{not json", b'{"canary": "ten"}', b'{"canary": 150}', b'{"canary": -1}', b'{"weight": 5}', b"[]"],
    ids=["syntax", "string", "above-100", "negative", "unknown-key", "array"],
)
def test_bad_weight_body_is_400(serin: Serin, body: bytes) -> None:
    """A malformed or out-of-range `PUT /weight` gets 400 with a JSON `error`,
    and the weight stays where it was."""
    serin.set_weight(10)
    resp = serin.admin.put("/weight", content=body, headers={"content-type": "application/json"})
    assert resp.status_code == 400
    assert resp.headers["content-type"].startswith("application/json")
    error = resp.json()["error"]
    assert isinstance(error, str) and error
    assert serin.status()["canary_weight"] == 10


def test_bad_rollout_body_is_400(serin: Serin) -> None:
    """`POST /rollout` with invalid JSON or an unparsable hold gets 400 with a JSON `error`."""
    for body in (b"{", b'{"hold": "soon"}'):
        resp = serin.admin.post("/rollout", content=body)
        assert resp.status_code == 400, body
        assert resp.json()["error"]
    assert serin.status()["phase"] == "steady"


def test_token_required_for_mutations(
    start_serin: SerinFactory, upstreams: tuple[Upstream, Upstream]
) -> None:
    """With `--admin-token`, a mutating call without (or with a wrong) bearer token
    gets 401 with a JSON `error` and changes nothing; reads stay open; the right
    token works."""
    stable, canary = upstreams
    serin = start_serin(stable.url, canary.url, token="s3cret")
    with httpx.Client(base_url=serin.admin_url, timeout=10.0, trust_env=False) as anon:
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "s3cret"}):
            resp = anon.put("/weight", json={"canary": 50}, headers=headers)
            assert resp.status_code == 401, headers
            assert resp.json()["error"]
            assert resp.headers["www-authenticate"].lower().startswith("bearer")
        assert anon.post("/promote").status_code == 401
        assert anon.post("/rollback").status_code == 401

        resp = anon.get("/status")
        assert resp.status_code == 200
        assert resp.json()["canary_weight"] == 0
        assert resp.json()["phase"] == "steady"

    resp = serin.admin.put("/weight", json={"canary": 50})  # carries the token
    assert resp.status_code == 200
    assert resp.json()["canary_weight"] == 50


def test_unknown_endpoint_and_wrong_method(serin: Serin) -> None:
    """Unknown paths get 404 and wrong methods 405 with `Allow`, both with a JSON `error`."""
    resp = serin.admin.get("/nope")
    assert resp.status_code == 404 and resp.json()["error"]
    resp = serin.admin.get("/weight")
    assert resp.status_code == 405 and resp.json()["error"]
    assert resp.headers["allow"] == "PUT"


def test_probes(serin: Serin) -> None:
    """`/healthz` and `/readyz` answer 200 once serin has printed its listening lines."""
    assert serin.admin.get("/healthz").status_code == 200
    assert serin.admin.get("/readyz").status_code == 200


def metric(text: str, sample: str) -> float:
    """The value of one exposition line, e.g. 'serin_requests_total{...}'."""
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{sample} not in /metrics:\n{text}")


def test_metrics_count_what_clients_saw(serin: Serin, upstreams: tuple[Upstream, Upstream]) -> None:
    """`GET /metrics` counts requests per upstream and class exactly as served:
    10 good answers from stable, 5 canary 503s to POSTs; and the weight ratio."""
    _, canary = upstreams
    canary.status = 503
    with serin.client() as client:
        for _ in range(10):
            assert client.get("/", headers={"x-serin-canary": "never"}).status_code == 200
        for _ in range(5):
            assert client.post("/", headers={"x-serin-canary": "always"}).status_code == 503
    serin.set_weight(12.5)
    resp = serin.admin.get("/metrics")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain")
    text = resp.text
    assert metric(text, 'serin_requests_total{upstream="stable",class="success"}') == 10
    assert metric(text, 'serin_requests_total{upstream="stable",class="error"}') == 0
    assert metric(text, 'serin_requests_total{upstream="canary",class="error"}') == 5
    assert metric(text, "serin_canary_weight_ratio") == 0.125
