"""Wires producers -> bounded queue -> consumers for every endpoint under one TaskGroup.

Per endpoint: one producer task drives the :func:`~ingest.source.walk_endpoint` generator and
puts each page (its records plus the checkpoint after it) into a bounded ``asyncio.Queue``;
``pipeline.consumers`` consumer tasks take batches off the queue (by record count and by time),
convert them to rows, and write them.

Exactly once: batches are numbered as they are taken. A consumer may COPY in parallel with the
others, but it commits only after the batch before it has committed (the :class:`CommitGate`),
and it commits the batch, its dead letters and the checkpoint of its last page in one
transaction. So the committed checkpoint always covers exactly the committed rows, in every
interleaving and at every crash point.

Memory is bounded by configuration: at most ``queue_size`` pages wait in the queue and each
consumer holds at most one batch (``batch_size`` records plus one page).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import structlog

from ingest.config import Endpoint, LoadedConfig
from ingest.errors import DeadLetterLimitError, IngestError, InterruptedRun, LockedError
from ingest.events import NullObserver, RunObserver
from ingest.http.messages import PageRequest
from ingest.paginate import make_paginator
from ingest.rows import RowBuilder
from ingest.sink import TableSink
from ingest.source import FetchedPage, Fetcher, resume_request, start_request, walk_endpoint
from ingest.state import (
    Checkpoint,
    finish_run,
    load_checkpoint,
    save_checkpoint,
    save_dead_letters,
    start_run,
    try_lock_source,
    unlock_source,
)

log = structlog.get_logger("ingest.pipeline")


@dataclass(frozen=True, slots=True)
class RunOptions:
    """What a caller may vary per run."""

    command: str = "run"
    endpoints: tuple[str, ...] = ()
    restart: bool = False
    max_dead_letters: int | None = None
    stop: asyncio.Event | None = None
    observer: RunObserver = field(default_factory=NullObserver)


@dataclass(slots=True)
class EndpointStats:
    """Counters for one endpoint in one run; committed numbers only."""

    pages: int = 0
    records: int = 0
    dead_letters: int = 0
    batches: int = 0
    resumed: bool = False
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None

    @property
    def seconds(self) -> float:
        return (self.finished or time.monotonic()) - self.started

    @property
    def records_per_second(self) -> float:
        return self.records / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "pages": self.pages,
            "records": self.records,
            "dead_letters": self.dead_letters,
            "batches": self.batches,
            "resumed": self.resumed,
            "seconds": round(self.seconds, 3),
            "records_per_second": round(self.records_per_second, 1),
        }


@dataclass(slots=True)
class RunResult:
    run_id: uuid.UUID
    endpoints: dict[str, EndpointStats]
    retries: Counter[str]
    interrupted: bool = False


class CommitGate:
    """Lets batch ``n`` commit only after batch ``n - 1`` has committed."""

    def __init__(self) -> None:
        self._next = 0
        self._changed = asyncio.Condition()

    async def wait_turn(self, sequence: int) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self._next == sequence)

    async def committed(self, sequence: int) -> None:
        async with self._changed:
            self._next = sequence + 1
            self._changed.notify_all()


_END = object()


@dataclass(slots=True)
class _EndpointRun:
    """Shared state of one endpoint's producer and consumers."""

    endpoint: Endpoint
    sink: TableSink
    builder: RowBuilder
    queue: asyncio.Queue[Any]
    stats: EndpointStats
    base_records: int
    base_pages: int
    gate: CommitGate = field(default_factory=CommitGate)
    take_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    next_sequence: int = 0
    ended: bool = False
    interrupted: bool = False


