"""One batch, written exactly once: rows, dead letters and the checkpoint in one transaction.

The consumer tasks of :mod:`ingest.pipeline` hand each batch they take to :meth:`BatchWriter.write`.
It converts the pages (unless the typed decoder already did, or PostgreSQL does with
``load = "server"``), COPYs or stages the rows while other batches may be doing the same, waits
for its turn at the :class:`~ingest.runstate.CommitGate`, then merges, saves dead letters, runs
the partition's lease fence and saves the checkpoint (and the incremental high-water mark at the
end of a walk) in the same transaction. A database error becomes one line saying nothing of the
batch was committed.
"""

from __future__ import annotations

from typing import Any

import asyncpg
import structlog

from ingest.cursor import CursorValue
from ingest.db import Connection
from ingest.errors import DeadLetterLimitError, SinkError, one_line
from ingest.paths import compile_path
from ingest.runstate import EndpointRun, RunOptions, larger
from ingest.server_load import FALLBACK_ERRORS
from ingest.source import FetchedPage
from ingest.state import (
    Checkpoint,
    save_checkpoint,
    save_cursor,
    save_dead_letters,
    save_parent_walk,
)
from ingest.typed import BuiltRows

log = structlog.get_logger("ingest.batches")


class BatchWriter:
    """Writes the batches of one run; counts dead letters across the run's endpoints."""

    def __init__(self, pool: asyncpg.Pool, options: RunOptions) -> None:
        self.pool = pool
        self.options = options
        #: Dead letters of the whole run (``--max-dead-letters`` outside backfills).
        self.dead_letters_total = 0

    async def write(self, state: EndpointRun, sequence: int, pages: list[FetchedPage]) -> None:
        endpoint = state.endpoint
        rows: list[tuple[Any, ...]] = []
        rejected: list[tuple[Any, str]] = []
        if state.server is None:
            rows, rejected = self.build_rows(state, pages)
        written = len(rows)
        batch_max = self._batch_cursor(state, pages)
        merge = endpoint.table.mode == "merge"
        last = pages[-1].checkpoint
        try:
            async with self.pool.acquire() as connection, connection.transaction():
                loaded = None
                if state.server is not None:
                    loaded = await self._load_on_server(state, connection, pages, sequence)
                if loaded is not None:
                    written = loaded
                else:
                    if state.server is not None:
                        rows, rejected = self.build_rows(state, pages)
                        written = len(rows)
                    if merge:
                        await state.sink.stage(connection, rows)
                    else:
                        await state.sink.write(connection, rows)
                await state.gate.wait_turn(sequence)
                if merge and written:
                    await state.sink.merge(connection)
                if rejected:
                    self._count_dead_letters(state, len(rejected))
                    await save_dead_letters(
                        connection,
                        run_id=state.run_id,
                        source=state.source,
                        endpoint=endpoint.name,
                        rejected=rejected,
                    )
                if state.partition is not None and state.partition.fence is not None:
                    await state.partition.fence(connection, last is None)
                cursor_max = larger(state.cursor_max, batch_max)
                await self._save_progress(connection, state, pages, written, cursor_max)
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
            where = f" partition {state.partition_key}" if state.partition else ""
            raise SinkError(
                f"endpoint {endpoint.name}{where}: writing a batch of {written} rows to "
                f"{endpoint.table.schema_}.{endpoint.table.name} failed "
                f"({type(exc).__name__}: {one_line(exc)}); nothing of it was committed and "
                "the last checkpoint holds: rerun to resume"
            ) from None
        state.cursor_max = cursor_max
        stats = state.stats
        stats.records += written
        stats.pages += len(pages)
        stats.typed_pages += sum(isinstance(page.records, BuiltRows) for page in pages)
        stats.dead_letters += len(rejected)
        stats.batches += 1
        self.options.observer.batch_committed(
            endpoint.name, rows=written, pages=len(pages), dead_letters=len(rejected)
        )
        log.debug(
            "batch_committed",
            endpoint=endpoint.name,
            partition=state.partition_key,
            sequence=sequence,
            rows=written,
            dead_letters=len(rejected),
            page=pages[-1].number,
        )
        await state.gate.committed(sequence)

    @staticmethod
    def build_rows(
        state: EndpointRun, pages: list[FetchedPage]
    ) -> tuple[list[tuple[Any, ...]], list[tuple[Any, str]]]:
        """Rows of the good records and (record, reason) of the rest, converted in Python."""
        rows: list[tuple[Any, ...]] = []
        rejected: list[tuple[Any, str]] = []
        for page in pages:
            if isinstance(page.records, BuiltRows):  # converted by the typed decoder
                rows.extend(page.records)
                continue
            good, bad = state.builder.build_many(page.records, page.parent)
            rows.extend(good)
            rejected.extend(bad)
        return rows, rejected

    async def _load_on_server(
        self,
        state: EndpointRun,
        connection: Connection,
        pages: list[FetchedPage],
        sequence: int,
    ) -> int | None:
        """Let PostgreSQL convert the batch (``load = "server"``); ``None``: use Python instead.

        The statements run in a savepoint, so a value PostgreSQL rejects leaves nothing behind
        and the same transaction writes the batch the Python way, dead letters included.
        """
        assert state.server is not None
        try:
            async with connection.transaction():
                return await state.server.load(connection, pages)
        except FALLBACK_ERRORS as exc:
            log.info(
                "server_load_fallback",
                endpoint=state.endpoint.name,
                partition=state.partition_key,
                sequence=sequence,
                # The class only: PostgreSQL's message quotes the offending value (record data).
                reason=type(exc).__name__,
            )
            return None

    def _batch_cursor(self, state: EndpointRun, pages: list[FetchedPage]) -> CursorValue | None:
        incremental = state.endpoint.incremental
        if incremental is None or state.cursor is None:
            return None
        get = compile_path(incremental.cursor_path)
        return state.cursor.highest(
            None,
            (
                value
                for page in pages
                for value in (
                    page.records.cursor_values or ()
                    if isinstance(page.records, BuiltRows)
                    else map(get, page.records)
                )
            ),
        )

    async def _save_progress(
        self,
        connection: Connection,
        state: EndpointRun,
        pages: list[FetchedPage],
        rows: int,
        cursor_max: CursorValue | None,
    ) -> None:
        """The checkpoint (and, when an incremental walk completes, the high-water mark)."""
        last = pages[-1].checkpoint
        kind = state.cursor
        await save_checkpoint(
            connection,
            source=state.source,
            endpoint=state.endpoint.name,
            partition=state.partition_key,
            checkpoint=Checkpoint(
                state=last,
                done=last is None,
                records=state.base_records + state.stats.records + rows,
                pages=state.base_pages + state.stats.pages + len(pages),
                cursor_max=kind.dump(cursor_max) if kind and cursor_max is not None else None,
            ),
            run_id=state.run_id,
        )
        started = pages[-1].walk_started
        if last is None and state.partition is None and started is not None:
            await save_parent_walk(
                connection,
                source=state.source,
                endpoint=state.endpoint.name,
                started_at=started,
                run_id=state.run_id,
            )
        if last is None and state.partition is None and kind is not None:
            high_water = larger(state.high_water, cursor_max)
            if high_water is not None:
                await save_cursor(
                    connection,
                    source=state.source,
                    endpoint=state.endpoint.name,
                    value=kind.dump(high_water),
                    run_id=state.run_id,
                )

    def _count_dead_letters(self, state: EndpointRun, count: int) -> None:
        """Enforce ``--max-dead-letters``: over the whole run, or per partition in a backfill."""
        if state.partition is None:
            self.dead_letters_total += count
            total, where = self.dead_letters_total, f"endpoint {state.endpoint.name}"
        else:
            total = state.stats.dead_letters + count
            where = f"endpoint {state.endpoint.name} partition {state.partition.key}"
        limit = self.options.max_dead_letters
        if limit is not None and total > limit:
            raise DeadLetterLimitError(
                f"{where}: {total} records failed conversion, "
                f"more than --max-dead-letters {limit}; see ingest.dead_letters for reasons"
            )
