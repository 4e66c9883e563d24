"""Slices: a cursor walk with a range filter cut into windows walked at once, exactly once.

The server serves ``/events?since=&until=&after=`` (a cursor API over a time range, ascending by
``updated_at``), counts the requests in flight (overlap is asserted from that count, never from
timings) and can hold the first slice's second page until the test lets it go.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
from aiohttp import web

from ingest.config import parse_config
from ingest.cursor import CursorKind
from ingest.errors import ExitCode
from ingest.secrets import Redactor
from ingest.slices import cut, estimated_pages
from ingest.validate import validate
from tests.helpers import run
from tests.processes import Cli, run_cli, spawn, wait_until
from tests.resume_servers import EPOCH, events_table, iso
from tests.servers import REQUESTS, TRICKY_TEXT, _app, json_response, serve

Connection = asyncpg.Connection
FLIGHT: web.AppKey[dict[str, int]] = web.AppKey("flight", dict)
HOLD: web.AppKey[dict[str, asyncio.Event]] = web.AppKey("hold", dict)
PER_PAGE = 10


def spread_records(count: int, *, start: int = 1) -> list[dict[str, Any]]:
    """Records from EPOCH to about now, evenly spread (a range that is all history)."""
    span = (dt.datetime.now(dt.UTC) - dt.timedelta(hours=1) - EPOCH) / count
    every = dt.timedelta(seconds=int(span.total_seconds()))
    return [
        {
            "id": index,
            "name": f"{TRICKY_TEXT[index % len(TRICKY_TEXT)]} #{index}",
            "amount": index * 3,
            "updated_at": iso(EPOCH + (index - 1) * every),
        }
        for index in range(start, start + count)
    ]


def _moment(text: str | None) -> dt.datetime | None:
    return dt.datetime.fromisoformat(text) if text else None


def cursor_app(records: list[dict[str, Any]]) -> web.Application:
    """``/events``: records with ``since <= updated_at < until``, ``after`` the last id seen.

    A request whose ``since`` is in ``app[HOLD]`` and that has an ``after`` cursor (a second
    page or later) waits for that event.
    """

    async def handler(request: web.Request) -> web.Response:
        flight = app[FLIGHT]
        flight["now"] += 1
        flight["most"] = max(flight["most"], flight["now"])
        try:
            since = request.query.get("since")
            held = app[HOLD].get(since or "")
            if held is not None and "after" in request.query:
                await held.wait()
            await asyncio.sleep(0.01)
            low, high = _moment(since), _moment(request.query.get("until"))
            after = int(request.query.get("after", "0"))
            selected = [
                record
                for record in records
                if (low is None or _moment(record["updated_at"]) >= low)  # type: ignore[operator]
                and (high is None or _moment(record["updated_at"]) < high)  # type: ignore[operator]
                and record["id"] > after
            ]
            page = selected[:PER_PAGE]
            more = len(selected) > PER_PAGE
            following = page[-1]["id"] if more else None
            # The same next page three ways: a cursor, a next URL and a Link header.
            url = str(request.url.update_query(after=str(following))) if more else None
            return json_response(
                {"items": page, "next": following, "next_url": url},
                headers={"Link": f'<{url}>; rel="next"'} if url else None,
            )
        finally:
            flight["now"] -= 1

    app = _app({"/events": handler})
    app[FLIGHT] = {"now": 0, "most": 0}
    app[HOLD] = {}
    return app


STYLES = {
    "cursor": '{ style = "cursor", cursor_path = "next", cursor_param = "after" }',
    "next_url": '{ style = "next_url", next_url_path = "next_url" }',
    "link_header": '{ style = "link_header" }',
}


def cursor_config(
    base_url: str,
    *,
    mode: str = "append",
    slices: str = "",
    end_param: bool = True,
    style: str = "cursor",
) -> str:
    key = 'primary_key = ["id"]' if mode == "merge" else ""
    until = 'end_param = "until"' if end_param else ""
    return f"""
