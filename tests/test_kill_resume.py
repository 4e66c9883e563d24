"""Exactly-once effect under crashes: SIGKILL at random moments, and a backend killed mid-COPY.

Each kill test runs ``python -m ingest run`` as a real process against a local server with small
pages and latency, SIGKILLs it at a seeded random moment at least ten times (while it fetches,
COPYs, merges or commits), resumes it each time, and finally compares the table with the source
row by row: nothing missing, nothing duplicated, in append mode as well as merge mode.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import random
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from ingest.config import parse_config
from ingest.errors import ExitCode, SinkError
from ingest.writer_process import APPLICATION_NAME
from tests.helpers import run
from tests.processes import Cli, run_cli, spawn, wait_until
from tests.resume_servers import Valve, changes_app, events_config, timed_records
from tests.resume_servers import events_table as table
from tests.servers import REQUESTS, serve

Connection = asyncpg.Connection

KILLS = 10
RECORDS = 1500
INCREMENTAL = """
[endpoints.incremental]
cursor_path = "updated_at"
param = "since"
start = "2024-12-31T00:00:00Z"
"""


def source(records: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [(r["id"], r["name"], r["amount"], r["updated_at"]) for r in records]


async def writers_connected(db: Connection, since: Any) -> int:
    """Writer processes (ingest.offload) connected since ``since``."""
    return int(
        await db.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 "
            "AND backend_start > $2",
            APPLICATION_NAME,
            since,
        )
    )


async def committed(db: Connection) -> int:
    return int(await db.fetchval("SELECT coalesce(max(records), 0) FROM ingest.checkpoints"))


@pytest.mark.parametrize(
    ("mode", "seed", "writers"),
    # With writers in append mode only: a duplicate shows there as a second row (merge mode
    # with writers is killed in each phase below).
    [("append", 20251, 0), ("merge", 20252, 0), ("append", 20253, 2)],
)
async def test_sigkill_at_random_moments_then_resume_loses_and_duplicates_nothing(  # noqa: PLR0917
    cli_env: dict[str, str], db: Connection, tmp_path: Path, mode: str, seed: int, writers: int
) -> None:
    """With writer processes too: the run's process dies, its writers are left to notice."""
    rng = random.Random(seed)
    # Each run with writers fetches ahead while they start: a longer walk keeps kills inside it.
    total = RECORDS * 2 if writers else RECORDS
    records = timed_records(total, every=dt.timedelta(minutes=1))
    app = changes_app(records, latency=0.06 if writers else 0.04)
    progress: list[int] = []
    async with serve(app) as base:
        config = tmp_path / "events.toml"
        config.write_text(
            events_config(
                base,
                mode=mode,
                per_page=10,
                batch_size=20,
                incremental=INCREMENTAL,
                writer_processes=writers,
                # Paced for a page at a time: kills at random moments land inside the walk.
                # (A prefetching run stopped and resumed: test_http_prefetch.)
                pages_ahead=1,
            )
        )
        while len(progress) < KILLS:
            asked = len(app[REQUESTS])
            spawned = await db.fetchval("SELECT clock_timestamp()")
            cli = await spawn(["run", str(config)], cli_env, tmp_path, f"run{len(progress)}")

            async def fetching(asked: int = asked, cli: Cli = cli, since: Any = spawned) -> bool:
                if cli.process.returncode is not None:
                    return True
                # Writer processes start an interpreter each before the first batch can commit.
                return len(app[REQUESTS]) > asked and await writers_connected(db, since) >= writers

            await wait_until(fetching, 60, "the run to start fetching")
            await asyncio.sleep(rng.uniform(0.0, 0.5))
            assert cli.process.returncode is None, f"run finished before kill:\n{cli.output()}"
            await cli.kill()
            progress.append(await committed(db))
        code, output = await run_cli(["run", str(config)], cli_env, tmp_path, "final")
        assert code == ExitCode.OK, output

    assert await table(db) == source(records)
    # The kills landed all along the walk, not only before the first commit.
    assert progress == sorted(progress)
    assert len({count for count in progress if 0 < count < total}) >= 5, progress
    # Ten runs died without a word; the eleventh finished and set the high-water mark.
    statuses = [row["status"] for row in await db.fetch("SELECT status FROM ingest.runs")]
    assert sorted(statuses) == ["running"] * KILLS + ["succeeded"]
    high_water = await db.fetchval("SELECT value FROM ingest.cursors")
    assert high_water == records[-1]["updated_at"].replace("Z", "+00:00")


