"""Progress while a run lasts: live bars in a terminal, periodic log events everywhere else.

Both are :class:`~ingest.events.RunObserver` implementations over the same counters
(:class:`ProgressTracker`), so the numbers a person watches and the numbers a log shipper
collects are the same numbers. Bars are only drawn when both stdout and stderr are terminals:
piped, redirected or scheduled runs (cron, Kubernetes, Airflow) get no escape codes, just a
``progress`` event every ``interval`` seconds.

Why rich: its ``Progress`` redraws several bars from a refresh thread, computes a windowed
speed per task and draws an ETA when a total is known, and it can route other output (our log
lines) above the bars instead of through them.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import structlog
from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text

from ingest.events import NullObserver, RunObserver

log = structlog.get_logger("ingest.progress")

ProgressMode = Literal["auto", "bars", "log", "none"]
DEFAULT_INTERVAL = 30.0


@dataclass(slots=True)
class EndpointProgress:
    """Live counters for one endpoint (records are committed ones, pages fetched ones)."""

    resumed: bool = False
    total: int | None = None
    pages: int = 0
    fetched: int = 0
    records: int = 0
    retries: int = 0
    dead_letters: int = 0
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None
    ok: bool | None = None
    #: The log context bound where the endpoint started (run_id, source, endpoint), so events
    #: emitted from elsewhere (the progress ticker) carry the same identifiers.
    context: dict[str, Any] = field(default_factory=dict)

    def seconds(self, now: float | None = None) -> float:
        return (self.finished or now or time.monotonic()) - self.started

    def rate(self, now: float | None = None) -> float:
        seconds = self.seconds(now)
        return self.records / seconds if seconds > 0 else 0.0

    def eta(self, now: float | None = None) -> float | None:
        """Seconds left at the average rate so far; None without a total or a rate."""
        rate = self.rate(now)
        if self.total is None or rate <= 0:
            return None
        return max(0.0, (self.total - self.records) / rate)


class ProgressTracker(NullObserver):
    """Counts what the run reports; the displays below read from it."""

    def __init__(self) -> None:
        self.endpoints: dict[str, EndpointProgress] = {}

    def endpoint_started(self, endpoint: str, *, resumed: bool, total: int | None) -> None:
        self.endpoints[endpoint] = EndpointProgress(
            resumed=resumed, total=total, context=structlog.contextvars.get_contextvars()
        )

    def _get(self, endpoint: str) -> EndpointProgress:
        return self.endpoints.setdefault(endpoint, EndpointProgress())

    def page_fetched(self, endpoint: str, *, records: int, queue_depth: int) -> None:
        progress = self._get(endpoint)
        progress.pages += 1
        progress.fetched += records

    def total_known(self, endpoint: str, *, total: int) -> None:
        self._get(endpoint).total = total

    def retried(self, endpoint: str, *, reason: str) -> None:
        self._get(endpoint).retries += 1

    def batch_committed(self, endpoint: str, *, rows: int, pages: int, dead_letters: int) -> None:
        progress = self._get(endpoint)
        progress.records += rows
        progress.dead_letters += dead_letters

    def endpoint_finished(self, endpoint: str, *, ok: bool) -> None:
        progress = self._get(endpoint)
        progress.finished = time.monotonic()
        progress.ok = ok


class LogProgress(ProgressTracker):
    """Emits one ``progress`` event per unfinished endpoint every ``interval`` seconds."""

    def __init__(self, interval: float = DEFAULT_INTERVAL) -> None:
        super().__init__()
        self.interval = interval

    def report(self) -> None:
        now = time.monotonic()
        for name, progress in self.endpoints.items():
            if progress.finished is not None:
                continue
            eta = progress.eta(now)
            log.info(
                "progress",
                **{**progress.context, "endpoint": name},
                pages=progress.pages,
                records=progress.records,
                records_per_second=round(progress.rate(now), 1),
                retries=progress.retries,
                dead_letters=progress.dead_letters,
                total=progress.total,
                eta_seconds=None if eta is None else round(eta, 1),
                elapsed_seconds=round(progress.seconds(now), 1),
            )

    async def tick(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self.report()


class _RateColumn(ProgressColumn):
    """Committed records per second since the endpoint started (steadier than a window)."""

    def render(self, task: Task) -> Text:
        return Text(f"{task.fields.get('rate', 0.0):,.0f} rec/s", style="progress.data.speed")


class _EtaColumn(ProgressColumn):
    """Time left, only when the total is known (rich's own column shows -:--:-- otherwise)."""

    def render(self, task: Task) -> Text:
        if task.total is None or task.finished:
            return Text("")
        remaining = task.time_remaining
        if remaining is None:
            return Text("eta ?", style="progress.remaining")
        minutes, seconds = divmod(int(remaining), 60)
        hours, minutes = divmod(minutes, 60)
        return Text(f"eta {hours}:{minutes:02d}:{seconds:02d}", style="progress.remaining")


class BarProgress(ProgressTracker):
    """Live rich bars, one per endpoint: pages, records, records/s, retries, ETA."""

    def __init__(self, console: Console | None = None) -> None:
        super().__init__()
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(bar_width=24),
            TextColumn("{task.fields[pages]:>6,} pages"),
            TextColumn("{task.completed:>10,.0f} records"),
            _RateColumn(),
            TextColumn("{task.fields[retries]} retries"),
            TextColumn("{task.fields[dead]} dead"),
            TimeElapsedColumn(),
            _EtaColumn(),
            console=console or Console(file=sys.stderr),
            refresh_per_second=4,
            redirect_stdout=False,
            redirect_stderr=True,
        )
        self.tasks: dict[str, TaskID] = {}

    def endpoint_started(self, endpoint: str, *, resumed: bool, total: int | None) -> None:
        super().endpoint_started(endpoint, resumed=resumed, total=total)
        label = f"{endpoint} (resumed)" if resumed else endpoint
        self.tasks[endpoint] = self.progress.add_task(
            label, total=total, pages=0, retries=0, dead=0
        )

    def _update(self, endpoint: str) -> None:
        task = self.tasks.get(endpoint)
        if task is None:
            return
        progress = self.endpoints[endpoint]
        self.progress.update(
            task,
            completed=progress.records,
            pages=progress.pages,
            retries=progress.retries,
            dead=progress.dead_letters,
            rate=progress.rate(),
        )

    def page_fetched(self, endpoint: str, *, records: int, queue_depth: int) -> None:
        super().page_fetched(endpoint, records=records, queue_depth=queue_depth)
        self._update(endpoint)

    def retried(self, endpoint: str, *, reason: str) -> None:
        super().retried(endpoint, reason=reason)
        self._update(endpoint)

    def total_known(self, endpoint: str, *, total: int) -> None:
        super().total_known(endpoint, total=total)
        task = self.tasks.get(endpoint)
        if task is not None:
            self.progress.update(task, total=total)

    def batch_committed(self, endpoint: str, *, rows: int, pages: int, dead_letters: int) -> None:
        super().batch_committed(endpoint, rows=rows, pages=pages, dead_letters=dead_letters)
        self._update(endpoint)

    def endpoint_finished(self, endpoint: str, *, ok: bool) -> None:
        super().endpoint_finished(endpoint, ok=ok)
        self._update(endpoint)
        task = self.tasks.get(endpoint)
        if task is not None:
            progress = self.endpoints[endpoint]
            if ok:
                self.progress.update(task, total=progress.records)
            else:
                self.progress.update(task, description=f"{endpoint} [red](failed)")
            self.progress.stop_task(task)


