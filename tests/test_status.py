"""``ingest status`` for finished, failed, in-progress and abandoned runs, against real runs."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import subprocess
import uuid
from pathlib import Path

import asyncpg
import orjson
import pytest

from ingest.config import LoadedConfig, parse_config
from ingest.errors import SourceError
from ingest.state import Checkpoint, save_checkpoint
from ingest.status import collect_status, render_status
from tests.conftest import PYTHON
from tests.gated import HOLDING, RELEASE, gated_app, gated_config, wait_committed
from tests.helpers import config_text, make_config, run
from tests.servers import serve

Connection = asyncpg.Connection

HALF_DEAD_COLUMNS = {
    "id": {"path": "id", "type": "bigint"},
    "name": {"path": "name", "type": "text"},
    "score": {"path": "score", "type": "integer"},  # 0.5, 1.5, ...: odd ids are dead letters
}


async def test_status_of_a_finished_run_shows_counts_retries_and_dead_letters(
    database: str, db: Connection
) -> None:
    app = gated_app(35, unavailable_once_at=2)
    async with serve(app) as base:
        loaded = make_config(base, **gated_config(columns=HALF_DEAD_COLUMNS))
        result = await run(loaded, database)

    stored = await db.fetchrow("SELECT status, host, config_hash, endpoints FROM ingest.runs")
    assert stored is not None and stored["status"] == "succeeded"
    assert stored["config_hash"] == loaded.config_hash and stored["host"]
    stats = orjson.loads(stored["endpoints"])["items"]
    assert (stats["pages"], stats["records"], stats["dead_letters"]) == (4, 17, 18)
    assert (stats["retries"], stats["retries_by_reason"]) == (1, {"http_503": 1})

    report = await collect_status(db, loaded)
    [source] = report.sources
    assert source.source == "test" and source.last_success is not None
    [endpoint] = source.endpoints
    assert endpoint.last_run is not None and endpoint.checkpoint is not None
    assert endpoint.last_run.run_id == str(result.run_id)
    assert endpoint.last_run.result == "succeeded"
    assert (endpoint.last_run.records, endpoint.last_run.pages) == (17, 4)
    assert (endpoint.last_run.retries, endpoint.last_run.dead_letters) == (1, 18)
    assert endpoint.last_run.error is None
    assert endpoint.checkpoint.done and endpoint.checkpoint.position == "done"
    assert endpoint.checkpoint.lag_seconds is None
    assert endpoint.dead_letters == 18
    assert endpoint.partitions == {}

    text = render_status(report)
    lines = text.splitlines()
    assert lines[0].startswith("source test  (last success: 20")
    assert lines[1].split() == [
        "endpoint", "last", "run", "result", "records", "duration", "checkpoint", "lag",
        "partitions", "d/p/l/f", "dead",
    ]  # fmt: skip
    row = lines[2].split()
    assert row[0] == "items" and "succeeded" in row and row[-1] == "18"
    assert row[row.index("succeeded") + 1] == "17" and "done" in row
    assert len(lines) == 3


async def test_status_of_a_failed_run_shows_the_error_and_where_it_will_resume(
    database: str, db: Connection
) -> None:
    app = gated_app(50, hold_at=3, fail_at=3)
    async with serve(app) as base:
        loaded = make_config(base, **gated_config())
        running = asyncio.create_task(run(loaded, database))
        try:
            await wait_committed(db, 20)  # pages 1-2 committed, then page 3 fails
        finally:
            app[RELEASE].set()
        with pytest.raises(SourceError, match="HTTP 400"):
            await running

    report = await collect_status(db, loaded)
    [endpoint] = report.sources[0].endpoints
    assert endpoint.last_run is not None and endpoint.checkpoint is not None
    assert endpoint.last_run.result == "failed"
    assert (endpoint.last_run.records, endpoint.last_run.pages) == (20, 2)
    assert endpoint.last_run.error is not None
    assert endpoint.last_run.error.startswith("endpoint items: http://127.0.0.1:")
    assert endpoint.last_run.error.endswith("/items?page=3: HTTP 400: bad page")
    assert not endpoint.checkpoint.done
    assert endpoint.checkpoint.position == "page=3"
    assert (endpoint.checkpoint.records, endpoint.checkpoint.pages) == (20, 2)
    assert report.sources[0].last_success is None

    text = render_status(report)
    assert "(last success: never)" in text
    assert " failed " in text and " page=3 " in text
    assert text.splitlines()[-1] == f"  error: {endpoint.last_run.error}"


async def test_status_of_a_run_in_progress_shows_it_running_with_records_so_far(
    database: str, db: Connection
) -> None:
    app = gated_app(50, hold_at=3)
    async with serve(app) as base:
        loaded = make_config(base, **gated_config())
        running = asyncio.create_task(run(loaded, database))
        try:
            await wait_committed(db, 20)
            report = await collect_status(db, loaded)
        finally:
            app[RELEASE].set()
        result = await running

    [endpoint] = report.sources[0].endpoints
    assert endpoint.last_run is not None and endpoint.checkpoint is not None
    assert endpoint.last_run.run_id == str(result.run_id)
    assert endpoint.last_run.result == "running"
    assert endpoint.last_run.finished_at is None and endpoint.last_run.records is None
    assert endpoint.checkpoint.position == "page=3" and endpoint.checkpoint.records == 20
    text = render_status(report)
    assert " running " in text and " 20 so far " in text

    after = await collect_status(db, loaded)
    finished = after.sources[0].endpoints[0]
    assert finished.last_run is not None and finished.last_run.result == "succeeded"
    assert finished.last_run.records == 50


async def test_a_running_row_without_its_lock_is_shown_as_abandoned(
    database: str, db: Connection
) -> None:
    async with serve(gated_app(10)) as base:
        loaded = make_config(base, **gated_config())
        await run(loaded, database)
    # What a process killed with SIGKILL leaves behind: a run row never finished.
    await db.execute(
        "INSERT INTO ingest.runs (run_id, command, source, config_hash, host) "
        "VALUES (gen_random_uuid(), 'run', 'test', 'x', 'gone-host')"
    )
    report = await collect_status(db, loaded)
    run_status = report.sources[0].endpoints[0].last_run
    assert run_status is not None
    assert (run_status.result, run_status.host) == ("abandoned", "gone-host")


async def test_status_counts_backfill_partitions_when_the_table_exists(
    database: str, db: Connection
) -> None:
    await db.executemany(
        "INSERT INTO ingest.partitions "
        "(source, endpoint, partition, lower_bound, upper_bound, status, lease_expires_at) "
        "VALUES ('test', 'items', $1, 'a', 'b', $2, now() + make_interval(secs => $3))",
        [
            ("p1", "done", 0.0),
            ("p2", "done", 0.0),
            ("p3", "done", 0.0),
            ("p4", "pending", 0.0),
            ("p5", "running", 60.0),  # a live lease
            ("p6", "running", -60.0),  # its worker died: claimable again
            ("p7", "failed", 0.0),
        ],
    )
    async with serve(gated_app(10)) as base:
        loaded = make_config(base, **gated_config())
    report = await collect_status(db, loaded)
    [endpoint] = report.sources[0].endpoints
    assert endpoint.partitions == {"done": 3, "pending": 2, "leased": 1, "failed": 1}
    assert endpoint.last_run is None
    row = render_status(report).splitlines()[2].split()
    assert row == ["items", "never", "-", "-", "-", "-", "-", "3/2/1/1", "0"]


async def test_status_cli_json_lists_every_recorded_source(
    database: str, cli_env: dict[str, str], tmp_path: Path
) -> None:
    async with serve(gated_app(25)) as base:
        loaded = make_config(base, **gated_config())
        await run(loaded, database)
        config = tmp_path / "test.toml"
        # Status needs names only: a secret the operator's shell lacks must not stop it.
        secret = {"headers": {"Authorization": "Bearer ${INGEST_TEST_UNSET_TOKEN}"}}
        config.write_text(config_text(base, source=secret, **gated_config()))
    completed = await asyncio.to_thread(
        subprocess.run,
        [PYTHON, "-m", "ingest", "status", "--json"],
        env=cli_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert completed.returncode == 0, completed.stderr
    document = json.loads(completed.stdout)
    assert [source["source"] for source in document["sources"]] == ["test"]
    [endpoint] = document["sources"][0]["endpoints"]
    assert endpoint["endpoint"] == "items"
    assert endpoint["last_run"]["result"] == "succeeded"
    assert endpoint["last_run"]["records"] == 25
    assert endpoint["checkpoint"]["done"] is True
    assert endpoint["dead_letters"] == 0
    with_config = await asyncio.to_thread(
        subprocess.run,
        [PYTHON, "-m", "ingest", "status", str(config)],
        env=cli_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert with_config.returncode == 0, with_config.stderr
    assert with_config.stdout.splitlines()[2].split()[0] == "items"


async def test_lag_is_now_minus_a_time_cursor(database: str, db: Connection) -> None:
    cursor = (dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)).isoformat().replace("+00:00", "Z")
    await save_checkpoint(
        db,
        source="test",
        endpoint="items",
        checkpoint=Checkpoint(state={"cursor": cursor}, done=False, records=7, pages=1),
        run_id=uuid.uuid4(),
    )
    report = await collect_status(db)
    [source] = report.sources
    [endpoint] = source.endpoints
    assert endpoint.checkpoint is not None
    assert endpoint.checkpoint.position == cursor
    assert endpoint.checkpoint.lag_seconds is not None
    assert 3600 <= endpoint.checkpoint.lag_seconds < 3700
    assert " 1h00m " in render_status(report)


def _two_endpoints(base: str) -> str:
    """Endpoints ``a`` and ``b`` of one source, both reading the gated app's ``/items``."""
    text = config_text(base, endpoint="a", table="a", **gated_config())
    second = text.split("[[endpoints]]", 1)[1]
    second = second.replace('name = "a"', 'name = "b"', 2)
    return text + "[[endpoints]]" + second


async def test_a_limited_run_in_progress_shows_running_for_its_endpoints_only(
    database: str, db: Connection, tmp_path: Path
) -> None:
    async with serve(gated_app(50)) as base:
        loaded = make_config_text(_two_endpoints(base), tmp_path)
        first = await run(loaded, database)
    app = gated_app(50, hold_at=3)
    async with serve(app) as base:
        loaded = make_config_text(_two_endpoints(base), tmp_path)
        limited = asyncio.create_task(run(loaded, database, endpoints=("b",)))
        try:
            async with asyncio.timeout(30):
                await app[HOLDING].wait()
            report = await collect_status(db, loaded)
        finally:
            app[RELEASE].set()
        second = await limited
    by_name = {item.endpoint: item.last_run for item in report.sources[0].endpoints}
    assert by_name["a"] is not None and by_name["a"].result == "succeeded"
    assert by_name["a"].run_id == str(first.run_id)
    assert by_name["b"] is not None and by_name["b"].result == "running"
    assert by_name["b"].run_id == str(second.run_id)


def make_config_text(text: str, tmp_path: Path) -> LoadedConfig:
    return parse_config(text, tmp_path / "two.toml", {})
