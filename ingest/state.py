"""ingest's own state in PostgreSQL: checkpoints, run records, dead letters, the per-source lock.

All queries against the ``ingest`` schema live here. Functions that take a connection run inside
the caller's transaction, so a checkpoint commits with the batch that reached it.
"""

from __future__ import annotations

import datetime as dt
import reprlib
import socket
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson

from ingest.db import Connection
from ingest.errors import LockedError, LockLostError


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """Where an endpoint's walk stands: the next request to make, or done."""

    state: dict[str, Any] | None
    done: bool
    records: int
    pages: int
    #: The highest incremental cursor value committed by this walk so far (canonical text).
    cursor_max: str | None = None


def _json(value: Any) -> str:
    return orjson.dumps(value).decode()


async def load_checkpoint(
    connection: Connection, source: str, endpoint: str, partition: str = ""
) -> Checkpoint | None:
    row = await connection.fetchrow(
        "SELECT state, done, records, pages, cursor_max FROM ingest.checkpoints "
        "WHERE source = $1 AND endpoint = $2 AND partition = $3",
        source,
        endpoint,
        partition,
    )
    if row is None:
        return None
    state = orjson.loads(row["state"]) if row["state"] is not None else None
    return Checkpoint(state, row["done"], row["records"], row["pages"], row["cursor_max"])


async def save_checkpoint(
    connection: Connection,
    *,
    source: str,
    endpoint: str,
    checkpoint: Checkpoint,
    run_id: uuid.UUID,
    partition: str = "",
) -> None:
    await connection.execute(
        "INSERT INTO ingest.checkpoints "
        "(source, endpoint, partition, state, done, records, pages, run_id, cursor_max, "
        "updated_at) VALUES ($1, $2, $3, $4::jsonb, $5, $6, $7, $8, $9, now()) "
        "ON CONFLICT (source, endpoint, partition) DO UPDATE SET "
        "state = EXCLUDED.state, done = EXCLUDED.done, records = EXCLUDED.records, "
        "pages = EXCLUDED.pages, run_id = EXCLUDED.run_id, cursor_max = EXCLUDED.cursor_max, "
        "updated_at = now()",
        source,
        endpoint,
        partition,
        None if checkpoint.state is None else _json(checkpoint.state),
        checkpoint.done,
        checkpoint.records,
        checkpoint.pages,
        run_id,
        checkpoint.cursor_max,
    )


async def load_checkpoints(
    connection: Connection, source: str, endpoint: str, partitions: Sequence[str]
) -> dict[str, Checkpoint]:
    """The checkpoints of some partitions of an endpoint (the slices of a run), by key."""
    rows = await connection.fetch(
        "SELECT partition, state, done, records, pages, cursor_max FROM ingest.checkpoints "
        "WHERE source = $1 AND endpoint = $2 AND partition = ANY($3::text[])",
        source,
        endpoint,
        list(partitions),
    )
    return {
        row["partition"]: Checkpoint(
            orjson.loads(row["state"]) if row["state"] is not None else None,
            row["done"],
            row["records"],
            row["pages"],
            row["cursor_max"],
        )
        for row in rows
    }


async def delete_checkpoints(
    connection: Connection, source: str, endpoint: str, *, prefix: str
) -> None:
    """Drop an endpoint's partition checkpoints whose key starts with ``prefix`` (its slices)."""
    await connection.execute(
        "DELETE FROM ingest.checkpoints WHERE source = $1 AND endpoint = $2 "
        "AND partition <> '' AND starts_with(partition, $3)",
        source,
        endpoint,
        prefix,
    )


async def reset_checkpoint(
    connection: Connection, source: str, endpoint: str, partition: str = ""
) -> None:
    await connection.execute(
        "DELETE FROM ingest.checkpoints WHERE source = $1 AND endpoint = $2 AND partition = $3",
        source,
        endpoint,
        partition,
    )


async def load_cursor(connection: Connection, source: str, endpoint: str) -> str | None:
    """The endpoint's high-water mark: the highest cursor value of its last completed walk."""
    value: str | None = await connection.fetchval(
        "SELECT value FROM ingest.cursors WHERE source = $1 AND endpoint = $2", source, endpoint
    )
    return value


async def save_cursor(
    connection: Connection, *, source: str, endpoint: str, value: str, run_id: uuid.UUID
) -> None:
    """Set the high-water mark; the caller has already taken the max with the previous one."""
    await connection.execute(
        "INSERT INTO ingest.cursors (source, endpoint, value, run_id, updated_at) "
        "VALUES ($1, $2, $3, $4, now()) ON CONFLICT (source, endpoint) DO UPDATE SET "
        "value = EXCLUDED.value, run_id = EXCLUDED.run_id, updated_at = now()",
        source,
        endpoint,
        value,
        run_id,
    )


