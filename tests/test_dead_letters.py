"""Dead letters a person can see and load after a config fix: `ingest dead-letters list/replay`.

Real CLI subprocesses, a real local aiohttp API, a real PostgreSQL. The fix in these tests is the
one a user makes when a column's type was too narrow: widen the table, widen the config, replay.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
from aiohttp import web

from ingest.config import parse_config
from ingest.deadletters import replay_dead_letters
from tests.helpers import config_text, run
from tests.processes import run_ingest, spawn, wait_until
from tests.servers import _app, json_response, make_records, page_number_app, serve
from tests.test_incremental import shop_config

Connection = asyncpg.Connection
BAD_IDS = (7, 19, 33)


def scored_records(count: int = 40) -> list[dict[str, Any]]:
    """Whole scores, except for BAD_IDS (x.5): an ``integer`` score column rejects those."""
    records = make_records(count)
    for record in records:
        record["score"] = record["id"] * 2 + (0.5 if record["id"] in BAD_IDS else 0)
    return records


def items_config(base: str, *, score_type: str, mode: str) -> str:
    return config_text(
        base,
        records_path="data.items",
        params={"per_page": 10},
        pagination={"style": "page_number", "total_path": "meta.total"},
        mode=mode,
        columns={
            "id": {"path": "id", "type": "bigint"},
            "name": {"path": "name", "type": "text"},
            "score": {"path": "score", "type": score_type},
        },
    )


async def widen_score(db: Connection, table: str = "items", column: str = "score") -> None:
    """The user's half of the fix: the table's column type, as the config's will be."""
    await db.execute(f'ALTER TABLE "{table}" ALTER COLUMN "{column}" TYPE double precision')


async def dead_ids(db: Connection) -> list[int]:
    rows = await db.fetch("SELECT record FROM ingest.dead_letters ORDER BY id")
    return [orjson.loads(row["record"])["id"] for row in rows]


async def test_run_points_to_its_dead_letters_and_list_shows_them(
    tmp_path: Path, cli_env: dict[str, str], db: Connection
) -> None:
    async with serve(page_number_app(scored_records())) as base:
        config = tmp_path / "shop.toml"
        config.write_text(items_config(base, score_type="integer", mode="append"))
        code, out, err = await run_ingest("run", str(config), env=cli_env)
    assert code == 0, err
    run_id = await db.fetchval("SELECT run_id FROM ingest.runs")
    pointer = [line for line in out.splitlines() if line.startswith("dead letters:")]
    assert pointer == [
        f"dead letters: 3 in ingest.dead_letters (ingest dead-letters list {config}, or "
        f"SELECT error, record FROM ingest.dead_letters WHERE run_id = '{run_id}'; "
        "after a config fix: ingest dead-letters replay)"
    ]
    # The SELECT the summary shows runs as printed.
    rows = await db.fetch(
        f"SELECT error, record FROM ingest.dead_letters WHERE run_id = '{run_id}'"
    )
    assert sorted(orjson.loads(row["record"])["id"] for row in rows) == list(BAD_IDS)

    code, out, err = await run_ingest("dead-letters", "list", str(config), env=cli_env)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "source test: 3 dead letters in ingest.dead_letters"
    assert lines[1].split() == ["endpoint", "records", "oldest", "newest"]
    assert lines[2].split()[:2] == ["items", "3"]
    assert "newest 3:" in lines
    assert "column score: 66.5 is not a whole number" in out
    assert '"id":33' in out
    assert f"ingest dead-letters replay {config}" in out

    code, out, err = await run_ingest(
        "dead-letters", "list", str(config), "--endpoint", "nope", env=cli_env
    )
    assert code == 2
    assert "no endpoint named 'nope'" in err


async def test_list_says_when_there_are_none(
    tmp_path: Path, cli_env: dict[str, str], db: Connection
) -> None:
    config = tmp_path / "shop.toml"
    config.write_text(items_config("http://127.0.0.1:9", score_type="integer", mode="append"))
    code, out, err = await run_ingest("dead-letters", "list", str(config), env=cli_env)
    assert (code, out.strip()) == (0, "source test: no dead letters"), err


