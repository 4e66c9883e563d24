"""The target table every contender loads, and the ingest config that describes it.

One definition, so the COPY ceiling, the naive pipeline and ingest write the same columns with
the same types (11 typed columns; ``tags`` as jsonb, ``profile.*`` flattened).
"""

from __future__ import annotations

import json
from typing import Any

COLUMNS: dict[str, tuple[str, str]] = {
    "id": ("id", "bigint"),
    "name": ("name", "text"),
    "email": ("email", "text"),
    "status": ("status", "text"),
    "score": ("score", "double"),
    "tags": ("tags", "jsonb"),
    "updated_at": ("updated_at", "timestamptz"),
    "plan": ("profile.plan", "text"),
    "seats": ("profile.seats", "integer"),
    "country": ("profile.country", "text"),
    "verified": ("profile.verified", "boolean"),
}

#: Defaults for the benchmark's ingest config; chosen from measurements (docs/performance.md).
PIPELINE_DEFAULTS: dict[str, Any] = {}
HTTP_DEFAULTS: dict[str, Any] = {}


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{key} = {_toml(inner)}" for key, inner in value.items()) + " }"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(inner) for inner in value) + "]"
    return json.dumps(value)


def ingest_config(
    base_url: str,
    *,
    table: str,
    mode: str,
    store_raw: bool = False,
    load: str = "python",
    pipeline: dict[str, Any] | None = None,
    http: dict[str, Any] | None = None,
) -> str:
    """A one-endpoint ingest source config (TOML text) for the served dataset."""
    lines = [
        "[source]",
        'name = "bench"',
        f"base_url = {_toml(base_url)}",
        "[http]",
        *(f"{key} = {_toml(value)}" for key, value in {**HTTP_DEFAULTS, **(http or {})}.items()),
        "[pipeline]",
        *(
            f"{key} = {_toml(value)}"
            for key, value in {**PIPELINE_DEFAULTS, **(pipeline or {})}.items()
        ),
        "[[endpoints]]",
        'name = "items"',
        'path = "/items"',
        'records_path = "data"',
        "pagination = "
        + _toml(
            {"style": "page_number", "page_param": "page", "total_pages_path": "meta.total_pages"}
        ),
        "[endpoints.table]",
        f"name = {_toml(table)}",
        f"mode = {_toml(mode)}",
        f"store_raw = {_toml(store_raw)}",
    ]
    if load != "python":  # older ingest versions (--compare-ref) do not know the key
        lines.append(f"load = {_toml(load)}")
    if mode == "merge":
        lines.append('primary_key = ["id"]')
    lines.append("[endpoints.table.columns]")
    for name, (path, kind) in COLUMNS.items():
        lines.append(f"{name} = {_toml({'path': path, 'type': kind})}")
    return "\n".join(lines) + "\n"
