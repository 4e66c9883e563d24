"""ingest.airflow in a real Airflow: the example DAGs run with ``airflow dags test``.

Airflow is an optional extra (``ingest[airflow]``); without it these tests are skipped. CI runs
them in a separate virtualenv that has it (``.ci/run``). Each test gets its own AIRFLOW_HOME
(SQLite metadata, migrated once per session and copied), the suite's PostgreSQL database and a
local API server; the DAGs are the ones in examples/airflow, configured by environment.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import importlib.util
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp import web

from ingest.state import lock_key
from tests.processes import wait_until
from tests.resume_servers import EPOCH, Valve, changes_app, events_config, iso, timed_records
from tests.resume_servers import events_table as table
from tests.servers import serve

pytestmark = [
    pytest.mark.airflow,
    pytest.mark.skipif(
        importlib.util.find_spec("airflow") is None,
        reason="Airflow is not installed (pip install -e '.[airflow]'; CI runs these tests "
        "in a separate virtualenv)",
    ),
]

ROOT = Path(__file__).resolve().parent.parent
DAGS = ROOT / "examples" / "airflow"

WINDOWED = """
[endpoints.incremental]
cursor_path = "updated_at"
param = "since"
end_param = "until"
"""


def _base_env(home: Path) -> dict[str, str]:
    environment = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("PG", "DATABASE", "AIRFLOW", "INGEST_EXAMPLE"))
    }
    environment.update(
        AIRFLOW_HOME=str(home),
        AIRFLOW__CORE__DAGS_FOLDER=str(DAGS),
        # airflow.cfg would name the migrated home's file; a copied home must use its own
        AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=f"sqlite:///{home / 'airflow.db'}",
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__CORE__UNIT_TEST_MODE="False",
        PYTHONPATH=str(ROOT),
        PYTHONWARNINGS="ignore",
    )
    return environment


@pytest.fixture(scope="session")
def migrated_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An AIRFLOW_HOME with its SQLite metadata database migrated (once: ~10 s)."""
    home = tmp_path_factory.mktemp("airflow-home")
    subprocess.run(
        [sys.executable, "-m", "airflow", "db", "migrate"],
        env=_base_env(home),
        check=True,
        capture_output=True,
        timeout=300,
    )
    return home


@dataclass
class Airflow:
    """One test's Airflow deployment: a home of its own, the test database, the example DAGs."""

    home: Path
    env: dict[str, str]
    logs: Path

    async def start(self, *args: str, name: str) -> asyncio.subprocess.Process:
        with (self.logs / f"{name}.out").open("wb") as out:
            return await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "airflow",
                *args,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def output(self, name: str) -> str:
        return (self.logs / f"{name}.out").read_text(errors="replace")

    async def run(self, *args: str, name: str, seconds: float = 240) -> tuple[int, str]:
        process = await self.start(*args, name=name)
        try:
            async with asyncio.timeout(seconds):
                code = await process.wait()
        except TimeoutError:
            process.kill()  # only this child, by its pid
            await process.wait()
            raise AssertionError(f"airflow {args} timed out:\n{self.output(name)}") from None
        return code, self.output(name)

    def tasks(self, dag_id: str) -> list[tuple[str, int, str, int]]:
        """``(task_id, map_index, state, try_number)`` of every task instance, all runs."""
        with sqlite3.connect(self.home / "airflow.db") as metadata:
            rows = metadata.execute(
                "SELECT task_id, map_index, state, try_number FROM task_instance "
                "WHERE dag_id = ? ORDER BY task_id, map_index",
                (dag_id,),
            ).fetchall()
        return [tuple(row) for row in rows]

    def summaries(self, dag_id: str, task_id: str) -> list[dict[str, Any]]:
        """The ``ingest_summary`` XComs a task pushed."""
        with sqlite3.connect(self.home / "airflow.db") as metadata:
            rows = metadata.execute(
                "SELECT value FROM xcom WHERE dag_id = ? AND task_id = ? AND key = ?",
                (dag_id, task_id, "ingest_summary"),
            ).fetchall()
        values = []
        for (raw,) in rows:
            value = json.loads(raw)
            values.append(json.loads(value) if isinstance(value, str) else value)
        return values


