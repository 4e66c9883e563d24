"""``ingest backfill``: split a cursor range into windows, store them, work them with leases.

The windows become rows of ``ingest.partitions`` (keyed by their bounds, so the same command
plans the same keys). The command then runs an in-process :class:`~ingest.worker.Worker` over
exactly those partitions with ``parallel`` slots: finished partitions are skipped, unfinished
ones resume from their checkpoints, and ``ingest worker`` processes elsewhere may help.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from ingest import leases
from ingest.config import Endpoint, LoadedConfig
from ingest.cursor import CursorKind
from ingest.db import open_pool
from ingest.errors import ConfigError, IngestError, InterruptedRun
from ingest.migrate import pending
from ingest.secrets import Redactor
from ingest.worker import WorkerOptions, WorkerResult, run_worker

#: A guard against a typo like ``--window 1s`` over ten years.
MAX_PARTITIONS = 100_000


@dataclass(frozen=True, slots=True)
class BackfillPlan:
    endpoint: str
    windows: tuple[tuple[str, str, str], ...]  # (key, lower, upper) in canonical text

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(key for key, _, _ in self.windows)


@dataclass(slots=True)
class BackfillResult:
    planned: int
    new: int
    worker: WorkerResult | None
    counts: dict[str, int]


class BackfillFailed(IngestError):
    """Some partitions failed for good (after their attempts); rerun the command to retry them."""


def plan_windows(endpoint: Endpoint, start: str, end: str, window: str) -> BackfillPlan:
    """``[start, end)`` cut into ``window``-sized partitions (the last one may be shorter)."""
    incremental = endpoint.incremental
    if incremental is None or incremental.end_param is None:
        raise ConfigError(
            f"endpoint {endpoint.name}: a backfill needs [endpoints.incremental] with param and "
            "end_param (the query parameters for a window's lower and upper bound)"
        )
    kind: CursorKind = incremental.kind()
    try:
        lower, upper = kind.parse_bound(start), kind.parse_bound(end)
    except ValueError as exc:
        raise ConfigError(f"--from/--to: {exc}") from None
    try:
        step = kind.parse_step(window)
    except ValueError as exc:
        raise ConfigError(f"--window: {exc}") from None
    if not step:
        raise ConfigError("--window: must be greater than zero")
    if not lower < upper:  # type: ignore[operator]
        raise ConfigError(f"--from {start} must be before --to {end}")
    windows: list[tuple[str, str, str]] = []
    current = lower
    while current < upper:  # type: ignore[operator]
        following = min(kind.plus(current, step), upper)
        low, high = kind.dump(current), kind.dump(following)
        windows.append((f"{low}/{high}", low, high))
        current = following
        if len(windows) > MAX_PARTITIONS:
            raise ConfigError(f"--window {window} makes more than {MAX_PARTITIONS} partitions")
    return BackfillPlan(endpoint.name, tuple(windows))


async def run_backfill(
    loaded: LoadedConfig,
    dsn: str | None,
    redactor: Redactor,
    backfill: BackfillPlan,
    options: WorkerOptions,
    *,
    plan_only: bool = False,
    stop: asyncio.Event | None = None,
) -> BackfillResult:
    """Store the plan, then (unless ``plan_only``) work its partitions until none is claimable."""
    source = loaded.source.name
    async with open_pool(dsn, size=2) as pool, pool.acquire() as connection:
        missing = await pending(connection)
        if missing:
            raise ConfigError(
                f"database schema is not up to date (pending: {', '.join(missing)}): "
                "run `ingest migrate` first"
            )
        new = await leases.plan(
            connection, source=source, endpoint=backfill.endpoint, windows=backfill.windows
        )
    worker: WorkerResult | None = None
    if not plan_only:
        worker = await run_worker(
            loaded,
            dsn,
            redactor,
            WorkerOptions(
                command="backfill",
                endpoints=(backfill.endpoint,),
                keys=backfill.keys,
                concurrency=options.concurrency,
                lease_seconds=options.lease_seconds,
                drain=True,
                max_attempts=options.max_attempts,
                max_dead_letters=options.max_dead_letters,
                observer=options.observer,
            ),
            stop,
        )
    async with open_pool(dsn, size=1) as pool, pool.acquire() as connection:
        counts = await leases.counts(
            connection, source=source, endpoint=backfill.endpoint, keys=backfill.keys
        )
        failed = await leases.failures(
            connection, source=source, endpoint=backfill.endpoint, keys=backfill.keys
        )
    result = BackfillResult(len(backfill.windows), new, worker, counts)
    if failed:
        key, error = failed[0]
        raise BackfillFailed(
            f"endpoint {backfill.endpoint}: {len(failed)} of {len(backfill.windows)} partitions "
            f"failed (first: {key}: {error}); rerun the same command to retry them"
        )
    if worker is not None and counts["pending"]:
        raise InterruptedRun(
            f"endpoint {backfill.endpoint}: {counts['pending']} partitions still pending: "
            "rerun the same command to resume"
        )
    return result
