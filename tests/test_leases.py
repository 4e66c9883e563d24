"""The lease protocol on a real PostgreSQL: claim, skip, expire, take over, fence, release."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from ingest import leases
from ingest.errors import LeaseLostError

Connection = asyncpg.Connection

WINDOWS = [("a/b", "a", "b"), ("b/c", "b", "c"), ("c/d", "c", "d")]


async def plan(db: Connection) -> None:
    assert await leases.plan(db, source="s", endpoint="e", windows=WINDOWS) == 3
    assert await leases.plan(db, source="s", endpoint="e", windows=WINDOWS) == 0


async def test_concurrent_claims_skip_each_other_and_never_share_a_partition(
    database: str, db: Connection
) -> None:
    await plan(db)
    connections = [await asyncpg.connect(database) for _ in range(4)]
    try:
        # Hold each claim's row lock open while the others claim: SKIP LOCKED, not waiting.
        transactions = [connection.transaction() for connection in connections]
        for transaction in transactions:
            await transaction.start()
        claimed = [
            await leases.claim(connection, source="s", owner=f"w{index}", lease_seconds=30)
            for index, connection in enumerate(connections)
        ]
        for transaction in transactions:
            await transaction.commit()
    finally:
        for connection in connections:
            await connection.close()
    keys = [row.key for row in claimed if row is not None]
    assert sorted(keys) == ["a/b", "b/c", "c/d"]
    assert claimed[3] is None


async def test_an_expired_lease_is_taken_over_and_the_old_owner_is_fenced_out(
    db: Connection,
) -> None:
    await plan(db)
    first = await leases.claim(db, source="s", owner="A", lease_seconds=0.2, keys=["b/c"])
    assert first is not None and first.attempts == 1
    assert await leases.claim(db, source="s", owner="B", lease_seconds=30, keys=["b/c"]) is None
    await asyncio.sleep(0.4)  # A stops heartbeating; its lease runs out
    second = await leases.claim(db, source="s", owner="B", lease_seconds=30, keys=["b/c"])
    assert second is not None and second.key == "b/c" and second.attempts == 2
    assert not await leases.renew(db, first, "A", 30)
    async with db.transaction():
        with pytest.raises(LeaseLostError, match="partition b/c: lease lost to another worker"):
            await leases.fence(db, first, "A", 30, done=False)
    async with db.transaction():
        await leases.fence(db, second, "B", 30, done=True)
    row = await db.fetchrow(
        "SELECT status, lease_owner FROM ingest.partitions WHERE partition = 'b/c'"
    )
    assert row is not None
    assert (row["status"], row["lease_owner"]) == ("done", None)
    assert await leases.claim(db, source="s", owner="C", lease_seconds=30, keys=["b/c"]) is None


async def test_release_hands_back_and_fails_only_after_the_last_attempt(db: Connection) -> None:
    await plan(db)
    for attempt in (1, 2, 3):
        row = await leases.claim(db, source="s", owner="A", lease_seconds=30, keys=["a/b"])
        assert row is not None and row.attempts == attempt
        await leases.release(db, row, "A", error="boom", max_attempts=3)
    status = await db.fetchrow(
        "SELECT status, error FROM ingest.partitions WHERE partition = 'a/b'"
    )
    assert status is not None
    assert (status["status"], status["error"]) == ("failed", "boom")
    assert await leases.claim(db, source="s", owner="A", lease_seconds=30, keys=["a/b"]) is None
    # Planning the same windows again (rerunning the backfill) retries failed partitions.
    await leases.plan(db, source="s", endpoint="e", windows=WINDOWS)
    again = await leases.claim(db, source="s", owner="A", lease_seconds=30, keys=["a/b"])
    assert again is not None and again.attempts == 1
    interrupted = await leases.claim(db, source="s", owner="A", lease_seconds=30, keys=["c/d"])
    assert interrupted is not None
    await leases.release(db, interrupted, "A")
    assert await leases.counts(db, source="s", endpoint="e") == {
        "pending": 2,  # b/c never claimed, c/d handed back
        "running": 1,  # a/b
        "done": 0,
        "failed": 0,
    }