async def test_replay_after_a_config_fix_lands_each_record_exactly_once(
    tmp_path: Path, cli_env: dict[str, str], db: Connection
) -> None:
    """Append mode: a record landed twice would show as a duplicate row."""
    records = scored_records()
    async with serve(page_number_app(records)) as base:
        config = tmp_path / "shop.toml"
        config.write_text(items_config(base, score_type="integer", mode="append"))
        code, _, err = await run_ingest("run", str(config), env=cli_env)
        assert code == 0, err
    assert await db.fetchval("SELECT count(*) FROM items") == 37

    # Before the fix: nothing converts, the reasons are the current ones, nothing is written.
    code, out, err = await run_ingest("dead-letters", "replay", str(config), env=cli_env)
    assert code == 0, err
    assert out.splitlines()[1].split() == ["items", "0", "0", "3"]
    assert "0 dead letters resolved, 3 still in ingest.dead_letters" in out
    assert await dead_ids(db) == list(BAD_IDS)
    assert await db.fetchval("SELECT count(*) FROM items") == 37

    await widen_score(db)
    config.write_text(items_config("http://127.0.0.1:9", score_type="double", mode="append"))
    code, out, err = await run_ingest("dead-letters", "replay", str(config), env=cli_env)
    assert code == 0, err
    assert out.splitlines()[1].split() == ["items", "3", "0", "0"]
    assert "3 dead letters resolved, 0 still in ingest.dead_letters" in out
    assert await dead_ids(db) == []

    code, out, err = await run_ingest("dead-letters", "replay", str(config), env=cli_env)
    assert code == 0, err
    assert out.splitlines()[1].split() == ["items", "0", "0", "0"]
    got = await db.fetch("SELECT id, name, score, _ingest_raw FROM items ORDER BY id")
    assert [(row["id"], row["name"], row["score"]) for row in got] == [
        (record["id"], record["name"], record["score"]) for record in records
    ]
    by_id = {row["id"]: orjson.loads(row["_ingest_raw"]) for row in got}
    assert all(by_id[record_id] == records[record_id - 1] for record_id in BAD_IDS)


async def test_replay_keeps_what_still_fails_with_its_new_reason(
    tmp_path: Path, cli_env: dict[str, str], db: Connection
) -> None:
    records = scored_records()
    records[18]["score"] = "n/a"  # id 19: no config fix makes this a number
    async with serve(page_number_app(records)) as base:
        config = tmp_path / "shop.toml"
        config.write_text(items_config(base, score_type="integer", mode="append"))
        code, _, err = await run_ingest("run", str(config), env=cli_env)
        assert code == 0, err
    await widen_score(db)
    config.write_text(items_config("http://127.0.0.1:9", score_type="double", mode="append"))
    code, out, err = await run_ingest("dead-letters", "replay", str(config), env=cli_env)
    assert code == 0, err
    assert out.splitlines()[1].split() == ["items", "2", "0", "1"]
    assert "see `ingest dead-letters list`" in out
    left = await db.fetch("SELECT record, error FROM ingest.dead_letters")
    assert [(orjson.loads(row["record"])["id"], row["error"]) for row in left] == [
        (19, "column score: 'n/a' is not a number")
    ]
    assert await db.fetchval("SELECT count(*) FROM items") == 39


async def test_merge_replay_never_puts_an_old_version_over_a_newer_one(
    database: str, db: Connection
) -> None:
    """Id 7 failed in run 1 and came back fixed in run 2: its dead letter is superseded."""
    records = scored_records()
    async with serve(page_number_app(records)) as base:
        first = parse_config(items_config(base, score_type="integer", mode="merge"), Path("t"))
        await run(first, database)
        records[6].update(score=14, name="seven, version 2")
        await run(first, database)
    assert await dead_ids(db) == [7, 19, 33, 19, 33]  # id 7 failed in run 1 only
    await widen_score(db)
    fixed = parse_config(items_config(base, score_type="double", mode="merge"), Path("t"))
    (stats,) = await replay_dead_letters(fixed, database)
    assert (stats.replayed, stats.superseded, stats.still_failing) == (4, 1, 0)
    assert await dead_ids(db) == []
    got = {row["id"]: (row["name"], row["score"]) for row in await db.fetch("SELECT * FROM items")}
    assert got[7] == ("seven, version 2", 14)
    assert got[19] == (records[18]["name"], 38.5)
    assert got[33] == (records[32]["name"], 66.5)
    assert len(got) == 40


def orders_app(customers: int) -> web.Application:
    """Customers 1..N; each has 3 orders, the second with a fractional total."""

    async def list_customers(request: web.Request) -> web.Response:
        people = [{"id": index, "name": f"customer {index}"} for index in range(1, customers + 1)]
        return json_response({"items": people, "has_more": False})

    async def list_orders(request: web.Request) -> web.Response:
        customer = int(request.match_info["id"])
        orders = [
            {"order_id": customer * 10 + index, "total": 10 + (0.25 if index == 2 else 0)}
            for index in (1, 2, 3)
        ]
        return json_response({"items": orders, "has_more": False})

    return _app({"/customers": list_customers, "/customers/{id}/orders": list_orders})