@dataclass(frozen=True, slots=True)
class ChildRecord:
    """A child endpoint's rejected record with its parent row's values (``$parent.`` columns),
    so a dead-letter replay can convert it as the run would have."""

    record: Any
    parent: Mapping[str, Any]


def _json_text(value: Any) -> str:
    """JSON text PostgreSQL stores (parent values may be Decimal, dates: text then), whatever
    ``value`` holds: a record orjson cannot encode (nested past its limit, say) is stored as
    its ``repr``, cut short, in a JSON string, so saving a dead letter never fails the batch."""
    try:
        text = orjson.dumps(value, default=str).decode()
    except TypeError:
        text = orjson.dumps(f"<not encodable as JSON> {reprlib.repr(value)}").decode()
    return text.replace("\x00", "\\u0000")  # PostgreSQL text cannot hold NUL


async def save_dead_letters(
    connection: Connection,
    *,
    run_id: uuid.UUID,
    source: str,
    endpoint: str,
    rejected: Sequence[tuple[Any, str]],
) -> None:
    """``rejected``: (record, reason); a :class:`ChildRecord` stores its parent's values too."""
    if not rejected:
        return
    await connection.copy_records_to_table(
        "dead_letters",
        schema_name="ingest",
        columns=["run_id", "source", "endpoint", "record", "error", "parent"],
        records=[
            (
                run_id,
                source,
                endpoint,
                _json_text(record.record if isinstance(record, ChildRecord) else record),
                reason,
                _json_text(dict(record.parent)) if isinstance(record, ChildRecord) else None,
            )
            for record, reason in rejected
        ],
    )


async def start_run(
    connection: Connection,
    *,
    command: str,
    source: str,
    config_hash: str,
    endpoints: Sequence[str] = (),
    run_id: uuid.UUID | None = None,
) -> uuid.UUID:
    """Record a run as started. ``endpoints``: the ones a limited run (``--endpoint``) covers,
    so ``ingest status`` shows it in progress for those only; empty: the whole source.
    ``run_id``: an id the caller already logs under (``ingest run``), else a new one."""
    run_id = run_id or uuid.uuid4()
    await connection.execute(
        "INSERT INTO ingest.runs (run_id, command, source, config_hash, host, endpoints) "
        "VALUES ($1, $2, $3, $4, $5, $6::jsonb)",
        run_id,
        command,
        source,
        config_hash,
        socket.gethostname(),
        orjson.dumps({name: {} for name in endpoints}).decode(),
    )
    return run_id


async def finish_run(
    connection: Connection,
    run_id: uuid.UUID,
    *,
    status: str,
    endpoints: Mapping[str, Mapping[str, Any]],
    error: str | None = None,
) -> None:
    await connection.execute(
        "UPDATE ingest.runs SET finished_at = now(), status = $2, endpoints = $3::jsonb, "
        "error = $4 WHERE run_id = $1",
        run_id,
        status,
        _json(endpoints),
        error,
    )


def lock_key(source: str) -> str:
    return f"ingest:source:{source}"


#: True while the session ``$2`` that started at ``$3`` still holds the source lock ``$1``. The
#: start time tells the run's own session from a later one that got the same process id.
_HOLDS_LOCK = """
SELECT EXISTS (
    SELECT 1
    FROM pg_locks AS l JOIN pg_stat_activity AS a ON a.pid = l.pid
    WHERE l.locktype = 'advisory' AND l.granted AND l.mode = 'ExclusiveLock' AND l.objsubid = 1
      AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
      AND l.classid = ((key.k >> 32) & 4294967295)::oid AND l.objid = (key.k & 4294967295)::oid
      AND l.pid = $2 AND a.backend_start = $3
) FROM (SELECT hashtextextended($1, 0) AS k) AS key
"""