[source]
name = "shop"
base_url = "{base_url}"
[http]
max_concurrency = 4
[pipeline]
batch_size = 20
batch_seconds = 0.05
[[endpoints]]
name = "events"
path = "/events"
records_path = "items"
pagination = {STYLES[style]}
[endpoints.incremental]
cursor_path = "updated_at"
param = "since"
{until}
start = "2025-01-01T00:00:00Z"
{slices}
[endpoints.table]
name = "events"
mode = "{mode}"
{key}
[endpoints.table.columns]
id = {{ path = "id", type = "bigint" }}
name = {{ path = "name" }}
amount = {{ path = "amount", type = "bigint" }}
updated_at = {{ path = "updated_at", type = "timestamptz" }}
"""


def source(records: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [(r["id"], r["name"], r["amount"], r["updated_at"]) for r in records]


async def checkpoints(db: Connection) -> dict[str, Any]:
    rows = await db.fetch("SELECT partition, state, done FROM ingest.checkpoints")
    return {
        row["partition"]: (orjson.loads(row["state"]) if row["state"] else None, row["done"])
        for row in rows
    }


async def high_water(db: Connection) -> str | None:
    value: str | None = await db.fetchval("SELECT value FROM ingest.cursors")
    return value


def stored(record: dict[str, Any]) -> str:
    return str(record["updated_at"]).replace("Z", "+00:00")


@pytest.mark.parametrize("style", list(STYLES))
async def test_a_large_range_is_walked_in_overlapping_slices_exactly_once(
    database: str, db: Connection, style: str
) -> None:
    """A first load from ``start``: several slices in flight, every row once, the high-water
    mark the highest cursor; the slices' checkpoints are gone and the endpoint's is done. The
    next run (a small range) walks serially and fetches its first page once."""
    records = spread_records(400)
    app = cursor_app(records)
    async with serve(app) as base:
        loaded = parse_config(cursor_config(base, style=style), Path("events.toml"))
        result = await run(loaded, database)
        assert await events_table(db) == source(records)
        assert 1 < app[FLIGHT]["most"] <= 4
        assert await high_water(db) == stored(records[-1])
        assert await checkpoints(db) == {"": (None, True)}
        assert result.endpoints["events"].records == 400
        assert not result.interrupted

        # A catch-up of one page: no slices, and the probe's page is the walk's first page.
        app[REQUESTS].clear()
        app[FLIGHT]["most"] = 0
        new = spread_records(3, start=401)
        for record in new:
            record["updated_at"] = iso(dt.datetime.now(dt.UTC) - dt.timedelta(minutes=30))
        last = records[-1]
        records.extend(new)
        await run(loaded, database)
    assert len(app[REQUESTS]) == 1
    # Append mode: the lower bound is inclusive, so the last run's last record comes again.
    assert await events_table(db) == sorted(source([*records, last]))
    assert await high_water(db) == stored(new[-1])


async def test_slices_off_and_no_range_filter_stay_serial(database: str, db: Connection) -> None:
    records = spread_records(120)
    for variant in ('slices = "off"', ""):
        app = cursor_app(records)
        async with serve(app) as base:
            text = cursor_config(base, slices=variant, end_param=bool(variant))
            await run(parse_config(text, Path("events.toml")), database, restart=True)
        assert app[FLIGHT]["most"] == 1
        await db.execute("TRUNCATE events")


async def test_validate_says_a_cursor_walk_without_a_range_filter_is_serial(
    tmp_path: Path,
) -> None:
    app = cursor_app(spread_records(5))
    async with serve(app) as base:
        config = tmp_path / "events.toml"
        config.write_text(cursor_config(base, end_param=False))
        result = await validate(config, None, Redactor())
        assert any(
            "endpoint events: note: cursor pagination walks one page at a time" in note
            and "end_param" in note
            for note in result.notes
        ), result.notes
        config.write_text(cursor_config(base))
        result = await validate(config, None, Redactor())
        assert not any("one page at a time" in note for note in result.notes)


async def _alive_and(cli: Cli, check: Any) -> bool:
    if cli.process.returncode is not None:
        check.close()
        raise AssertionError(f"the run ended before the kill:\n{cli.output()}")
    return bool(await check)


@pytest.mark.parametrize("mode", ["append", "merge"])
async def test_sigkill_with_one_slice_held_keeps_the_high_water_mark_then_resumes_exactly(
    cli_env: dict[str, str], db: Connection, tmp_path: Path, mode: str
) -> None:
    """The first slice is held at its second page while the others finish and commit: no
    high-water mark yet. SIGKILL there, and again with a batch stuck on a lock just before its
    commit; the final run resumes the same slices (the finished ones are not fetched again),
    every row once, and only then sets the high-water mark."""
    records = spread_records(400)
    app = cursor_app(records)
    first_since = "2025-01-01T00:00:00Z"
    app[HOLD][first_since] = asyncio.Event()
    async with serve(app) as base:
        config = tmp_path / "events.toml"
        config.write_text(cursor_config(base, mode=mode))

        async def others_done() -> bool:
            points = await checkpoints(db)
            if not (points.get("", (None,))[0] or {}).get("slices"):
                return False
            slices = {key: point for key, point in points.items() if key.startswith("slice:")}
            return (
                len(slices) >= 2
                and sum(done for _, done in slices.values()) == len(points[""][0]["slices"]) - 1
            )

        cli = await spawn(["run", str(config)], cli_env, tmp_path, "run1")
        await wait_until(lambda: _alive_and(cli, others_done()), 60, "all slices but one done")
        assert await high_water(db) is None
        await cli.kill()
        plan = (await checkpoints(db))[""][0]["slices"]
        done_lowers = {lower for _, lower, _ in plan[1:]}

        # Second run: the held slice's next batch waits on a lock on ingest.checkpoints.
        app[REQUESTS].clear()
        cli = await spawn(["run", str(config)], cli_env, tmp_path, "run2")
        async with db.transaction():
            await db.execute("LOCK TABLE ingest.checkpoints IN EXCLUSIVE MODE")
            app[HOLD][first_since].set()
            await wait_until(
                lambda: _alive_and(cli, _blocked(db)), 60, "a batch waiting on the lock"
            )
            await cli.kill()
        assert await high_water(db) is None
        assert (await checkpoints(db))[""][0]["slices"] == plan

        code, output = await run_cli(["run", str(config)], cli_env, tmp_path, "final")
        assert code == ExitCode.OK, output
    assert await events_table(db) == source(records)
    assert await high_water(db) == stored(records[-1])
    assert await checkpoints(db) == {"": (None, True)}
    # The finished slices were never asked for again.
    sinces = {request["query"].get("since") for request in app[REQUESTS]}
    assert not sinces & {lower.replace("+00:00", "Z") for lower in done_lowers}


async def _blocked(db: Connection) -> bool:
    waiting = await db.fetchval(
        "SELECT count(*) FROM pg_locks WHERE relation = 'ingest.checkpoints'::regclass "
        "AND NOT granted"
    )
    return bool(waiting)


async def test_a_plan_of_slices_left_by_an_earlier_config_does_not_wedge_a_serial_run(
    database: str, db: Connection
) -> None:
    """The range filter was removed from the config after a sliced run was killed: the next
    run walks serially from its lower bound instead of failing on the stored plan."""
    records = spread_records(30)
    await db.execute(
        "INSERT INTO ingest.checkpoints (source, endpoint, state) "
        """VALUES ('shop', 'events', '{"slices": [["slice:a/", "a", null]]}')"""
    )
    app = cursor_app(records)
    async with serve(app) as base:
        text = cursor_config(base, end_param=False)
        result = await run(parse_config(text, Path("events.toml")), database)
    assert not result.interrupted
    assert await events_table(db) == source(records)


def test_cut_spreads_the_slices_over_where_the_records_begin_and_covers_the_whole_range() -> None:
    kind = CursorKind("iso8601")
    lower = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)
    begin = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
    upper = dt.datetime(2025, 1, 5, tzinfo=dt.UTC)
    slices = cut(kind, lower, upper, 4, begin)
    assert [(item.lower, item.upper) for item in slices] == [
        ("2020-01-01T00:00:00+00:00", "2025-01-02T00:00:00+00:00"),
        ("2025-01-02T00:00:00+00:00", "2025-01-03T00:00:00+00:00"),
        ("2025-01-03T00:00:00+00:00", "2025-01-04T00:00:00+00:00"),
        ("2025-01-04T00:00:00+00:00", None),
    ]
    # A range too short for that many whole seconds makes fewer slices.
    assert len(cut(kind, begin, begin + dt.timedelta(seconds=2), 8)) == 2


def test_the_first_page_estimates_the_pages_of_the_range() -> None:
    endpoint = parse_config(cursor_config("http://127.0.0.1:1"), Path("e.toml")).source.endpoints[0]
    kind = CursorKind("iso8601")
    lower = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
    upper = lower + dt.timedelta(hours=100)
    ascending = [{"updated_at": iso(lower + dt.timedelta(hours=10 + i))} for i in range(3)]
    pages, begin = estimated_pages(endpoint, kind, ascending, lower, upper)
    assert (round(pages), begin) == (45, lower + dt.timedelta(hours=10))
    newest_first = list(reversed(ascending))
    pages, begin = estimated_pages(endpoint, kind, newest_first, lower, upper)
    assert (round(pages), begin) == (50, None)
