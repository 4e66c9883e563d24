"""How `ingest` ends, as a scheduler sees it: exit codes, what stdout and stderr say, the final
JSON event, the database named before writing, a closed stdout. Real CLI in a subprocess, real
PostgreSQL, real local HTTP servers; every failure is held where the test wants it."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest
from aiohttp import web

from ingest.errors import ExitCode
from tests.gated import HOLDING, RELEASE, gated_app, gated_config, wait_committed
from tests.helpers import config_text
from tests.processes import run_ingest, spawn, wait_until
from tests.servers import serve

Connection = asyncpg.Connection
CONSOLE = ("--log-format", "console")


def _database_name(dsn: str) -> str:
    return urlsplit(dsn).path.lstrip("/")


def _events(stderr: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


def _gated_config(base: str, path: Path) -> Path:
    path.write_text(config_text(base, **gated_config()))
    return path


def _refusing_app(status: int) -> web.Application:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(status=status, text='{"message": "Bad credentials"}')

    app = web.Application()
    app.router.add_get("/items", handler)
    return app


@pytest.mark.parametrize("status", [401, 403])
async def test_refused_credentials_exit_2_not_1(
    status: int, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    async with serve(_refusing_app(status)) as base:
        config = tmp_path / "shop.toml"
        config.write_text(config_text(base, pagination={"style": "single"}))
        code, _, err = await run_ingest("run", str(config), *CONSOLE, env=cli_env)
    assert code == 2, err
    assert f"HTTP {status}" in err.splitlines()[-1]
    assert err.splitlines()[-1].startswith("ingest: error: endpoint items: ")


async def test_missing_database_and_role_exit_2(
    cli_env: dict[str, str], database: str, tmp_path: Path
) -> None:
    parts = urlsplit(database)
    missing_db = parts._replace(path="/no_such_db_for_ingest").geturl()
    code, _, err = await run_ingest("migrate", "--dsn", missing_db, env=cli_env)
    assert code == 2, err
    assert 'database "no_such_db_for_ingest" does not exist' in err
    assert err.startswith("ingest: error: PostgreSQL at ")

    netloc = parts.netloc.split("@", 1)[-1]
    missing_role = parts._replace(netloc=f"nobody_ingest:pw-9f8e7d@{netloc}").geturl()
    config = tmp_path / "shop.toml"
    config.write_text(config_text("http://127.0.0.1:9/api", pagination={"style": "single"}))
    code, _, err = await run_ingest(
        "run", str(config), "--dsn", missing_role, *CONSOLE, env=cli_env
    )
    assert code == 2, err
    assert 'role "nobody_ingest" does not exist' in err
    assert "pw-9f8e7d" not in err
    # The DSN-less variant (PG* variables) names the same role: the server's words, not ours.


async def test_validate_gives_a_missing_database_the_same_code(
    tmp_path: Path, cli_env: dict[str, str], database: str
) -> None:
    missing_db = urlsplit(database)._replace(path="/no_such_db_for_ingest").geturl()
    async with serve(gated_app(5)) as base:
        config = _gated_config(base, tmp_path / "shop.toml")
        code, out, err = await run_ingest("validate", str(config), "--dsn", missing_db, env=cli_env)
    assert code == 2, out + err
    assert 'database "no_such_db_for_ingest" does not exist' in out


async def test_unreachable_database_stays_1(cli_env: dict[str, str]) -> None:
    """A server that does not answer may answer later: still "retry"."""
    code, _, err = await run_ingest("migrate", "--dsn", "postgresql://u@127.0.0.1:9/x", env=cli_env)
    assert code == 1, err


async def test_failed_run_prints_its_table_and_status(
    tmp_path: Path, cli_env: dict[str, str], db: Connection
) -> None:
    """Two pages committed, the third held, then refused with a 400: a failure after progress."""
    app = gated_app(50, hold_at=3, fail_at=3)
    async with serve(app) as base:
        config = _gated_config(base, tmp_path / "shop.toml")
        cli = await spawn(["run", str(config), "--log-format", "console"], cli_env, tmp_path, "run")
        await wait_committed(db, 20)
        app[RELEASE].set()
        code = await cli.wait(60)
    out, err = cli.stdout.read_text(), cli.stderr.read_text()
    assert code == ExitCode.FAILED, out + err
    run = await db.fetchrow("SELECT run_id, status FROM ingest.runs")
    assert run is not None and run["status"] == "failed"
    lines = out.splitlines()
    assert lines[0].startswith("writing to database ")
    assert lines[1].split() == ["endpoint", "pages", "records", "dead", "seconds", "records/s"]
    assert lines[2].split()[:4] == ["items", "2", "20", "0"]
    assert lines[-1] == f"run {run['run_id']}: failed"
    assert err.splitlines()[-1].startswith("ingest: error: endpoint items: ")
    assert "HTTP 400" in err.splitlines()[-1]


async def test_failed_run_in_json_mode_ends_with_one_structured_event(
    tmp_path: Path, cli_env: dict[str, str], db: Connection
) -> None:
    app = gated_app(30, fail_at=2)
    async with serve(app) as base:
        config = _gated_config(base, tmp_path / "shop.toml")
        code, out, err = await run_ingest("run", str(config), "--log-format", "json", env=cli_env)
    assert code == ExitCode.FAILED, err
    run_id = str(await db.fetchval("SELECT run_id FROM ingest.runs"))
    assert out.splitlines()[-1] == f"run {run_id}: failed"
    assert not [line for line in err.splitlines() if not line.startswith("{")], err
    final = _events(err)[-1]
    assert final["event"] == "run_finished"
    assert final["run_id"] == run_id and final["source"] == "test"
    assert (final["status"], final["exit_code"], final["recorded"]) == ("failed", 1, True)
    assert "HTTP 400" in final["error"]
    assert final["level"] == "error"


async def test_successful_run_in_json_mode_ends_with_run_finished(
    tmp_path: Path, cli_env: dict[str, str], db: Connection
) -> None:
    async with serve(gated_app(25)) as base:
        config = _gated_config(base, tmp_path / "shop.toml")
        code, out, err = await run_ingest("run", str(config), env=cli_env)  # auto: not a TTY
    assert code == 0, err
    run_id = str(await db.fetchval("SELECT run_id FROM ingest.runs"))
    final = _events(err)[-1]
    assert final["event"] == "run_finished"
    assert (final["run_id"], final["status"], final["exit_code"]) == (run_id, "succeeded", 0)
    assert final["error"] is None
    # Every event of the run carries the same id, including those before the run was recorded.
    assert {event.get("run_id") for event in _events(err)} == {run_id}
    assert out.splitlines()[-1] == f"run {run_id}: succeeded"


async def test_interrupted_run_reports_itself_and_its_signal_event_names_the_run(
    tmp_path: Path, cli_env: dict[str, str], db: Connection
) -> None:
    app = gated_app(50, hold_at=3)
    async with serve(app) as base:
        config = _gated_config(base, tmp_path / "shop.toml")
        cli = await spawn(["run", str(config), "--log-format", "json"], cli_env, tmp_path, "run")
        await wait_committed(db, 20)
        await asyncio.wait_for(app[HOLDING].wait(), 30)
        cli.signal(signal.SIGTERM)

        async def stop_logged() -> bool:
            text = await asyncio.to_thread(cli.stderr.read_text, errors="replace")
            return "signal_received_stopping" in text

        await wait_until(stop_logged, what="the signal to be logged")
        app[RELEASE].set()
        code = await cli.wait(60)
    out, err = cli.stdout.read_text(), cli.stderr.read_text()
    assert code == ExitCode.INTERRUPTED, out + err
    run_id = str(await db.fetchval("SELECT run_id FROM ingest.runs WHERE status = 'interrupted'"))
    assert out.splitlines()[-1] == f"run {run_id}: interrupted"
    assert out.splitlines()[1].split()[0] == "endpoint"
    events = _events(err)
    stopping = next(event for event in events if event["event"] == "signal_received_stopping")
    assert (stopping["run_id"], stopping["source"]) == (run_id, "test")
    final = events[-1]
    assert (final["event"], final["status"], final["exit_code"]) == (
        "run_finished",
        "interrupted",
        4,
    )
    assert final["level"] == "warning"


async def test_locked_source_exits_3_without_error(
    tmp_path: Path, cli_env: dict[str, str], db: Connection
) -> None:
    config = tmp_path / "shop.toml"
    config.write_text(config_text("http://127.0.0.1:9/api", pagination={"style": "single"}))
    await db.execute("SELECT pg_advisory_lock(hashtextextended('ingest:source:test', 0))")
    try:
        code, out, err = await run_ingest("run", str(config), *CONSOLE, env=cli_env)
        assert code == 3, err
        assert err.strip().splitlines() == [
            "ingest: skipped: source test is already being run by another process "
            "(advisory lock held); try again when it finishes"
        ]
        assert "run " not in out  # nothing ran, nothing recorded
        code, _, err = await run_ingest("run", str(config), env=cli_env)
        assert code == 3
        final = _events(err)[-1]
        assert (final["status"], final["recorded"], final["level"]) == ("skipped", False, "warning")
    finally:
        await db.execute("SELECT pg_advisory_unlock_all()")
    assert await db.fetchval("SELECT count(*) FROM ingest.runs") == 0


async def test_migrate_and_run_name_the_database_never_the_password(
    tmp_path: Path, cli_env: dict[str, str], empty_database: str
) -> None:
    parts = urlsplit(empty_database)
    user, _, host = parts.netloc.rpartition("@")
    with_password = parts._replace(netloc=f"{user.split(':')[0]}:hunter2-pw@{host}").geturl()
    env = {**cli_env, "DATABASE_URL": with_password}
    code, out, err = await run_ingest("migrate", env=env)
    assert code == 0, err
    name = _database_name(empty_database)
    first, second = out.splitlines()[:2]
    assert first.startswith(f"writing to database {name} on ") and first.endswith(" as postgres")
    assert second.startswith("applied: ")
    async with serve(gated_app(5)) as base:
        config = _gated_config(base, tmp_path / "shop.toml")
        code, out, err = await run_ingest("run", str(config), env=env)
    assert code == 0, err
    assert out.splitlines()[0] == first
    assert "hunter2-pw" not in out + err


async def test_closed_stdout_ends_quietly_and_the_load_completes(
    cli_env: dict[str, str], db: Connection
) -> None:
    """The reader is gone before the first line (the hardest case): every write fails with
    EPIPE, the demo still loads everything, exits 0 and says nothing on stderr."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "ingest", "demo", "--users", "123", "--log-level", "warning"],
            env=cli_env,
            stdout=write_end,
            stderr=subprocess.PIPE,
            timeout=120,
            check=False,
        )
    finally:
        os.close(write_end)
    assert done.returncode == 0, done.stderr
    assert done.stderr.decode() == ""
    assert await db.fetchval("SELECT count(*) FROM demo_users") == 123

    # As a user types it: `ingest demo | head -2` (bash, with pipefail so ingest's code counts).
    shell = await asyncio.to_thread(
        subprocess.run,
        ["bash", "-c", f"set -o pipefail; {sys.executable} -m ingest demo --users 50 | head -2"],
        env=cli_env,
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert shell.returncode == 0, shell.stderr
    assert len(shell.stdout.decode().splitlines()) == 2
    assert "BrokenPipe" not in shell.stderr.decode()
    assert "error" not in shell.stderr.decode().lower()
