"""Writer processes (``pipeline.writer_processes``): failures, secrets and the commit lock.

Their exactly-once effect under SIGKILLs of the run's process is proven with the other kill
tests (tests/test_kill_resume.py runs them with writers too), their rows and dead letters
against the in-process path in tests/test_typed.py, child endpoints in tests/test_incremental.py.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
from pathlib import Path

import asyncpg
import pytest

from ingest.errors import ExitCode
from ingest.state import hold_commits_shared, wait_for_commits
from tests.processes import run_cli, spawn, wait_until
from tests.resume_servers import changes_app, events_config, timed_records
from tests.resume_servers import events_table as table
from tests.servers import serve

Connection = asyncpg.Connection


def command_line(pid: int) -> bytes:
    return Path(f"/proc/{pid}/cmdline").read_bytes()


def writer_pids(parent: int) -> list[int]:
    """The writer processes among ``parent``'s children (Linux /proc)."""
    children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    return [int(pid) for pid in children if b"ingest.writer_process" in command_line(int(pid))]


def with_password(dsn: str, password: str) -> str:
    """The DSN with a password in it (the test server trusts every connection anyway)."""
    scheme, _, rest = dsn.partition("://")
    user, _, host = rest.partition("@")
    return f"{scheme}://{user.split(':')[0]}:{password}@{host}"


async def test_a_writer_killed_mid_run_fails_the_run_in_one_line_and_the_rerun_is_exact(
    cli_env: dict[str, str], db: Connection, tmp_path: Path
) -> None:
    password = "writer-secret-9f2c"
    env = {**cli_env, "DATABASE_URL": with_password(cli_env["DATABASE_URL"], password)}
    records = timed_records(600, every=dt.timedelta(minutes=1))
    async with serve(changes_app(records, latency=0.03)) as base:
        config = tmp_path / "events.toml"
        config.write_text(
            events_config(base, mode="append", per_page=10, batch_size=20, writer_processes=2)
        )
        cli = await spawn(["run", str(config)], env, tmp_path, "run")

        async def committed_some() -> bool:
            return bool(await db.fetchval("SELECT count(*) FROM ingest.checkpoints"))

        await wait_until(committed_some, 60, "a committed batch")
        pids = writer_pids(cli.pid)
        assert len(pids) == 2, pids
        for pid in pids:  # the DSN travels through the pipe, never on a command line
            assert password.encode() not in command_line(pid)
        os.kill(pids[0], signal.SIGKILL)  # a process this test's child started
        code = await cli.wait(60)
        output = cli.output()
        assert code == ExitCode.FAILED, output
        # JSON logs (stdout is not a terminal): the run ends with one run_finished event.
        final = json.loads(cli.stderr.read_text().splitlines()[-1])
        assert (final["event"], final["status"], final["exit_code"]) == (
            "run_finished",
            "failed",
            1,
        )
        assert f"writer process {pids[0]} ended while" in final["error"]
        assert "nothing of its batch was committed unless its checkpoint says so" in final["error"]
        assert "ingest: error:" not in output
        assert password not in output
        # Exactly the checkpointed rows: none of the killed writer's batch, none twice.
        done = await db.fetchval("SELECT records FROM ingest.checkpoints")
        assert 0 < done < 600
        expected = [(r["id"], r["name"], r["amount"], r["updated_at"]) for r in records]
        assert await table(db) == expected[:done]
        assert await db.fetchval("SELECT status FROM ingest.runs") == "failed"
        code, output = await run_cli(["run", str(config)], env, tmp_path, "rerun")
        assert code == ExitCode.OK, output
        assert password not in output
    assert await table(db) == expected


async def test_a_new_run_waits_for_writer_transactions_of_an_earlier_run(
    database: str, db: Connection
) -> None:
    """A writer told to commit just before its run died may still be committing."""
    other = await asyncpg.connect(database)
    try:
        async with db.transaction():
            await hold_commits_shared(db, "shop")
            assert not await wait_for_commits(other, "shop", seconds=0.2)
            assert await wait_for_commits(other, "elsewhere", seconds=0.2)
        assert await wait_for_commits(other, "shop", seconds=0.2)
    finally:
        await other.close()


@pytest.mark.parametrize(("mode", "writers"), [("append", 2), ("merge", 2), ("merge", 1)])
async def test_writer_processes_land_the_same_table_as_one_process(
    cli_env: dict[str, str], db: Connection, tmp_path: Path, mode: str, writers: int
) -> None:
    """One writer for two consumers too: batches borrow writers in order, or the batch that
    holds the only writer could wait for its turn behind a batch that waits for a writer."""
    records = timed_records(250, every=dt.timedelta(minutes=1))
    async with serve(changes_app(records)) as base:
        config = tmp_path / "events.toml"
        config.write_text(
            events_config(base, mode=mode, per_page=10, consumers=2, writer_processes=writers)
        )
        code, output = await run_cli(["run", str(config)], cli_env, tmp_path, "run")
        assert code == ExitCode.OK, output
        summary = [line.split() for line in output.splitlines() if line.startswith("events ")]
        assert summary and summary[0][1:3] == ["25", "250"], output
        assert '"typed_pages":25' in output  # converted by the writers' typed decoders
    expected = [(r["id"], r["name"], r["amount"], r["updated_at"]) for r in records]
    assert await table(db) == expected
    checkpoint = await db.fetchrow("SELECT done, records, pages FROM ingest.checkpoints")
    assert checkpoint is not None
    assert tuple(checkpoint) == (True, 250, 25)
