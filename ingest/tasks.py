"""Run ingest in-process from a scheduler's task: a source run, a backfill plan, one partition.

Each function is synchronous (a scheduler's task is a plain function), runs one coroutine with
``asyncio.run`` and returns ``(exit code, summary)`` instead of raising, so a scheduler adapter
(:mod:`ingest.airflow`) only maps the code to its own outcomes. The codes are the CLI's
(:class:`~ingest.errors.ExitCode`); the summary is JSON-serialisable (an XCom value).

Why not shell out to the CLI: the summary would have to be parsed back from text. Why the
signal and logging dance: a scheduler's worker process has its own SIGTERM handler (it asks the
task to stop) and its own structlog configuration; ingest takes them over only while it runs, so
a SIGTERM during a run stops it gracefully (checkpoint committed, exit 4), and both are restored
afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import structlog

from ingest import leases
from ingest.config import load_config
from ingest.db import open_pool, resolve_dsn
from ingest.errors import ExitCode, IngestError, one_line
from ingest.log import configure_logging
from ingest.runstate import RunOptions
from ingest.secrets import Redactor

Summary = dict[str, Any]


@dataclass(frozen=True, slots=True)
class TaskSettings:
    """What every task takes: where the database is and how to log."""

    dsn: str | None = None
    log_level: str = "info"


@contextlib.contextmanager
def _borrowed_process_state() -> Iterator[None]:
    """Give back SIGINT/SIGTERM handlers and structlog's configuration as they were."""
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    config = structlog.get_config()
    try:
        yield
    finally:
        structlog.configure(**config)
        for signum, handler in handlers.items():
            if handler is not None:
                with contextlib.suppress(ValueError):  # not the main thread: nothing was changed
                    signal.signal(signum, handler)


def _call(
    settings: TaskSettings,
    redactor: Redactor,
    work: Callable[[], Coroutine[Any, Any, Summary]],
    summary: Summary,
) -> tuple[int, Summary]:
    """Run ``work``; on an error put its one-line (redacted) message into ``summary``."""
    with _borrowed_process_state():
        configure_logging(redactor, level=settings.log_level, fmt="auto", stream=sys.stderr)
        try:
            summary.update(asyncio.run(work()))
            code = int(summary.get("exit_code", ExitCode.OK))
        except IngestError as exc:
            code = int(exc.exit_code)
            summary["error"] = redactor(one_line(exc))
        except KeyboardInterrupt:
            code = int(ExitCode.INTERRUPTED)
            summary["error"] = "interrupted"
        except Exception as exc:  # a bug or an unforeseen failure: one line, redacted
            code = int(ExitCode.FAILED)
            summary["error"] = redactor(f"unexpected {type(exc).__name__}: {one_line(exc)}")
    summary["exit_code"] = code
    return code, summary


def run_source_task(
    config: str,
    endpoints: Sequence[str] = (),
    *,
    settings: TaskSettings | None = None,
    restart: bool = False,
    max_dead_letters: int | None = None,
) -> tuple[int, Summary]:
    """``ingest run CONFIG [--endpoint ...]`` in this process."""
    from ingest.runner import run_source  # noqa: PLC0415

    settings = settings or TaskSettings()
    redactor = Redactor()

    async def work() -> Summary:
        loaded = load_config(config)
        options = RunOptions(
            command="airflow",
            endpoints=tuple(endpoints),
            restart=restart,
            max_dead_letters=max_dead_letters,
            log_level=settings.log_level,
        )
        result = await run_source(loaded, resolve_dsn(settings.dsn), redactor, options)
        stats = {name: value.as_dict() for name, value in result.endpoints.items()}
        return {
            "source": loaded.source.name,
            "run_id": str(result.run_id),
            "endpoints": stats,
            "records": sum(value.records for value in result.endpoints.values()),
            "dead_letters": sum(value.dead_letters for value in result.endpoints.values()),
            "retries": dict(result.retries),
        }

    return _call(settings, redactor, work, {"config": config})