@pytest.fixture
def airflow(migrated_home: Path, tmp_path: Path, cli_env: dict[str, str]) -> Iterator[Airflow]:
    home = tmp_path / "airflow"
    shutil.copytree(migrated_home, home)
    logs = tmp_path / "out"
    logs.mkdir()
    environment = _base_env(home)
    environment["DATABASE_URL"] = cli_env["DATABASE_URL"]
    environment["INGEST_EXAMPLE_RETRY_SECONDS"] = "0"
    yield Airflow(home, environment, logs)


def expected(records: list[dict[str, Any]], until: dt.datetime) -> list[tuple[Any, ...]]:
    return [
        (r["id"], r["name"], r["amount"], r["updated_at"])
        for r in records
        if r["updated_at"] < iso(until)
    ]


def fail_first_request_at(page: str) -> Any:
    """A middleware answering the first request for ``page`` with a 400 (ingest: exit 1)."""
    failed: list[str] = []

    @web.middleware
    async def middleware(request: web.Request, handler: Any) -> Any:
        if request.query.get("page") == page and not failed:
            failed.append(page)
            return web.Response(status=400, text="not today")
        return await handler(request)

    return middleware


async def test_source_dag_retries_a_failed_run_and_maps_locked_and_config_errors(
    airflow: Airflow, db: asyncpg.Connection, tmp_path: Path
) -> None:
    records = timed_records(45, every=dt.timedelta(hours=1))
    app = changes_app(records)
    app.middlewares.append(fail_first_request_at("3"))
    async with serve(app) as base:
        config = tmp_path / "shop.toml"
        config.write_text(events_config(base, mode="append", per_page=10))
        airflow.env["INGEST_EXAMPLE_CONFIG"] = str(config)
        # The database from an Airflow connection (conn_id), not ingest's DATABASE_URL.
        dsn = airflow.env.pop("DATABASE_URL")
        airflow.env["AIRFLOW_CONN_INGEST_TEST_DB"] = dsn
        airflow.env["INGEST_EXAMPLE_CONN_ID"] = "ingest_test_db"

        # Try 1 fails on the third page (exit 1: retry); try 2 resumes from its checkpoint.
        code, output = await airflow.run("dags", "test", "ingest_shop_hourly", name="ok")
        assert code == 0, output
        assert await table(db) == expected(records, EPOCH + dt.timedelta(days=30))
        assert airflow.tasks("ingest_shop_hourly") == [("ingest_run", -1, "success", 2)], output
        assert "ingest: exit 1 (retry)" in output and "HTTP 400" in output
        assert "ingest: exit 0 (success)" in output
        # XCom keeps the last try's summary.
        [summary] = airflow.summaries("ingest_shop_hourly", "ingest_run")
        assert summary["exit_code"] == 0 and summary["outcome"] == "success", summary
        assert summary["endpoints"]["events"]["records"] == summary["records"] > 0

        # Another run holds the source's lock: exit 3 is a skip, not a failure.
        holder = await asyncpg.connect(dsn)
        try:
            assert await holder.fetchval(
                "SELECT pg_try_advisory_lock(hashtextextended($1, 0))", lock_key("shop")
            )
            code, output = await airflow.run("dags", "test", "ingest_shop_hourly", name="locked")
        finally:
            await holder.close()
        assert ("ingest_run", -1, "skipped", 1) in airflow.tasks("ingest_shop_hourly"), output
        assert len(await table(db)) == 45

        # A config error fails at once: no retry although the task has two.
        config.write_text(events_config(base, mode="append", per_page=10) + "\n[oops\n")
        code, output = await airflow.run("dags", "test", "ingest_shop_hourly", name="config")
        assert ("ingest_run", -1, "failed", 1) in airflow.tasks("ingest_shop_hourly"), output
        errors = [s for s in airflow.summaries("ingest_shop_hourly", "ingest_run") if "error" in s]
        assert [s["exit_code"] for s in errors] == [3, 2], errors


