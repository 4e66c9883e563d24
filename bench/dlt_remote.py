"""dlt's ``rest_api`` source against the remote-mode server; run with the benchmark's dlt venv.

Standalone on purpose (it imports neither ingest nor bench): ``bench/.venv-dlt/bin/python
bench/dlt_remote.py BASE_URL DSN DATASET PIPELINES_DIR PROFILE STYLE PAGE_SIZE
[parallelized]``. dlt runs
with its defaults, configured the way its documentation shows for each pagination style; for the
parent -> child pair, ``parallelized`` sets the child resource's ``parallelized: True``. Prints one
JSON line with the records loaded (the child table's for the pair) and dlt's version.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import dlt
from dlt.sources.rest_api import rest_api_source

PAGINATORS: dict[str, dict[str, Any]] = {
    "page_total": {
        "type": "page_number",
        "base_page": 1,
        "page_param": "page",
        "total_path": "meta.total_pages",
    },
    "page": {"type": "page_number", "base_page": 1, "page_param": "page", "total_path": None},
    "offset_total": {
        "type": "offset",
        "limit": 100,
        "offset_param": "offset",
        "limit_param": "limit",
        "total_path": "meta.total",
    },
    "offset": {
        "type": "offset",
        "limit": 100,
        "offset_param": "offset",
        "limit_param": "limit",
        "total_path": None,
    },
    "cursor": {"type": "cursor", "cursor_path": "next_cursor", "cursor_param": "cursor"},
    "next_url": {"type": "json_link", "next_url_path": "next"},
    "link": {"type": "header_link"},
}


def for_dlt(dsn: str) -> str:
    """dlt insists on a password and a host (see bench/dlt_run.py)."""
    parts = urlsplit(dsn)
    user, _, host = parts.netloc.rpartition("@")
    if parts.password is None:
        user = f"{user or 'postgres'}:unused"
    return urlunsplit(parts._replace(netloc=f"{user}@{host or 'localhost'}"))


def resources(profile: str, style: str, parallelized: bool) -> list[dict[str, Any]]:
    if style == "children":
        return [
            {
                "name": "parents",
                "endpoint": {
                    "path": f"{profile}/parents",
                    "data_selector": "data",
                    "paginator": "single_page",
                },
            },
            {
                "name": "children",
                "parallelized": parallelized,
                "endpoint": {
                    "path": f"{profile}/parents/{{parent_id}}/children",
                    "data_selector": "data",
                    "paginator": "single_page",
                    "params": {
                        "parent_id": {"type": "resolve", "resource": "parents", "field": "id"}
                    },
                },
            },
        ]
    return [
        {
            "name": "items",
            "endpoint": {
                "path": f"{profile}/{style}",
                "data_selector": "data",
                "paginator": PAGINATORS[style],
            },
        }
    ]


def main() -> None:
    base_url, dsn, dataset, pipelines_dir, profile, style, page_size = sys.argv[1:8]
    parallelized = sys.argv[8:9] == ["parallelized"]
    if "limit" in PAGINATORS.get(style, {}):
        PAGINATORS[style]["limit"] = int(page_size)
    source = rest_api_source(
        {
            "client": {"base_url": base_url},
            "resource_defaults": {"write_disposition": "append"},
            "resources": resources(profile, style, parallelized),
        }
    )
    pipeline = dlt.pipeline(
        pipeline_name=f"ingest_remote_{style}",
        destination=dlt.destinations.postgres(credentials=for_dlt(dsn)),
        dataset_name=dataset,
        pipelines_dir=pipelines_dir,
    )
    started = time.perf_counter()
    pipeline.run(source)
    seconds = time.perf_counter() - started
    table = "children" if style == "children" else "items"
    with pipeline.sql_client() as client:
        rows = client.execute_sql(f"SELECT count(*) FROM {dataset}.{table}")
    print(
        json.dumps(
            {"records": int(rows[0][0]), "version": dlt.__version__, "seconds": round(seconds, 2)}
        )
    )


if __name__ == "__main__":
    main()
