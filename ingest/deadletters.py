"""Dead letters after the fact: list them, and replay them through the current config.

Why a replay: an incremental cursor moves past a dead-lettered record, so no later run fetches it
again. ``ingest.dead_letters`` keeps the raw record (and a child record's parent values), which is
all a fixed config needs to convert it once more.

Exactly once: a replay holds the source's run lock (no run or other replay of the source at the
same time), reads the dead letters in id order in chunks locked ``FOR UPDATE``, and in one
transaction per chunk writes the records that now convert into the endpoint's table (the same
sink, merge or append, as a run) and deletes them from ``ingest.dead_letters``; records that
still fail stay, with their new reason. A crash rolls back the chunk in progress only.

Merge tables: a record whose key was loaded again after it was dead-lettered (a later run brought
a newer version) is *superseded*: it is deleted without being written, so a replay never puts an
old version over a newer one. The incremental cursor is left alone.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson
import structlog

from ingest.config import Endpoint, LoadedConfig
from ingest.db import Connection, open_pool
from ingest.errors import ConfigError, SinkError, one_line
from ingest.evolve import Decision, load_decisions, scan, table_with
from ingest.migrate import pending
from ingest.rows import POSTGRES_TYPES, RowBuilder, RowError
from ingest.sink import LOADED_AT_COLUMN, TableSink, quote
from ingest.state import holding_source

log = structlog.get_logger("ingest.deadletters")

#: Dead letters converted and written per transaction.
REPLAY_CHUNK = 500
#: Characters of a record shown by ``ingest dead-letters list``.
RECORD_EXCERPT = 100


@dataclass(slots=True)
class ReplayStats:
    """What one endpoint's replay did."""

    endpoint: str
    #: Converted and written to the endpoint's table; gone from ingest.dead_letters.
    replayed: int = 0
    #: Merge tables: the key was loaded again after the record failed; deleted, not written.
    superseded: int = 0
    #: Still not convertible; kept with the new reason.
    still_failing: int = 0


@dataclass(frozen=True, slots=True)
class DeadLetter:
    id: int
    endpoint: str
    run_id: str
    created_at: dt.datetime
    error: str
    record: str


@dataclass(frozen=True, slots=True)
class DeadLetterCount:
    endpoint: str
    count: int
    oldest: dt.datetime
    newest: dt.datetime


def selected(loaded: LoadedConfig, names: Sequence[str]) -> list[Endpoint]:
    """The named endpoints (a config error names an unknown one), or all of them."""
    source = loaded.source
    if not names:
        return list(source.endpoints)
    return [source.endpoint(name) for name in dict.fromkeys(names)]


async def check_schema(connection: Connection) -> None:
    missing = await pending(connection)
    if missing:
        raise ConfigError(
            f"database schema is not up to date (pending: {', '.join(missing)}): "
            "run `ingest migrate` first"
        )


async def count_dead_letters(
    connection: Connection, source: str, endpoints: Sequence[str] | None = None
) -> list[DeadLetterCount]:
    """Per endpoint (all of the source's, or the named ones): how many, oldest and newest."""
    rows = await connection.fetch(
        "SELECT endpoint, count(*) AS count, min(created_at) AS oldest, "
        "max(created_at) AS newest FROM ingest.dead_letters WHERE source = $1 "
        "AND ($2::text[] IS NULL OR endpoint = ANY($2::text[])) "
        "GROUP BY endpoint ORDER BY endpoint",
        source,
        None if endpoints is None else list(endpoints),
    )
    return [
        DeadLetterCount(row["endpoint"], row["count"], row["oldest"], row["newest"]) for row in rows
    ]


async def latest_dead_letters(
    connection: Connection, source: str, endpoints: Sequence[str] | None, limit: int
) -> list[DeadLetter]:
    """The newest ``limit`` dead letters of the source (or the named endpoints), newest first."""
    rows = await connection.fetch(
        "SELECT id, endpoint, run_id, created_at, error, left(record, $3) AS record "
        "FROM ingest.dead_letters WHERE source = $1 "
        "AND ($2::text[] IS NULL OR endpoint = ANY($2::text[])) ORDER BY id DESC LIMIT $4",
        source,
        None if endpoints is None else list(endpoints),
        RECORD_EXCERPT + 1,
        limit,
    )
    return [
        DeadLetter(
            row["id"],
            row["endpoint"],
            str(row["run_id"]),
            row["created_at"],
            row["error"],
            row["record"],
        )
        for row in rows
    ]