async def test_backfill_dag_partition_killed_mid_run_is_resumed_exactly_once(
    airflow: Airflow, db: asyncpg.Connection, tmp_path: Path
) -> None:
    """Kill Airflow (SIGKILL) while a mapped partition task is mid-window, then run the DAG
    again in two Airflow deployments at once: the dead task's lease expires, one copy resumes
    the partition from its checkpoint, the other waits for it; no row is missing or doubled."""
    records = timed_records(96, every=dt.timedelta(hours=1))  # 4 days, 24 a day
    valve = Valve()
    app = changes_app(records, valve=valve)
    async with serve(app) as base:
        config = tmp_path / "shop.toml"
        config.write_text(
            events_config(
                base, mode="append", per_page=4, batch_size=4, consumers=1, incremental=WINDOWED
            )
        )
        airflow.env.update(
            INGEST_EXAMPLE_CONFIG=str(config),
            INGEST_EXAMPLE_ENDPOINT="events",
            INGEST_EXAMPLE_FROM="2025-01-01",
            INGEST_EXAMPLE_TO="2025-01-04",
            INGEST_EXAMPLE_WINDOW="1d",
            INGEST_EXAMPLE_LEASE_SECONDS="3",
        )
        await valve.close()
        await valve.allow(3)  # the first window's first three pages, then held
        first = await airflow.start("dags", "test", "ingest_shop_backfill", name="killed")

        async def mid_partition() -> bool:
            committed = await db.fetchval(
                "SELECT coalesce(sum(records), 0) FROM ingest.checkpoints WHERE NOT done"
            )
            return bool(committed) and valve.waiting > 0

        try:
            await wait_until(mid_partition, seconds=180, what="a partition task mid-window")
        finally:
            first.send_signal(signal.SIGKILL)  # only this child, by its pid
            await first.wait()
        running = await db.fetch(
            "SELECT partition, lease_owner FROM ingest.partitions WHERE status = 'running'"
        )
        assert len(running) == 1, airflow.output("killed")
        assert await db.fetchval("SELECT count(*) FROM ingest.partitions") == 3
        before = len(await table(db))
        assert 0 < before < 24

        await valve.release_held()
        await valve.open()
        second_home = tmp_path / "airflow-2"
        shutil.copytree(airflow.home, second_home)
        copy = Airflow(second_home, {**airflow.env, **_base_env(second_home)}, airflow.logs)
        (code, output), (code2, output2) = await asyncio.gather(
            airflow.run("dags", "test", "ingest_shop_backfill", name="retry"),
            copy.run("dags", "test", "ingest_shop_backfill", name="duplicate"),
        )
        assert code == 0, output
        assert code2 == 0, output2
    assert await table(db) == expected(records, EPOCH + dt.timedelta(days=3))
    statuses = await db.fetch("SELECT status, attempts FROM ingest.partitions ORDER BY partition")
    assert {row["status"] for row in statuses} == {"done"}
    assert max(row["attempts"] for row in statuses) == 2  # the killed one, taken over once
    finished = [t for t in airflow.tasks("ingest_shop_backfill") if t[2] == "success"]
    assert {(t[0], t[1]) for t in finished} >= {("plan", -1), ("report", -1)} | {
        ("partition", index) for index in range(3)
    }
    # Each record was committed by exactly one task: before the kill, or by one of the copies.
    summaries = airflow.summaries("ingest_shop_backfill", "partition")
    summaries += copy.summaries("ingest_shop_backfill", "partition")
    assert len(summaries) == 6, summaries
    assert before + sum(summary["records"] for summary in summaries) == 72


