"""One batch, written exactly once: rows, dead letters and the checkpoint in one transaction.

The consumer tasks of :mod:`ingest.pipeline` hand each batch they take to :meth:`BatchWriter.write`.
It converts the pages (unless the typed decoder already did, or PostgreSQL does with
``load = "server"``), COPYs or stages the rows while other batches may be doing the same, waits
for its turn at the :class:`~ingest.runstate.CommitGate`, then merges, saves dead letters, runs
the partition's lease fence and saves the checkpoint (and the incremental high-water mark at the
end of a walk) in the same transaction. A database error becomes one line saying nothing of the
batch was committed.

A batch has two phases, kept apart so that a writer process (:mod:`ingest.offload`) runs the
same code: the *load* (:func:`convert_pages`, then COPY or stage) may run in parallel with other
batches; the *commit* (:func:`apply_commit`) runs at the batch's turn, from a
:class:`CommitPlan` that only the run's own process can make, because it alone knows what the
batches before this one committed.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson
import structlog

from ingest.config import Endpoint
from ingest.copyenc import EncodedBatch, RecordEncoder, Rows
from ingest.cursor import CursorKind, CursorValue
from ingest.db import Connection
from ingest.errors import DeadLetterLimitError, SinkError, one_line
from ingest.evolve import evolve, missing_key, scan, table_with
from ingest.paths import compile_path
from ingest.rows import RowBuilder
from ingest.runstate import EndpointRun, Fence, RunOptions, larger
from ingest.server_load import FALLBACK_ERRORS
from ingest.sink import REFUSALS, TableSink
from ingest.source import FetchedPage, extract_records
from ingest.state import (
    Checkpoint,
    ChildRecord,
    save_checkpoint,
    save_cursor,
    save_dead_letters,
    save_parent_walk,
)
from ingest.typed import BuiltRows, EnvelopePages, PageParser, RawRecords

log = structlog.get_logger("ingest.batches")

#: Rows of the good records and (record, reason) of the rest.
Converted = tuple[list[tuple[Any, ...]], list[tuple[Any, str]]]


@dataclass(slots=True)
class Staged:
    """What a batch's load phase wrote (COPYed or staged), before its turn to commit."""

    written: int
    dead_letters: int
    #: The highest incremental cursor value among the batch's records.
    batch_max: CursorValue | None
    #: Pages whose records the typed decoder converted.
    typed_pages: int


@dataclass(frozen=True, slots=True)
class BatchTarget:
    """Whose batch it is: the run, source, endpoint and partition the statements name."""

    run_id: uuid.UUID
    source: str
    endpoint: str
    partition: str = ""


@dataclass(frozen=True, slots=True)
class CommitPlan:
    """What a batch's turn adds to its transaction, decided where the commit order is known."""

    #: Merge the staged rows into the target (merge mode, at least one row).
    merge: bool
    checkpoint: Checkpoint
    #: When the child walk this batch ends started (``parents = "changed"``), else None.
    walk_started: dt.datetime | None = None
    #: The incremental high-water mark to save (canonical text), at the end of a walk.
    high_water: str | None = None


def convert_pages(builder: RowBuilder, pages: Sequence[FetchedPage]) -> Converted:
    """Rows of the good records and (record, reason) of the rest, converted in Python."""
    rows: list[tuple[Any, ...]] = []
    rejected: list[tuple[Any, str]] = []
    for page in pages:
        if isinstance(page.records, BuiltRows):  # converted by the typed decoder
            rows.extend(page.records)
            continue
        good, bad = builder.build_many(page.records, page.parent)
        rows.extend(good)
        if bad and page.parent is not None:  # kept with the record for a dead-letter replay
            bad = [(ChildRecord(record, page.parent), reason) for record, reason in bad]
        rejected.extend(bad)
    return rows, rejected


