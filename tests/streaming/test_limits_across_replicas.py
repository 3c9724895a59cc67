"""Rate limits as deployed: 3 gateway processes around one Redis, one key, 100 clients hammering it.

The ledger dates every admitted request by Redis's clock, so the most requests and reserved tokens admitted in any
60 s can be read back and held against the limits: they must never be passed, however many replicas admit.
"""

from __future__ import annotations

import subprocess

import pytest

from bench.limits import measure

pytestmark = [pytest.mark.server, pytest.mark.timeout(180)]


async def test_three_replicas_admit_exactly_the_limits_of_one_key() -> None:
    figures = await measure(gateways=3, clients=100, duration=12, rpm=600, tpm=15_000, log=subprocess.DEVNULL)
    statuses = figures["statuses"]
    assert set(statuses) <= {"200", "429/5429"}, statuses
    used = figures["most_used_tokens_in_60s"]
    # The token limit binds first. Reservations come back as requests finish (8 of each request's 40 completion
    # tokens are used), so more requests fit than reservations alone would allow; the tokens used in any 60 s never
    # pass the limit, and fill it to within one request's reservation (at most ~100 tokens).
    assert 15_000 - 100 < used <= 15_000, figures
    assert figures["most_reserved_tokens_in_60s"] > 15_000  # the reconciliation returned tokens to the window
    assert figures["admitted_requests"] == statuses["200"] == figures["most_requests_in_60s"] <= 600