@contextlib.asynccontextmanager
async def executor_api(airflow: Airflow) -> AsyncIterator[None]:
    """``airflow api-server`` on a free loopback port, and the settings that make ``dags test
    --use-executor`` run each task in a process of its own (LocalExecutor) that reports to it."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    airflow.env.update(
        AIRFLOW__CORE__EXECUTOR="LocalExecutor",
        AIRFLOW__CORE__EXECUTION_API_SERVER_URL=f"{url}/execution/",
        AIRFLOW__API__BASE_URL=url,
        AIRFLOW__API_AUTH__JWT_SECRET=uuid.uuid4().hex,
    )
    server = await airflow.start(
        "api-server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1", name="api"
    )

    async def answers() -> bool:
        if server.returncode is not None:
            raise AssertionError(f"airflow api-server exited:\n{airflow.output('api')}")
        try:
            async with (
                aiohttp.ClientSession() as session,
                session.get(f"{url}/api/v2/monitor/health") as response,
            ):
                return response.status == 200
        except aiohttp.ClientError:
            return False

    try:
        await wait_until(answers, seconds=120, what="airflow api-server")
        yield
    finally:
        if server.returncode is None:
            server.terminate()  # only this child, by its pid
            try:
                async with asyncio.timeout(30):
                    await server.wait()
            except TimeoutError:
                server.kill()
                await server.wait()


async def test_backfill_partition_task_killed_mid_window_is_retried_by_airflow(
    airflow: Airflow, db: asyncpg.Connection, tmp_path: Path
) -> None:
    """SIGKILL one mapped partition task's own process (LocalExecutor) mid-window: Airflow marks
    the try failed and retries it; the retry waits for the dead try's lease, takes the partition
    over and resumes from its checkpoint; the table is exact."""
    records = timed_records(72, every=dt.timedelta(hours=1))  # 3 days, 24 a day
    valve = Valve()
    app = changes_app(records, valve=valve)
    async with serve(app) as base, executor_api(airflow):
        config = tmp_path / "shop.toml"
        config.write_text(
            events_config(
                base, mode="append", per_page=4, batch_size=4, consumers=1, incremental=WINDOWED
            )
        )
        airflow.env.update(
            INGEST_EXAMPLE_CONFIG=str(config),
            INGEST_EXAMPLE_ENDPOINT="events",
            INGEST_EXAMPLE_FROM="2025-01-01",
            INGEST_EXAMPLE_TO="2025-01-03",
            INGEST_EXAMPLE_WINDOW="1d",
            INGEST_EXAMPLE_LEASE_SECONDS="3",
        )
        await valve.close()
        await valve.allow(3)
        run = await airflow.start(
            "dags", "test", "ingest_shop_backfill", "--use-executor", name="executor"
        )

        async def mid_partition() -> bool:
            committed = await db.fetchval(
                "SELECT count(*) FROM ingest.checkpoints c JOIN ingest.partitions p "
                "USING (source, endpoint, partition) "
                "WHERE NOT c.done AND c.records > 0 AND p.status = 'running'"
            )
            return bool(committed) and valve.waiting > 0

        try:
            await wait_until(mid_partition, seconds=180, what="a partition task mid-window")
            victim = await db.fetchrow(
                "SELECT p.partition, p.lease_owner FROM ingest.checkpoints c "
                "JOIN ingest.partitions p USING (source, endpoint, partition) "
                "WHERE NOT c.done AND c.records > 0 AND p.status = 'running' LIMIT 1"
            )
            assert victim is not None
            # The lease owner is host:pid:random, the pid the task's own process (a descendant
            # of the airflow process this test started).
            os.kill(int(victim["lease_owner"].split(":")[-2]), signal.SIGKILL)
            await valve.release_held()
            await valve.open()
            async with asyncio.timeout(240):
                code = await run.wait()
        finally:
            if run.returncode is None:
                run.kill()  # only this child, by its pid
                await run.wait()
        output = airflow.output("executor")
        assert code == 0, output
    assert await table(db) == expected(records, EPOCH + dt.timedelta(days=2))
    partitions = {
        row["partition"]: (row["status"], row["attempts"])
        for row in await db.fetch("SELECT partition, status, attempts FROM ingest.partitions")
    }
    assert partitions[victim["partition"]] == ("done", 2), partitions
    assert {status for status, _ in partitions.values()} == {"done"}
    partition_tries = sorted(
        (try_number, state)
        for task_id, _, state, try_number in airflow.tasks("ingest_shop_backfill")
        if task_id == "partition"
    )
    assert partition_tries == [(1, "success"), (2, "success")], output
