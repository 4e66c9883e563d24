"""Airflow integration (``pip install 'ingest[airflow]'``): tasks and DAG factories.

ingest runs inside the Airflow task (no subprocess, no CLI text to parse) and its exit codes
become Airflow outcomes (:func:`outcome`):

* 0 ok: success; the summary is the task's XCom ``return_value``;
* 3 locked (another run of the source holds its lock): skipped (``AirflowSkipException``);
* 1 failed, 4 interrupted: failed, and Airflow's ``retries`` apply (:class:`IngestTaskFailed`);
* 2 config, 5 dead letters, 6 unhealthy: failed at once, no retry (``AirflowFailException``).

Every outcome logs a one-line summary to the task log and pushes the summary (counts, run id,
error) to XCom under ``ingest_summary``.

Backfills fan out as dynamic task mapping: one ``plan`` task stores the partitions (as
``ingest backfill --plan-only``) and returns their keys, then one mapped ``partition`` task per
key claims that partition through ingest's lease. Leases, not Airflow, guarantee exactly once:
a retried task, a zombie, or two copies of one task instance never commit a row twice
(:func:`ingest.tasks.run_partition_task`).

Airflow is imported lazily, so ``import ingest.airflow`` only fails when a factory is called
without Airflow installed.
"""

from __future__ import annotations

import datetime as dt
import importlib
import logging
from collections.abc import Sequence
from typing import Any, Literal

from ingest.errors import ExitCode
from ingest.tasks import (
    Summary,
    TaskSettings,
    plan_backfill_task,
    run_partition_task,
    run_source_task,
)

Outcome = Literal["success", "skipped", "retry", "fail"]

_OUTCOMES: dict[int, Outcome] = {
    ExitCode.OK: "success",
    ExitCode.LOCKED: "skipped",
    ExitCode.FAILED: "retry",
    ExitCode.INTERRUPTED: "retry",
    ExitCode.CONFIG: "fail",
    ExitCode.DEAD_LETTERS: "fail",
    # Only `ingest status` checks return it; a task that runs one wants an alert, not a retry.
    ExitCode.UNHEALTHY: "fail",
}

#: Where the summary goes in XCom whatever the outcome (the return value only on success).
SUMMARY_KEY = "ingest_summary"

log = logging.getLogger("airflow.task")


class IngestTaskFailed(Exception):
    """A run that may succeed when retried: any exception other than Airflow's skip and fail
    ones fails the task with its ``retries`` applying."""


def outcome(code: int, summary: Summary | None = None) -> Outcome:
    """The Airflow outcome of an ingest exit code; an unknown code may be retried."""
    if summary is not None and summary.get("final") and code != ExitCode.OK:
        return "fail"
    return _OUTCOMES.get(code, "retry")


def _settings(dsn: str | None, conn_id: str | None, log_level: str) -> TaskSettings:
    """The DSN: given, or an Airflow connection's URI, or ingest's own (DATABASE_URL, PG*)."""
    if conn_id is not None:
        from airflow.sdk import BaseHook  # noqa: PLC0415

        dsn = BaseHook.get_connection(conn_id).get_uri()
    return TaskSettings(dsn=dsn, log_level=log_level)


def _context() -> Any:
    from airflow.sdk import get_current_context  # noqa: PLC0415

    return get_current_context()


def _airflow_exception(name: str) -> type[Exception]:
    """Airflow's own exception: from the task SDK (3.2+; the old place warns there), or from
    ``airflow.exceptions`` (3.1)."""
    for module in ("airflow.sdk.exceptions", "airflow.exceptions"):
        found: type[Exception] | None = getattr(importlib.import_module(module), name, None)
        if found is not None:
            return found
    raise ImportError(f"Airflow has no {name}")


def finish(code: int, summary: Summary) -> Summary:
    """Log and push ``summary``, then end the task as :func:`outcome` says (or return it)."""
    result = outcome(code, summary)
    summary["outcome"] = result
    line = ", ".join(
        f"{name}={summary[name]}"
        for name in ("source", "endpoint", "key", "status", "records", "dead_letters", "planned")
        if name in summary
    )
    log.info("ingest: exit %s (%s): %s", code, result, line)
    if "error" in summary:
        log.error("ingest: %s", summary["error"])
    context = _context()
    context["ti"].xcom_push(key=SUMMARY_KEY, value=summary)
    if result == "success":
        return summary
    message = f"ingest exit code {code}: {summary.get('error', 'see the task log')}"
    if result == "skipped":
        raise _airflow_exception("AirflowSkipException")(message)
    if result == "fail":
        raise _airflow_exception("AirflowFailException")(message)
    raise IngestTaskFailed(message)


def run_source(
    config: str,
    endpoints: Sequence[str] = (),
    *,
    dsn: str | None = None,
    conn_id: str | None = None,
    restart: bool = False,
    max_dead_letters: int | None = None,
    log_level: str = "info",
) -> Summary:
    """``ingest run`` inside a running Airflow task (call it from your own ``@task``)."""
    code, summary = run_source_task(
        config,
        endpoints,
        settings=_settings(dsn, conn_id, log_level),
        restart=restart,
        max_dead_letters=max_dead_letters,
    )
    return finish(code, summary)