class Pipeline:
    """One run of one source: the producer/consumer wiring plus run bookkeeping."""

    def __init__(
        self,
        loaded: LoadedConfig,
        pool: asyncpg.Pool,
        fetcher: Fetcher,
        *,
        options: RunOptions = RunOptions(),
        redact_url: Callable[[str], str] = str,
    ) -> None:
        self.loaded = loaded
        self.source = loaded.source
        self.pool = pool
        self.fetcher = fetcher
        self.options = options
        self.redact_url = redact_url
        self.settings = loaded.source.pipeline
        self.run_id = uuid.uuid4()
        self.stats: dict[str, EndpointStats] = {}
        self._dead_letters_total = 0

    def selected_endpoints(self) -> list[Endpoint]:
        if not self.options.endpoints:
            return list(self.source.endpoints)
        return [self.source.endpoint(name) for name in self.options.endpoints]

    async def run(self) -> RunResult:
        """Run every selected endpoint concurrently; raise the first failure after cleanup."""
        endpoints = self.selected_endpoints()
        async with self.pool.acquire() as lock_connection:
            if not await try_lock_source(lock_connection, self.source.name):
                raise LockedError(
                    f"source {self.source.name} is already being run by another process "
                    "(advisory lock held); try again when it finishes"
                )
            try:
                self.run_id = await start_run(
                    lock_connection,
                    command=self.options.command,
                    source=self.source.name,
                    config_hash=self.loaded.config_hash,
                )
                structlog.contextvars.bind_contextvars(
                    run_id=str(self.run_id), source=self.source.name
                )
                try:
                    await self._run_endpoints(endpoints)
                except BaseException as exc:
                    await finish_run(
                        lock_connection,
                        self.run_id,
                        status="interrupted" if isinstance(exc, InterruptedRun) else "failed",
                        endpoints=self._stats_dicts(),
                        error=_one_line(exc),
                    )
                    raise
                interrupted = any(stats.finished is None for stats in self.stats.values())
                await finish_run(
                    lock_connection,
                    self.run_id,
                    status="interrupted" if interrupted else "succeeded",
                    endpoints=self._stats_dicts(),
                )
            finally:
                structlog.contextvars.unbind_contextvars("run_id", "source")
                await unlock_source(lock_connection, self.source.name)
        retries: Counter[str] = Counter(getattr(self.fetcher, "retries", {}))
        return RunResult(self.run_id, self.stats, retries, interrupted=interrupted)

    def _stats_dicts(self) -> dict[str, dict[str, Any]]:
        return {name: stats.as_dict() for name, stats in self.stats.items()}

    async def _run_endpoints(self, endpoints: Sequence[Endpoint]) -> None:
        async with self.pool.acquire() as connection:
            for endpoint in endpoints:
                await TableSink(endpoint.table).ensure(connection)
        try:
            async with asyncio.TaskGroup() as group:
                for endpoint in endpoints:
                    group.create_task(
                        self._run_endpoint(endpoint), name=f"endpoint:{endpoint.name}"
                    )
        except BaseExceptionGroup as group_error:
            raise _first_error(group_error) from None

    async def _run_endpoint(self, endpoint: Endpoint) -> None:
        stats = self.stats.setdefault(endpoint.name, EndpointStats())
        paginator = make_paginator(endpoint.pagination)
        async with self.pool.acquire() as connection:
            checkpoint = await load_checkpoint(connection, self.source.name, endpoint.name)
        first: PageRequest
        base_records = base_pages = 0
        if checkpoint and not checkpoint.done and checkpoint.state and not self.options.restart:
            first = resume_request(checkpoint.state, paginator)
            base_records, base_pages = checkpoint.records, checkpoint.pages
            stats.resumed = True
            log.info(
                "resuming",
                endpoint=endpoint.name,
                url=self.redact_url(first.full_url()),
                records_before=base_records,
            )
        else:
            first = paginator.first_request(start_request(self.source.base_url, endpoint))
        state = _EndpointRun(
            endpoint=endpoint,
            sink=TableSink(endpoint.table),
            builder=RowBuilder(endpoint.table),
            queue=asyncio.Queue(maxsize=self.settings.queue_size),
            stats=stats,
            base_records=base_records,
            base_pages=base_pages,
        )
        pages = walk_endpoint(
            endpoint,
            self.fetcher,
            paginator,
            first,
            resumed=stats.resumed,
            redact_url=self.redact_url,
        )
        observer = self.options.observer
        observer.endpoint_started(endpoint.name, resumed=stats.resumed, total=None)
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._produce(state, pages), name=f"produce:{endpoint.name}")
                for index in range(self.settings.consumers):
                    group.create_task(self._consume(state), name=f"consume:{endpoint.name}:{index}")
        except BaseException:
            observer.endpoint_finished(endpoint.name, ok=False)
            raise
        observer.endpoint_finished(endpoint.name, ok=not state.interrupted)
        if not state.interrupted:
            stats.finished = time.monotonic()
            log.info("endpoint_done", endpoint=endpoint.name, **stats.as_dict())

    async def _produce(self, state: _EndpointRun, pages: Any) -> None:
        try:
            async for page in pages:
                await state.queue.put(page)
                self.options.observer.page_fetched(
                    state.endpoint.name, records=len(page.records), queue_depth=state.queue.qsize()
                )
                if self.options.stop is not None and self.options.stop.is_set():
                    state.interrupted = page.checkpoint is not None
                    break
        finally:
            await pages.aclose()
        await state.queue.put(_END)

    async def _take_batch(self, state: _EndpointRun) -> tuple[int, list[FetchedPage]]:
        """Up to ``batch_size`` records (whole pages), or what arrived within ``batch_seconds``."""
        pages: list[FetchedPage] = []
        count = 0
        deadline: float | None = None
        loop = asyncio.get_running_loop()
        while count < self.settings.batch_size and not state.ended:
            if deadline is None:
                item = await state.queue.get()
            else:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    async with asyncio.timeout(remaining):
                        item = await state.queue.get()
                except TimeoutError:
                    break
            if item is _END:
                state.ended = True
                break
            pages.append(item)
            count += len(item.records)
            if deadline is None:
                deadline = loop.time() + self.settings.batch_seconds
        sequence = state.next_sequence
        if pages:
            state.next_sequence += 1
        return sequence, pages

    async def _consume(self, state: _EndpointRun) -> None:
        while True:
            async with state.take_lock:
                sequence, pages = await self._take_batch(state)
            if not pages:
                return
            await self._write_batch(state, sequence, pages)

    async def _write_batch(
        self, state: _EndpointRun, sequence: int, pages: list[FetchedPage]
    ) -> None:
        endpoint = state.endpoint
        records = [record for page in pages for record in page.records]
        rows, rejected = state.builder.build_many(records)
        merge = endpoint.table.mode == "merge"
        async with self.pool.acquire() as connection, connection.transaction():
            if merge:
                await state.sink.stage(connection, rows)
            else:
                await state.sink.write(connection, rows)
            await state.gate.wait_turn(sequence)
            if merge and rows:
                await state.sink.merge(connection)
            if rejected:
                self._count_dead_letters(endpoint, len(rejected))
                await save_dead_letters(
                    connection,
                    run_id=self.run_id,
                    source=self.source.name,
                    endpoint=endpoint.name,
                    rejected=rejected,
                )
            stats = state.stats
            last = pages[-1].checkpoint
            await save_checkpoint(
                connection,
                source=self.source.name,
                endpoint=endpoint.name,
                checkpoint=Checkpoint(
                    state=last,
                    done=last is None,
                    records=state.base_records + stats.records + len(rows),
                    pages=state.base_pages + stats.pages + len(pages),
                ),
                run_id=self.run_id,
            )
        stats.records += len(rows)
        stats.pages += len(pages)
        stats.dead_letters += len(rejected)
        stats.batches += 1
        self.options.observer.batch_committed(
            endpoint.name, rows=len(rows), pages=len(pages), dead_letters=len(rejected)
        )
        log.debug(
            "batch_committed",
            endpoint=endpoint.name,
            sequence=sequence,
            rows=len(rows),
            dead_letters=len(rejected),
            page=pages[-1].number,
        )
        await state.gate.committed(sequence)

    def _count_dead_letters(self, endpoint: Endpoint, count: int) -> None:
        self._dead_letters_total += count
        limit = self.options.max_dead_letters
        if limit is not None and self._dead_letters_total > limit:
            raise DeadLetterLimitError(
                f"endpoint {endpoint.name}: {self._dead_letters_total} records failed conversion, "
                f"more than --max-dead-letters {limit}; see ingest.dead_letters for reasons"
            )


def _first_error(group: BaseExceptionGroup[Any]) -> BaseException:
    """The most telling exception of a task group: an IngestError if there is one."""
    leaves: list[BaseException] = []

    def collect(error: BaseException) -> None:
        if isinstance(error, BaseExceptionGroup):
            for inner in error.exceptions:
                collect(inner)
        else:
            leaves.append(error)

    collect(group)
    for leaf in leaves:
        if isinstance(leaf, IngestError):
            return leaf
    return leaves[0]


def _one_line(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    return " ".join(text.split())