@pytest.mark.parametrize("writers", [0, 2])
async def test_child_replay_fills_parent_columns_from_the_stored_parent(
    database: str, db: Connection, writers: int
) -> None:
    """Also when writer processes convert the child's pages (and store its dead letters)."""
    async with serve(orders_app(4)) as base:
        text = (
            shop_config(base)
            .replace(
                'total = { path = "total", type = "double" }',
                'total = { path = "total", type = "integer" }',
            )
            .replace("batch_size = 10", f"batch_size = 10\nwriter_processes = {writers}")
        )
        await run(parse_config(text, Path("shop.toml")), database)
    letters = await db.fetch("SELECT record, parent FROM ingest.dead_letters ORDER BY id")
    assert sorted(
        (orjson.loads(row["record"])["order_id"], orjson.loads(row["parent"])["id"])
        for row in letters
    ) == [(12, 1), (22, 2), (32, 3), (42, 4)]
    await widen_score(db, "orders", "total")
    fixed = parse_config(text.replace('type = "integer" }', 'type = "double" }'), Path("shop.toml"))
    results = await replay_dead_letters(fixed, database, ["orders"])
    assert [(item.endpoint, item.replayed) for item in results] == [("orders", 4)]
    got = await db.fetch("SELECT order_id, total, customer_id FROM orders ORDER BY order_id")
    assert [tuple(row) for row in got] == [
        (customer * 10 + index, 10 + (0.25 if index == 2 else 0), customer)
        for customer in range(1, 5)
        for index in (1, 2, 3)
    ]
    assert await db.fetchval("SELECT count(*) FROM ingest.dead_letters") == 0


async def test_replay_waits_for_no_one_and_writes_nothing_while_a_run_holds_the_source(
    tmp_path: Path, cli_env: dict[str, str], db: Connection
) -> None:
    """The run lock (what `ingest run` holds) makes a replay exit 3 without touching a row."""
    async with serve(page_number_app(scored_records())) as base:
        config = tmp_path / "shop.toml"
        config.write_text(items_config(base, score_type="integer", mode="append"))
        code, _, err = await run_ingest("run", str(config), env=cli_env)
        assert code == 0, err
    await widen_score(db)
    config.write_text(items_config("http://127.0.0.1:9", score_type="double", mode="append"))
    await db.execute("SELECT pg_advisory_lock(hashtextextended('ingest:source:test', 0))")
    code, out, err = await run_ingest("dead-letters", "replay", str(config), env=cli_env)
    assert code == 3, out + err
    assert "advisory lock held" in err
    assert await db.fetchval("SELECT count(*) FROM items") == 37
    assert await dead_ids(db) == list(BAD_IDS)
    await db.execute("SELECT pg_advisory_unlock(hashtextextended('ingest:source:test', 0))")
    code, out, err = await run_ingest("dead-letters", "replay", str(config), env=cli_env)
    assert code == 0, err
    assert await db.fetchval("SELECT count(*) FROM items") == 40


async def test_a_replay_killed_mid_write_lands_nothing_and_the_next_one_lands_all_once(
    tmp_path: Path, cli_env: dict[str, str], database: str, db: Connection
) -> None:
    """The replay is held (not raced) on a row lock of its target, then SIGKILLed."""
    async with serve(page_number_app(scored_records())) as base:
        config = tmp_path / "shop.toml"
        config.write_text(items_config(base, score_type="integer", mode="merge"))
        code, _, err = await run_ingest("run", str(config), env=cli_env)
        assert code == 0, err
    await widen_score(db)
    config.write_text(items_config("http://127.0.0.1:9", score_type="double", mode="merge"))
    blocker = await asyncpg.connect(database)
    try:
        # An uncommitted insert of key 33 makes the replay's merge of key 33 wait for it.
        transaction = blocker.transaction()
        await transaction.start()
        await blocker.execute("INSERT INTO items (id, name) VALUES (33, 'blocker')")
        replay = await spawn(["dead-letters", "replay", str(config)], cli_env, tmp_path, "replay")

        async def replay_waits() -> bool:
            waiting: bool = await db.fetchval(
                "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock' AND query LIKE 'INSERT INTO%')"
            )
            return waiting

        await wait_until(replay_waits, what="the replay to wait on the row lock")
        await replay.kill()
        await transaction.rollback()
    finally:
        await blocker.close()

    async def source_unlocked() -> bool:
        # The killed replay's idle lock session ends as soon as its server sees the socket close.
        held: bool = await db.fetchval(
            "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' "
            "AND ((classid::bigint << 32) | objid::bigint) = "
            "hashtextextended('ingest:source:test', 0))"
        )
        return not held

    await wait_until(source_unlocked, what="the killed replay's lock to go")
    assert await dead_ids(db) == list(BAD_IDS)
    assert await db.fetchval("SELECT count(*) FROM items") == 37
    code, out, err = await run_ingest("dead-letters", "replay", str(config), env=cli_env)
    assert code == 0, err
    assert out.splitlines()[1].split() == ["items", "3", "0", "0"]
    assert await db.fetchval("SELECT count(*) FROM items") == 40
    assert await dead_ids(db) == []