async def blocked_on(db: Connection, table: str, mode: str) -> bool:
    """Some backend asked for ``mode`` on ``table`` and waits: the test's lock holds it there."""
    waiting = await db.fetchval(
        "SELECT count(*) FROM pg_locks WHERE relation = $1::regclass AND mode = $2 AND NOT granted",
        table,
        mode,
    )
    return bool(waiting)


@pytest.mark.parametrize(("mode", "writers"), [("append", 0), ("merge", 0), ("merge", 2)])
async def test_sigkill_in_each_phase_of_a_batch_then_resume_is_exact(
    cli_env: dict[str, str], db: Connection, tmp_path: Path, mode: str, writers: int
) -> None:
    """Deterministic kills: mid-fetch, mid-COPY (merge: mid-upsert), between COPY and commit.

    Locks taken by the test hold the run at each point: a SHARE lock on the target table stops
    the COPY (append) or the upsert (merge) inside the batch transaction; an EXCLUSIVE lock on
    ``ingest.checkpoints`` stops the transaction after its rows are written, just before commit.
    The server lets each run fetch one batch's pages, then holds the next ones until the test's
    lock is in place: the run can never finish its walk before the test is ready for it.
    """
    records = timed_records(400, every=dt.timedelta(minutes=1))
    valve = Valve()
    app = changes_app(records, latency=0.01, valve=valve)
    async with serve(app) as base:
        config = tmp_path / "events.toml"
        config.write_text(
            events_config(base, mode=mode, per_page=10, batch_size=20, writer_processes=writers)
        )
        phases = ["fetch", "copy", "before_commit"]
        for index, phase in enumerate(phases):
            before = await committed(db)
            await valve.close()
            await valve.allow(2)  # one batch: 2 pages of 10
            cli = await spawn(["run", str(config)], cli_env, tmp_path, f"{phase}{index}")

            async def moved_on(before: int = before) -> bool:
                return await committed(db) > before

            await wait_until(moved_on, 60, "a commit by this run")
            if phase == "fetch":

                async def held() -> bool:
                    return valve.waiting > 0

                await wait_until(held, what="a fetch held by the server")
                await cli.kill()
                await valve.release_held()
                continue
            target, lock = (
                ("events", "SHARE") if phase == "copy" else ("ingest.checkpoints", "EXCLUSIVE")
            )
            async with db.transaction():
                await db.execute(f"LOCK TABLE {target} IN {lock} MODE")
                await valve.allow(2)  # the next batch, which the lock stops

                async def stuck(target: str = target) -> bool:
                    return await blocked_on(db, target, "RowExclusiveLock")

                await wait_until(stuck, what=f"the batch transaction to wait on {target}")
                await cli.kill()
            await valve.release_held()
        await valve.open()
        code, output = await run_cli(["run", str(config)], cli_env, tmp_path, "final")
        assert code == ExitCode.OK, output
    assert await table(db) == source(records)


@pytest.mark.parametrize("writers", [0, 1])
async def test_backend_killed_mid_copy_fails_clearly_and_the_next_run_is_exact(
    database: str, db: Connection, writers: int
) -> None:
    records = timed_records(300, every=dt.timedelta(minutes=1))
    async with serve(changes_app(records, latency=0.02)) as base:
        text = events_config(
            base, mode="append", per_page=10, consumers=1, writer_processes=writers
        )
        loaded = parse_config(text, Path("events.toml"))
        task = asyncio.create_task(run(loaded, database))

        async def some_committed() -> bool:
            return await committed(db) > 0

        await wait_until(some_committed, what="a committed batch")
        async with db.transaction():
            # SHARE mode stops the COPY itself (it needs ROW EXCLUSIVE) while it is under way.
            await db.execute("LOCK TABLE events IN SHARE MODE")
            before = await committed(db)
            blocked = (
                "SELECT pid FROM pg_locks WHERE relation = 'events'::regclass "
                "AND mode = 'RowExclusiveLock' AND NOT granted"
            )

            async def copying() -> bool:
                return bool(await db.fetchval(blocked))

            await wait_until(copying, what="the COPY to be under way")
            pid = await db.fetchval(blocked)
            assert await db.fetchval("SELECT pg_terminate_backend($1)", pid)
        with pytest.raises(SinkError) as failure:
            await task
        message = str(failure.value)
        assert message.startswith("endpoint events: writing a batch of 20 rows to public.events")
        assert "nothing of it was committed and the last checkpoint holds" in message
        assert "\n" not in message
        run_row = await db.fetchrow("SELECT status, error FROM ingest.runs")
        assert run_row is not None
        assert run_row["status"] == "failed" and run_row["error"] == message
        assert await committed(db) == before
        assert [row[0] for row in await table(db)] == list(range(1, before + 1))

        result = await run(loaded, database)
    assert result.endpoints["events"].resumed
    assert await table(db) == source(records)