def batch_cursor(
    endpoint: Endpoint, kind: CursorKind | None, pages: Sequence[FetchedPage]
) -> CursorValue | None:
    """The highest incremental cursor value of the pages' records (None without a cursor)."""
    incremental = endpoint.incremental
    if incremental is None or kind is None:
        return None
    get = compile_path(incremental.cursor_path)
    return kind.highest(
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


def typed_count(pages: Sequence[FetchedPage]) -> int:
    return sum(isinstance(page.records, BuiltRows) for page in pages)


def decoded_page(
    endpoint: Endpoint,
    parse: PageParser | None,
    number: int,
    body: bytes | None,
    parent: Any,
    *,
    keep_body: bool = False,
) -> FetchedPage:
    """A page whose records were left as raw JSON, decoded the usual way from its body: typed
    rows or records, exactly as the run's parser would have returned them."""
    records: list[Any] = []
    if body is not None:
        document = parse(body, parent) if parse is not None else orjson.loads(body)
        records = extract_records(document, endpoint.records_path, endpoint.name, f"page {number}")
    return FetchedPage(number, records, None, parent=parent, body=body if keep_body else None)


def raw_records(pages: Sequence[FetchedPage]) -> list[Any] | None:
    """The batch's records as raw JSON text, for the record encoder; None if a page has other
    records (one the envelope parser handed to orjson, say)."""
    if not all(isinstance(page.records, RawRecords) for page in pages):
        return None
    return [record for page in pages for record in page.records]


def redecoded(
    endpoint: Endpoint, parse: PageParser | None, pages: list[FetchedPage]
) -> list[FetchedPage]:
    """Pages the record encoder declined, decoded from their bodies as the endpoint's full
    parser would have (typed rows or records); checkpoints and the rest as they were."""
    return [
        dataclasses.replace(
            page,
            records=decoded_page(endpoint, parse, page.number, page.body, page.parent).records,
        )
        if isinstance(page.records, RawRecords)
        else page
        for page in pages
    ]


@dataclass(slots=True)
class _Batch:
    """One batch's rows between its tries (see :meth:`BatchWriter.write`)."""

    rows: Rows
    rejected: list[tuple[Any, str]]
    staged: Staged
    #: None on the first try; on the second, the rows PostgreSQL refused (then dead letters).
    refused: list[tuple[Any, str]] | None = None


@dataclass(slots=True)
class BatchRows:
    """A batch ready for the load phase: what to COPY, what to dead-letter, and its counts."""

    rows: Rows
    rejected: list[tuple[Any, str]]
    staged: Staged


def convert_batch(
    endpoint: Endpoint,
    builder: RowBuilder,
    cursor: CursorKind | None,
    pages: list[FetchedPage],
    *,
    encoded: EncodedBatch | None,
    parse: PageParser | None,
) -> BatchRows:
    """The batch's rows: ``encoded``, the record encoder's COPY bytes when it took the whole
    batch, else rows built the usual way (pages left as raw records decoded first with
    ``parse``, the endpoint's full parser). The run's process and writer processes both use it."""
    if encoded is not None:
        cursors = encoded.cursors
        batch_max = cursor.highest(None, cursors) if cursor and cursors is not None else None
        return BatchRows(encoded, [], Staged(len(encoded), 0, batch_max, len(pages)))
    pages = redecoded(endpoint, parse, pages)
    rows, rejected = convert_pages(builder, pages)
    batch_max = batch_cursor(endpoint, cursor, pages)
    return BatchRows(
        rows, rejected, Staged(len(rows), len(rejected), batch_max, typed_count(pages))
    )


async def load_rows(
    connection: Connection,
    sink: TableSink,
    rows: Rows,
    *,
    direct: bool,
    refused: list[tuple[Any, str]] | None = None,
) -> None:
    """The load phase's COPY: into the staging table (merge) or the target (append).

    A ``direct`` merge batch COPYs nothing yet: it goes straight into the target at its turn.
    ``refused``: a list for the rows PostgreSQL refuses (a batch's second try), see
    :meth:`ingest.sink.TableSink.copy_refusing`; None for one plain COPY.
    """
    if sink.table.mode == "merge":
        if not direct:
            await sink.stage(connection, rows, refused)
    else:
        await sink.write(connection, rows, refused)


async def merge_at_turn(
    connection: Connection, sink: TableSink, rows: Rows, *, direct: bool
) -> bool:
    """A merge batch into the target, at its turn; True if a direct COPY met a known key.

    Direct COPYs wait for the turn because an uncommitted key in the target makes a later
    batch's insert of the same key wait for it: before the turn that could be a batch that
    waits for this one (unless :class:`ingest.runstate.MergeKeys` rules that out, and the
    run's process COPYs earlier with :func:`copy_or_stage`).
    """
    if direct and not await copy_or_stage(connection, sink, rows):
        return False
    await sink.merge(connection)
    return direct


async def copy_or_stage(connection: Connection, sink: TableSink, rows: Rows) -> bool:
    """A direct merge batch: one COPY into the target, or, when a key is already there, into the
    staging table in the same transaction. True if it staged (the batch still needs a merge)."""
    if await sink.copy_new(connection, rows):
        return False
    await sink.stage(connection, rows)
    return True


async def apply_commit(
    connection: Connection,
    sink: TableSink,
    target: BatchTarget,
    plan: CommitPlan,
    rejected: Sequence[tuple[Any, str]],
    *,
    rows: Rows = (),
    direct: bool = False,
    fence: Fence | None = None,
) -> bool:
    """The commit phase's statements, in the batch's transaction, at its turn.

    Returns True when a ``direct`` merge batch met keys already in the target (see
    :func:`merge_at_turn`): the endpoint's next batches should stage.
    """
    known_keys = plan.merge and await merge_at_turn(connection, sink, rows, direct=direct)
    if rejected:
        await save_dead_letters(
            connection,
            run_id=target.run_id,
            source=target.source,
            endpoint=target.endpoint,
            rejected=rejected,
        )
    if fence is not None:
        await fence(connection, plan.checkpoint.done)
    await save_checkpoint(
        connection,
        source=target.source,
        endpoint=target.endpoint,
        partition=target.partition,
        checkpoint=plan.checkpoint,
        run_id=target.run_id,
    )
    if plan.walk_started is not None:
        await save_parent_walk(
            connection,
            source=target.source,
            endpoint=target.endpoint,
            started_at=plan.walk_started,
            run_id=target.run_id,
        )
    if plan.high_water is not None:
        await save_cursor(
            connection,
            source=target.source,
            endpoint=target.endpoint,
            value=plan.high_water,
            run_id=target.run_id,
        )
    return known_keys


def sink_error(endpoint: Endpoint, partition: str, written: int, exc: BaseException) -> SinkError:
    """The one line for a batch the database refused: nothing of it was committed."""
    where = f" partition {partition}" if partition else ""
    return SinkError(
        f"endpoint {endpoint.name}{where}: writing a batch of {written} rows to "
        f"{endpoint.table.schema_}.{endpoint.table.name} failed "
        f"({type(exc).__name__}: {one_line(exc)}); nothing of it was committed and "
        "the last checkpoint holds: rerun to resume"
    )


#: What a failed batch write raises, in this process or in a writer process.
WRITE_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError)


