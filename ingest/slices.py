"""Slices: one incremental run of a serial pagination style, cut into windows walked at once.

Cursor, next-URL and Link-header walks cannot fetch ahead: the next request is only known from
the page before it. But an endpoint with a range filter (its incremental ``param`` and
``end_param``, the same parameters backfill windows use) can be asked for several windows of its
range at the same time, each a walk of its own. A run whose range is large (a first load from
``start``, a catch-up after a long pause) is cut into slices: ``[lower, b1)``, ``[b1, b2)``, ...,
``[b(n-1), ...)``, the last one open-ended like the serial walk.

Each slice is a backfill-style partition of the run: its own checkpoint row keyed
``slice:<lower>/<upper>`` and its batches committed with it, exactly once, by the same code as
backfill windows. The plan is stored in the endpoint's own checkpoint before any slice starts,
so a rerun after a kill resumes the same slices (not a new plan with a new "now"). Only when
every slice has committed does one transaction move the high-water mark (the highest cursor any
slice saw), mark the endpoint's walk done and drop the slices' checkpoints.

How many slices (``incremental.slices``): ``"off"``; a number; or ``"auto"`` (default), which
fetches the serial walk's first page and estimates the pages of the whole range from the span of
cursor values on it. A range of one page, or a few, stays serial and that first page is not
fetched twice (:class:`PrimedFetcher`).
"""

from __future__ import annotations

import datetime as dt
import itertools
from dataclasses import dataclass
from typing import Any

import structlog

from ingest.config import Endpoint
from ingest.cursor import CursorKind, CursorValue
from ingest.http.messages import HttpResponse, PageRequest, ParseBody
from ingest.paginate import Page, make_paginator
from ingest.paths import compile_path
from ingest.source import Fetcher, extract_records

log = structlog.get_logger("ingest.slices")

#: Pagination styles that walk one page at a time (the next request comes from the page).
SERIAL_STYLES = frozenset({"cursor", "next_url", "link_header"})
#: Checkpoint keys of slices (backfill windows are keyed ``<lower>/<upper>``, without it).
SLICE_PREFIX = "slice:"
#: ``"auto"`` cuts a range into slices only if each gets at least this many estimated pages.
MIN_PAGES_PER_SLICE = 2
#: Slices never go below one second (timestamps) or one day (``date`` cursors) of the range.
_SECOND = dt.timedelta(seconds=1)
_DAY = dt.timedelta(days=1)


def serial_reason(endpoint: Endpoint) -> str | None:
    """Why this endpoint's run cannot be sliced (None: it can), for ``ingest validate``."""
    style = endpoint.pagination.style
    if style not in SERIAL_STYLES or endpoint.parent is not None:
        return None
    incremental = endpoint.incremental
    if incremental is None or incremental.end_param is None:
        return (
            f"{style} pagination walks one page at a time: declare [endpoints.incremental] "
            "with param and end_param (a range filter) to let runs split large ranges into "
            "slices walked at once"
        )
    if incremental.format == "integer":
        return f"{style} pagination over an integer cursor has no known upper bound: serial"
    if incremental.slices == "off":
        return f"{style} pagination with incremental.slices = off: serial"
    return None


def can_slice(endpoint: Endpoint) -> bool:
    return endpoint.pagination.style in SERIAL_STYLES and serial_reason(endpoint) is None


def most_slices(endpoint: Endpoint, concurrency: int) -> int:
    """The most slices a run of the endpoint may walk at once (1: it is never sliced).

    Each slice has its own consumers, each holding a database connection while its batch waits
    for its turn: the run's pool must have one for every one of them (see :mod:`ingest.runner`).
    """
    if not can_slice(endpoint):
        return 1
    assert endpoint.incremental is not None
    setting = endpoint.incremental.slices
    return setting if isinstance(setting, int) else concurrency


@dataclass(frozen=True, slots=True)
class Slice:
    """One window: its checkpoint key and bounds (canonical text; no upper for the last)."""

    key: str
    lower: str
    upper: str | None

    def params(self, endpoint: Endpoint, kind: CursorKind) -> dict[str, str]:
        incremental = endpoint.incremental
        assert incremental is not None and incremental.end_param is not None
        params = {incremental.param: kind.render(kind.load(self.lower))}
        if self.upper is not None:
            params[incremental.end_param] = kind.render(kind.load(self.upper))
        return params

    def to_state(self) -> list[str | None]:
        return [self.key, self.lower, self.upper]

    @classmethod
    def from_state(cls, state: list[Any]) -> Slice:
        key, lower, upper = state
        return cls(str(key), str(lower), None if upper is None else str(upper))