async def replay_dead_letters(
    loaded: LoadedConfig,
    dsn: str | None,
    endpoints: Sequence[str] = (),
    *,
    chunk: int = REPLAY_CHUNK,
) -> list[ReplayStats]:
    """Replay the dead letters of the source's endpoints (or the named ones); see the module."""
    source = loaded.source.name
    chosen = selected(loaded, endpoints)
    async with open_pool(dsn, size=2) as pool, pool.acquire() as lock_connection:
        await check_schema(lock_connection)
        async with (
            holding_source(lock_connection, source, "replay its dead letters when it finishes"),
            pool.acquire() as connection,
        ):
            return [
                await replay_endpoint(connection, source, endpoint, chunk=chunk)
                for endpoint in chosen
            ]


async def replay_endpoint(
    connection: Connection, source: str, endpoint: Endpoint, *, chunk: int = REPLAY_CHUNK
) -> ReplayStats:
    """One endpoint's dead letters, a chunk per transaction, in id (arrival) order."""
    stats = ReplayStats(endpoint.name)
    decisions: list[Decision] | None = None
    if endpoint.table.inferred:  # the columns decided so far; a replay adds none
        decisions = await load_decisions(connection, endpoint.table)
        endpoint = endpoint.model_copy(update={"table": table_with(endpoint.table, decisions)})
    sink = TableSink(endpoint.table)
    builder = RowBuilder(endpoint.table)
    ensured = False
    after = 0
    while True:
        async with connection.transaction():
            letters = await connection.fetch(
                "SELECT id, record, parent, created_at FROM ingest.dead_letters "
                "WHERE source = $1 AND endpoint = $2 AND id > $3 ORDER BY id LIMIT $4 FOR UPDATE",
                source,
                endpoint.name,
                after,
                chunk,
            )
            if not letters:
                break
            after = letters[-1]["id"]
            good: list[tuple[asyncpg.Record, tuple[Any, ...]]] = []
            failing: list[tuple[int, str]] = []
            for letter in letters:
                if decisions is not None:
                    record = orjson.loads(letter["record"])
                    refused = scan(endpoint.table, decisions, [record]).rejected
                    if refused:
                        failing.append((letter["id"], refused[0][1]))
                        continue
                try:
                    good.append((letter, convert(builder, letter)))
                except RowError as exc:
                    failing.append((letter["id"], str(exc)))
            superseded: set[int] = set()
            if good and endpoint.table.mode == "merge":
                superseded = await newer_in_target(connection, sink, good)
            rows = [row for letter, row in good if letter["id"] not in superseded]
            if rows:
                if not ensured:
                    await sink.ensure(connection)
                    ensured = True
                await write(connection, sink, endpoint, rows)
            await connection.execute(
                "DELETE FROM ingest.dead_letters WHERE id = ANY($1::bigint[])",
                [letter["id"] for letter, _ in good],
            )
            if failing:
                await connection.execute(
                    "UPDATE ingest.dead_letters AS d SET error = u.error "
                    "FROM unnest($1::bigint[], $2::text[]) AS u(id, error) WHERE d.id = u.id",
                    [letter_id for letter_id, _ in failing],
                    [reason for _, reason in failing],
                )
        stats.replayed += len(rows)
        stats.superseded += len(superseded)
        stats.still_failing += len(failing)
        log.info(
            "dead_letters_replayed",
            source=source,
            endpoint=endpoint.name,
            replayed=len(rows),
            superseded=len(superseded),
            still_failing=len(failing),
        )
    return stats


