"""Retries under injected faults: every record lands exactly once, and the server is obeyed."""

from __future__ import annotations

import time
from collections import Counter

import asyncpg
import pytest

from ingest.report import summary_table
from tests.fault_server import Faults, FaultServer
from tests.helpers import make_config, run, table_rows
from tests.servers import make_records, serve

RETRY_AFTER = 0.3
FAULTS = Faults(
    server_error=0.20,
    rate_limited=0.10,
    retry_after=RETRY_AFTER,
    reset=0.025,
    truncate=0.025,
    invalid_json=0.02,
    stall=0.01,
    stall_seconds=1.0,
    seed=20240611,
)
FAST_RETRIES = {
    "backoff_initial": 0.01,
    "backoff_max": 0.05,
    "max_attempts": 12,
    "read_timeout": 0.3,
    "max_concurrency": 4,
}


@pytest.mark.parametrize("pages_ahead", [1, 4])
async def test_faults_land_every_record_exactly_once_and_retries_are_counted_by_reason(
    database: str, db: asyncpg.Connection, pages_ahead: int
) -> None:
    records = make_records(300)
    server = FaultServer(records, FAULTS)
    async with serve(server.app) as base:
        loaded = make_config(
            base,
            records_path="data",
            params={"per_page": 10},
            pagination={"style": "page_number", "total_path": "total"},
            mode="append",  # no primary key: a duplicate would show as an extra row
            http={**FAST_RETRIES, "pages_ahead": pages_ahead},
        )
        started = time.monotonic()
        result = await run(loaded, database)
        elapsed = time.monotonic() - started

    rows = await table_rows(db)
    assert len(rows) == 300
    assert [row["id"] for row in rows] == list(range(1, 301))
    assert result.endpoints["items"].records == 300

    outcomes = server.outcomes()
    # The seeded draw really did inject every kind of fault at roughly the configured rates.
    assert outcomes["server_error"] >= 5
    assert outcomes["rate_limited"] >= 2
    assert outcomes.get("reset", 0) + outcomes.get("truncate", 0) >= 1
    assert outcomes["ok"] == 30  # one good answer per page, none wasted

    retries = result.retries
    five_xx = sum(count for reason, count in retries.items() if reason.startswith("http_5"))
    assert five_xx == outcomes["server_error"]
    assert retries["http_429"] == outcomes["rate_limited"]
    assert retries["truncated"] == outcomes.get("truncate", 0)
    assert retries["malformed_json"] == outcomes.get("invalid_json", 0)
    assert retries["timeout"] == outcomes.get("stall", 0)
    # aiohttp itself resends an idempotent request once when a reused keep-alive connection
    # turns out closed, so a dropped connection is not always visible as one of our retries.
    assert retries["connection"] <= outcomes.get("reset", 0)
    summary = summary_table(result)
    assert f"http_429={outcomes['rate_limited']}" in summary

    # Retry-After was respected: the same page was never asked again sooner.
    last_refused: dict[str, float] = {}
    for served in server.log:
        if served.key in last_refused:
            assert served.at - last_refused.pop(served.key) >= RETRY_AFTER - 0.02
        if served.outcome == "rate_limited":
            last_refused[served.key] = served.at
    if pages_ahead == 1:  # serial: every pause adds up in the wall time
        assert elapsed >= outcomes["rate_limited"] * RETRY_AFTER * 0.95


async def test_retries_give_up_with_one_line_error_naming_the_endpoint(database: str) -> None:
    server = FaultServer(make_records(5), Faults(server_error=1.0))
    async with serve(server.app) as base:
        loaded = make_config(
            base,
            records_path="data",
            pagination={"style": "page_number", "total_path": "total"},
            http={**FAST_RETRIES, "max_attempts": 3, "pages_ahead": 1},  # page 1's attempts only
        )
        with pytest.raises(Exception) as caught:
            await run(loaded, database)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("endpoint items: http://127.0.0.1:")
    assert "gave up after 3 attempts" in message
    assert len(server.log) == 3


async def test_retry_after_longer_than_the_budget_fails_fast(database: str) -> None:
    server = FaultServer(make_records(5), Faults(rate_limited=1.0, retry_after=30))
    async with serve(server.app) as base:
        loaded = make_config(
            base,
            records_path="data",
            pagination={"style": "page_number", "total_path": "total"},
            http={**FAST_RETRIES, "max_retry_seconds": 2.0, "pages_ahead": 1},
        )
        started = time.monotonic()
        with pytest.raises(Exception, match=r"gave up after 1 attempt in .*HTTP 429"):
            await run(loaded, database)
    assert time.monotonic() - started < 10
    assert Counter(served.outcome for served in server.log) == {"rate_limited": 1}