def choose_mode(mode: ProgressMode) -> ProgressMode:
    """``auto``: bars only when a person is watching (stdout and stderr are terminals)."""
    if mode != "auto":
        return mode
    return "bars" if sys.stdout.isatty() and sys.stderr.isatty() else "log"


@asynccontextmanager
async def showing_progress(
    mode: ProgressMode = "auto",
    *,
    interval: float = DEFAULT_INTERVAL,
    console: Console | None = None,
) -> AsyncIterator[RunObserver]:
    """The progress observer for a run; drawing or ticking stops when the block exits."""
    chosen = choose_mode(mode)
    if chosen == "none":
        yield NullObserver()
        return
    if chosen == "log":
        reporter = LogProgress(interval)
        ticker = asyncio.create_task(reporter.tick(), name="progress-log")
        try:
            yield reporter
        finally:
            ticker.cancel()
            await asyncio.gather(ticker, return_exceptions=True)
        return
    bars = BarProgress(console)
    previous = structlog.get_config()["logger_factory"]
    bars.progress.start()
    # While the bars are live, sys.stderr is rich's proxy; log lines sent there are printed
    # above the bars instead of tearing them.
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=sys.stderr))
    try:
        yield bars
    finally:
        bars.progress.stop()
        structlog.configure(logger_factory=previous)
