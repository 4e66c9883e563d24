"""What watches a run: the progress display and the Prometheus exporter, composed for the CLI.

Both are :class:`~ingest.events.RunObserver` implementations; this module only decides which are
on and keeps their lifetimes around the run (bars drawn, ticker running, metrics served).

:mod:`ingest.metrics` is imported only when metrics are wanted: ``prometheus_client`` adds
~15 ms to the start of every run, which a scheduled run without metrics flags need not pay.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from ingest.events import FanOut, RunObserver
from ingest.progress import DEFAULT_INTERVAL, ProgressMode, showing_progress


@dataclass(frozen=True, slots=True)
class ObserveOptions:
    progress: ProgressMode = "auto"
    progress_interval: float = DEFAULT_INTERVAL
    metrics_port: int | None = None
    metrics_host: str | None = None  # None: the exporter's default (loopback)
    metrics_textfile: str | None = None

    @property
    def metrics_wanted(self) -> bool:
        return self.metrics_port is not None or self.metrics_textfile is not None


@asynccontextmanager
async def observing(source: str, options: ObserveOptions) -> AsyncIterator[RunObserver]:
    """One observer for the whole run; everything it started is stopped when the block exits."""
    async with showing_progress(options.progress, interval=options.progress_interval) as shown:
        if not options.metrics_wanted:
            yield shown
            return
        from ingest.metrics import DEFAULT_HOST, RunMetrics, exporting  # noqa: PLC0415 - see top

        metrics = RunMetrics(source)
        with exporting(
            metrics,
            port=options.metrics_port,
            host=DEFAULT_HOST if options.metrics_host is None else options.metrics_host,
            textfile=options.metrics_textfile,
        ):
            yield FanOut([shown, metrics])
