"""Backfills: windows stored as partitions, worked with leases, resumed, spread over workers."""

from __future__ import annotations

import asyncio
import datetime as dt
import signal
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from ingest import leases
from ingest.backfill import plan_windows
from ingest.config import parse_config
from ingest.errors import ConfigError, ExitCode
from ingest.events import NullObserver
from ingest.runner import connected
from ingest.secrets import Redactor
from ingest.worker import Worker, WorkerOptions, WorkerResult
from tests.processes import run_cli, spawn, wait_until
from tests.resume_servers import EPOCH, changes_app, events_config, iso, timed_records
from tests.resume_servers import events_table as table
from tests.servers import REQUESTS, serve

Connection = asyncpg.Connection

WINDOWED = """
[endpoints.incremental]
cursor_path = "updated_at"
param = "since"
end_param = "until"
"""


def source(records: list[dict[str, Any]], until: dt.datetime) -> list[tuple[Any, ...]]:
    return [
        (r["id"], r["name"], r["amount"], r["updated_at"])
        for r in records
        if r["updated_at"] < iso(until)
    ]


async def statuses(db: Connection) -> dict[str, int]:
    rows = await db.fetch("SELECT status, count(*) AS n FROM ingest.partitions GROUP BY status")
    return {row["status"]: row["n"] for row in rows}


def test_a_range_is_cut_into_windows_and_the_last_one_may_be_shorter() -> None:
    loaded = parse_config(events_config("http://127.0.0.1:1", incremental=WINDOWED), Path("e.toml"))
    endpoint = loaded.source.endpoint("events")
    plan = plan_windows(endpoint, "2025-01-01", "2025-02-01", "7d")
    assert [(lower[:10], upper[:10]) for _, lower, upper in plan.windows] == [
        ("2025-01-01", "2025-01-08"),
        ("2025-01-08", "2025-01-15"),
        ("2025-01-15", "2025-01-22"),
        ("2025-01-22", "2025-01-29"),
        ("2025-01-29", "2025-02-01"),
    ]
    assert plan.keys[0] == "2025-01-01T00:00:00+00:00/2025-01-08T00:00:00+00:00"
    with pytest.raises(ConfigError, match="--from 2025-02-01 must be before --to 2025-01-01"):
        plan_windows(endpoint, "2025-02-01", "2025-01-01", "1d")
    with pytest.raises(ConfigError, match="--window: duration 'weekly'"):
        plan_windows(endpoint, "2025-01-01", "2025-02-01", "weekly")
    by_id = parse_config(
        events_config("http://127.0.0.1:1", incremental=WINDOWED + 'format = "integer"\n'),
        Path("e.toml"),
    )
    ids = plan_windows(by_id.source.endpoint("events"), "0", "1000", "300")
    assert [(lower, upper) for _, lower, upper in ids.windows] == [
        ("0", "300"),
        ("300", "600"),
        ("600", "900"),
        ("900", "1000"),
    ]
    plain = parse_config(events_config("http://127.0.0.1:1"), Path("e.toml"))
    with pytest.raises(ConfigError, match=r"a backfill needs \[endpoints\.incremental\]"):
        plan_windows(plain.source.endpoint("events"), "2025-01-01", "2025-02-01", "1d")


async def test_backfill_fills_the_range_and_a_rerun_skips_finished_partitions(
    cli_env: dict[str, str], db: Connection, tmp_path: Path
) -> None:
    records = timed_records(300, every=dt.timedelta(hours=1))  # 12.5 days of records
    app = changes_app(records)
    async with serve(app) as base:
        config = tmp_path / "events.toml"
        config.write_text(events_config(base, mode="append", per_page=5, incremental=WINDOWED))
        args = ["backfill", str(config), "--endpoint", "events", "--from", "2025-01-01"]
        args += ["--to", "2025-01-11", "--window", "1d", "--parallel", "3"]
        code, output = await run_cli(args, cli_env, tmp_path, "first")
        assert code == ExitCode.OK, output
        assert "planned 10 partitions (10 new)" in output
        assert "partitions: 10 done, 0 failed" in output
        assert await table(db) == source(records, EPOCH + dt.timedelta(days=10))
        assert await statuses(db) == {"done": 10}
        windows = {(r["query"]["since"], r["query"]["until"]) for r in app[REQUESTS]}
        assert ("2025-01-03T00:00:00Z", "2025-01-04T00:00:00Z") in windows
        assert len(windows) == 10

        requests = len(app[REQUESTS])
        code, output = await run_cli(args, cli_env, tmp_path, "again")
        assert code == ExitCode.OK, output
        assert "planned 10 partitions (0 new)" in output
        assert len(app[REQUESTS]) == requests  # nothing fetched again
    assert await table(db) == source(records, EPOCH + dt.timedelta(days=10))


