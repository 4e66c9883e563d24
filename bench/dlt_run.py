"""dlt's ``rest_api`` source into PostgreSQL; run with the benchmark's own dlt venv.

Standalone on purpose (it imports neither ingest nor bench): ``bench/.venv-dlt/bin/python
bench/dlt_run.py BASE_URL DSN DATASET PIPELINES_DIR``. dlt runs with its defaults (lists become
child tables, nested objects are flattened), which is what a user gets. Prints one JSON line with
the records loaded and the seconds of extract, normalize and load.
"""

from __future__ import annotations

import json
import sys
import time
from urllib.parse import urlsplit, urlunsplit

import dlt
from dlt.sources.rest_api import rest_api_source


def for_dlt(dsn: str) -> str:
    """dlt insists on a password and a host. A placeholder password is ignored by trust/peer
    authentication; a socket-only DSN (``postgresql://u@/db?host=/socket/dir``) gets the host
    ``localhost`` in the URL while libpq still uses the ``host`` query parameter, which wins.
    """
    parts = urlsplit(dsn)
    user, _, host = parts.netloc.rpartition("@")
    if parts.password is None:
        user = f"{user or 'postgres'}:unused"
    return urlunsplit(parts._replace(netloc=f"{user}@{host or 'localhost'}"))


def main() -> None:
    base_url, dsn, dataset, pipelines_dir = sys.argv[1:5]
    source = rest_api_source(
        {
            "client": {
                "base_url": base_url,
                "paginator": {
                    "type": "page_number",
                    "base_page": 1,
                    "page_param": "page",
                    "total_path": "meta.total_pages",
                },
            },
            "resource_defaults": {"write_disposition": "append"},
            "resources": [
                {"name": "items", "endpoint": {"path": "items", "data_selector": "data"}}
            ],
        }
    )
    pipeline = dlt.pipeline(
        pipeline_name="ingest_bench",
        destination=dlt.destinations.postgres(credentials=for_dlt(dsn)),
        dataset_name=dataset,
        pipelines_dir=pipelines_dir,
    )
    phases: dict[str, float] = {}
    started = time.perf_counter()
    pipeline.extract(source)
    phases["extract"] = time.perf_counter() - started
    mark = time.perf_counter()
    pipeline.normalize()
    phases["normalize"] = time.perf_counter() - mark
    mark = time.perf_counter()
    pipeline.load()
    phases["load"] = time.perf_counter() - mark
    with pipeline.sql_client() as client:
        rows = client.execute_sql(f"SELECT count(*) FROM {dataset}.items")
    print(
        json.dumps(
            {
                "records": int(rows[0][0]),
                "version": dlt.__version__,
                "phases": {name: round(value, 2) for name, value in phases.items()},
            }
        )
    )


if __name__ == "__main__":
    main()
