"""The remote benchmark's pagination styles: ingest's config for each, and what a serial walk costs.

Kept apart from :mod:`bench.remote` (which drives processes) so tests can import it cheaply.
"""

from __future__ import annotations

import math
from typing import Any

from bench.remote_server import Settings

STYLES = ("page_total", "page", "offset_total", "offset", "cursor", "next_url", "link", "children")
#: Numbered styles: the targets' "page_number/offset with or without a total".
NUMBERED = ("page_total", "page", "offset_total", "offset")
#: Serial styles: ingest's configs declare the server's range filter (``since``/``until`` over
#: ``updated_at``) as their incremental cursor, so a first load is cut into slices (the default
#: ``slices = "auto"``). dlt's configs stay plain walks (its defaults).
RANGED = ("cursor", "next_url", "link")
#: The ingest incremental table of the ranged styles: a first load of all history (``start``
#: well before the records, as a user who does not know where the data begins would write).
INCREMENTAL: dict[str, Any] = {
    "cursor_path": "updated_at",
    "param": "since",
    "end_param": "until",
    "format": "iso8601",
    "start": "2020-01-01T00:00:00Z",
}

PAGINATION: dict[str, dict[str, Any]] = {
    "page_total": {"style": "page_number", "page_param": "page", "total_path": "meta.total"},
    "page": {"style": "page_number", "page_param": "page"},
    "offset_total": {"style": "offset", "limit": 100, "total_path": "meta.total"},
    "offset": {"style": "offset", "limit": 100},
    "cursor": {"style": "cursor", "cursor_path": "next_cursor", "cursor_param": "cursor"},
    "next_url": {"style": "next_url", "next_url_path": "next"},
    "link": {"style": "link_header"},
}


def pagination(style: str, page_size: int) -> dict[str, Any]:
    """The ``pagination`` table of the style's endpoint (offset walks ask for ``page_size``)."""
    table = dict(PAGINATION[style])
    if table["style"] == "offset":
        table["limit"] = page_size
    return table


def serial_requests(style: str, settings: Settings) -> int:
    """Requests a one-page-at-a-time walk needs (an empty page ends walks without a total)."""
    if style == "children":
        return 1 + settings.parents
    pages = math.ceil(settings.records / settings.page_size)
    full_last = settings.records % settings.page_size == 0
    return pages + (1 if style in ("page", "offset") and full_last else 0)


def expected_rows(style: str, settings: Settings) -> int:
    if style == "children":
        return min(settings.records, settings.parents * settings.page_size)
    return settings.records


def mean_latency(profile: str, settings: Settings) -> float:
    if profile == "lognormal":
        return settings.latency * 0.9 * math.exp(settings.sigma**2 / 2)
    return settings.latency