async def test_interrupted_backfill_resumes_partitions_from_their_checkpoints(
    cli_env: dict[str, str], db: Connection, tmp_path: Path
) -> None:
    records = timed_records(480, every=dt.timedelta(hours=1))  # 20 days, 24 a day
    app = changes_app(records, latency=0.05)
    async with serve(app) as base:
        config = tmp_path / "events.toml"
        config.write_text(
            events_config(base, mode="append", per_page=4, batch_size=4, incremental=WINDOWED)
        )
        args = ["backfill", str(config), "--endpoint", "events", "--from", "2025-01-01"]
        args += ["--to", "2025-01-21", "--window", "2d", "--parallel", "2"]
        cli = await spawn(args, cli_env, tmp_path, "first")

        async def mid_partition() -> bool:
            count = await db.fetchval(
                "SELECT count(*) FROM ingest.checkpoints WHERE NOT done AND records > 0"
            )
            return bool(count)

        await wait_until(mid_partition, what="a partition half done")
        cli.signal(signal.SIGTERM)
        assert await cli.wait(30) == ExitCode.INTERRUPTED, cli.output()
        handed_back = await db.fetch(
            "SELECT c.partition, c.records FROM ingest.checkpoints c JOIN ingest.partitions p "
            "USING (source, endpoint, partition) WHERE NOT c.done AND p.status = 'pending'"
        )
        assert handed_back, cli.output()
        assert all(row["records"] > 0 for row in handed_back)
        app[REQUESTS].clear()
        code, output = await run_cli(args, cli_env, tmp_path, "again")
        assert code == ExitCode.OK, output
        # A resumed partition starts after its checkpoint: its first page is not asked again.
        since = handed_back[0]["partition"].split("/")[0].replace("+00:00", "Z")
        pages = [r["query"]["page"] for r in app[REQUESTS] if r["query"]["since"] == since]
        assert pages and "1" not in pages
    assert await table(db) == source(records, EPOCH + dt.timedelta(days=20))
    assert await statuses(db) == {"done": 10}


async def test_two_workers_and_one_killed_complete_fifty_partitions_exactly(
    cli_env: dict[str, str], db: Connection, tmp_path: Path
) -> None:
    records = timed_records(600, every=dt.timedelta(hours=2))  # 50 days, 12 a day
    app = changes_app(records, latency=0.04)
    async with serve(app) as base:
        config = tmp_path / "events.toml"
        config.write_text(
            events_config(base, mode="append", per_page=4, batch_size=4, incremental=WINDOWED)
        )
        args = ["backfill", str(config), "--endpoint", "events", "--from", "2025-01-01"]
        args += ["--to", "2025-02-20", "--window", "1d", "--plan-only"]
        code, output = await run_cli(args, cli_env, tmp_path, "plan")
        assert code == ExitCode.OK and "planned 50 partitions (50 new)" in output, output
        assert await statuses(db) == {"pending": 50}

        worker = ["worker", str(config), "--drain", "--lease-seconds", "2", "--poll-seconds", "0.2"]
        victim = await spawn(worker, cli_env, tmp_path, "victim")
        survivors = [await spawn(worker, cli_env, tmp_path, f"worker{i}") for i in (1, 2)]

        async def victim_mid_partition() -> bool:
            count = await db.fetchval(
                "SELECT count(*) FROM ingest.partitions p JOIN ingest.checkpoints c "
                "USING (source, endpoint, partition) WHERE p.lease_owner LIKE $1 "
                "AND NOT c.done AND c.records > 0",
                f"%:{victim.pid}:%",
            )
            return bool(count)

        await wait_until(victim_mid_partition, what="the victim half-way through a partition")
        await victim.kill()
        orphaned = await db.fetch(
            "SELECT partition FROM ingest.partitions WHERE lease_owner LIKE $1",
            f"%:{victim.pid}:%",
        )
        assert orphaned
        for survivor in survivors:
            assert await survivor.wait(60) == ExitCode.OK, survivor.output()

    assert await statuses(db) == {"done": 50}
    assert await table(db) == source(records, EPOCH + dt.timedelta(days=50))
    taken_over = await db.fetch(
        "SELECT attempts FROM ingest.partitions WHERE partition = ANY($1::text[])",
        [row["partition"] for row in orphaned],
    )
    assert all(row["attempts"] >= 2 for row in taken_over)
    done_by = {
        row["run_id"] for row in await db.fetch("SELECT DISTINCT run_id FROM ingest.checkpoints")
    }
    assert len(done_by) >= 2  # both survivors finished partitions


