"""A PostgreSQL restart in the middle of a run: the run's lock dies with its session.

The tests start a PostgreSQL cluster of their own (:mod:`tests.pg_cluster`) and restart it for
real (``pg_ctl stop -m fast`` then ``start``) while the server holds the run between batches,
so the restart lands where the test wants it, never by chance.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from ingest.errors import ExitCode
from ingest.migrate import migrate
from tests.helpers import final_error
from tests.pg_cluster import Cluster, cluster
from tests.processes import run_cli, spawn, wait_until
from tests.resume_servers import Valve, changes_app, events_config, timed_records
from tests.resume_servers import events_table as table
from tests.servers import serve

ROOT = Path(__file__).resolve().parent.parent
Connection = asyncpg.Connection


@pytest.fixture
def restartable() -> Iterator[Cluster]:
    with cluster() as server:
        yield server


@pytest.fixture
async def dsn(restartable: Cluster) -> AsyncIterator[str]:
    connection = await asyncpg.connect(restartable.dsn)
    try:
        await migrate(connection)
    finally:
        await connection.close()
    yield restartable.dsn


def environment(dsn: str) -> dict[str, str]:
    env = {
        key: value for key, value in os.environ.items() if not key.startswith(("PG", "DATABASE"))
    }
    return {**env, "DATABASE_URL": dsn, "PYTHONPATH": str(ROOT)}


async def query(dsn: str, sql: str) -> Any:
    connection = await asyncpg.connect(dsn)
    try:
        return await connection.fetch(sql)
    finally:
        await connection.close()


async def committed(dsn: str) -> int:
    rows = await query(dsn, "SELECT coalesce(max(records), 0) AS n FROM ingest.checkpoints")
    return int(rows[0]["n"])


def source(records: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [(r["id"], r["name"], r["amount"], r["updated_at"]) for r in records]


@pytest.mark.parametrize("writers", [0, 1])
async def test_a_restart_between_batches_stops_the_run_cleanly_and_the_rerun_is_exact(
    restartable: Cluster, dsn: str, tmp_path: Path, writers: int
) -> None:
    records = timed_records(200, every=dt.timedelta(minutes=1))
    valve = Valve()
    env = environment(dsn)
    async with serve(changes_app(records, valve=valve)) as base:
        config = tmp_path / "events.toml"
        config.write_text(
            events_config(
                base,
                mode="append",
                per_page=10,
                batch_size=20,
                consumers=1,
                writer_processes=writers,
            )
        )
        await valve.close()
        await valve.allow(4)  # two batches, then the run waits for page 5
        cli = await spawn(["run", str(config)], env, tmp_path, "restarted")

        async def held_after_two_batches() -> bool:
            return valve.waiting > 0 and await committed(dsn) == 40

        await wait_until(held_after_two_batches, 60, "two commits, then a held fetch")
        await restartable.restart()
        await valve.open()
        code = await cli.wait(120)
        output = cli.output()
        assert code == ExitCode.FAILED, output
        assert "Traceback" not in output, output
        last = final_error(cli.stderr.read_text())
        # In process, the next batch finds the lock gone; a writer process finds its own
        # connection gone first.
        if writers:
            assert last.startswith("endpoint events: writing a batch of "), output
            assert "failed (ConnectionDoesNotExistError: " in last, output
        else:
            assert last.startswith("source shop: the run lost its lock"), output
        assert last.endswith("rerun to resume"), output
        # Nothing was written once the lock was gone; the run says it failed.
        assert await committed(dsn) == 40
        runs = await query(dsn, "SELECT status, error FROM ingest.runs")
        assert [(row["status"], row["error"]) for row in runs] == [("failed", last)]
        code, output = await run_cli(["run", str(config)], env, tmp_path, "rerun")
        assert code == ExitCode.OK, output
    connection = await asyncpg.connect(dsn)
    try:
        assert await table(connection) == source(records)  # append mode: no row twice
    finally:
        await connection.close()


@pytest.mark.parametrize("writers", [0, 1])
async def test_a_run_whose_lock_session_ended_commits_nothing_more_while_another_holds_it(
    cli_env: dict[str, str], database: str, db: Connection, tmp_path: Path, writers: int
) -> None:
    """The lock's session is terminated and another holder takes the lock: the run's next
    batch must not commit, though its own batch connections are alive and well."""
    records = timed_records(200, every=dt.timedelta(minutes=1))
    valve = Valve()
    async with serve(changes_app(records, valve=valve)) as base:
        config = tmp_path / "events.toml"
        config.write_text(
            events_config(
                base,
                mode="append",
                per_page=10,
                batch_size=20,
                consumers=1,
                writer_processes=writers,
            )
        )
        await valve.close()
        await valve.allow(4)
        cli = await spawn(["run", str(config)], cli_env, tmp_path, "terminated")

        async def held_after_two_batches() -> bool:
            return valve.waiting > 0 and await committed(database) == 40

        await wait_until(held_after_two_batches, 60, "two commits, then a held fetch")
        holder = await db.fetchval(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND mode = 'ExclusiveLock' "
            "AND granted AND database = (SELECT oid FROM pg_database "
            "WHERE datname = current_database())"
        )
        assert await db.fetchval("SELECT pg_terminate_backend($1, 5000)", holder)
        # Another run of the source (this test, here) takes the lock the run has lost.
        assert await db.fetchval(
            "SELECT pg_try_advisory_lock(hashtextextended('ingest:source:shop', 0))"
        )
        await valve.open()
        code = await cli.wait(120)
        output = cli.output()
        assert code == ExitCode.FAILED, output
        assert "Traceback" not in output, output
        last = final_error(cli.stderr.read_text())
        assert last.startswith("source shop: the run lost its lock"), output
        assert await committed(database) == 40
        assert await db.fetchval("SELECT count(*) FROM events") == 40
        assert await db.fetchval("SELECT status FROM ingest.runs") == "failed"
        await db.execute("SELECT pg_advisory_unlock(hashtextextended('ingest:source:shop', 0))")
        code, output = await run_cli(["run", str(config)], cli_env, tmp_path, "rerun")
        assert code == ExitCode.OK, output
    assert await table(db) == source(records)


async def test_a_server_down_when_the_run_writes_is_one_clean_line_and_the_rerun_is_exact(
    restartable: Cluster, dsn: str, tmp_path: Path
) -> None:
    records = timed_records(100, every=dt.timedelta(minutes=1))
    valve = Valve()
    env = environment(dsn)
    async with serve(changes_app(records, valve=valve)) as base:
        config = tmp_path / "events.toml"
        config.write_text(
            events_config(base, mode="append", per_page=10, batch_size=20, consumers=1)
        )
        await valve.close()
        await valve.allow(2)
        cli = await spawn(["run", str(config)], env, tmp_path, "down")

        async def held_after_a_batch() -> bool:
            return valve.waiting > 0 and await committed(dsn) == 20

        await wait_until(held_after_a_batch, 60, "a commit, then a held fetch")
        await asyncio.to_thread(restartable.stop)
        await valve.open()
        code = await cli.wait(120)
        output = cli.output()
        assert code == ExitCode.FAILED, output
        assert "Traceback" not in output, output
        last = final_error(cli.stderr.read_text())
        assert last.startswith("endpoint events: writing a batch of "), output
        assert last.endswith("the last checkpoint holds: rerun to resume"), output
        assert "run_record_not_saved" in output  # it could not say so in ingest.runs
        await asyncio.to_thread(restartable.start)
        assert await committed(dsn) == 20
        code, output = await run_cli(["run", str(config)], env, tmp_path, "rerun")
        assert code == ExitCode.OK, output
    connection = await asyncpg.connect(dsn)
    try:
        assert await table(connection) == source(records)
    finally:
        await connection.close()