def cut(
    kind: CursorKind,
    lower: CursorValue,
    upper: CursorValue,
    count: int,
    begin: CursorValue | None = None,
) -> list[Slice]:
    """``[lower, upper)`` in ``count`` windows on whole seconds (days for ``date``), the last
    one open-ended; fewer when the range is too short for that many.

    ``begin``: where the records seem to begin (the first page's lowest value, when that page
    came in ascending order); the windows split ``[begin, upper)`` evenly and the first one
    still starts at ``lower``, so nothing before ``begin`` is left out if the guess is wrong.
    """
    assert isinstance(lower, dt.datetime) and isinstance(upper, dt.datetime)
    begin = begin if isinstance(begin, dt.datetime) and lower < begin < upper else lower
    grain = _DAY if kind.format == "date" else _SECOND
    width = (upper - begin) / max(count, 1)
    width = max(grain, (width // grain) * grain)
    bounds: list[CursorValue] = [lower]
    following = kind.plus(begin, width)
    while len(bounds) < count and following < upper:  # type: ignore[operator]
        bounds.append(following)
        following = kind.plus(following, width)
    texts = [kind.dump(bound) for bound in bounds]
    uppers: list[str | None] = [*texts[1:], None]
    return [
        Slice(f"{SLICE_PREFIX}{low}/{high or ''}", low, high)
        for low, high in zip(texts, uppers, strict=True)
    ]


def _seconds(value: CursorValue) -> float:
    return value.timestamp() if isinstance(value, dt.datetime) else float(value)


def estimated_pages(
    endpoint: Endpoint, kind: CursorKind, records: list[Any], lower: CursorValue, upper: CursorValue
) -> tuple[float, CursorValue | None]:
    """Pages of the range if all of it is as dense as this first page, and where the records
    seem to begin (None: at ``lower`` as far as we can tell).

    The span between the page's lowest and highest cursor value holds one page. A page in
    ascending order is the start of the data: the range to fill runs from its lowest value.
    """
    incremental = endpoint.incremental
    assert incremental is not None
    get = compile_path(incremental.cursor_path)
    values = [value for value in map(kind.parse, map(get, records)) if value is not None]
    if not values:
        return 1.0, None
    low, high = min(values), max(values)
    ascending = all(a <= b for a, b in itertools.pairwise(values))  # type: ignore[operator]
    begin = low if ascending else None
    span = max(_seconds(high) - _seconds(low), 1.0)
    start = begin if begin is not None else lower
    return max(1.0, (_seconds(upper) - _seconds(start)) / span), begin


@dataclass(frozen=True, slots=True)
class Probe:
    """The serial walk's first page, fetched to decide: its request and response."""

    request: PageRequest
    response: HttpResponse
    pages: float
    #: Where the records seem to begin (see :func:`estimated_pages`).
    begin: CursorValue | None = None


async def probe(
    endpoint: Endpoint,
    fetcher: Fetcher,
    first: PageRequest,
    *,
    kind: CursorKind,
    lower: CursorValue,
    upper: CursorValue,
) -> Probe:
    """Fetch ``first`` (the serial walk's first request) and estimate the range's pages."""
    response = await fetcher.fetch(first, endpoint.name)
    records = extract_records(response.document, endpoint.records_path, endpoint.name, "page 1")
    paginator = make_paginator(endpoint.pagination)
    paginator.first_request(first)
    following = paginator.next_request(Page(first, response, records))
    if following is None:
        return Probe(first, response, 1.0)
    pages, begin = estimated_pages(endpoint, kind, records, lower, upper)
    return Probe(first, response, pages, begin)


def slice_count(setting: str | int, concurrency: int, pages: float | None) -> int:
    """Slices for a run: ``setting`` (a number) or, for ``"auto"``, as many as the estimated
    ``pages`` fill with at least :data:`MIN_PAGES_PER_SLICE` each, up to ``concurrency``."""
    if setting == "off":
        return 1
    if isinstance(setting, int):
        return setting
    if pages is None:
        return 1
    return max(1, min(concurrency, int(pages // MIN_PAGES_PER_SLICE)))


class PrimedFetcher:
    """The run's fetcher, except that one request is answered from a response already fetched
    (the probe's), once: a range too small to slice costs no extra request."""

    def __init__(self, fetcher: Fetcher, request: PageRequest, response: HttpResponse) -> None:
        self.fetcher = fetcher
        self._key: str | None = request.key()
        self._response = response
        self.retries = getattr(fetcher, "retries", {})
        self.retries_by_endpoint = getattr(fetcher, "retries_by_endpoint", {})

    async def fetch(
        self, request: PageRequest, endpoint: str, parse: ParseBody | None = None
    ) -> HttpResponse:
        if self._key is not None and request.key() == self._key:
            self._key = None
            response = self._response
            if parse is not None and response.document is not None:
                return HttpResponse(
                    response.url,
                    response.status,
                    response.headers,
                    response.body,
                    parse(response.body),
                )
            return response
        return await self.fetcher.fetch(request, endpoint, parse)
