"""Writer processes: batches converted and written in other processes, committed in run order.

Why: the GIL binds one Python process to one core. On the benchmark's data, decoding the pages
into rows and asyncpg's COPY encoding are about three quarters of ingest's CPU, while the
PostgreSQL server leaves much of a second core idle (docs/performance.md). With
``pipeline.writer_processes = N`` the run's process still fetches, walks, queues and decides
every checkpoint, but reads only each page's envelope (:meth:`ingest.typed.TypedPages.envelope`)
and hands whole batches of page bodies to N writer processes (:mod:`ingest.writer_process`).
Each opens its own connection, converts the pages exactly as the run's process would
(:func:`ingest.batches.convert_pages`), COPYs them inside a transaction it keeps open, and
commits only when the run's process sends the batch's :class:`~ingest.batches.CommitPlan` at
its turn at the :class:`~ingest.runstate.CommitGate`.

Exactly once holds as in one process: a batch, its dead letters and its checkpoint commit in one
transaction, in batch order. If the run's process dies, its writers read end-of-file and roll
back. A writer already told to commit may still be committing a batch whose checkpoint is its
own; that is consistent, but a next run must not read the checkpoints before it lands, so every
writer transaction holds a shared advisory lock of the source that a run takes exclusively
(:func:`ingest.state.wait_for_commits`) before it reads them.

Messages are pickled frames (4-byte length, then the pickle) over the writer's stdin and stdout:
the writer is a child of this process and reads nothing else; the DSN travels in the first
frame, never on a command line.
"""

from __future__ import annotations

import asyncio
import contextlib
import pickle
import struct
import sys
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import IO, Any

import structlog

from ingest.batches import BatchWriter, CommitPlan, Staged
from ingest.config import Endpoint
from ingest.errors import IngestError, SinkError
from ingest.log import LogFormat
from ingest.runstate import EndpointRun
from ingest.secrets import Redactor
from ingest.source import FetchedPage

log = structlog.get_logger("ingest.offload")

_HEADER = struct.Struct("!I")
#: How long a writer may take to finish and exit once its stdin closes.
CLOSE_SECONDS = 10.0


@dataclass(frozen=True, slots=True)
class WriterSetup:
    """The first frame: what every writer process needs for the whole run."""

    dsn: str | None
    source: str
    redactor: Redactor
    log_level: str
    log_format: LogFormat
    typed_decode: bool


@dataclass(frozen=True, slots=True)
class BatchJob:
    """Convert and stage one batch; the writer keeps its transaction open for the plan."""

    run_id: uuid.UUID
    endpoint_name: str
    #: The endpoint's config, sent the first time this writer meets the endpoint, else None.
    endpoint: Endpoint | None
    #: (page number, body or None for a page without records, parent row or None) per page.
    pages: list[tuple[int, bytes | None, Mapping[str, Any] | None]]
    #: A merge batch goes straight into the target at its turn (``EndpointRun.merge_direct``).
    direct: bool = False


@dataclass(frozen=True, slots=True)
class Ready:
    """The writer is connected and waits for batches."""


@dataclass(frozen=True, slots=True)
class StagedBatch:
    """The writer's answer to a :class:`BatchJob`: what its load phase wrote."""

    written: int
    dead_letters: int
    #: The batch's highest cursor value in the cursor's canonical text, or None.
    batch_max: str | None
    typed_pages: int


@dataclass(frozen=True, slots=True)
class Committed:
    """The batch and its checkpoint are committed."""

    #: A direct merge batch met keys already in the target (it merged through staging).
    known_keys: bool = False
    #: Rows PostgreSQL refused at the turn (a direct merge batch's COPY): dead letters, not
    #: written, after the :class:`StagedBatch` counts.
    refused: int = 0


@dataclass(frozen=True, slots=True)
class Failed:
    """The batch was not committed; ``message`` is the one-line error for the user."""

    message: str


def frame(message: Any) -> bytes:
    """One message as it travels: its pickle's length, then the pickle."""
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(payload)) + payload


def write_frame(stream: IO[bytes], message: Any) -> None:
    """Blocking write of one frame (the writer process's side)."""
    stream.write(frame(message))
    stream.flush()


def read_frame(stream: IO[bytes]) -> Any:
    """Blocking read of one frame; None at end of file (the writer process's side)."""
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        return None
    (size,) = _HEADER.unpack(header)
    payload = stream.read(size)
    if len(payload) < size:
        return None
    return pickle.loads(payload)


class WriterGoneError(IngestError):
    """A writer process exited or closed its pipe in the middle of a batch."""


