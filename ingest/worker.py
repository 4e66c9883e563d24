"""A backfill worker: claims partitions from PostgreSQL, runs each one, keeps its lease alive.

Any number of ``ingest worker`` processes, on any number of machines, can share one database:
the lease protocol in :mod:`ingest.leases` keeps every partition with one worker at a time, and
each partition's checkpoint lets whoever holds it next resume where the last holder committed.
``ingest backfill`` runs the same worker in-process with ``drain=True``.

One worker runs ``concurrency`` slots; each slot claims a partition, runs it through the
:class:`~ingest.pipeline.Pipeline` (same queue, consumers and transactions as ``ingest run``),
and renews its lease every third of ``lease_seconds`` while it does.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import structlog

from ingest import leases
from ingest.config import Endpoint, LoadedConfig
from ingest.db import Connection
from ingest.errors import (
    ConfigError,
    ExitCode,
    IngestError,
    InterruptedRun,
    LeaseLostError,
    one_line,
)
from ingest.events import NullObserver, RunObserver
from ingest.leases import PartitionRow
from ingest.pipeline import Pipeline, first_error
from ingest.runner import connected, stop_on_signals
from ingest.runstate import EndpointStats, Partition, RunOptions
from ingest.secrets import Redactor
from ingest.source import Fetcher

log = structlog.get_logger("ingest.worker")


@dataclass(frozen=True, slots=True)
class WorkerOptions:
    """How a worker takes and holds partitions."""

    command: str = "worker"
    endpoints: tuple[str, ...] = ()
    #: Only these partition keys (``ingest backfill`` works the windows it planned).
    keys: tuple[str, ...] | None = None
    concurrency: int = 2
    lease_seconds: float = 30.0
    poll_seconds: float = 2.0
    #: Exit when nothing is claimable instead of polling for new partitions.
    drain: bool = False
    max_attempts: int = 3
    max_dead_letters: int | None = None
    observer: RunObserver = field(default_factory=NullObserver)


@dataclass(slots=True)
class WorkerResult:
    """What one worker did: partitions by outcome, and committed records."""

    run_id: uuid.UUID | None = None
    done: int = 0
    failed: int = 0
    lost: int = 0
    interrupted: int = 0
    records: int = 0
    errors: list[str] = field(default_factory=list)
    #: The exit code each failed partition's error carries (a scheduler maps them to retries).
    exit_codes: list[int] = field(default_factory=list)


def worker_id() -> str:
    """``host:pid:random``: readable in ``ingest.partitions.lease_owner``, unique per process."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def window_params(endpoint: Endpoint, row: PartitionRow) -> dict[str, str]:
    """The query parameters that restrict a walk to one partition's window."""
    incremental = endpoint.incremental
    if incremental is None or incremental.end_param is None:
        raise ConfigError(
            f"endpoint {endpoint.name}: a backfill needs [endpoints.incremental] with param and "
            "end_param (the query parameters for a window's lower and upper bound)"
        )
    kind = incremental.kind()
    return {
        incremental.param: kind.render(kind.load(row.lower)),
        incremental.end_param: kind.render(kind.load(row.upper)),
    }


