"""The `ingest` command as a user runs it: a subprocess, real server, real database."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import asyncpg

from tests.helpers import config_text
from tests.processes import run_ingest
from tests.servers import REQUESTS, make_records, page_number_app, serve


async def test_run_prints_summary_and_second_merge_run_changes_nothing(
    tmp_path: Path, cli_env: dict[str, str], database: str
) -> None:
    records = make_records(57)
    app = page_number_app(records)
    async with serve(app) as base:
        config = tmp_path / "shop.toml"
        config.write_text(
            config_text(
                base,
                source={"headers": {"Authorization": "Bearer ${SHOP_TOKEN}"}},
                records_path="data.items",
                params={"per_page": 10},
                pagination={"style": "page_number", "total_path": "meta.total"},
            )
        )
        env = {**cli_env, "SHOP_TOKEN": "tok-8f3a9c1d2e7b"}
        code, out, err = await run_ingest("run", str(config), env=env)
        assert code == 0, err
        lines = out.splitlines()
        assert lines[0].startswith("writing to database ")  # named before anything is written
        assert lines[1].split() == ["endpoint", "pages", "records", "dead", "seconds", "records/s"]
        assert lines[2].split()[:4] == ["items", "6", "57", "0"]
        assert "retries: none" in out
        assert "tok-8f3a9c1d2e7b" not in out + err
        assert all(
            request["headers"]["Authorization"] == "Bearer tok-8f3a9c1d2e7b"
            for request in app[REQUESTS]
        )
        connection = await asyncpg.connect(database)
        try:
            before = await connection.fetch("SELECT id, name, _ingest_raw FROM items ORDER BY id")
            code, out, err = await run_ingest("run", str(config), env=env)
            assert code == 0, err
            after = await connection.fetch("SELECT id, name, _ingest_raw FROM items ORDER BY id")
        finally:
            await connection.close()
    assert len(before) == 57
    assert [tuple(r) for r in before] == [tuple(r) for r in after]


async def test_bad_config_exits_2_with_one_line(tmp_path: Path, cli_env: dict[str, str]) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(
        config_text(
            "http://127.0.0.1:9/api",
            pagination={"style": "page_number", "page_size": 0},
        )
    )
    code, out, err = await run_ingest("run", str(config), "--log-format", "console", env=cli_env)
    assert code == 2
    assert out == ""
    assert err.strip().splitlines() == [
        f"ingest: error: {config}: endpoint items: pagination.page_size: must be greater than 0"
    ]


def test_console_entry_returns_the_exit_code_with_the_collector_frozen_for_exit(
    tmp_path: Path,
) -> None:
    """The script's entry point (``ingest``, ``python -m ingest``) exits with main()'s code,
    and leaves the objects alive at exit out of the interpreter's final collections. In a
    child process: main() configures logging for the whole process."""
    config = tmp_path / "bad.toml"
    config.write_text("[source]\n")
    probe = (
        "import gc, sys; from ingest.cli import console; "
        f"sys.argv = ['ingest', 'run', {str(config)!r}]; "
        "code = console(); print(code, gc.get_freeze_count() > 0)"
    )
    done = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True)
    assert done.stdout.split() == ["2", "True"], done.stderr


def test_ingest_run_does_not_import_what_only_other_commands_or_flags_need() -> None:
    """Start-up is a fixed cost of every scheduled run (~0.6 s of a million-record run's ~3.5 s
    on the benchmark machine); these modules are imported by the command or flag that uses them."""
    probe = "import sys, ingest.cli, ingest.runner; print(' '.join(sorted(sys.modules)))"
    loaded = set(
        subprocess.run(
            [sys.executable, "-c", probe], check=True, capture_output=True, text=True
        ).stdout.split()
    )
    lazy = {"prometheus_client", "ingest.metrics", "ingest.backfill", "ingest.worker"}
    lazy |= {"ingest.status", "ingest.validate", "ingest.demo"}
    assert not lazy & loaded


async def test_missing_env_var_and_unreachable_database_are_one_line_errors(
    tmp_path: Path, cli_env: dict[str, str]
) -> None:
    config = tmp_path / "shop.toml"
    config.write_text(
        config_text(
            "http://127.0.0.1:9/api",
            source={"headers": {"X-Api-Key": "${MISSING_KEY}"}},
            pagination={"style": "single"},
        )
    )
    code, _, err = await run_ingest("run", str(config), env=cli_env)
    assert code == 2
    assert "environment variable MISSING_KEY is not set" in err
    assert len(err.strip().splitlines()) == 1

    env = {**cli_env, "MISSING_KEY": "k", "DATABASE_URL": "postgresql://u:pw-secret@127.0.0.1:9/x"}
    code, _, err = await run_ingest("run", str(config), "--log-format", "console", env=env)
    assert code == 1
    assert err.startswith(
        "ingest: error: cannot connect to PostgreSQL at postgresql://u@127.0.0.1:9/x"
    )
    assert "pw-secret" not in err
    assert len(err.strip().splitlines()) == 1


async def test_run_before_migrate_says_what_to_do(
    tmp_path: Path, cli_env: dict[str, str], empty_database: str
) -> None:
    config = tmp_path / "shop.toml"
    config.write_text(config_text("http://127.0.0.1:9/api", pagination={"style": "single"}))
    code, _, err = await run_ingest(
        "run", str(config), env={**cli_env, "DATABASE_URL": empty_database}
    )
    assert code == 2
    assert "run `ingest migrate` first" in err


async def test_demo_runs_against_the_given_database(cli_env: dict[str, str], database: str) -> None:
    code, out, err = await run_ingest("demo", "--users", "321", env=cli_env)
    assert code == 0, err
    assert "demo_users holds 321 rows" in out
    assert "demo-secret-token" not in out + err
    connection = await asyncpg.connect(database)
    try:
        assert await connection.fetchval("SELECT count(DISTINCT id) FROM demo_users") == 321
        assert await connection.fetchval("SELECT count(*) FROM demo_events") == 730
    finally:
        await connection.close()


async def test_malformed_dsn_is_a_one_line_error_without_the_password(
    cli_env: dict[str, str],
) -> None:
    code, out, err = await run_ingest(
        "migrate", "--dsn", "postgresql://u:hunter2pass@[::1", env=cli_env
    )
    assert code == 1
    assert err.startswith("ingest: error: cannot connect to PostgreSQL")
    assert "hunter2pass" not in out + err
    assert len(err.strip().splitlines()) == 1