def plan_backfill_task(
    config: str,
    endpoint: str,
    start: str,
    end: str,
    window: str,
    *,
    settings: TaskSettings | None = None,
) -> tuple[int, Summary]:
    """``ingest backfill ... --plan-only`` in this process; the summary lists the partition keys.

    Planning is idempotent: the same range plans the same keys, finished partitions stay
    finished, and partitions that failed for good go back to pending (a rerun retries them).
    """
    from ingest.backfill import plan_windows, run_backfill  # noqa: PLC0415
    from ingest.worker import WorkerOptions  # noqa: PLC0415

    settings = settings or TaskSettings()
    redactor = Redactor()

    async def work() -> Summary:
        loaded = load_config(config)
        plan = plan_windows(loaded.source.endpoint(endpoint), start, end, window)
        result = await run_backfill(
            loaded, resolve_dsn(settings.dsn), redactor, plan, WorkerOptions(), plan_only=True
        )
        return {
            "source": loaded.source.name,
            "endpoint": endpoint,
            "planned": result.planned,
            "new": result.new,
            "keys": list(plan.keys),
            "partitions": result.counts,
        }

    return _call(settings, redactor, work, {"config": config, "endpoint": endpoint})


def run_partition_task(
    config: str,
    endpoint: str,
    key: str,
    *,
    settings: TaskSettings | None = None,
    lease_seconds: float = 30.0,
    max_attempts: int = 3,
    max_dead_letters: int | None = None,
) -> tuple[int, Summary]:
    """Claim one planned partition through its lease and work it to the end.

    The lease is what keeps a row from being written twice whatever the scheduler does: a
    retried task, or a second copy of the task, finds the partition done (nothing to do), or
    leased by a live holder (it waits, like a draining worker, and is done when the holder is),
    or leased by a dead holder (it takes over once the lease expires and resumes from the
    partition's checkpoint). Every batch commits only while its lease is held (the fence).
    """
    from ingest.worker import WorkerOptions, run_worker  # noqa: PLC0415

    settings = settings or TaskSettings()
    redactor = Redactor()

    async def work() -> Summary:
        loaded = load_config(config)
        source = loaded.source.name
        loaded.source.endpoint(endpoint)
        dsn = resolve_dsn(settings.dsn)
        options = WorkerOptions(
            command="airflow",
            endpoints=(endpoint,),
            keys=(key,),
            concurrency=1,
            lease_seconds=lease_seconds,
            poll_seconds=max(0.2, min(2.0, lease_seconds / 3)),
            drain=True,
            max_attempts=max_attempts,
            max_dead_letters=max_dead_letters,
        )
        result = await run_worker(loaded, dsn, redactor, options)
        async with open_pool(dsn, size=1) as pool, pool.acquire() as connection:
            row = await connection.fetchrow(
                "SELECT status, attempts, coalesce(error, '') AS error FROM ingest.partitions "
                "WHERE source = $1 AND endpoint = $2 AND partition = $3",
                source,
                endpoint,
                key,
            )
            counts = await leases.counts(connection, source=source, endpoint=endpoint)
        summary: Summary = {
            "source": source,
            "run_id": None if result.run_id is None else str(result.run_id),
            "records": result.records,
            "worked": result.done,
            "partitions": counts,
        }
        if row is None:
            summary["status"] = "unplanned"
            summary["exit_code"] = int(ExitCode.CONFIG)
            summary["error"] = f"endpoint {endpoint}: partition {key} was never planned"
            return summary
        summary.update(status=row["status"], attempts=row["attempts"])
        if row["status"] == "done":
            summary["exit_code"] = int(ExitCode.OK)
            return summary
        summary["error"] = redactor(row["error"] or "; ".join(result.errors) or row["status"])
        if result.exit_codes and ExitCode.DEAD_LETTERS in result.exit_codes:
            summary["exit_code"] = int(ExitCode.DEAD_LETTERS)
        else:
            summary["exit_code"] = int(ExitCode.FAILED)
            # Out of attempts: retrying the task finds nothing claimable; a new plan re-pends it.
            summary["final"] = row["status"] == "failed"
        return summary

    return _call(settings, redactor, work, {"config": config, "endpoint": endpoint, "key": key})