def source_task(
    config: str,
    endpoints: Sequence[str] = (),
    *,
    task_id: str = "ingest_run",
    dsn: str | None = None,
    conn_id: str | None = None,
    max_dead_letters: int | None = None,
    **task_kwargs: Any,
) -> Any:
    """A task (in the DAG being defined) running one source, or only ``endpoints`` of it.

    One task per source, not per endpoint: a source's runs share one lock, so parallel tasks
    of one source would skip each other (exit 3).
    """
    from airflow.sdk import task  # noqa: PLC0415

    def ingest_run() -> Summary:
        return run_source(
            config, endpoints, dsn=dsn, conn_id=conn_id, max_dead_letters=max_dead_letters
        )

    return task(task_id=task_id, **task_kwargs)(ingest_run)()


def source_dag(
    dag_id: str,
    config: str,
    endpoints: Sequence[str] = (),
    *,
    schedule: Any = None,
    dsn: str | None = None,
    conn_id: str | None = None,
    retries: int = 2,
    retry_delay: dt.timedelta = dt.timedelta(minutes=1),
    max_dead_letters: int | None = None,
    **dag_kwargs: Any,
) -> Any:
    """A DAG of one :func:`source_task`; at most one active run (they would share the lock)."""
    from airflow.sdk import DAG  # noqa: PLC0415

    dag_kwargs.setdefault("start_date", dt.datetime(2025, 1, 1, tzinfo=dt.UTC))
    dag_kwargs.setdefault("catchup", False)
    dag_kwargs.setdefault("max_active_runs", 1)
    dag_kwargs.setdefault("tags", ["ingest"])
    with DAG(dag_id, schedule=schedule, **dag_kwargs) as dag:
        source_task(
            config,
            endpoints,
            dsn=dsn,
            conn_id=conn_id,
            max_dead_letters=max_dead_letters,
            retries=retries,
            retry_delay=retry_delay,
        )
    return dag


def backfill_dag(
    dag_id: str,
    config: str,
    *,
    endpoint: str,
    start: str,
    end: str,
    window: str,
    dsn: str | None = None,
    conn_id: str | None = None,
    parallel: int | None = None,
    lease_seconds: float = 60.0,
    max_attempts: int = 5,
    max_dead_letters: int | None = None,
    retries: int = 3,
    retry_delay: dt.timedelta = dt.timedelta(seconds=30),
    **dag_kwargs: Any,
) -> Any:
    """A DAG that backfills ``[start, end)`` of ``endpoint`` in ``window``-sized partitions.

    ``plan`` stores the partitions and returns their keys; ``partition`` is mapped over them
    (``parallel`` caps how many run at once); ``report`` adds up their records. The range is
    the DAG's params (``start``, ``end``, ``window``): trigger with ``--conf`` to change it.

    ``lease_seconds`` is how long a killed task's partition stays locked before its retry (or
    another copy) takes it over; ``max_attempts`` counts claims of a partition before ingest
    gives it up (``failed``, no further retry); keep it above ``retries``.
    """
    from airflow.sdk import DAG, Param, task  # noqa: PLC0415

    dag_kwargs.setdefault("start_date", dt.datetime(2025, 1, 1, tzinfo=dt.UTC))
    dag_kwargs.setdefault("catchup", False)
    dag_kwargs.setdefault("tags", ["ingest", "backfill"])
    params = {
        "start": Param(start, type="string"),
        "end": Param(end, type="string"),
        "window": Param(window, type="string"),
    }

    def settings() -> TaskSettings:
        return _settings(dsn, conn_id, "info")

    with DAG(dag_id, schedule=None, params=params, **dag_kwargs) as dag:

        def plan() -> list[str]:
            given = _context()["params"]
            code, summary = plan_backfill_task(
                config,
                endpoint,
                str(given["start"]),
                str(given["end"]),
                str(given["window"]),
                settings=settings(),
            )
            keys: list[str] = finish(code, summary)["keys"]
            return keys

        def partition(key: str) -> Summary:
            _context()["ingest_partition"] = key
            code, summary = run_partition_task(
                config,
                endpoint,
                key,
                settings=settings(),
                lease_seconds=lease_seconds,
                max_attempts=max_attempts,
                max_dead_letters=max_dead_letters,
            )
            return finish(code, summary)

        def report(results: Any) -> Summary:  # a lazy sequence of the partitions' XComs
            done = list(results)
            total = {
                "endpoint": endpoint,
                "partitions": len(done),
                "records": sum(int(item.get("records", 0)) for item in done),
            }
            log.info("ingest backfill: %s", total)
            return total

        # Plain calls, not decorators: the same code type-checks with and without Airflow.
        planned = task(task_id="plan", retries=retries, retry_delay=retry_delay)(plan)()
        partitions = task(
            task_id="partition",
            retries=retries,
            retry_delay=retry_delay,
            max_active_tis_per_dag=parallel,
            map_index_template="{{ ingest_partition }}",
        )(partition).expand(key=planned)
        task(task_id="report")(report)(partitions)
    return dag
