"""Example DAGs for ingest on Airflow: an hourly source run and a backfill fanned out as mapped
tasks. Copy this file into your DAGs folder and set the paths (or the environment variables).

The database is ingest's usual one (DATABASE_URL or PG* in the workers' environment); pass
``conn_id="my_postgres"`` to use an Airflow connection instead. docs/airflow.md explains the
outcomes, the retries and why a retried partition never writes a row twice.
"""

from __future__ import annotations

import datetime as dt
import os

from ingest.airflow import backfill_dag, source_dag

CONFIG = os.environ.get("INGEST_EXAMPLE_CONFIG", "/opt/ingest/config/shop.toml")
CONN_ID = os.environ.get("INGEST_EXAMPLE_CONN_ID") or None
RETRY_DELAY = dt.timedelta(seconds=float(os.environ.get("INGEST_EXAMPLE_RETRY_SECONDS", "30")))

# Every endpoint of the source, once an hour; an hour whose run finds the previous one still
# running (the source's lock) is skipped, not failed.
ingest_shop_hourly = source_dag(
    "ingest_shop_hourly",
    CONFIG,
    schedule="@hourly",
    conn_id=CONN_ID,
    retries=2,
    retry_delay=RETRY_DELAY,
)

# A month of one endpoint in daily partitions, one mapped task per day, four at a time.
ingest_shop_backfill = backfill_dag(
    "ingest_shop_backfill",
    CONFIG,
    endpoint=os.environ.get("INGEST_EXAMPLE_ENDPOINT", "orders"),
    start=os.environ.get("INGEST_EXAMPLE_FROM", "2025-01-01"),
    end=os.environ.get("INGEST_EXAMPLE_TO", "2025-02-01"),
    window=os.environ.get("INGEST_EXAMPLE_WINDOW", "1d"),
    conn_id=CONN_ID,
    parallel=4,
    lease_seconds=float(os.environ.get("INGEST_EXAMPLE_LEASE_SECONDS", "60")),
    retries=3,
    retry_delay=RETRY_DELAY,
)
