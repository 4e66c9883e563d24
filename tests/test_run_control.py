"""Scheduled-run behaviour through the real CLI: the per-source lock, signals, dead letters."""

from __future__ import annotations

import asyncio
import datetime as dt
import signal
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest

from ingest.errors import ExitCode
from tests.processes import run_cli, spawn, wait_until
from tests.resume_servers import changes_app, events_config, timed_records
from tests.servers import REQUESTS, page_number_app, serve

Connection = asyncpg.Connection


async def committed(db: Connection) -> int:
    return int(await db.fetchval("SELECT coalesce(max(records), 0) FROM ingest.checkpoints"))


async def event_ids(db: Connection) -> list[int]:
    return [row["id"] for row in await db.fetch("SELECT id FROM events ORDER BY id")]


async def test_overlapping_run_of_the_same_source_exits_locked(
    cli_env: dict[str, str], db: Connection, tmp_path: Path
) -> None:
    records = timed_records(200, every=dt.timedelta(minutes=1))
    async with serve(changes_app(records, latency=0.1)) as base:
        config = tmp_path / "shop.toml"
        # One page at a time (2 s in all): the first run is still going when the second starts.
        config.write_text(events_config(base, per_page=10, pages_ahead=1))
        first = await spawn(["run", str(config)], cli_env, tmp_path, "first")
        await wait_until(lambda: committed_positive(db), what="first run committing")
        code, output = await run_cli(["run", str(config)], cli_env, tmp_path, "second", 30)
        assert code == int(ExitCode.LOCKED) == 3, output
        assert "source shop is already being run by another process" in output
        assert await first.wait(60) == ExitCode.OK, first.output()
    assert await event_ids(db) == list(range(1, 201))


async def committed_positive(db: Connection) -> bool:
    return await committed(db) > 0


@pytest.mark.parametrize("writers", [0, 2])
async def test_sigterm_commits_the_checkpoint_and_the_rerun_completes_exactly(
    cli_env: dict[str, str], db: Connection, tmp_path: Path, writers: int
) -> None:
    records = timed_records(300, every=dt.timedelta(minutes=1))
    app = changes_app(records, latency=0.1)
    async with serve(app) as base:
        config = tmp_path / "shop.toml"
        config.write_text(events_config(base, per_page=10, mode="append", writer_processes=writers))
        cli = await spawn(["run", str(config)], cli_env, tmp_path, "run")
        await wait_until(lambda: committed_positive(db), what="a committed batch")
        cli.signal(signal.SIGTERM)
        code = await cli.wait(20)
        assert code == int(ExitCode.INTERRUPTED) == 4, cli.output()
        assert "stopped by a signal after committing its checkpoint" in cli.output()
        checkpoint = await db.fetchrow("SELECT done, state, records FROM ingest.checkpoints")
        assert checkpoint is not None
        assert checkpoint["done"] is False and checkpoint["state"] is not None
        assert 0 < checkpoint["records"] < 300
        # Exactly the checkpointed rows, nothing fetched after the signal went unwritten or half.
        assert await event_ids(db) == list(range(1, checkpoint["records"] + 1))
        status = await db.fetchval("SELECT status FROM ingest.runs")
        assert status == "interrupted"
        code, output = await run_cli(["run", str(config)], cli_env, tmp_path, "rerun")
        assert code == ExitCode.OK, output
    assert await event_ids(db) == list(range(1, 301))