class BatchWriter:
    """Writes the batches of one run; counts dead letters across the run's endpoints."""

    def __init__(self, pool: asyncpg.Pool, options: RunOptions) -> None:
        self.pool = pool
        self.options = options
        #: Dead letters of the whole run (``--max-dead-letters`` outside backfills).
        self.dead_letters_total = 0

    async def write(self, state: EndpointRun, sequence: int, pages: list[FetchedPage]) -> None:
        if state.decisions is not None:
            await self._write_inferred(state, sequence, pages)
            return
        endpoint = state.endpoint
        rows: Rows = []
        rejected: list[tuple[Any, str]] = []
        if state.server is None:
            encoder = await self._encoder(state)
            records = raw_records(pages) if encoder is not None else None
            converted = convert_batch(
                endpoint,
                state.builder,
                state.cursor,
                pages,
                encoded=await encoder.encode_beside(records)
                if encoder is not None and records is not None
                else None,
                parse=state.typed.full if isinstance(state.typed, EnvelopePages) else None,
            )
            rows, rejected, staged = converted.rows, converted.rejected, converted.staged
            # The records and bodies are in `rows` now; what waits for the turn needs only the
            # pages' checkpoints. In place: the consumer's list would keep them alive otherwise.
            pages[:] = [dataclasses.replace(page, records=(), body=None) for page in pages]
        else:
            batch_max = batch_cursor(endpoint, state.cursor, pages)
            staged = Staged(0, 0, batch_max, typed_count(pages))
        keyed = endpoint.table.mode == "merge" and state.server is None
        if keyed:
            state.merge_keys.register(sequence, state.sink.key_set(rows))
        batch = _Batch(rows, rejected, staged)
        counted = self.dead_letters_total
        try:
            try:
                known_keys, cursor_max = await self._transaction(state, sequence, pages, batch)
            except REFUSALS as exc:
                self.dead_letters_total = counted  # the first try's plan counted them already
                # PostgreSQL refused some value: nothing of the batch was committed. The same
                # batch once more, finding the rows it refuses (dead letters, with its reason).
                log.info(
                    "batch_refused_finding_rows",
                    endpoint=endpoint.name,
                    partition=state.partition_key,
                    sequence=sequence,
                    # The class only: PostgreSQL's message quotes the offending value.
                    reason=type(exc).__name__,
                )
                batch.refused = []
                known_keys, cursor_max = await self._transaction(state, sequence, pages, batch)
        except WRITE_ERRORS as exc:
            raise sink_error(endpoint, state.partition_key, batch.staged.written, exc) from None
        finally:
            if keyed:
                state.merge_keys.release(sequence)
        await self.committed(
            state, sequence, pages, batch.staged, cursor_max, known_keys=known_keys
        )

    async def _transaction(
        self, state: EndpointRun, sequence: int, pages: list[FetchedPage], batch: _Batch
    ) -> tuple[bool, CursorValue | None]:
        """The batch's transaction: load, wait for the turn, commit. Returns whether a direct
        merge batch met known keys, and the walk's cursor maximum after this batch.

        With ``batch.refused`` a list (the second try of a batch PostgreSQL refused), every COPY
        finds the rows PostgreSQL refuses, before the turn: they become dead letters and the
        counts the plan is made of follow.
        """
        endpoint = state.endpoint
        rows, refused, staged = batch.rows, batch.refused, batch.staged
        rejected = list(batch.rejected)
        fence = state.lock_fence or (state.partition.fence if state.partition is not None else None)
        # Server loads stage in PostgreSQL; only Python-built rows go straight into the target.
        # A second try stages too, so that every refused row is found before the turn.
        direct = state.merge_direct and state.server is None and refused is None
        keyed = endpoint.table.mode == "merge" and state.server is None
        # A merge batch's second try stages and merges in parts at its turn (the merge, too,
        # may be refused, and merges go in batch order).
        merge_in_parts = refused is not None and endpoint.table.mode == "merge"
        async with self.pool.acquire() as connection, connection.transaction():
            loaded = None
            copied_early: bool | None = None  # None: not tried before the turn
            if state.server is not None:
                loaded = await self._load_on_server(state, connection, pages, sequence)
            if loaded is not None:
                staged.written = loaded
                merge_in_parts = False
            else:
                if state.server is not None:
                    rows, rejected = convert_pages(state.builder, pages)
                    staged.written, staged.dead_letters = len(rows), len(rejected)
                if merge_in_parts:
                    pass  # at the turn
                elif (
                    keyed and direct and state.merge_keys.may_copy_early(sequence, state.gate.next)
                ):
                    copied_early = not await copy_or_stage(connection, state.sink, rows)
                else:
                    await load_rows(connection, state.sink, rows, direct=direct, refused=refused)
            await state.gate.wait_turn(sequence)
            if merge_in_parts:
                assert refused is not None
                await state.sink.merge_refusing(connection, rows, refused)
            if refused:
                rejected += refused
                staged.written = len(rows) - len(refused)
                staged.dead_letters = len(rejected)
            plan, cursor_max = self.plan(state, pages, staged)
            if copied_early is not None:  # copied (nothing to merge) or staged (merge it)
                plan = dataclasses.replace(plan, merge=plan.merge and not copied_early)
            if merge_in_parts:  # merged already
                plan = dataclasses.replace(plan, merge=False)
            known_keys = await apply_commit(
                connection,
                state.sink,
                self.target(state),
                plan,
                rejected,
                rows=rows,
                direct=direct and copied_early is None,
                fence=fence,
            )
            known_keys = known_keys or copied_early is False
        return known_keys, cursor_max

    async def _write_inferred(
        self, state: EndpointRun, sequence: int, pages: list[FetchedPage]
    ) -> None:
        """A batch of an endpoint without declared columns (see :mod:`ingest.evolve`): at its
        turn, its new fields become columns in its own transaction, then it converts and loads.
        """
        await state.gate.wait_turn(sequence)  # one at a time: an ALTER needs the table alone
        endpoint = state.endpoint
        records = [record for page in pages for record in page.records]
        batch_max = batch_cursor(endpoint, state.cursor, pages)
        pages[:] = [dataclasses.replace(page, records=(), body=None) for page in pages]
        assert state.decisions is not None
        found = scan(endpoint.table, state.decisions, records)
        fence = state.lock_fence or (state.partition.fence if state.partition is not None else None)
        merge = endpoint.table.mode == "merge"
        refused: list[tuple[Any, str]] | None = None
        while True:
            decisions = state.decisions
            table = endpoint.table
            try:
                async with self.pool.acquire() as connection, connection.transaction():
                    if found.new or not decisions:  # the first batch creates the table
                        decisions = await evolve(
                            connection,
                            endpoint,
                            found.new,
                            source=state.source,
                            run_id=state.run_id,
                        )
                        table = table_with(endpoint.table, decisions)
                    sink = TableSink(table)
                    rows, rejected = RowBuilder(table).build_many(found.records)
                    rejected = found.rejected + rejected
                    if key := missing_key(table):  # no record carried it yet: no table
                        reason = f"column {key}: required value is missing (the primary key)"
                        rows = []
                        rejected = found.rejected + [(record, reason) for record in found.records]
                    if not rows:
                        pass
                    elif merge and refused is not None:
                        await sink.merge_refusing(connection, rows, refused)
                    else:
                        await load_rows(connection, sink, rows, direct=False, refused=refused)
                    rejected += refused or []
                    staged = Staged(len(rows) - len(refused or []), len(rejected), batch_max, 0)
                    plan, cursor_max = self.plan(state, pages, staged)
                    if merge and refused is not None:
                        plan = dataclasses.replace(plan, merge=False)  # merged in parts
                    await apply_commit(
                        connection, sink, self.target(state), plan, rejected, fence=fence
                    )
                break
            except REFUSALS as exc:
                if refused is not None:
                    raise sink_error(endpoint, state.partition_key, len(records), exc) from None
                log.info(
                    "batch_refused_finding_rows",
                    endpoint=endpoint.name,
                    sequence=sequence,
                    reason=type(exc).__name__,
                )
                refused = []
            except WRITE_ERRORS as exc:
                raise sink_error(endpoint, state.partition_key, len(records), exc) from None
        if decisions is not state.decisions:  # committed: later batches use the new columns
            if added := len(decisions) - len(state.decisions):
                log.info("columns_added", endpoint=endpoint.name, columns=added, sequence=sequence)
            state.decisions = decisions
            state.endpoint = endpoint.model_copy(update={"table": table})
            state.sink = TableSink(table)
            state.builder = RowBuilder(table)
        await self.committed(state, sequence, pages, staged, cursor_max)

    async def _encoder(self, state: EndpointRun) -> RecordEncoder | None:
        """The endpoint's record encoder, once its target's column types are known to match."""
        sink = state.sink
        if state.encoder is None:
            return None
        if not sink.target_checked:
            async with self.pool.acquire() as connection:
                await sink.target_matches(connection)
        return state.encoder if sink.target_matched else None

    @staticmethod
    def target(state: EndpointRun) -> BatchTarget:
        return BatchTarget(state.run_id, state.source, state.endpoint.name, state.partition_key)

    def plan(
        self, state: EndpointRun, pages: Sequence[FetchedPage], staged: Staged
    ) -> tuple[CommitPlan, CursorValue | None]:
        """At the batch's turn: the dead-letter limit, then the checkpoint after this batch.

        Returns the plan and the walk's cursor maximum once this batch commits.
        """
        if staged.dead_letters:
            self._count_dead_letters(state, staged.dead_letters)
        last = pages[-1].checkpoint
        kind = state.cursor
        cursor_max = larger(state.cursor_max, staged.batch_max)
        checkpoint = Checkpoint(
            state=last,
            done=last is None,
            records=state.base_records + state.stats.records + staged.written,
            pages=state.base_pages + state.stats.pages + len(pages),
            cursor_max=kind.dump(cursor_max) if kind and cursor_max is not None else None,
        )
        walk_end = last is None and state.partition is None
        high_water = larger(state.high_water, cursor_max) if walk_end and kind else None
        plan = CommitPlan(
            merge=state.endpoint.table.mode == "merge" and staged.written > 0,
            checkpoint=checkpoint,
            walk_started=pages[-1].walk_started if walk_end else None,
            high_water=kind.dump(high_water) if kind and high_water is not None else None,
        )
        return plan, cursor_max

    async def committed(
        self,
        state: EndpointRun,
        sequence: int,
        pages: Sequence[FetchedPage],
        staged: Staged,
        cursor_max: CursorValue | None,
        *,
        known_keys: bool = False,
    ) -> None:
        """Count a committed batch and let the next one commit.

        ``known_keys``: a direct merge batch met keys already in the target, so the endpoint's
        next batches stage and merge as usual.
        """
        endpoint = state.endpoint
        state.cursor_max = cursor_max
        if known_keys and state.merge_direct:
            state.merge_direct = False
            log.info("merge_staged_from_now_on", endpoint=endpoint.name, sequence=sequence)
        stats = state.stats
        stats.records += staged.written
        stats.pages += len(pages)
        stats.typed_pages += staged.typed_pages
        stats.dead_letters += staged.dead_letters
        stats.batches += 1
        self.options.observer.batch_committed(
            endpoint.name, rows=staged.written, pages=len(pages), dead_letters=staged.dead_letters
        )
        log.debug(
            "batch_committed",
            endpoint=endpoint.name,
            partition=state.partition_key,
            sequence=sequence,
            rows=staged.written,
            dead_letters=staged.dead_letters,
            page=pages[-1].number,
        )
        await state.gate.committed(sequence)

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
                f"more than --max-dead-letters {limit}; this batch was rolled back, those of "
                "earlier batches are in ingest.dead_letters (`ingest dead-letters list CONFIG`)"
            )