async def test_two_replays_at_once_land_each_record_once(
    tmp_path: Path, cli_env: dict[str, str], db: Connection
) -> None:
    async with serve(page_number_app(scored_records())) as base:
        config = tmp_path / "shop.toml"
        config.write_text(items_config(base, score_type="integer", mode="append"))
        code, _, err = await run_ingest("run", str(config), env=cli_env)
        assert code == 0, err
    await widen_score(db)
    config.write_text(items_config("http://127.0.0.1:9", score_type="double", mode="append"))
    results = await asyncio.gather(
        *(run_ingest("dead-letters", "replay", str(config), env=cli_env) for _ in range(2))
    )
    # Each either replayed (exit 0) or found the other holding the source (exit 3).
    assert sorted(code for code, _, _ in results) in ([0, 0], [0, 3])
    assert await db.fetchval("SELECT count(*) FROM items") == 40
    assert await db.fetchval("SELECT count(DISTINCT id) FROM items") == 40
    assert await dead_ids(db) == []


async def test_a_replay_the_database_refuses_fails_in_one_line_and_keeps_every_dead_letter(
    tmp_path: Path, cli_env: dict[str, str], db: Connection
) -> None:
    """One record of the chunk breaks a constraint: nothing of the chunk lands, nothing is lost."""
    async with serve(page_number_app(scored_records())) as base:
        config = tmp_path / "shop.toml"
        config.write_text(items_config(base, score_type="integer", mode="append"))
        code, _, err = await run_ingest("run", str(config), env=cli_env)
        assert code == 0, err
    await widen_score(db)
    await db.execute("ALTER TABLE items ADD CONSTRAINT small_scores CHECK (score <> 66.5)")
    config.write_text(items_config("http://127.0.0.1:9", score_type="double", mode="append"))
    code, out, err = await run_ingest("dead-letters", "replay", str(config), env=cli_env)
    assert code == 1, out + err
    (line,) = err.strip().splitlines()
    assert line.startswith(
        "ingest: error: endpoint items: writing 3 replayed dead letters to public.items failed "
        "(CheckViolationError: "
    )
    assert line.endswith("nothing of this chunk was committed and its dead letters stay")
    assert await dead_ids(db) == list(BAD_IDS)
    assert await db.fetchval("SELECT count(*) FROM items") == 37


async def test_list_and_replay_need_no_secrets(
    tmp_path: Path, cli_env: dict[str, str], db: Connection
) -> None:
    """An operator replaying after a fix may not have the API token: no request is made."""
    config = tmp_path / "shop.toml"
    text = items_config("http://127.0.0.1:9", score_type="integer", mode="append")
    config.write_text(
        text.replace(
            "[source]\n", '[source]\nheaders = { Authorization = "Bearer ${SHOP_TOKEN}" }\n'
        )
    )
    assert "SHOP_TOKEN" not in cli_env
    for action in ("list", "replay"):
        code, out, err = await run_ingest("dead-letters", action, str(config), env=cli_env)
        assert code == 0, out + err


def kubernetes_recipe_args() -> list[str]:
    """The ``args`` of the Kubernetes CronJob recipe in docs/operations.md, as written."""
    text = (Path(__file__).resolve().parent.parent / "docs" / "operations.md").read_text()
    recipe = text[text.index("### Kubernetes CronJob") :]
    match = re.search(r"args: (\[.*?\])", recipe, re.DOTALL)
    assert match is not None
    args: list[str] = orjson.loads(match.group(1))
    return args


async def test_the_kubernetes_recipes_exit_5_rule_can_fire(
    tmp_path: Path, cli_env: dict[str, str], db: Connection
) -> None:
    """The recipe's command line exits 5 once more records fail than its --max-dead-letters."""
    args = kubernetes_recipe_args()
    limit = int(args[args.index("--max-dead-letters") + 1])
    records = make_records(limit + 20)
    for record in records[: limit + 1]:
        record["score"] = "n/a"
    async with serve(page_number_app(records)) as base:
        config = tmp_path / "crm.toml"
        config.write_text(items_config(base, score_type="double", mode="append"))
        local = [
            {"/config/crm.toml": str(config), "0.0.0.0": "127.0.0.1", "9464": "0"}.get(arg, arg)
            for arg in args
        ]
        code, out, err = await run_ingest(*local, env=cli_env)
    assert code == 5, out + err
    assert f"more than --max-dead-letters {limit}" in err
    assert "ingest dead-letters list" in err
