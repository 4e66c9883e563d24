"""``ingest reset``: forget where an endpoint's walks stand, never what they loaded.

What a reset clears, per endpoint: its checkpoint (``ingest.checkpoints``, the run's own row, not
a backfill partition's), its incremental high-water mark (``ingest.cursors``) and, for a child
endpoint with ``parents = "changed"``, when its last complete walk started
(``ingest.parent_walks``). The next ``ingest run`` then walks the endpoint as on its first run
(from ``incremental.start``, every parent row). It never drops or truncates a loaded table,
never touches dead letters, run records or backfill partitions.

It holds the source's run lock while it reads and clears, so a run cannot start or commit a
checkpoint in between; the caller's confirmation is asked while the lock is held, so what the
person confirmed is what gets cleared.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from ingest.config import LoadedConfig
from ingest.db import Connection, open_pool
from ingest.deadletters import check_schema, selected, utc
from ingest.state import holding_source


@dataclass(frozen=True, slots=True)
class EndpointState:
    """What a reset of one endpoint would clear (None/False: nothing stored)."""

    endpoint: str
    has_checkpoint: bool
    checkpoint_done: bool
    checkpoint_records: int
    cursor: str | None
    parent_walk: dt.datetime | None

    @property
    def empty(self) -> bool:
        return not self.has_checkpoint and self.cursor is None and self.parent_walk is None

    def describe(self) -> str:
        if self.empty:
            return "nothing stored"
        parts = []
        if self.has_checkpoint:
            walk = "complete" if self.checkpoint_done else "in progress"
            parts.append(f"checkpoint ({walk}, {self.checkpoint_records} records)")
        if self.cursor is not None:
            parts.append(f"cursor {self.cursor}")
        if self.parent_walk is not None:
            parts.append(f"changed-parents mark {utc(self.parent_walk)}")
        return ", ".join(parts)


#: Asked with the states about to be cleared; False leaves everything as it was.
Confirm = Callable[[Sequence[EndpointState]], Awaitable[bool]]


async def endpoint_states(
    connection: Connection, source: str, endpoints: Sequence[str]
) -> list[EndpointState]:
    rows = await connection.fetch(
        "SELECT e.name, c.source IS NOT NULL AS has_checkpoint, "
        "coalesce(c.done, false) AS done, coalesce(c.records, 0) AS records, "
        "u.value AS cursor, w.started_at AS parent_walk "
        "FROM unnest($2::text[]) WITH ORDINALITY AS e(name, position) "
        "LEFT JOIN ingest.checkpoints c ON c.source = $1 AND c.endpoint = e.name "
        "AND c.partition = '' "
        "LEFT JOIN ingest.cursors u ON u.source = $1 AND u.endpoint = e.name "
        "LEFT JOIN ingest.parent_walks w ON w.source = $1 AND w.endpoint = e.name "
        "ORDER BY e.position",
        source,
        list(endpoints),
    )
    return [
        EndpointState(
            row["name"],
            row["has_checkpoint"],
            row["done"],
            row["records"],
            row["cursor"],
            row["parent_walk"],
        )
        for row in rows
    ]


async def clear_state(connection: Connection, source: str, endpoints: Sequence[str]) -> None:
    """Delete the endpoints' checkpoint, cursor and parent-walk rows in one transaction."""
    async with connection.transaction():
        for table, run_only in (("checkpoints", True), ("cursors", False), ("parent_walks", False)):
            await connection.execute(
                f"DELETE FROM ingest.{table} WHERE source = $1 AND endpoint = ANY($2::text[])"
                + (" AND partition = ''" if run_only else ""),
                source,
                list(endpoints),
            )


async def reset_endpoints(
    loaded: LoadedConfig,
    dsn: str | None,
    endpoints: Sequence[str],
    confirm: Confirm,
) -> list[EndpointState] | None:
    """Clear the state of the named endpoints (all when none are named) once ``confirm`` says
    so; the states cleared, or None when it said no."""
    source = loaded.source.name
    names = [endpoint.name for endpoint in selected(loaded, endpoints)]
    async with open_pool(dsn, size=1) as pool, pool.acquire() as connection:
        await check_schema(connection)
        async with holding_source(connection, source, "reset it when the run finishes"):
            states = await endpoint_states(connection, source, names)
            if not await confirm(states):
                return None
            await clear_state(connection, source, names)
            return states


def confirm_on_terminal(source: str, *, ask: bool) -> Confirm:
    """Show what would be cleared and, with ``ask``, wait for the person to type ``yes``."""

    async def confirm(states: Sequence[EndpointState]) -> bool:
        print(f"source {source}: reset the state of {len(states)} endpoint(s):")
        width = max(len(state.endpoint) for state in states)
        for state in states:
            print(f"  {state.endpoint.ljust(width)}  {state.describe()}")
        print("Loaded tables are kept: their rows are not deleted; the next run fetches again.")
        if not ask:
            return True
        try:
            answer = await asyncio.to_thread(input, "Type yes to reset: ")
        except EOFError:
            return False
        return answer.strip().lower() in {"yes", "y"}

    return confirm


def reset_report(source: str, states: Sequence[EndpointState]) -> str:
    cleared = [state.endpoint for state in states if not state.empty]
    if not cleared:
        return f"source {source}: nothing to reset (no state stored for the endpoint(s))"
    return (
        f"source {source}: reset {', '.join(cleared)}; the next `ingest run` walks "
        "them from the start (tables kept)"
    )
