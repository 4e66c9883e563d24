"""Prometheus metrics for one run: an observer that counts, and two ways to export the counts.

Why prometheus_client: it is the Prometheus project's own Python client, so names, types and
the text exposition format are right by construction, and it ships the HTTP exporter and the
atomic textfile writer node_exporter's textfile collector expects. Each run gets its own
:class:`~prometheus_client.CollectorRegistry`, so nothing is global and two runs in one process
(tests, a scheduler embedding ingest) never mix their numbers.

Long runs: ``--metrics-port`` serves ``/metrics`` from a daemon thread while the run lasts (a
thread, so a scrape is answered even while the event loop is busy converting a batch). Short
runs (cron): ``--metrics-textfile`` writes the final numbers, plus the run's outcome and end
time, for node_exporter to pick up between scrapes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, write_to_textfile
from prometheus_client.exposition import start_http_server
from prometheus_client.metrics_core import Metric

from ingest.errors import ConfigError

log = structlog.get_logger("ingest.metrics")

#: Request latency buckets (seconds): fast local APIs up to slow, paginated exports.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
DEFAULT_HOST = "127.0.0.1"


class RunRegistry(CollectorRegistry):
    """A registry that leaves out the ``*_created`` series prometheus_client adds to every
    counter and histogram: creation timestamps are not metrics, they double the series count
    and dashboards mistake them for counters. ``ingest_run_start_time_seconds`` says when the
    run started. (Per registry, not prometheus_client's process-wide switch.)"""

    def collect(self) -> Iterator[Metric]:
        for metric in super().collect():
            metric.samples = [
                sample for sample in metric.samples if not sample.name.endswith("_created")
            ]
            yield metric


class RunMetrics:
    """A :class:`~ingest.events.RunObserver` that keeps Prometheus counters for one source."""

    def __init__(self, source: str, registry: CollectorRegistry | None = None) -> None:
        self.source = source
        self.registry = registry or RunRegistry(auto_describe=True)
        labels = ("source", "endpoint")
        reg = self.registry
        self.records = Counter(
            "ingest_records", "Records committed to PostgreSQL.", labels, registry=reg
        )
        self.pages = Counter("ingest_pages", "Pages fetched from the API.", labels, registry=reg)
        self.retries = Counter(
            "ingest_retries", "HTTP requests retried, by reason.", (*labels, "reason"), registry=reg
        )
        self.errors = Counter(
            "ingest_errors",
            "Failures: HTTP responses with status >= 400 and endpoints that failed.",
            (*labels, "kind"),
            registry=reg,
        )
        self.dead_letters = Counter(
            "ingest_dead_letters",
            "Records that failed conversion and went to ingest.dead_letters.",
            labels,
            registry=reg,
        )
        self.responses = Counter(
            "ingest_http_responses", "HTTP responses by status code.", (*labels, "status"),
            registry=reg,
        )  # fmt: skip
        self.latency = Histogram(
            "ingest_request_duration_seconds",
            "Time from sending a request to having read its whole body.",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.queue_depth = Gauge(
            "ingest_queue_depth",
            "Pages waiting between fetch and write (as of the last page fetched).",
            labels,
            registry=reg,
        )
        self.endpoints_running = Gauge(
            "ingest_endpoints_running", "Endpoints currently being walked.", ("source",),
            registry=reg,
        )  # fmt: skip
        self.started = Gauge(
            "ingest_run_start_time_seconds", "When the run started (Unix time).", ("source",),
            registry=reg,
        )  # fmt: skip
        self.ended = Gauge(
            "ingest_run_end_time_seconds", "When the run ended (Unix time).", ("source",),
            registry=reg,
        )  # fmt: skip
        self.success = Gauge(
            "ingest_run_success",
            "1 if the run succeeded, 0 if it failed or was interrupted.",
            ("source",),
            registry=reg,
        )
        self.started.labels(source).set(time.time())
        self.endpoints_running.labels(source).set(0)

    # --- RunObserver -------------------------------------------------------------------------

    def endpoint_started(self, endpoint: str, *, resumed: bool, total: int | None) -> None:
        self.endpoints_running.labels(self.source).inc()
        # Create the series at zero so dashboards see them before the first event.
        self.records.labels(self.source, endpoint)
        self.pages.labels(self.source, endpoint)
        self.dead_letters.labels(self.source, endpoint)

    def page_fetched(self, endpoint: str, *, records: int, queue_depth: int) -> None:
        self.pages.labels(self.source, endpoint).inc()
        self.queue_depth.labels(self.source, endpoint).set(queue_depth)

    def total_known(self, endpoint: str, *, total: int) -> None:
        pass  # a total is a property of the source, not a rate worth scraping

    def request_finished(self, endpoint: str, *, status: int, seconds: float) -> None:
        self.latency.labels(self.source, endpoint).observe(seconds)
        self.responses.labels(self.source, endpoint, str(status)).inc()
        if status >= 400:
            self.errors.labels(self.source, endpoint, f"http_{status}").inc()

    def retried(self, endpoint: str, *, reason: str) -> None:
        self.retries.labels(self.source, endpoint, reason).inc()

    def batch_committed(self, endpoint: str, *, rows: int, pages: int, dead_letters: int) -> None:
        self.records.labels(self.source, endpoint).inc(rows)
        if dead_letters:
            self.dead_letters.labels(self.source, endpoint).inc(dead_letters)

    def endpoint_finished(self, endpoint: str, *, ok: bool) -> None:
        self.endpoints_running.labels(self.source).dec()
        self.queue_depth.labels(self.source, endpoint).set(0)
        if not ok:
            self.errors.labels(self.source, endpoint, "endpoint_failed").inc()

    # --- run outcome -------------------------------------------------------------------------

    def run_finished(self, *, succeeded: bool) -> None:
        self.ended.labels(self.source).set(time.time())
        self.success.labels(self.source).set(1 if succeeded else 0)


@contextmanager
def exporting(
    metrics: RunMetrics,
    *,
    port: int | None = None,
    host: str = DEFAULT_HOST,
    textfile: str | Path | None = None,
) -> Iterator[int | None]:
    """Serve and/or write ``metrics`` around a run; yields the port actually bound (0 = any).

    The outcome gauges are set however the run ends; the textfile is written last, so a
    collector never sees a half-finished run's file replaced by nothing.
    """
    server = None
    thread: threading.Thread | None = None
    bound: int | None = None
    if port is not None:
        try:
            server, thread = start_http_server(port, addr=host, registry=metrics.registry)
        except OSError as exc:
            raise ConfigError(
                f"--metrics-port: cannot serve metrics on {host}:{port}: {exc.strerror or exc}"
            ) from None
        bound = int(server.server_port)
        # The run id comes from the log context (``ingest run`` binds it before the run).
        log.info(
            "metrics_serving",
            url=f"http://{_url_host(host)}:{bound}/metrics",
            source=metrics.source,
        )
    succeeded = False
    try:
        yield bound
        succeeded = True
    finally:
        metrics.run_finished(succeeded=succeeded)
        if server is not None and thread is not None:
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)
        if textfile is not None:
            _write_textfile(metrics, Path(textfile))


def _write_textfile(metrics: RunMetrics, path: Path) -> None:
    """Atomic write (temp file + rename); a failure is logged, never fails the run itself."""
    try:
        write_to_textfile(str(path), metrics.registry)
    except OSError as exc:
        log.error("metrics_textfile_failed", path=str(path), error=str(exc))
    else:
        log.debug("metrics_textfile_written", path=str(path))


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
