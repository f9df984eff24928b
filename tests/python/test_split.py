"""The traffic split as clients see it: weights set through the control API,
and the override header and cookie."""

from __future__ import annotations

import httpx
import pytest

from conftest import Serin


def served_by(client: httpx.Client, n: int, **kwargs: object) -> dict[str, int]:
    """Sends ``n`` GETs; counts the answers by `x-serin-upstream`, checking bodies."""
    counts = {"stable": 0, "canary": 0}
    for _ in range(n):
        resp = client.get("/", **kwargs)  # type: ignore[arg-type]
        assert resp.status_code == 200
        upstream = resp.headers["x-serin-upstream"]
        assert resp.text == upstream, "the body comes from the upstream the header names"
        counts[upstream] += 1
    return counts


def test_weight_30_splits_traffic(serin: Serin) -> None:
    """After `PUT /weight {"canary": 30}`, about 30% of 500 requests reach the canary."""
    status = serin.set_weight(30)
    assert status["phase"] == "manual"
    assert status["canary_weight"] == 30
    with serin.client() as client:
        counts = served_by(client, 500)
    # Binomial(500, 0.3): mean 150, sd 10.2; ±50 is ~5 sd.
    assert 100 <= counts["canary"] <= 200, counts
    status = serin.status()
    assert status["phase"] == "manual", status.get("reason")
    assert status["canary_weight"] == 30


def test_fractional_weight_reported_in_percent(serin: Serin) -> None:
    """Weights are percent with basis-point precision: 12.5 is reported as 12.5."""
    assert serin.set_weight(12.5)["canary_weight"] == 12.5
    assert serin.status()["canary_weight"] == 12.5


@pytest.mark.parametrize(
    "weight,headers,expected",
    [
        (0, {"x-serin-canary": "always"}, "canary"),
        (100, {"x-serin-canary": "never"}, "stable"),
        (0, {"cookie": "serin-canary=always"}, "canary"),
        (100, {"cookie": "other=1; serin-canary=never"}, "stable"),
        # The header wins over the cookie.
        (30, {"x-serin-canary": "never", "cookie": "serin-canary=always"}, "stable"),
        (30, {"x-serin-canary": "always", "cookie": "serin-canary=never"}, "canary"),
        # Unknown header value: falls through to the cookie.
        (30, {"x-serin-canary": "maybe", "cookie": "serin-canary=always"}, "canary"),
        # Unknown values everywhere: falls through to the weight.
        (100, {"x-serin-canary": "maybe", "cookie": "serin-canary=sometimes"}, "canary"),
        (0, {"x-serin-canary": "maybe", "cookie": "serin-canary=sometimes"}, "stable"),
    ],
    ids=[
        "header-always", "header-never", "cookie-always", "cookie-never",
        "header-beats-cookie-never", "header-beats-cookie-always",
        "bad-header-falls-to-cookie", "bad-both-weight-100", "bad-both-weight-0",
    ],
)
def test_overrides(serin: Serin, weight: float, headers: dict[str, str], expected: str) -> None:
    """`x-serin-canary: always|never` and the `serin-canary` cookie pin every request
    to one upstream, whatever the weight; the header takes precedence."""
    if weight:
        serin.set_weight(weight)
    for http2 in (False, True):
        with serin.client(http2=http2) as client:
            counts = served_by(client, 20, headers=headers)
        assert counts[expected] == 20, counts
