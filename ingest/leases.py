"""Backfill partitions and their leases, on PostgreSQL's own work-queue primitive.

Every query on ``ingest.partitions`` lives here. The protocol:

* **claim**: ``SELECT ... FOR UPDATE SKIP LOCKED LIMIT 1`` picks a partition that is pending, or
  running under a lease that has expired; the same statement marks it running, owned by this
  worker until ``now() + lease``. Concurrent claimers skip each other's rows instead of waiting,
  so N workers on M machines never take the same partition at once.
* **heartbeat**: the owner renews ``lease_expires_at`` every third of the lease. A worker that
  dies (SIGKILL, lost machine) stops renewing; when the lease expires any worker may claim the
  partition and resumes it from its checkpoint.
* **fence**: every batch transaction re-checks, and locks, the partition row
  (``UPDATE ... WHERE lease_owner = me AND status = 'running'``) before it writes its checkpoint.
  A worker that was too slow to renew and lost its partition therefore cannot commit another
  row: its batch rolls back. The batch that ends the partition marks it done in the same
  transaction, so "done" always means "every row committed".

Times are the database's ``now()``, never a worker's clock, so clock skew between machines does
not matter.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ingest.db import Connection
from ingest.errors import LeaseLostError


@dataclass(frozen=True, slots=True)
class PartitionRow:
    """One claimed partition: which endpoint, which window, how many times it was claimed."""

    source: str
    endpoint: str
    key: str
    lower: str
    upper: str
    attempts: int


async def plan(
    connection: Connection, *, source: str, endpoint: str, windows: Sequence[tuple[str, str, str]]
) -> int:
    """Insert the ``(key, lower, upper)`` windows not planned yet; return how many were new.

    Partitions that failed before are put back to pending: running the same backfill command
    again is how a user retries them. Finished partitions stay finished.
    """
    keys = [key for key, _, _ in windows]
    async with connection.transaction():
        before = await connection.fetchval(
            "SELECT count(*) FROM ingest.partitions "
            "WHERE source = $1 AND endpoint = $2 AND partition = ANY($3::text[])",
            source,
            endpoint,
            keys,
        )
        await connection.executemany(
            "INSERT INTO ingest.partitions (source, endpoint, partition, lower_bound, upper_bound) "
            "VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
            [(source, endpoint, key, lower, upper) for key, lower, upper in windows],
        )
        await connection.execute(
            "UPDATE ingest.partitions SET status = 'pending', attempts = 0, error = NULL "
            "WHERE source = $1 AND endpoint = $2 AND partition = ANY($3::text[]) "
            "AND status = 'failed'",
            source,
            endpoint,
            keys,
        )
    return len(keys) - int(before)


async def claim(
    connection: Connection,
    *,
    source: str,
    owner: str,
    lease_seconds: float,
    endpoints: Sequence[str] = (),
    keys: Sequence[str] | None = None,
) -> PartitionRow | None:
    """Take one claimable partition (pending, or running with an expired lease), or ``None``."""
    row = await connection.fetchrow(
        "WITH candidate AS ("
        " SELECT source, endpoint, partition FROM ingest.partitions"
        " WHERE source = $1"
        " AND (cardinality($2::text[]) = 0 OR endpoint = ANY($2::text[]))"
        " AND ($3::text[] IS NULL OR partition = ANY($3::text[]))"
        " AND (status = 'pending' OR (status = 'running' AND lease_expires_at < now()))"
        " ORDER BY endpoint, partition LIMIT 1 FOR UPDATE SKIP LOCKED) "
        "UPDATE ingest.partitions AS p SET status = 'running', lease_owner = $4,"
        " lease_expires_at = now() + make_interval(secs => $5), heartbeat_at = now(),"
        " attempts = p.attempts + 1, started_at = coalesce(p.started_at, now()), error = NULL "
        "FROM candidate AS c "
        "WHERE p.source = c.source AND p.endpoint = c.endpoint AND p.partition = c.partition "
        "RETURNING p.source, p.endpoint, p.partition, p.lower_bound, p.upper_bound, p.attempts",
        source,
        list(endpoints),
        None if keys is None else list(keys),
        owner,
        lease_seconds,
    )
    if row is None:
        return None
    return PartitionRow(
        row["source"],
        row["endpoint"],
        row["partition"],
        row["lower_bound"],
        row["upper_bound"],
        row["attempts"],
    )


_OWNED = (
    "WHERE source = $1 AND endpoint = $2 AND partition = $3 AND lease_owner = $4 "
    "AND status = 'running'"
)


async def renew(
    connection: Connection, row: PartitionRow, owner: str, lease_seconds: float
) -> bool:
    """Heartbeat: extend the lease; ``False`` when it is no longer ours."""
    renewed = await connection.fetchval(
        "UPDATE ingest.partitions SET lease_expires_at = now() + make_interval(secs => $5), "
        f"heartbeat_at = now() {_OWNED} RETURNING true",
        row.source,
        row.endpoint,
        row.key,
        owner,
        lease_seconds,
    )
    return bool(renewed)


async def fence(
    connection: Connection, row: PartitionRow, owner: str, lease_seconds: float, *, done: bool
) -> None:
    """Inside a batch transaction: prove the lease is ours (and keep the row locked to commit).

    With ``done`` the partition is marked finished in the same transaction as its last batch.
    """
    kept = await connection.fetchval(
        "UPDATE ingest.partitions SET heartbeat_at = now(), "
        "lease_expires_at = CASE WHEN $6 THEN NULL ELSE now() + make_interval(secs => $5) END, "
        "status = CASE WHEN $6 THEN 'done' ELSE status END, "
        "lease_owner = CASE WHEN $6 THEN NULL ELSE lease_owner END, "
        f"finished_at = CASE WHEN $6 THEN now() ELSE NULL END {_OWNED} RETURNING true",
        row.source,
        row.endpoint,
        row.key,
        owner,
        lease_seconds,
        done,
    )
    if not kept:
        raise LeaseLostError(
            f"endpoint {row.endpoint} partition {row.key}: lease lost to another worker "
            "(heartbeats were late); this worker's uncommitted batch was rolled back"
        )


async def release(
    connection: Connection,
    row: PartitionRow,
    owner: str,
    *,
    error: str | None = None,
    max_attempts: int = 3,
) -> None:
    """Give the partition back: pending again (interrupted, or failed with attempts left),
    or failed for good after ``max_attempts`` claims."""
    await connection.execute(
        "UPDATE ingest.partitions SET lease_owner = NULL, lease_expires_at = NULL, "
        "error = $5, status = CASE WHEN $5::text IS NOT NULL AND attempts >= $6 "
        f"THEN 'failed' ELSE 'pending' END {_OWNED}",
        row.source,
        row.endpoint,
        row.key,
        owner,
        error,
        max_attempts,
    )


async def leased_elsewhere(
    connection: Connection,
    *,
    source: str,
    owner: str,
    endpoints: Sequence[str] = (),
    keys: Sequence[str] | None = None,
) -> int:
    """Partitions in scope running under another worker's lease (live or not yet expired)."""
    count: int = await connection.fetchval(
        "SELECT count(*) FROM ingest.partitions WHERE source = $1"
        " AND (cardinality($2::text[]) = 0 OR endpoint = ANY($2::text[]))"
        " AND ($3::text[] IS NULL OR partition = ANY($3::text[]))"
        " AND status = 'running' AND lease_owner IS DISTINCT FROM $4",
        source,
        list(endpoints),
        None if keys is None else list(keys),
        owner,
    )
    return count


async def counts(
    connection: Connection, *, source: str, endpoint: str, keys: Sequence[str] | None = None
) -> dict[str, int]:
    """Partitions by status (pending, running, done, failed) for one endpoint."""
    rows = await connection.fetch(
        "SELECT status, count(*) AS n FROM ingest.partitions "
        "WHERE source = $1 AND endpoint = $2 "
        "AND ($3::text[] IS NULL OR partition = ANY($3::text[])) GROUP BY status",
        source,
        endpoint,
        None if keys is None else list(keys),
    )
    result = {"pending": 0, "running": 0, "done": 0, "failed": 0}
    result.update({row["status"]: row["n"] for row in rows})
    return result


async def failures(
    connection: Connection, *, source: str, endpoint: str, keys: Sequence[str]
) -> list[tuple[str, str]]:
    """``(partition, error)`` of the failed partitions among ``keys``."""
    rows = await connection.fetch(
        "SELECT partition, coalesce(error, '') AS error FROM ingest.partitions "
        "WHERE source = $1 AND endpoint = $2 AND partition = ANY($3::text[]) "
        "AND status = 'failed' ORDER BY partition",
        source,
        endpoint,
        list(keys),
    )
    return [(row["partition"], row["error"]) for row in rows]