async def write(
    connection: Connection, sink: TableSink, endpoint: Endpoint, rows: list[tuple[Any, ...]]
) -> None:
    """The rows into the endpoint's table as a run writes them; a refusal is one line."""
    try:
        await sink.write(connection, rows)
    except (asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise SinkError(
            f"endpoint {endpoint.name}: writing {len(rows)} replayed dead letters to "
            f"{endpoint.table.schema_}.{endpoint.table.name} failed "
            f"({type(exc).__name__}: {one_line(exc)}); nothing of this chunk was committed "
            "and its dead letters stay"
        ) from None


def convert(builder: RowBuilder, letter: asyncpg.Record) -> tuple[Any, ...]:
    """The row of a stored dead letter under the current config, or :class:`RowError`."""
    try:
        record = orjson.loads(letter["record"])
        parent = orjson.loads(letter["parent"]) if letter["parent"] is not None else None
    except orjson.JSONDecodeError as exc:  # not written by ingest; say so, keep it
        raise RowError(f"stored record is not valid JSON ({exc})") from None
    return builder.build(record, parent)


async def newer_in_target(
    connection: Connection,
    sink: TableSink,
    good: Sequence[tuple[asyncpg.Record, tuple[Any, ...]]],
) -> set[int]:
    """Ids of dead letters whose key the target loaded again after they were dead-lettered."""
    table = sink.table
    if await connection.fetchval("SELECT to_regclass($1) IS NULL", sink.qualified):
        return set()
    positions = [sink.columns.index(key) for key in table.primary_key]
    keys = [tuple(row[i] for i in positions) for _, row in good]
    key_list = ", ".join(quote(key) for key in table.primary_key)
    arrays = ", ".join(
        f"${i + 1}::{POSTGRES_TYPES[table.columns[key].type]}[]"
        for i, key in enumerate(table.primary_key)
    )
    loaded = {
        tuple(row[key] for key in table.primary_key): row[LOADED_AT_COLUMN]
        for row in await connection.fetch(
            f"SELECT {key_list}, {quote(LOADED_AT_COLUMN)} FROM {sink.qualified} "
            f"WHERE ({key_list}) IN (SELECT * FROM unnest({arrays}))",
            *([key[i] for key in keys] for i in range(len(positions))),
        )
    }
    return {
        letter["id"]
        for (letter, _), key in zip(good, keys, strict=True)
        if key in loaded and loaded[key] > letter["created_at"]
    }


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return [
        "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip()
        for row in [header, *rows]
    ]


def utc(moment: dt.datetime) -> str:
    """A moment as ``ingest status`` shows it: UTC, to the second."""
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _one_line(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


async def list_report(
    loaded: LoadedConfig, dsn: str | None, endpoints: Sequence[str], limit: int
) -> str:
    """``ingest dead-letters list``: counts per endpoint, then the newest ``limit`` records."""
    source = loaded.source.name
    names = [endpoint.name for endpoint in selected(loaded, endpoints)] if endpoints else None
    async with open_pool(dsn, size=1) as pool, pool.acquire() as connection:
        await check_schema(connection)
        counts = await count_dead_letters(connection, source, names)
        latest = await latest_dead_letters(connection, source, names, limit) if limit else []
    if not counts:
        return f"source {source}: no dead letters"
    total = sum(count.count for count in counts)
    lines = [f"source {source}: {total} dead letters in ingest.dead_letters"]
    lines += _table(
        ("endpoint", "records", "oldest", "newest"),
        [
            (
                count.endpoint,
                str(count.count),
                utc(count.oldest),
                utc(count.newest),
            )
            for count in counts
        ],
    )
    if latest:
        lines.append("")
        lines.append(f"newest {len(latest)}:")
        lines += _table(
            ("id", "endpoint", "created_at", "error", "record"),
            [
                (
                    str(letter.id),
                    letter.endpoint,
                    utc(letter.created_at),
                    _one_line(letter.error, 60),
                    _one_line(letter.record, RECORD_EXCERPT),
                )
                for letter in latest
            ],
        )
    lines.append("")
    lines.append(
        f"after fixing the config: ingest dead-letters replay {loaded.path}"
        " (converts them again; those that convert are loaded exactly once)"
    )
    return "\n".join(lines)


def replay_report(source: str, stats: Sequence[ReplayStats]) -> str:
    """``ingest dead-letters replay``'s summary, one line per endpoint."""
    lines = _table(
        ("endpoint", "replayed", "superseded", "still failing"),
        [
            (item.endpoint, str(item.replayed), str(item.superseded), str(item.still_failing))
            for item in stats
        ],
    )
    failing = sum(item.still_failing for item in stats)
    done = sum(item.replayed + item.superseded for item in stats)
    lines.append(
        f"source {source}: {done} dead letters resolved, {failing} still in ingest.dead_letters"
        + (" (see `ingest dead-letters list`)" if failing else "")
    )
    return "\n".join(lines)
