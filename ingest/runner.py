"""Runs a command end to end: database pool, schema check, HTTP client, pipeline, signals.

Signals: the first SIGINT/SIGTERM asks the pipeline to stop fetching; what is queued is written
and checkpointed, then the run exits with the interrupted-resumable code. A second signal
cancels at once; open transactions roll back, so the last committed checkpoint still holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import signal
from collections.abc import AsyncIterator, Callable, Iterator

import asyncpg
import structlog

from ingest.config import LoadedConfig
from ingest.db import database_in_use, open_pool
from ingest.errors import ConfigError, InterruptedRun, LockedError
from ingest.events import RunObserver
from ingest.http.client import HttpClient
from ingest.log import resolved_format
from ingest.migrate import pending
from ingest.offload import WriterPool, WriterSetup
from ingest.pipeline import Pipeline
from ingest.runstate import RunOptions, RunResult, attach_result
from ingest.secrets import Redactor
from ingest.slices import most_slices
from ingest.tuning import relaxed_gc

log = structlog.get_logger("ingest.runner")


@contextlib.contextmanager
def stop_on_signals(stop: asyncio.Event) -> Iterator[None]:
    """First signal: graceful stop. Second: cancel the current task."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    installed: list[signal.Signals] = []

    def handle(signum: signal.Signals) -> None:
        if stop.is_set():
            log.warning("second_signal_cancelling", signal=signum.name)
            if task is not None:
                task.cancel()
            return
        log.warning("signal_received_stopping", signal=signum.name)
        stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(signum, handle, signum)
            installed.append(signum)
        except (NotImplementedError, RuntimeError):  # not the main thread, or no signals
            pass
    try:
        yield
    finally:
        for signum in installed:
            loop.remove_signal_handler(signum)


@contextlib.asynccontextmanager
async def connected(
    loaded: LoadedConfig,
    dsn: str | None,
    redactor: Redactor,
    *,
    pool_size: int,
    observer: RunObserver,
    announce: Callable[[str], None] | None = None,
) -> AsyncIterator[tuple[asyncpg.Pool, HttpClient]]:
    """A pool on an up-to-date schema and the source's HTTP client, for any command that runs.

    ``announce`` is told which database the pool reached before anything is written there.
    """
    async with open_pool(dsn, size=pool_size) as pool:
        async with pool.acquire() as connection:
            missing = await pending(connection)
            if announce is not None:
                announce(str(await database_in_use(connection)))
        if missing:
            raise ConfigError(
                f"database schema is not up to date (pending: {', '.join(missing)}): "
                "run `ingest migrate` first"
            )
        async with HttpClient(loaded.source, redactor, observer=observer) as http:
            yield pool, http


@contextlib.asynccontextmanager
async def writer_pool(
    loaded: LoadedConfig, dsn: str | None, redactor: Redactor, options: RunOptions
) -> AsyncIterator[WriterPool | None]:
    """The run's writer processes (``pipeline.writer_processes``), or None for none."""
    settings = loaded.source.pipeline
    if settings.writer_processes == 0:
        yield None
        return
    setup = WriterSetup(
        dsn=dsn,
        source=loaded.source.name,
        redactor=redactor,
        log_level=options.log_level,
        log_format=resolved_format(options.log_format),
        typed_decode=settings.typed_decode,
    )
    async with WriterPool(settings.writer_processes, setup) as writers:
        yield writers


async def run_source(
    loaded: LoadedConfig,
    dsn: str | None,
    redactor: Redactor,
    options: RunOptions,
) -> RunResult:
    """One run of one source; raises an IngestError (with its exit code) on failure."""
    source = loaded.source
    stop = options.stop or asyncio.Event()
    options = dataclasses.replace(options, stop=stop)
    # A connection for every consumer of every endpoint (of every slice of a sliced one).
    walks = sum(most_slices(endpoint, source.http.max_concurrency) for endpoint in source.endpoints)
    pool_size = walks * source.pipeline.consumers + 2
    pipeline: Pipeline | None = None
    try:
        async with connected(
            loaded,
            dsn,
            redactor,
            pool_size=pool_size,
            observer=options.observer,
            announce=options.announce_database,
        ) as (pool, http):
            try:
                with stop_on_signals(stop), relaxed_gc():
                    async with writer_pool(loaded, dsn, redactor, options) as writers:
                        pipeline = Pipeline(
                            loaded,
                            pool,
                            http,
                            options=options,
                            redact_url=redactor.url,
                            writers=writers,
                        )
                        result = await pipeline.run()
            except asyncio.CancelledError:
                raise InterruptedRun(
                    "run cancelled by a second signal; the last committed checkpoint holds: "
                    "rerun to resume"
                ) from None
        if result.interrupted:
            raise InterruptedRun(
                f"run {result.run_id} stopped by a signal after committing its checkpoint: "
                "rerun to resume"
            )
    except BaseException as error:
        # A run that was recorded (it got past the source lock) reports what it did.
        if pipeline is not None and not isinstance(error, LockedError):
            attach_result(error, pipeline.result())
        raise
    return result
