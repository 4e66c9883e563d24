"""``python -m ingest.writer_process``: one writer process of a run (see :mod:`ingest.offload`).

It reads frames from stdin and answers on stdout, nothing else: a :class:`WriterSetup`, then for
each batch a :class:`BatchJob` (answered with :class:`StagedBatch` once the rows are COPYed in
an open transaction) and the batch's :class:`CommitPlan` (answered with :class:`Committed`).
Any other frame, or end of file, rolls the open batch back; end of file also ends the process,
so a writer never outlives its run's process by more than the statement it is in.

SIGINT and SIGTERM are ignored: a terminal or a process manager signals the whole group, and
it is the run's process that decides how a stop ends (queued batches are still committed).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import sys
from typing import IO, Any

import asyncpg
import structlog

from ingest.batches import (
    WRITE_ERRORS,
    BatchRows,
    BatchTarget,
    CommitPlan,
    apply_commit,
    convert_batch,
    decoded_page,
    load_rows,
    raw_records,
    sink_error,
)
from ingest.config import Endpoint
from ingest.copyenc import RecordEncoder, Rows
from ingest.db import describe_dsn
from ingest.errors import one_line
from ingest.log import configure_logging
from ingest.offload import (
    BatchJob,
    Committed,
    Failed,
    Ready,
    StagedBatch,
    WriterSetup,
    read_frame,
    write_frame,
)
from ingest.pgcodecs import install_codecs
from ingest.rows import RowBuilder
from ingest.sink import REFUSALS, TableSink
from ingest.state import hold_commits_shared
from ingest.tuning import relaxed_gc
from ingest.typed import TypedPages, typed_pages_for

#: How a writer's connection shows in ``pg_stat_activity``.
APPLICATION_NAME = "ingest writer"


class _EndpointWork:
    """What converting and writing one endpoint's pages needs, built once per writer."""

    def __init__(self, endpoint: Endpoint, typed_decode: bool) -> None:
        self.endpoint = endpoint
        self.sink = TableSink(endpoint.table)
        self.builder = RowBuilder(endpoint.table)
        self.typed: TypedPages | None = typed_pages_for(endpoint, typed_decode)
        self.cursor = endpoint.incremental.kind() if endpoint.incremental else None
        self.encoder = RecordEncoder.for_endpoint(endpoint) if self.typed is not None else None
        self.envelope = self.typed.envelope() if self.typed and self.encoder else None

    async def convert(self, connection: asyncpg.Connection, job: BatchJob) -> BatchRows:
        """The job's pages converted as the run's own process would (record encoder first)."""
        encoder = self.encoder
        if encoder is not None and not await self.sink.target_matches(connection):
            encoder = None
        parse = self.envelope if encoder is not None else self.typed
        # With the encoder: raw records, and the bodies for what it declines.
        pages = [
            decoded_page(self.endpoint, parse, number, body, parent, keep_body=encoder is not None)
            for number, body, parent in job.pages
        ]
        records = raw_records(pages) if encoder is not None else None
        encoded = encoder.encode(records) if encoder is not None and records is not None else None
        return convert_batch(
            self.endpoint, self.builder, self.cursor, pages, encoded=encoded, parse=self.typed
        )