@dataclass(frozen=True, slots=True)
class SourceLock:
    """A run's hold on its source's lock: which PostgreSQL session holds it.

    The lock is a session lock: it ends with the session, silently, when PostgreSQL restarts
    or the connection is terminated, and another run may take it. So every batch transaction
    checks, just before it saves its checkpoint, that the run's session still holds it
    (:meth:`fence`), and commits nothing once it does not.
    """

    source: str
    pid: int
    backend_start: dt.datetime

    @classmethod
    async def of(cls, connection: Connection, source: str) -> SourceLock:
        """The lock just taken on ``connection``."""
        row = await connection.fetchrow(
            "SELECT pid, backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid()"
        )
        assert row is not None
        return cls(source, row["pid"], row["backend_start"])

    async def held(self, connection: Connection) -> bool:
        held: bool = await connection.fetchval(
            _HOLDS_LOCK, lock_key(self.source), self.pid, self.backend_start
        )
        return held

    async def verify(self, connection: Connection) -> None:
        """Raise :class:`LockLostError` unless the run's session still holds the lock."""
        if not await self.held(connection):
            raise LockLostError(
                f"source {self.source}: the run lost its lock (the PostgreSQL session holding "
                "it ended: a server restart or a terminated connection), so it stopped before "
                "committing anything more; the last committed checkpoint holds: rerun to resume"
            )

    async def fence(self, connection: Connection, done: bool) -> None:
        """In a batch transaction, before its checkpoint: go on only while the lock is ours.

        Holding ``commits`` shared first closes the gap between this check and the commit: a
        run that takes the lock after the check waits in :func:`wait_for_commits` until this
        transaction has ended, before it reads any checkpoint.
        """
        await hold_commits_shared(connection, self.source)
        await self.verify(connection)


async def try_lock_source(connection: Connection, source: str) -> bool:
    """A session-level advisory lock: one run per source at a time, released with the session."""
    locked: bool = await connection.fetchval(
        "SELECT pg_try_advisory_lock(hashtextextended($1, 0))", lock_key(source)
    )
    return locked


async def unlock_source(connection: Connection, source: str) -> None:
    await connection.execute("SELECT pg_advisory_unlock(hashtextextended($1, 0))", lock_key(source))


def commits_key(source: str) -> str:
    return f"ingest:commits:{source}"


async def hold_commits_shared(connection: Connection, source: str) -> None:
    """Taken first in every writer process's batch transaction (:mod:`ingest.offload`)."""
    await connection.execute(
        "SELECT pg_advisory_xact_lock_shared(hashtextextended($1, 0))", commits_key(source)
    )


async def wait_for_commits(connection: Connection, source: str, *, seconds: float) -> bool:
    """Wait until no writer process of an earlier run is inside a batch transaction.

    A writer told to commit just before its run's process died may still be committing; a new
    run must not read the checkpoints before that lands. False if ``seconds`` were not enough.
    """
    try:
        async with connection.transaction():
            await connection.execute(f"SET LOCAL lock_timeout = '{int(seconds * 1000)}ms'")
            await connection.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", commits_key(source)
            )
    except asyncpg.LockNotAvailableError:
        return False
    return True


async def load_parent_walk(
    connection: Connection, source: str, endpoint: str
) -> dt.datetime | None:
    """When the child endpoint's last complete walk started (``parents = "changed"``)."""
    value: dt.datetime | None = await connection.fetchval(
        "SELECT started_at FROM ingest.parent_walks WHERE source = $1 AND endpoint = $2",
        source,
        endpoint,
    )
    return value


async def save_parent_walk(
    connection: Connection,
    *,
    source: str,
    endpoint: str,
    started_at: dt.datetime,
    run_id: uuid.UUID,
) -> None:
    """Record a complete walk's start, in the transaction of its last batch."""
    await connection.execute(
        "INSERT INTO ingest.parent_walks (source, endpoint, started_at, run_id, updated_at) "
        "VALUES ($1, $2, $3, $4, now()) ON CONFLICT (source, endpoint) DO UPDATE SET "
        "started_at = EXCLUDED.started_at, run_id = EXCLUDED.run_id, updated_at = now()",
        source,
        endpoint,
        started_at,
        run_id,
    )


@asynccontextmanager
async def holding_source(connection: Connection, source: str, retry: str) -> AsyncIterator[None]:
    """Hold the source's run lock on ``connection`` for a command that changes what runs
    write (dead-letter replay, reset), once no writer process of an earlier run is still
    committing; released on exit. ``retry`` ends the message when the lock is taken, e.g.
    "reset it when the run finishes"."""
    if not await try_lock_source(connection, source):
        raise LockedError(
            f"source {source} is being run by another process (advisory lock held); {retry}"
        )
    try:
        if not await wait_for_commits(connection, source, seconds=60):
            raise LockedError(
                f"source {source}: a writer process of an earlier run is still "
                "committing after 60 s; try again when it finishes"
            )
        yield
    finally:
        await unlock_source(connection, source)