@pytest.mark.parametrize("writers", [0, 1])
async def test_second_signal_exits_at_once_and_the_checkpoint_still_holds(
    cli_env: dict[str, str], db: Connection, tmp_path: Path, writers: int
) -> None:
    """With a writer process too: the one blocked in its COPY is ended with the run."""
    records = timed_records(300, every=dt.timedelta(minutes=1))
    async with serve(changes_app(records, latency=0.05)) as base:
        config = tmp_path / "shop.toml"
        config.write_text(
            events_config(base, per_page=10, mode="append", consumers=1, writer_processes=writers)
        )
        cli = await spawn(["run", str(config)], cli_env, tmp_path, "run")
        await wait_until(lambda: committed_positive(db), what="a committed batch")
        # Block the writer: its next COPY waits on our lock, so a graceful stop cannot finish.
        # (SHARE mode lets asyncpg's introspection SELECT through and stops the COPY itself.)
        async with db.transaction():
            await db.execute("LOCK TABLE events IN SHARE MODE")
            before = await committed(db)
            await wait_until(lambda: copy_waiting(db), what="the COPY to wait on the lock")
            cli.signal(signal.SIGTERM)
            await wait_until(lambda: stop_logged(cli.stderr), what="the first signal logged")
            assert cli.process.returncode is None  # still waiting to flush
            cli.signal(signal.SIGINT)
            code = await cli.wait(15)
        assert code == ExitCode.INTERRUPTED, cli.output()
        assert "cancelled by a second signal" in cli.output()
        assert await committed(db) == before
        assert await event_ids(db) == list(range(1, before + 1))
        code, output = await run_cli(["run", str(config)], cli_env, tmp_path, "rerun")
        assert code == ExitCode.OK, output
    assert await event_ids(db) == list(range(1, 301))


async def copy_waiting(db: Connection) -> bool:
    """A writer is blocked inside its COPY: it asked for the table's write lock and waits."""
    waiting = await db.fetchval(
        "SELECT count(*) FROM pg_locks WHERE relation = 'events'::regclass "
        "AND mode = 'RowExclusiveLock' AND NOT granted"
    )
    return bool(waiting)


async def stop_logged(stderr: Path) -> bool:
    text = await asyncio.to_thread(stderr.read_text, errors="replace")
    return "signal_received_stopping" in text


BAD_RECORDS: list[dict[str, Any]] = [
    {"id": "abc", "name": "text in an integer column", "seen": "2025-01-01T00:00:00Z"},
    {"name": "no primary key", "seen": "2025-01-01T00:00:00Z"},
    {"id": 1002, "name": "bad timestamp", "seen": "yesterday-ish"},
]


def dead_letter_config(base: str) -> str:
    from tests.helpers import config_text  # noqa: PLC0415

    return config_text(
        base,
        records_path="data.items",
        params={"per_page": 5},
        pagination={"style": "page_number", "total_path": "meta.total"},
        columns={
            "id": {"path": "id", "type": "bigint"},
            "name": {"path": "name", "type": "text"},
            "seen": {"path": "seen", "type": "timestamptz"},
        },
        pipeline={"batch_size": 5},
    )


async def test_bad_records_go_to_dead_letters_and_the_limit_fails_the_run(
    cli_env: dict[str, str], db: Connection, tmp_path: Path
) -> None:
    good = [
        {"id": index, "name": f"good {index}", "seen": "2025-01-01T00:00:00Z"}
        for index in range(1, 21)
    ]
    records = [*good[:7], BAD_RECORDS[0], *good[7:14], *BAD_RECORDS[1:], *good[14:]]
    app = page_number_app(records)
    async with serve(app) as base:
        config = tmp_path / "items.toml"
        config.write_text(dead_letter_config(base))
        code, output = await run_cli(["run", str(config)], cli_env, tmp_path, "run")
        assert code == ExitCode.OK, output
        summary = [line.split() for line in output.splitlines() if line.startswith("items ")]
        assert summary and summary[0][2:4] == ["20", "3"], output  # records 20, dead 3
        run_id = await db.fetchval("SELECT run_id FROM ingest.runs")
        letters = await db.fetch(
            "SELECT run_id, source, endpoint, record, error FROM ingest.dead_letters ORDER BY id"
        )
        assert [orjson.loads(row["record"]) for row in letters] == BAD_RECORDS
        assert {(row["run_id"], row["source"], row["endpoint"]) for row in letters} == {
            (run_id, "test", "items")
        }
        assert [row["error"] for row in letters] == [
            "column id: 'abc' is not an integer",
            "column id: required value is missing",
            "column seen: 'yesterday-ish' is not an ISO 8601 timestamp",
        ]
        assert [row["id"] for row in await db.fetch("SELECT id FROM items ORDER BY id")] == [
            record["id"] for record in good
        ]

        code, output = await run_cli(
            ["run", str(config), "--restart", "--max-dead-letters", "2"], cli_env, tmp_path, "limit"
        )
        assert code == int(ExitCode.DEAD_LETTERS) == 5, output
        assert "3 records failed conversion, more than --max-dead-letters 2" in output
    assert len(app[REQUESTS]) >= 4
