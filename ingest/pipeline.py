"""Wires producers -> bounded queue -> consumers for every endpoint under one TaskGroup.

Per endpoint: one producer task drives the :func:`~ingest.source.walk_endpoint` generator and
puts each page (its records plus the checkpoint after it) into a bounded ``asyncio.Queue``;
``pipeline.consumers`` consumer tasks take batches off the queue (by record count and by time),
convert them to rows, and write them.

Exactly once: batches are numbered as they are taken. A consumer may COPY in parallel with the
others, but it commits only after the batch before it has committed (the
:class:`~ingest.runstate.CommitGate`), and it commits the batch, its dead letters and the
checkpoint of its last page in one transaction (:mod:`ingest.batches`). So the committed
checkpoint always covers exactly the committed rows, in every interleaving and at every crash
point.

Memory is bounded by configuration: at most ``queue_size`` pages wait in the queue and each
consumer holds at most one batch (``batch_size`` records plus one page).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import time
import uuid
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from typing import Any

import asyncpg
import structlog

from ingest.batches import BatchWriter
from ingest.children import walk_children
from ingest.config import Endpoint, LoadedConfig
from ingest.copyenc import RecordEncoder
from ingest.cursor import CursorValue
from ingest.db import CONNECTION_LOST
from ingest.errors import (
    DatabaseLostError,
    IngestError,
    InterruptedRun,
    LockedError,
    one_line,
)
from ingest.events import NullObserver
from ingest.evolve import Decision, load_decisions, missing_key, table_with
from ingest.http.messages import PageRequest
from ingest.offload import WriterPool
from ingest.paginate import make_paginator
from ingest.rows import RowBuilder
from ingest.runstate import (
    EndpointRun,
    EndpointStats,
    Partition,
    RunOptions,
    RunResult,
    larger,
)
from ingest.server_load import ServerLoad
from ingest.sink import TableSink
from ingest.slices import SLICE_PREFIX, PrimedFetcher, Slice, can_slice, cut, probe, slice_count
from ingest.source import FetchedPage, Fetcher, resume_request, start_request, walk_endpoint
from ingest.state import (
    Checkpoint,
    SourceLock,
    delete_checkpoints,
    finish_run,
    load_checkpoint,
    load_checkpoints,
    load_cursor,
    save_checkpoint,
    save_cursor,
    start_run,
    try_lock_source,
    unlock_source,
    wait_for_commits,
)
from ingest.typed import typed_pages_for

log = structlog.get_logger("ingest.pipeline")

_END = object()
#: Waits between tries to record a run's outcome while PostgreSQL is unreachable.
FINISH_RETRY_WAITS = (0.5, 1.0, 2.0, 4.0)


class Pipeline:
    """One run of one source: the producer/consumer wiring plus run bookkeeping."""

    def __init__(
        self,
        loaded: LoadedConfig,
        pool: asyncpg.Pool,
        fetcher: Fetcher,
        *,
        options: RunOptions | None = None,
        redact_url: Callable[[str], str] = str,
        writers: WriterPool | None = None,
    ) -> None:
        self.loaded = loaded
        self.source = loaded.source
        self.pool = pool
        self.fetcher = fetcher
        self.options = options or RunOptions()
        self.redact_url = redact_url
        self.settings = loaded.source.pipeline
        self.run_id = self.options.run_id or uuid.uuid4()
        self.stats: dict[str, EndpointStats] = {}
        self.writer = BatchWriter(pool, self.options)
        #: Writer processes for the batches of scheduled walks (``pipeline.writer_processes``).
        self.writers = writers
        self._ensured: set[str] = set()
        #: Per endpoint: the fetcher that answers its first request from the slice probe.
        self._primed: dict[str, PrimedFetcher] = {}
        #: The source lock :meth:`run` holds; None in a backfill worker (leases fence it).
        self.lock: SourceLock | None = None

    def selected_endpoints(self) -> list[Endpoint]:
        if not self.options.endpoints:
            return list(self.source.endpoints)
        return [self.source.endpoint(name) for name in self.options.endpoints]

    async def run(self) -> RunResult:
        """Run every selected endpoint (parents before children); raise the first failure."""
        endpoints = self.selected_endpoints()
        async with self.pool.acquire() as lock_connection:
            if not await try_lock_source(lock_connection, self.source.name):
                raise LockedError(
                    f"source {self.source.name} is already being run by another process "
                    "(advisory lock held); try again when it finishes"
                )
            if not await wait_for_commits(lock_connection, self.source.name, seconds=60):
                raise LockedError(
                    f"source {self.source.name}: a writer process of an earlier run is still "
                    "committing after 60 s; try again when it finishes"
                )
            self.lock = await SourceLock.of(lock_connection, self.source.name)
            try:
                async with self.recorded():
                    try:
                        await self._run_endpoints(endpoints)
                    except CONNECTION_LOST as exc:
                        raise DatabaseLostError(
                            f"source {self.source.name}: lost the connection to PostgreSQL "
                            f"({type(exc).__name__}: {one_line(exc)}); the last committed "
                            "checkpoint holds: rerun to resume"
                        ) from None
            finally:
                # Gone with its session if the connection is (a server restart).
                with contextlib.suppress(*CONNECTION_LOST):
                    await unlock_source(lock_connection, self.source.name)
        return self.result()

    def result(self) -> RunResult:
        retries: Counter[str] = Counter(getattr(self.fetcher, "retries", {}))
        interrupted = any(stats.finished is None for stats in self.stats.values())
        return RunResult(self.run_id, self.stats, retries, interrupted=interrupted)

    @contextlib.asynccontextmanager
    async def recorded(self) -> AsyncIterator[None]:
        """A row in ``ingest.runs`` for the body: started now, finished with its outcome."""
        async with self.pool.acquire() as connection:
            self.run_id = await start_run(
                connection,
                command=self.options.command,
                source=self.source.name,
                config_hash=self.loaded.config_hash,
                endpoints=self.options.endpoints,
                run_id=self.options.run_id,
            )
        structlog.contextvars.bind_contextvars(run_id=str(self.run_id), source=self.source.name)
        try:
            try:
                yield
            except BaseException as exc:
                stopped = isinstance(exc, InterruptedRun | asyncio.CancelledError)
                await self._finish("interrupted" if stopped else "failed", one_line(exc))
                raise
            interrupted = any(stats.finished is None for stats in self.stats.values())
            # Everything is committed by now: a run record that cannot be saved is a warning,
            # not a failure, or a scheduler would retry a finished (append mode: duplicating) run.
            await self._finish("interrupted" if interrupted else "succeeded", None)
        finally:
            structlog.contextvars.unbind_contextvars("run_id", "source")

    async def _finish(self, status: str, error: str | None) -> None:
        """Record the run's outcome; a few tries if PostgreSQL is away (restarting), then a
        warning: the outcome itself (the exit code, the committed data) stands either way."""
        # A limited run that failed before its endpoints started still names them.
        endpoints = self._stats_dicts() or {name: {} for name in self.options.endpoints}
        for wait in (*FINISH_RETRY_WAITS, None):
            try:
                async with self.pool.acquire() as connection:
                    await finish_run(
                        connection, self.run_id, status=status, endpoints=endpoints, error=error
                    )
                return
            except CONNECTION_LOST as exc:
                if wait is None:
                    log.warning(
                        "run_record_not_saved",
                        status=status,
                        error=f"{type(exc).__name__}: {one_line(exc)}",
                    )
                    return
                await asyncio.sleep(wait)

    async def run_partition(self, endpoint: Endpoint, partition: Partition) -> EndpointStats:
        """Run one endpoint over one backfill window, inside a :meth:`recorded` run.

        No source lock: partitions are made exclusive by their leases (see :mod:`ingest.leases`),
        so many workers can fill one source at once.
        """
        if endpoint.name not in self._ensured:
            if not endpoint.table.inferred:  # inferred: in _run_endpoint, once resolved
                async with self.pool.acquire() as connection:
                    await TableSink(endpoint.table).ensure(connection)
            self._ensured.add(endpoint.name)
        await self._run_endpoint(endpoint, partition)
        return self.stats[_stats_key(endpoint, partition)]

    def _stats_dicts(self) -> dict[str, dict[str, Any]]:
        """Per-endpoint counts for ``ingest.runs.endpoints``, retries (by reason) included."""
        retries: dict[str, Counter[str]] = getattr(self.fetcher, "retries_by_endpoint", {})
        dicts = {}
        for name, stats in self.stats.items():
            by_reason = retries.get(name, Counter())
            dicts[name] = {
                **stats.as_dict(),
                "retries": sum(by_reason.values()),
                "retries_by_reason": dict(sorted(by_reason.items())),
            }
        return dicts

    async def _run_endpoints(self, endpoints: Sequence[Endpoint]) -> None:
        async with self.pool.acquire() as connection:
            for endpoint in endpoints:
                if not endpoint.table.inferred:  # inferred: in _run_endpoint, once resolved
                    await TableSink(endpoint.table).ensure(connection)
        for wave in _waves(endpoints):
            try:
                async with asyncio.TaskGroup() as group:
                    for endpoint in wave:
                        group.create_task(
                            self._run_endpoint(endpoint), name=f"endpoint:{endpoint.name}"
                        )
            except BaseExceptionGroup as group_error:
                raise first_error(group_error) from None
            if self.options.stop is not None and self.options.stop.is_set():
                # Children wait for the next run: counted as unfinished, so the run is resumable.
                for endpoint in endpoints:
                    self.stats.setdefault(endpoint.name, EndpointStats())
                return

    async def _inferred(self, endpoint: Endpoint) -> tuple[Endpoint, list[Decision]]:
        """An inferred endpoint with the columns decided so far; its table, if it has any."""
        async with self.pool.acquire() as connection:
            decisions = await load_decisions(connection, endpoint.table)
            resolved = endpoint.model_copy(update={"table": table_with(endpoint.table, decisions)})
            if decisions and missing_key(resolved.table) is None:
                await TableSink(resolved.table).ensure(connection)
        return resolved, decisions

    async def _run_endpoint(self, endpoint: Endpoint, partition: Partition | None = None) -> None:
        # This task runs in its own copy of the context, so the binding reaches exactly the
        # log events of this endpoint's producer, consumers and HTTP requests.
        structlog.contextvars.bind_contextvars(endpoint=endpoint.name)
        if (
            partition is None
            and not endpoint.table.inferred
            and can_slice(endpoint)
            and await self._run_sliced(endpoint)
        ):
            return
        decisions: list[Decision] | None = None
        if endpoint.table.inferred:
            endpoint, decisions = await self._inferred(endpoint)
        stats = self.stats.setdefault(_stats_key(endpoint, partition), EndpointStats())
        key = partition.key if partition else ""
        async with self.pool.acquire() as connection:
            checkpoint = await load_checkpoint(connection, self.source.name, endpoint.name, key)
            stored_cursor = (
                await load_cursor(connection, self.source.name, endpoint.name)
                if endpoint.incremental and partition is None
                else None
            )
        resuming = bool(
            checkpoint
            and not checkpoint.done
            and checkpoint.state
            and not self.options.restart
            # A plan of slices left by a config that sliced: this walk cannot resume it.
            and "slices" not in checkpoint.state
        )
        if partition is not None and checkpoint is not None and checkpoint.done:
            # A finished partition whose lease was not yet released: nothing left to fetch.
            stats.finished = time.monotonic()
            if partition.fence is not None:
                async with self.pool.acquire() as connection, connection.transaction():
                    await partition.fence(connection, True)
            return
        cursor = endpoint.incremental.kind() if endpoint.incremental else None
        sink = TableSink(endpoint.table)
        # Backfill windows stay in this process: their lease fence runs in the batch transaction.
        offloaded = (
            self.writers is not None
            and endpoint.table.load == "python"
            and partition is None
            and decisions is None
        )
        # Inferred columns change between batches: their records go through the Python loop.
        typed = typed_pages_for(endpoint, self.settings.typed_decode and decisions is None)
        encoder = (
            RecordEncoder.for_endpoint(endpoint) if typed is not None and not offloaded else None
        )
        state = EndpointRun(
            run_id=self.run_id,
            source=self.source.name,
            endpoint=endpoint,
            sink=sink,
            builder=RowBuilder(endpoint.table),
            server=ServerLoad(endpoint, sink) if endpoint.table.load == "server" else None,
            typed=typed.envelope() if (offloaded or encoder) and typed is not None else typed,
            queue=asyncio.Queue(maxsize=self.settings.queue_size),
            stats=stats,
            base_records=checkpoint.records if resuming and checkpoint else 0,
            base_pages=checkpoint.pages if resuming and checkpoint else 0,
            partition=partition,
            # Slices of this run are partitions without a lease: the run's lock fences them too.
            lock_fence=self.lock.fence if self.lock is not None else None,
            cursor=cursor,
            high_water=cursor.load(stored_cursor) if cursor and stored_cursor else None,
            offloaded=offloaded,
            encoder=encoder,
            # Slices of one run may meet the same key (a record that moved while they ran):
            # every batch stages and upserts at its turn, never COPYs a key another may hold.
            merge_direct=not _is_slice(partition) and decisions is None,
            decisions=decisions,
        )
        if resuming and checkpoint and cursor and checkpoint.cursor_max:
            state.cursor_max = cursor.load(checkpoint.cursor_max)
        stats.resumed = resuming
        pages = self._pages(state, checkpoint.state if resuming and checkpoint else None)
        # A sliced run tells the observer of the endpoint once, not of each slice.
        observer = self.options.observer if not _is_slice(partition) else NullObserver()
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
            log.info("endpoint_done", endpoint=endpoint.name, partition=key, **stats.as_dict())

    def _start_params(self, state: EndpointRun) -> dict[str, str]:
        """Query parameters of a fresh walk: the backfill window, or the incremental lower bound."""
        if state.partition is not None:
            return dict(state.partition.params)
        incremental = state.endpoint.incremental
        if incremental is None or state.cursor is None:
            return {}
        lower = _lower_bound(state.endpoint, state.high_water)
        if lower is None:
            return {}
        return {incremental.param: state.cursor.render(lower)}

    async def _run_sliced(self, endpoint: Endpoint) -> bool:
        """Run the endpoint as slices walked at once (:mod:`ingest.slices`); False: serially.

        A stored plan (the endpoint's checkpoint holds ``{"slices": [...]}``) is resumed as it
        is; a serial walk in progress stays serial; otherwise a new plan is made and saved
        before any slice starts.
        """
        incremental = endpoint.incremental
        assert incremental is not None
        kind = incremental.kind()
        async with self.pool.acquire() as connection:
            checkpoint = await load_checkpoint(connection, self.source.name, endpoint.name)
            stored = await load_cursor(connection, self.source.name, endpoint.name)
        high_water = kind.load(stored) if stored else None
        unfinished = (
            checkpoint is not None
            and not checkpoint.done
            and checkpoint.state is not None
            and not self.options.restart
        )
        if unfinished and checkpoint is not None and "slices" in (checkpoint.state or {}):
            assert checkpoint.state is not None
            slices = [Slice.from_state(item) for item in checkpoint.state["slices"]]
            resumed = True
        elif unfinished:
            return False
        else:
            slices = await self._plan_slices(endpoint, high_water)
            if len(slices) <= 1:
                return False
            resumed = False
            async with self.pool.acquire() as connection, connection.transaction():
                await delete_checkpoints(
                    connection, self.source.name, endpoint.name, prefix=SLICE_PREFIX
                )
                await save_checkpoint(
                    connection,
                    source=self.source.name,
                    endpoint=endpoint.name,
                    checkpoint=Checkpoint(
                        {"slices": [item.to_state() for item in slices]}, False, 0, 0
                    ),
                    run_id=self.run_id,
                )
        log.info("slices", endpoint=endpoint.name, slices=len(slices), resumed=resumed)
        await self._walk_slices(endpoint, slices, high_water, resumed=resumed)
        return True

    async def _plan_slices(self, endpoint: Endpoint, high_water: CursorValue | None) -> list[Slice]:
        """This run's slices, or none (a range too small, or of unknown bounds: serial)."""
        incremental = endpoint.incremental
        assert incremental is not None
        kind = incremental.kind()
        lower = _lower_bound(endpoint, high_water)
        upper = dt.datetime.now(dt.UTC)
        if lower is None or not lower < upper:  # type: ignore[operator]
            return []
        pages: float | None = None
        begin: CursorValue | None = None
        if incremental.slices == "auto":
            base = start_request(self.source.base_url, endpoint)
            paginator = make_paginator(endpoint.pagination)
            first = paginator.first_request(
                base.with_params(**{incremental.param: kind.render(lower)})
            )
            found = await probe(endpoint, self.fetcher, first, kind=kind, lower=lower, upper=upper)
            pages, begin = found.pages, found.begin
            count = slice_count(incremental.slices, self.source.http.max_concurrency, pages)
            if count <= 1:
                self._primed[endpoint.name] = PrimedFetcher(
                    self.fetcher, found.request, found.response
                )
                return []
        else:
            count = slice_count(incremental.slices, self.source.http.max_concurrency, None)
        slices = cut(kind, lower, upper, count, begin)
        log.info(
            "slices_planned",
            endpoint=endpoint.name,
            slices=len(slices),
            estimated_pages=round(pages) if pages is not None else None,
            lower=kind.dump(lower),
        )
        return slices

    async def _walk_slices(
        self,
        endpoint: Endpoint,
        slices: Sequence[Slice],
        high_water: CursorValue | None,
        *,
        resumed: bool,
    ) -> None:
        """Walk every slice at once; when all have committed, move the high-water mark."""
        incremental = endpoint.incremental
        assert incremental is not None
        kind = incremental.kind()
        observer = self.options.observer
        observer.endpoint_started(endpoint.name, resumed=resumed, total=None)
        started = time.monotonic()
        ok = False
        try:
            async with asyncio.TaskGroup() as group:
                for item in slices:
                    partition = Partition(item.key, item.params(endpoint, kind))
                    group.create_task(
                        self._run_endpoint(endpoint, partition), name=f"slice:{endpoint.name}"
                    )
            ok = True
        finally:
            parts = [
                self.stats.pop(f"{endpoint.name}[{item.key}]", EndpointStats()) for item in slices
            ]
            stats = self.stats.setdefault(endpoint.name, EndpointStats(started=started))
            stats.resumed = resumed
            for part in parts:
                stats.pages += part.pages
                stats.records += part.records
                stats.dead_letters += part.dead_letters
                stats.batches += part.batches
                stats.typed_pages += part.typed_pages
            finished = ok and all(part.finished is not None for part in parts)
            observer.endpoint_finished(endpoint.name, ok=finished)
        if not finished:
            return
        keys = [item.key for item in slices]
        async with self.pool.acquire() as connection, connection.transaction():
            done = await load_checkpoints(connection, self.source.name, endpoint.name, keys)
            if len(done) < len(keys) or not all(point.done for point in done.values()):
                return
            if self.lock is not None:
                await self.lock.fence(connection, True)
            best = high_water
            for point in done.values():
                if point.cursor_max is not None:
                    best = larger(best, kind.load(point.cursor_max))
            if best is not None:
                await save_cursor(
                    connection,
                    source=self.source.name,
                    endpoint=endpoint.name,
                    value=kind.dump(best),
                    run_id=self.run_id,
                )
            await save_checkpoint(
                connection,
                source=self.source.name,
                endpoint=endpoint.name,
                checkpoint=Checkpoint(
                    None,
                    True,
                    sum(point.records for point in done.values()),
                    sum(point.pages for point in done.values()),
                    kind.dump(best) if best is not None else None,
                ),
                run_id=self.run_id,
            )
            await delete_checkpoints(
                connection, self.source.name, endpoint.name, prefix=SLICE_PREFIX
            )
        stats.finished = time.monotonic()
        log.info("endpoint_done", endpoint=endpoint.name, slices=len(slices), **stats.as_dict())

    def _pages(
        self, state: EndpointRun, resume: dict[str, Any] | None
    ) -> AsyncGenerator[FetchedPage, None]:
        """The endpoint's pages: a plain walk, or one walk per parent row for a child endpoint."""
        endpoint = state.endpoint
        params = self._start_params(state)
        if endpoint.parent is not None:
            parallel = endpoint.parallel_parents or self.source.http.max_concurrency
            return walk_children(
                endpoint,
                self.source.endpoint(endpoint.parent),
                pool=self.pool,
                fetcher=self.fetcher,
                base_url=self.source.base_url,
                params=params,
                state=resume,
                redact_url=self.redact_url,
                pages_ahead=self._child_pages_ahead(endpoint, parallel),
                credential_params=self.source.credential_params(),
                typed=state.typed,
                source=self.source.name,
                # A backfill window is history: every parent's, whatever changed lately.
                only_changed=endpoint.parents == "changed" and state.partition is None,
                keep_body=state.raw_records,
                parallel=parallel,
            )
        primed = self._primed.pop(endpoint.name, None)
        fetcher: Fetcher = primed if primed is not None else self.fetcher
        paginator = make_paginator(endpoint.pagination)
        first: PageRequest
        if resume is not None:
            first = resume_request(resume, paginator)
            log.info(
                "resuming",
                endpoint=endpoint.name,
                partition=state.partition_key,
                url=self.redact_url(first.full_url()),
                records_before=state.base_records,
            )
        else:
            base = start_request(self.source.base_url, endpoint).with_params(**params)
            first = paginator.first_request(base)
        return walk_endpoint(
            endpoint,
            fetcher,
            paginator,
            first,
            resumed=resume is not None,
            redact_url=self.redact_url,
            pages_ahead=self.source.pages_ahead(endpoint),
            credential_params=self.source.credential_params(),
            parse=state.typed,
            keep_body=state.raw_records,
        )

    def _child_pages_ahead(self, endpoint: Endpoint, parallel: int) -> int:
        """Pages fetched ahead inside each parent's walk: one at a time when several parents
        are walked at once (they fill the concurrency budget without speculative requests past
        each parent's end), unless the endpoint itself sets ``pages_ahead``."""
        if parallel > 1:
            return endpoint.pages_ahead or 1
        return self.source.pages_ahead(endpoint)

    async def _produce(self, state: EndpointRun, pages: AsyncGenerator[FetchedPage, None]) -> None:
        """Move pages into the queue until the walk ends or a stop is asked for.

        A stop does not wait for the fetch in flight (a slow server could hold it for the whole
        read timeout): the fetch is cancelled, what is queued is still written and checkpointed.
        """
        stop = self.options.stop
        observer = self.options.observer
        reported: int | None = None
        try:
            while True:
                page = await _next_or_stop(pages, stop)
                if page is None:
                    break
                if page is _STOPPED:
                    state.interrupted = True
                    break
                assert isinstance(page, FetchedPage)
                await state.queue.put(page)
                if page.total is not None and page.total != reported:
                    reported = page.total
                    # This run's share: what earlier runs committed is not left to fetch.
                    observer.total_known(
                        state.endpoint.name, total=max(0, reported - state.base_records)
                    )
                observer.page_fetched(
                    state.endpoint.name, records=len(page.records), queue_depth=state.queue.qsize()
                )
                if page.checkpoint is None:
                    break
                if stop is not None and stop.is_set():
                    state.interrupted = True
                    break
        finally:
            await pages.aclose()
        await state.queue.put(_END)

    async def _take_batch(self, state: EndpointRun) -> tuple[int, list[FetchedPage]]:
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

    async def _consume(self, state: EndpointRun) -> None:
        while True:
            async with state.take_lock:
                sequence, pages = await self._take_batch(state)
            if not pages:
                return
            if state.offloaded and self.writers is not None:
                await self.writers.write(self.writer, state, sequence, pages)
            else:
                await self.writer.write(state, sequence, pages)


_STOPPED = object()


async def _next_or_stop(
    pages: AsyncGenerator[FetchedPage, None], stop: asyncio.Event | None
) -> FetchedPage | object | None:
    """The next page, ``None`` at the end, or ``_STOPPED`` if ``stop`` is set first."""
    if stop is None:
        return await anext(pages, None)
    if stop.is_set():
        return _STOPPED
    fetch = asyncio.ensure_future(anext(pages, None))
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({fetch, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        # Never leave the fetch running on its own, whether we stop or are cancelled ourselves.
        stopped.cancel()
        if not fetch.done():
            fetch.cancel()
            await asyncio.wait({fetch})
    if fetch.cancelled():
        return _STOPPED
    return fetch.result()


def _is_slice(partition: Partition | None) -> bool:
    return partition is not None and partition.key.startswith(SLICE_PREFIX)


def _lower_bound(endpoint: Endpoint, high_water: CursorValue | None) -> CursorValue | None:
    """A fresh incremental walk's lower bound: the high-water mark minus the lookback, else
    the configured start, else none (everything)."""
    incremental = endpoint.incremental
    if incremental is None:
        return None
    kind = incremental.kind()
    if high_water is not None:
        return kind.minus(high_water, kind.parse_step(incremental.lookback))
    if incremental.start is not None:
        return kind.parse_bound(incremental.start)
    return None


def _stats_key(endpoint: Endpoint, partition: Partition | None) -> str:
    return f"{endpoint.name}[{partition.key}]" if partition else endpoint.name


def _waves(endpoints: Sequence[Endpoint]) -> list[list[Endpoint]]:
    """Endpoints in dependency order: a child runs after its parent when both are selected."""
    waves: list[list[Endpoint]] = []
    remaining = list(endpoints)
    while remaining:
        pending = {endpoint.name for endpoint in remaining}
        wave = [endpoint for endpoint in remaining if endpoint.parent not in pending]
        waves.append(wave)
        remaining = [endpoint for endpoint in remaining if endpoint not in wave]
    return waves


def first_error(
    group: BaseExceptionGroup[Any], preferred: tuple[type[BaseException], ...] = (IngestError,)
) -> BaseException:
    """The most telling exception of a task group: the first of the ``preferred`` kinds, in
    their order of preference, else the first one raised."""
    leaves: list[BaseException] = []

    def collect(error: BaseException) -> None:
        if isinstance(error, BaseExceptionGroup):
            for inner in error.exceptions:
                collect(inner)
        else:
            leaves.append(error)

    collect(group)
    for kind in preferred:
        for leaf in leaves:
            if isinstance(leaf, kind):
                return leaf
    return leaves[0]