class WriterProcess:
    """One child ``python -m ingest.writer_process`` and its two pipes."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        #: Endpoints whose config this writer has already been sent.
        self.known: set[str] = set()

    @classmethod
    async def start(cls, setup: WriterSetup) -> WriterProcess:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "ingest.writer_process",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        writer = cls(process)
        try:
            await writer.send(setup)
            reply = await writer.receive("starting")
        except BaseException:
            writer.kill()
            raise
        if isinstance(reply, Failed):
            await writer.close()
            raise IngestError(reply.message)
        return writer

    async def send(self, message: Any) -> None:
        stdin = self.process.stdin
        assert stdin is not None
        try:
            stdin.write(frame(message))
            await stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            raise self._gone("receiving a batch") from None

    async def receive(self, doing: str) -> Any:
        stdout = self.process.stdout
        assert stdout is not None
        try:
            header = await stdout.readexactly(_HEADER.size)
            (size,) = _HEADER.unpack(header)
            return pickle.loads(await stdout.readexactly(size))
        except asyncio.IncompleteReadError:
            raise self._gone(doing) from None

    def _gone(self, doing: str) -> WriterGoneError:
        code = self.process.returncode
        status = f"exit code {code}" if code is not None else "pipe closed"
        return WriterGoneError(
            f"writer process {self.process.pid} ended while {doing} ({status}); nothing of "
            "its batch was committed unless its checkpoint says so: rerun to resume"
        )

    def kill(self) -> None:
        """End the writer now: its connection closes and its open transaction rolls back."""
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()

    async def close(self) -> None:
        """Close its stdin (it exits at end of file), wait a while, then end it."""
        stdin = self.process.stdin
        if stdin is not None and not stdin.is_closing():
            stdin.close()
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                await stdin.wait_closed()
        try:
            async with asyncio.timeout(CLOSE_SECONDS):
                await self.process.wait()
        except TimeoutError:
            self.kill()
            await self.process.wait()


class WriterPool:
    """The run's writer processes; a consumer borrows one for each batch it writes.

    They start in the background while the run fetches its first pages (starting one costs an
    interpreter and its imports); the first batch waits for them.
    """

    def __init__(self, count: int, setup: WriterSetup) -> None:
        self.count = count
        self.setup = setup
        self._idle: asyncio.Queue[WriterProcess] = asyncio.Queue()
        self._starts: list[asyncio.Future[WriterProcess]] = []
        self._all: list[WriterProcess] = []

    async def __aenter__(self) -> WriterPool:
        self._starts = [
            asyncio.ensure_future(WriterProcess.start(self.setup)) for _ in range(self.count)
        ]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _started(self) -> None:
        """Wait for every writer to be ready; raise the first start failure."""
        for start in self._starts:
            writer = await start
            if writer not in self._all:
                self._all.append(writer)
                self._idle.put_nowait(writer)

    async def close(self) -> None:
        for start in self._starts:
            start.cancel()
        results = await asyncio.gather(*self._starts, return_exceptions=True)
        writers = [result for result in results if isinstance(result, WriterProcess)]
        await asyncio.gather(*(writer.close() for writer in writers))

    async def write(
        self, batches: BatchWriter, state: EndpointRun, sequence: int, pages: list[FetchedPage]
    ) -> None:
        """:meth:`BatchWriter.write` with the load and commit phases in a writer process."""
        endpoint = state.endpoint
        await self._started()
        await state.writer_order.wait_turn(sequence)
        writer = await self._idle.get()
        await state.writer_order.committed(sequence)
        reusable = False
        try:
            job = BatchJob(
                run_id=state.run_id,
                endpoint_name=endpoint.name,
                endpoint=None if endpoint.name in writer.known else endpoint,
                pages=[
                    (page.number, page.body if page.records else None, page.parent)
                    for page in pages
                ],
                direct=state.merge_direct,
            )
            await writer.send(job)
            writer.known.add(endpoint.name)
            reply = await writer.receive("converting a batch")
            if isinstance(reply, Failed):
                reusable = True  # it rolled back; the run fails on this error anyway
                raise SinkError(reply.message)
            assert isinstance(reply, StagedBatch)
            kind = state.cursor
            staged = Staged(
                reply.written,
                reply.dead_letters,
                kind.load(reply.batch_max) if kind and reply.batch_max is not None else None,
                reply.typed_pages,
            )
            await state.gate.wait_turn(sequence)
            plan: CommitPlan
            plan, cursor_max = batches.plan(state, pages, staged)
            if state.lock_fence is not None:
                # The writer's transaction holds `commits` shared since it began, so checked
                # now the lock covers its commit as the fence covers an in-process batch's.
                async with batches.pool.acquire() as connection:
                    await state.lock_fence(connection, plan.checkpoint.done)
            await writer.send(plan)
            reply = await writer.receive("committing a batch")
            reusable = True
            if isinstance(reply, Failed):
                raise SinkError(reply.message)
            assert isinstance(reply, Committed)
            staged.written -= reply.refused
            staged.dead_letters += reply.refused
        finally:
            if reusable:
                self._idle.put_nowait(writer)
            else:  # mid-batch: its transaction must not outlive this write
                writer.kill()
        await batches.committed(
            state, sequence, pages, staged, cursor_max, known_keys=reply.known_keys
        )