async def test_a_worker_whose_lease_was_taken_commits_nothing_more_then_takes_it_back(
    database: str, db: Connection
) -> None:
    records = timed_records(200, every=dt.timedelta(hours=1))
    async with serve(changes_app(records, latency=0.03)) as base:
        loaded = parse_config(
            events_config(base, mode="append", per_page=4, batch_size=4, incremental=WINDOWED),
            Path("events.toml"),
        )
        plan = plan_windows(loaded.source.endpoint("events"), "2025-01-01", "2025-01-10", "9d")
        await leases.plan(db, source="shop", endpoint="events", windows=plan.windows)
        options = WorkerOptions(drain=True, concurrency=1, lease_seconds=30, poll_seconds=0.1)

        async def work() -> WorkerResult:
            redactor, observer = Redactor(), NullObserver()
            async with connected(loaded, database, redactor, pool_size=6, observer=observer) as (
                pool,
                http,
            ):
                return await Worker(loaded, pool, http, options, stop=asyncio.Event()).run()

        async def checkpointed() -> int:
            return int(
                await db.fetchval("SELECT coalesce(max(records), 0) FROM ingest.checkpoints")
            )

        async def some_committed() -> bool:
            return await checkpointed() >= 8

        worker = asyncio.create_task(work())
        await wait_until(some_committed, what="the worker committing")
        # Another worker takes the partition over (as if this one had missed its heartbeats).
        await db.execute(
            "UPDATE ingest.partitions SET lease_owner = 'thief', "
            "lease_expires_at = now() + interval '1 hour'"
        )
        at_takeover = await checkpointed()
        await asyncio.sleep(1.0)  # dozens of batch intervals: none of them may commit
        assert await checkpointed() == at_takeover
        assert len(await table(db)) == at_takeover

        # The thief dies in turn; its lease expires and the draining worker resumes the partition.
        await db.execute("UPDATE ingest.partitions SET lease_expires_at = now() - interval '1s'")
        result = await worker
    assert (result.lost, result.done, result.failed) == (1, 1, 0)
    assert await table(db) == source(records, EPOCH + dt.timedelta(days=9))
    assert await statuses(db) == {"done": 1}


async def test_backfill_writes_metrics_for_node_exporter(
    cli_env: dict[str, str], db: Connection, tmp_path: Path
) -> None:
    records = timed_records(72, every=dt.timedelta(hours=1))  # 3 days
    async with serve(changes_app(records)) as base:
        config = tmp_path / "events.toml"
        config.write_text(events_config(base, mode="append", per_page=5, incremental=WINDOWED))
        textfile = tmp_path / "ingest.prom"
        args = ["backfill", str(config), "--endpoint", "events", "--from", "2025-01-01"]
        args += ["--to", "2025-01-04", "--window", "1d", "--metrics-textfile", str(textfile)]
        code, output = await run_cli(args, cli_env, tmp_path, "metrics")
    assert code == ExitCode.OK, output
    assert len(await table(db)) == 72
    samples = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in textfile.read_text().splitlines()
        if line and not line.startswith("#")
    }
    records_total = [
        value for name, value in samples.items() if name.startswith("ingest_records_total")
    ]
    assert records_total == [72.0]
