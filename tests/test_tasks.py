"""ingest.tasks (in-process runs for schedulers) and the exit-code -> Airflow outcome mapping,
without Airflow installed: tests/test_airflow.py runs the same code in a real Airflow."""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path

import asyncpg

from ingest.airflow import outcome
from ingest.errors import ExitCode
from ingest.state import lock_key
from ingest.tasks import TaskSettings, plan_backfill_task, run_partition_task, run_source_task
from tests.resume_servers import changes_app, events_config, timed_records
from tests.resume_servers import events_table as table
from tests.servers import serve

WINDOWED = """
[endpoints.incremental]
cursor_path = "updated_at"
param = "since"
end_param = "until"
"""


def test_exit_codes_map_to_airflow_outcomes() -> None:
    assert [outcome(code) for code in ExitCode] == [
        "success",  # 0
        "retry",  # 1 failed: retry later
        "fail",  # 2 config
        "skipped",  # 3 locked
        "retry",  # 4 interrupted
        "fail",  # 5 dead letters
        "fail",  # 6 unhealthy (ingest status checks)
    ]
    assert outcome(7) == "retry"  # a code this version does not know: Airflow's retries bound it
    assert outcome(1, {"final": True}) == "fail"  # a partition out of attempts
    assert outcome(0, {"final": True}) == "success"


async def test_tasks_return_codes_and_summaries(
    database: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    records = timed_records(48, every=dt.timedelta(hours=1))
    async with serve(changes_app(records)) as base:
        config = tmp_path / "shop.toml"
        config.write_text(events_config(base, mode="append", per_page=10, incremental=WINDOWED))
        settings = TaskSettings(dsn=database)

        code, summary = await asyncio.to_thread(
            plan_backfill_task,
            str(config),
            "events",
            "2025-01-01",
            "2025-01-03",
            "1d",
            settings=settings,
        )
        assert code == ExitCode.OK, summary
        assert summary["planned"] == 2 and summary["new"] == 2
        first, _ = summary["keys"]
        code, summary = await asyncio.to_thread(
            run_partition_task, str(config), "events", first, settings=settings
        )
        assert (code, summary["status"], summary["records"]) == (0, "done", 24), summary
        code, summary = await asyncio.to_thread(
            run_partition_task, str(config), "events", first, settings=settings
        )
        assert (code, summary["records"]) == (0, 0)  # done already: nothing written twice
        code, summary = await asyncio.to_thread(
            run_partition_task, str(config), "events", "1/2", settings=settings
        )
        assert code == ExitCode.CONFIG and "never planned" in summary["error"], summary
        assert len(await table(db)) == 24

        await db.execute("SELECT pg_advisory_lock(hashtextextended($1, 0))", lock_key("shop"))
        code, summary = await asyncio.to_thread(run_source_task, str(config), settings=settings)
        assert code == ExitCode.LOCKED and "already being run" in summary["error"], summary
        await db.execute("SELECT pg_advisory_unlock(hashtextextended($1, 0))", lock_key("shop"))
        code, summary = await asyncio.to_thread(
            run_source_task, str(config), ["events"], settings=settings
        )
        assert code == ExitCode.OK, summary
        assert summary["records"] == 48 and summary["endpoints"]["events"]["pages"] == 5
        code, summary = await asyncio.to_thread(
            run_source_task, str(tmp_path / "missing.toml"), settings=settings
        )
        assert code == ExitCode.CONFIG and "missing.toml" in summary["error"]