class Worker:
    """Claims and runs partitions until none is left (``drain``) or a stop is asked for."""

    def __init__(
        self,
        loaded: LoadedConfig,
        pool: asyncpg.Pool,
        fetcher: Fetcher,
        options: WorkerOptions,
        *,
        stop: asyncio.Event,
        redact_url: Any = str,
    ) -> None:
        self.source = loaded.source
        self.pool = pool
        self.options = options
        self.stop = stop
        self.owner = worker_id()
        self.result = WorkerResult()
        self.pipeline = Pipeline(
            loaded,
            pool,
            fetcher,
            options=RunOptions(
                command=options.command,
                max_dead_letters=options.max_dead_letters,
                stop=stop,
                observer=options.observer,
            ),
            redact_url=redact_url,
        )

    async def run(self) -> WorkerResult:
        for name in self.options.endpoints:
            self.source.endpoint(name)  # unknown names are a config error before any claim
        log.info("worker_started", owner=self.owner, concurrency=self.options.concurrency)
        async with self.pipeline.recorded():
            self.result.run_id = self.pipeline.run_id
            async with asyncio.TaskGroup() as group:
                for index in range(self.options.concurrency):
                    group.create_task(self._slot(), name=f"slot:{index}")
        log.info("worker_stopped", owner=self.owner, done=self.result.done)
        return self.result

    async def _slot(self) -> None:
        while not self.stop.is_set():
            async with self.pool.acquire() as connection:
                row = await leases.claim(
                    connection,
                    source=self.source.name,
                    owner=self.owner,
                    lease_seconds=self.options.lease_seconds,
                    endpoints=self.options.endpoints,
                    keys=self.options.keys,
                )
            if row is None:
                if self.options.drain and not await self._others_hold_work():
                    return
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.options.poll_seconds):
                        await self.stop.wait()
                continue
            await self._work(row)

    async def _others_hold_work(self) -> bool:
        """Draining waits for partitions leased by others: if their worker died, we resume them."""
        async with self.pool.acquire() as connection:
            count = await leases.leased_elsewhere(
                connection,
                source=self.source.name,
                owner=self.owner,
                endpoints=self.options.endpoints,
                keys=self.options.keys,
            )
        return count > 0

    async def _work(self, row: PartitionRow) -> None:
        endpoint = self.source.endpoint(row.endpoint)
        lease = self.options.lease_seconds

        async def fence(connection: Connection, done: bool) -> None:
            await leases.fence(connection, row, self.owner, lease, done=done)

        partition = Partition(row.key, window_params(endpoint, row), fence)
        log.info(
            "partition_claimed", endpoint=row.endpoint, partition=row.key, attempt=row.attempts
        )
        try:
            async with asyncio.TaskGroup() as group:
                beat = group.create_task(self._heartbeat(row), name=f"heartbeat:{row.key}")
                try:
                    stats = await self.pipeline.run_partition(endpoint, partition)
                finally:
                    beat.cancel()
        except BaseExceptionGroup as group_error:
            self.pipeline.stats.pop(f"{endpoint.name}[{row.key}]", None)
            error = first_error(group_error, (LeaseLostError, IngestError, Exception))
            if isinstance(error, LeaseLostError):
                self.result.lost += 1
                log.warning("partition_lease_lost", endpoint=row.endpoint, partition=row.key)
                return
            if not isinstance(error, Exception):
                raise error from None
            await self._failed(row, error)
            return
        self._count(endpoint, row.key, stats)
        if stats.finished is None:
            self.result.interrupted += 1
            await self._release(row, None)
            log.info("partition_interrupted", endpoint=row.endpoint, partition=row.key)
        else:
            self.result.done += 1
            log.info("partition_done", endpoint=row.endpoint, partition=row.key)

    async def _failed(self, row: PartitionRow, error: Exception) -> None:
        message = one_line(error)
        self.result.failed += 1
        self.result.errors.append(f"{row.endpoint} {row.key}: {message}")
        code = error.exit_code if isinstance(error, IngestError) else ExitCode.FAILED
        self.result.exit_codes.append(int(code))
        log.error("partition_failed", endpoint=row.endpoint, partition=row.key, error=message)
        await self._release(row, message)

    async def _release(self, row: PartitionRow, error: str | None) -> None:
        async with self.pool.acquire() as connection:
            await leases.release(
                connection, row, self.owner, error=error, max_attempts=self.options.max_attempts
            )

    async def _heartbeat(self, row: PartitionRow) -> None:
        """Renew the lease; raise :class:`LeaseLostError` (cancelling the work) once it is gone."""
        interval = self.options.lease_seconds / 3
        while True:
            await asyncio.sleep(interval)
            try:
                async with self.pool.acquire() as connection:
                    kept = await leases.renew(
                        connection, row, self.owner, self.options.lease_seconds
                    )
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
                log.warning("heartbeat_failed", partition=row.key, error=str(exc))
                continue
            if not kept:
                raise LeaseLostError(f"partition {row.key}: lease lost")

    def _count(self, endpoint: Endpoint, key: str, stats: EndpointStats) -> None:
        """Fold a partition's stats into the endpoint's totals (keeps run records small)."""
        self.pipeline.stats.pop(f"{endpoint.name}[{key}]", None)
        totals = self.pipeline.stats.setdefault(endpoint.name, EndpointStats())
        totals.records += stats.records
        totals.pages += stats.pages
        totals.dead_letters += stats.dead_letters
        totals.batches += stats.batches
        totals.finished = totals.finished or time.monotonic()
        self.result.records += stats.records


async def run_worker(
    loaded: LoadedConfig,
    dsn: str | None,
    redactor: Redactor,
    options: WorkerOptions,
    stop: asyncio.Event | None = None,
) -> WorkerResult:
    """A worker process's whole life: connect, install signal handlers, claim until done."""
    stop = stop or asyncio.Event()
    consumers = loaded.source.pipeline.consumers
    pool_size = options.concurrency * (consumers + 2) + 2
    async with connected(loaded, dsn, redactor, pool_size=pool_size, observer=options.observer) as (
        pool,
        http,
    ):
        worker = Worker(loaded, pool, http, options, stop=stop, redact_url=redactor.url)
        try:
            with stop_on_signals(stop):
                result = await worker.run()
        except asyncio.CancelledError:
            raise InterruptedRun(
                "worker cancelled by a second signal; committed checkpoints hold and its leases "
                "expire for other workers to resume"
            ) from None
    if stop.is_set():
        raise InterruptedRun(
            f"worker stopped by a signal after committing its checkpoints ({result.done} "
            f"partitions done, {result.interrupted} handed back): rerun to resume"
        )
    return result


def summary(result: WorkerResult, counts: dict[str, int] | None = None) -> str:
    """A few lines for stdout."""
    lines = [
        f"partitions: {result.done} done, {result.failed} failed, {result.lost} lost, "
        f"{result.interrupted} handed back; {result.records} records"
    ]
    if counts is not None:
        lines.append("all partitions: " + ", ".join(f"{k}={v}" for k, v in counts.items()))
    lines.extend(f"failed: {error}" for error in result.errors[:10])
    return "\n".join(lines)