class _Writer:
    def __init__(self, setup: WriterSetup, frames_in: IO[bytes], frames_out: IO[bytes]) -> None:
        self.setup = setup
        self.frames_in = frames_in
        self.frames_out = frames_out
        self.work: dict[str, _EndpointWork] = {}

    async def serve(self) -> None:
        try:
            connection = await asyncpg.connect(
                self.setup.dsn, server_settings={"application_name": APPLICATION_NAME}
            )
        except (OSError, ValueError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            write_frame(
                self.frames_out,
                Failed(
                    f"writer process: cannot connect to PostgreSQL at "
                    f"{describe_dsn(self.setup.dsn)}: {self.setup.redactor(one_line(exc))}"
                ),
            )
            return
        try:
            await install_codecs(connection)
            write_frame(self.frames_out, Ready())
            while (job := read_frame(self.frames_in)) is not None:
                assert isinstance(job, BatchJob)
                await self.batch(connection, job)
        finally:
            await connection.close()

    async def batch(self, connection: asyncpg.Connection, job: BatchJob) -> None:
        """Load the batch in a transaction, then commit it at the plan's word, or roll back."""
        if job.endpoint is not None:
            self.work[job.endpoint_name] = _EndpointWork(job.endpoint, self.setup.typed_decode)
        work = self.work[job.endpoint_name]
        # The same context as the run's own log lines (typed decoder fallbacks, say).
        structlog.contextvars.bind_contextvars(
            run_id=str(job.run_id), source=self.setup.source, endpoint=job.endpoint_name
        )
        written = 0
        transaction = connection.transaction()
        try:
            await transaction.start()  # inside: the connection may be gone (a server restart)
            await hold_commits_shared(connection, self.setup.source)
            converted = await work.convert(connection, job)
            rows, rejected, staged = converted.rows, converted.rejected, converted.staged
            written, batch_max = staged.written, staged.batch_max
            direct = job.direct
            merge = work.sink.table.mode == "merge"
            merge_in_parts = False  # staged and merged in parts at the turn
            try:
                await load_rows(connection, work.sink, rows, direct=direct)
            except REFUSALS:
                # PostgreSQL refused a value: the batch once more, finding the rows it refuses
                # (a merge batch at its turn, where the merge may be refused too).
                transaction = await self._restart(connection, transaction)
                merge_in_parts = merge
                if not merge:
                    refused: list[tuple[Any, str]] = []
                    await load_rows(connection, work.sink, rows, direct=False, refused=refused)
                    rejected = [*rejected, *refused]
                    staged.written -= len(refused)
                    staged.dead_letters = len(rejected)
                    written = staged.written
            dumped = work.cursor.dump(batch_max) if work.cursor and batch_max is not None else None
            write_frame(
                self.frames_out,
                StagedBatch(written, staged.dead_letters, dumped, staged.typed_pages),
            )
            plan = read_frame(self.frames_in)
            if not isinstance(plan, CommitPlan):  # end of file: the run's process is gone
                await transaction.rollback()
                if plan is None:
                    raise EOFError
                return
            target = BatchTarget(job.run_id, self.setup.source, job.endpoint_name)
            if merge_in_parts:
                known_keys, late = await self._merge_in_parts(
                    connection, work.sink, target, plan, rejected, rows=rows
                )
            else:
                try:
                    known_keys = await apply_commit(
                        connection, work.sink, target, plan, rejected, rows=rows, direct=direct
                    )
                    late = 0
                except REFUSALS:
                    if not merge:
                        raise
                    # The direct COPY or the merge at the turn was refused: in parts instead.
                    transaction = await self._restart(connection, transaction)
                    known_keys, late = await self._merge_in_parts(
                        connection, work.sink, target, plan, rejected, rows=rows
                    )
            await transaction.commit()
        except WRITE_ERRORS as exc:
            await _rollback_quietly(transaction)
            error = sink_error(work.endpoint, "", written, exc)
            write_frame(self.frames_out, Failed(self.setup.redactor(str(error))))
            return
        except EOFError:
            raise
        except Exception as exc:
            await _rollback_quietly(transaction)
            write_frame(
                self.frames_out,
                Failed(
                    f"endpoint {job.endpoint_name}: a writer process failed on a batch "
                    f"({type(exc).__name__}: {self.setup.redactor(one_line(exc))}); nothing of "
                    "it was committed and the last checkpoint holds: rerun to resume"
                ),
            )
            return
        write_frame(self.frames_out, Committed(known_keys, refused=late))

    @staticmethod
    async def _merge_in_parts(
        connection: asyncpg.Connection,
        sink: TableSink,
        target: BatchTarget,
        plan: CommitPlan,
        rejected: list[tuple[Any, str]],
        *,
        rows: Rows,
    ) -> tuple[bool, int]:
        """A merge batch's turn, staged and merged in parts to find the rows PostgreSQL
        refuses (dead letters); the rest of the plan as sent. Returns (known keys, refused)."""
        refused: list[tuple[Any, str]] = []
        await sink.merge_refusing(connection, rows, refused)
        checkpoint = dataclasses.replace(
            plan.checkpoint, records=plan.checkpoint.records - len(refused)
        )
        known_keys = await apply_commit(
            connection,
            sink,
            target,
            dataclasses.replace(plan, merge=False, checkpoint=checkpoint),
            [*rejected, *refused],
            rows=rows,
        )
        return known_keys, len(refused)

    async def _restart(self, connection: asyncpg.Connection, transaction: Any) -> Any:
        """Roll the batch's transaction back and start it again (with its shared lock)."""
        await transaction.rollback()
        transaction = connection.transaction()
        await transaction.start()
        await hold_commits_shared(connection, self.setup.source)
        return transaction


async def _rollback_quietly(transaction: Any) -> None:
    # If the connection is gone, PostgreSQL rolled the transaction back itself.
    with contextlib.suppress(*WRITE_ERRORS):
        await transaction.rollback()


def main() -> int:
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    frames_in = sys.stdin.buffer
    frames_out = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # a stray print never corrupts a frame
    setup = read_frame(frames_in)
    if not isinstance(setup, WriterSetup):
        return 2
    configure_logging(setup.redactor, level=setup.log_level, fmt=setup.log_format)
    writer = _Writer(setup, frames_in, frames_out)
    try:
        with relaxed_gc():
            asyncio.run(writer.serve())
    except (EOFError, BrokenPipeError):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
