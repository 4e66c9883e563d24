"""Pagination styles, each a small class behind one narrow protocol.

A paginator reads a fetched page and says what the next request is, or ``None`` when the walk is
over. Nothing else in ingest knows how pagination works. Stop conditions are explicit: an empty
page, no next reference, a total reached, a ``has_more``-style flag that is explicitly false.
Absent, null or empty values are never taken as a stop signal on their own: real servers send
numbers as strings and empty headers.

The walker in :mod:`ingest.source` adds the guards that apply to every style: a next reference
that repeats, a page that repeats, and a 404 past the end of a numbered walk.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol
from urllib.parse import parse_qsl, urljoin, urlsplit

from ingest.config import (
    CursorPagination,
    LinkHeaderPagination,
    NextUrlPagination,
    OffsetPagination,
    PageNumberPagination,
    Pagination,
    SinglePage,
)
from ingest.errors import PaginationError
from ingest.http.messages import HttpResponse, PageRequest
from ingest.paths import MISSING, compile_path, lenient_bool, lenient_int


@dataclass(frozen=True, slots=True)
class Page:
    """What a paginator sees of one fetched page."""

    request: PageRequest
    response: HttpResponse
    records: Sequence[Any]


class Paginator(Protocol):
    """Turns one page into the next request."""

    #: The record total the server reported, when it does (progress ETA, prefetch bounds).
    reported_total: int | None

    #: True for styles where the page position is a number we compute (page, offset): a 404 or a
    #: repeated page past the end then means "no more data" rather than an error.
    numbered: bool

    def first_request(self, base: PageRequest) -> PageRequest:
        """The request for the first page, built from the endpoint's URL and params."""

    def next_request(self, page: Page) -> PageRequest | None:
        """The request for the page after ``page``, or ``None`` when the walk is over."""

    def snapshot(self) -> dict[str, Any]:
        """Counters needed to resume (stored in the checkpoint next to the next request)."""

    def restore(self, state: dict[str, Any]) -> None:
        """Reload counters from :meth:`snapshot` output."""


def _explicitly_false(flag: Any) -> bool:
    return lenient_bool(flag) is False


def _reported(page: Page, getter: Callable[[Any], Any] | None, header: str | None) -> int | None:
    """A count the server reports in the body or a header; None when absent, empty or junk."""
    if getter is not None:
        value = lenient_int(getter(page.response.document))
        if value is not None:
            return value
    if header:
        return lenient_int(page.response.header(header))
    return None


class _Place:
    """Where a style puts its page/offset/cursor: query parameters, or (``location = "body"``)
    values at dotted paths in the POST body, sent as JSON numbers or as read (cursors)."""

    def __init__(self, location: str) -> None:
        self.in_body = location == "body"

    def get(self, request: PageRequest, name: str) -> Any:
        return request.body_value(name) if self.in_body else request.param(name)

    def set(self, request: PageRequest, values: dict[str, Any]) -> PageRequest:
        if not self.in_body:
            return request.with_params(**values)
        for name, value in values.items():
            try:
                request = request.with_body_value(name, value)
            except ValueError as exc:
                raise PaginationError(str(exc)) from None
        return request


def _next_request(page: Page, target: str, carry_params: bool) -> PageRequest:
    """The request for a next URL the server named: its own query string, the page's method
    and body, and with ``carry_params`` the page's query parameters the URL does not have."""
    url = urljoin(page.response.url, target)
    request = PageRequest(url, (), page.request.method, page.request.body)
    if not carry_params:
        return request
    present = {name for name, _ in parse_qsl(urlsplit(url).query, keep_blank_values=True)}
    carried = tuple((name, value) for name, value in page.request.params if name not in present)
    return replace(request, params=carried)


class Speculation:
    """How many pages past the current one a walk without a known total may fetch ahead.

    It starts at ``INITIAL`` (the second page, which a walk without a total asks for anyway)
    and grows by one with every full page (as large as the largest page so far), up to
    ``LIMIT``: as the full pages of one round trip arrive, the guesses double per round trip,
    as TCP's slow start does, while a short walk wastes at most as many guesses as it had
    pages. A short or empty page, the usual sign of the end, drops it to zero, so a walk near
    its end stops guessing. With a known total the paginator bounds the guesses by the total.
    """

    INITIAL = 1
    LIMIT = 64

    def __init__(self) -> None:
        self.depth = self.INITIAL

    def saw(self, records: int, largest: int) -> None:
        if records and records >= largest:
            self.depth = min(self.LIMIT, max(1, self.depth) + 1)
        else:
            self.depth = 0


class _Counting:
    """Shared bookkeeping: records seen so far, for "total reached" checks across resumes."""

    numbered = False

    def __init__(self) -> None:
        self.records_seen = 0
        # The record total the server last reported (body or header), if the style has one.
        self.reported_total: int | None = None

    def snapshot(self) -> dict[str, Any]:
        return {"records_seen": self.records_seen}

    def restore(self, state: dict[str, Any]) -> None:
        self.records_seen = int(state.get("records_seen", 0))


class PageNumberPaginator(_Counting):
    """``?page=N`` (plus an optional page size); page numbers count pages, not records."""

    numbered = True

    def __init__(self, config: PageNumberPagination) -> None:
        super().__init__()
        self.config = config
        self._total = compile_path(config.total_path) if config.total_path else None
        self._total_pages = (
            compile_path(config.total_pages_path) if config.total_pages_path else None
        )
        self._has_more = compile_path(config.has_more_path) if config.has_more_path else None
        self._next_page = compile_path(config.next_page_path) if config.next_page_path else None
        self._place = _Place(config.location)
        # What the pages so far said about the end; only used to guess requests to prefetch.
        self._known_pages: int | None = None
        # The largest page actually received, never the configured page_size: a server that caps
        # pages at 1000 while page_size asks 5000 would otherwise put page 4 past a 20,000 total.
        self._largest_page = 0
        totals = (config.total_path, config.total_header, config.total_pages_path)
        self._expects_total = any(totals) or bool(config.total_pages_header)
        self.speculation = Speculation()

    def predict(self, request: PageRequest, steps: int) -> PageRequest | None:
        """Page ``current + steps``, unless what the pages so far said puts it past the end."""
        if self._next_page is not None:  # the server names the next page: no guessing
            return None
        current = lenient_int(self._place.get(request, self.config.page_param))
        target = (self.config.start_page if current is None else current) + steps
        index = target - self.config.start_page
        if self._known_pages is not None:
            return None if index >= self._known_pages else self._page(request, target)
        if self.reported_total is not None and self._largest_page:
            if index * self._largest_page >= self.reported_total:
                return None
            return self._page(request, target)
        if self._expects_total and not self._largest_page:
            return None  # the first page says how far to go: nothing past a small endpoint's end
        # No total: guess only as far as the run of full pages so far justifies.
        return self._page(request, target) if steps <= self.speculation.depth else None

    def _page(self, request: PageRequest, number: int) -> PageRequest:
        return self._place.set(request, {self.config.page_param: number})

    def first_request(self, base: PageRequest) -> PageRequest:
        params: dict[str, Any] = {self.config.page_param: self.config.start_page}
        if self.config.page_size_param and self.config.page_size:
            params[self.config.page_size_param] = self.config.page_size
        return self._place.set(base, params)

    def next_request(self, page: Page) -> PageRequest | None:
        self.records_seen += len(page.records)
        self._largest_page = max(self._largest_page, len(page.records))
        self.speculation.saw(len(page.records), self._largest_page)
        if not page.records and self.config.stop_on_empty:
            return None
        document = page.response.document
        has_more = lenient_bool(self._has_more(document)) if self._has_more else None
        if has_more is False:
            return None
        total = _reported(page, self._total, self.config.total_header)
        self.reported_total = total
        if total is not None and self.records_seen >= total:
            return None
        current = lenient_int(self._place.get(page.request, self.config.page_param))
        if current is None:
            current = self.config.start_page
        total_pages = _reported(page, self._total_pages, self.config.total_pages_header)
        self._known_pages = total_pages
        if total_pages is not None and current - self.config.start_page + 1 >= total_pages:
            return None
        following = current + 1
        if self._next_page is not None:
            named = self._next_page(document)
            if named is MISSING or named is None or str(named).strip() == "":
                if has_more is True:
                    raise PaginationError(
                        f"{self.config.has_more_path} says there are more pages but "
                        f"{self.config.next_page_path} is empty"
                    )
                return None
            number = None if isinstance(named, bool) else lenient_int(named)
            if number is None:
                raise PaginationError(
                    f"{self.config.next_page_path} is not a page number: {named!r}"
                )
            following = number
        return self._place.set(page.request, {self.config.page_param: following})


class OffsetPaginator(_Counting):
    """``?offset=N&limit=M``; the offset advances by the records received, so capped pages work."""

    numbered = True

    def __init__(self, config: OffsetPagination) -> None:
        super().__init__()
        self.config = config
        self._total = compile_path(config.total_path) if config.total_path else None
        self._has_more = compile_path(config.has_more_path) if config.has_more_path else None
        # Only used to guess requests to prefetch: the end, and how far a page moves the offset
        # (the records a page actually held: a server may cap pages below ``limit``).
        self.reported_total: int | None = None
        # None until a page arrives: guessing from ``limit`` against a server that caps pages
        # would fetch offsets that are never asked for.
        self._step: int | None = None
        self._largest_page = 0
        self.speculation = Speculation()
        self._place = _Place(config.location)

    def predict(self, request: PageRequest, steps: int) -> PageRequest | None:
        """Offset ``current + steps * step``, unless what was seen so far puts it past the end."""
        if self._step is None:
            return None
        current = lenient_int(self._place.get(request, self.config.offset_param))
        target = (self.config.start_offset if current is None else current) + steps * self._step
        if self.reported_total is not None:
            if target >= self.reported_total:
                return None
        elif steps > self.speculation.depth:
            return None
        return self._place.set(request, {self.config.offset_param: target})

    def first_request(self, base: PageRequest) -> PageRequest:
        return self._place.set(
            base,
            {
                self.config.offset_param: self.config.start_offset,
                self.config.limit_param: self.config.limit,
            },
        )

    def next_request(self, page: Page) -> PageRequest | None:
        received = len(page.records)
        self.records_seen += received
        self._largest_page = max(self._largest_page, received)
        self.speculation.saw(received, self._largest_page)
        if not received:
            # An empty page ends an offset walk whatever stop_on_empty says: the offset would not
            # move, so asking again could only return the same empty page.
            return None
        self._step = received
        document = page.response.document
        if self._has_more and _explicitly_false(self._has_more(document)):
            return None
        offset = lenient_int(self._place.get(page.request, self.config.offset_param))
        if offset is None:
            offset = self.config.start_offset
        following = offset + received
        total = _reported(page, self._total, self.config.total_header)
        self.reported_total = total
        if total is not None and following >= total:
            return None
        return self._place.set(page.request, {self.config.offset_param: following})


class _BodyReference(_Counting):
    """Styles whose body names the next page: a cursor token or a URL at a dotted path."""

    def __init__(self, reference_path: str, has_more_path: str | None, stop_on_empty: bool) -> None:
        super().__init__()
        self.reference_path = reference_path
        self.has_more_path = has_more_path
        self.stop_on_empty = stop_on_empty
        self._reference = compile_path(reference_path)
        self._has_more = compile_path(has_more_path) if has_more_path else None

    def first_request(self, base: PageRequest) -> PageRequest:
        return base

    def next_request(self, page: Page) -> PageRequest | None:
        self.records_seen += len(page.records)
        if not page.records and self.stop_on_empty:
            return None
        document = page.response.document
        has_more = lenient_bool(self._has_more(document)) if self._has_more else None
        if has_more is False:
            return None
        reference = self._reference(document)
        if reference is MISSING or reference is None or str(reference).strip() == "":
            if has_more is True:
                raise PaginationError(
                    f"{self.has_more_path} says there are more pages but "
                    f"{self.reference_path} is empty"
                )
            return None
        if isinstance(reference, dict | list | bool):
            raise PaginationError(f"{self.reference_path} is not a usable reference: {reference!r}")
        return self.follow(page, reference)

    def follow(self, page: Page, reference: Any) -> PageRequest:
        raise NotImplementedError


class CursorPaginator(_BodyReference):
    """A token read from the body and sent back as a query parameter."""

    def __init__(self, config: CursorPagination) -> None:
        super().__init__(config.cursor_path, config.has_more_path, config.stop_on_empty)
        self.config = config
        self._place = _Place(config.location)

    def follow(self, page: Page, reference: Any) -> PageRequest:
        return self._place.set(page.request, {self.config.cursor_param: reference})


class NextUrlPaginator(_BodyReference):
    """The body names the next page's URL (absolute or relative to the page)."""

    def __init__(self, config: NextUrlPagination) -> None:
        super().__init__(config.next_url_path, config.has_more_path, config.stop_on_empty)
        self.config = config

    def follow(self, page: Page, reference: Any) -> PageRequest:
        if not isinstance(reference, str):
            raise PaginationError(f"{self.reference_path} is not a URL: {reference!r}")
        # The next URL carries its own query string: our params never override it, and are
        # only sent at all (those it lacks) with carry_params.
        return _next_request(page, reference.strip(), self.config.carry_params)


_LINK = re.compile(r"<([^>]*)>((?:\s*;\s*[^;,]*(?:=\s*(?:\"[^\"]*\"|[^;,]*))?)*)")
_PARAM = re.compile(r";\s*([A-Za-z0-9!#$&+.^_`|~*-]+)\s*(?:=\s*(\"[^\"]*\"|[^;,]*))?")


def parse_link_header(value: str) -> dict[str, str]:
    """RFC 8288: map each relation type to its target URL (first one wins per rel)."""
    relations: dict[str, str] = {}
    for match in _LINK.finditer(value or ""):
        target, parameters = match.group(1).strip(), match.group(2)
        for name, raw in _PARAM.findall(parameters):
            if name.lower() != "rel":
                continue
            for rel in raw.strip().strip('"').lower().split():
                relations.setdefault(rel, target)
    return relations


class LinkHeaderPaginator(_Counting):
    """Follows the ``Link`` header's ``rel="next"`` target, resolved against the page URL."""

    def __init__(self, config: LinkHeaderPagination) -> None:
        super().__init__()
        self.config = config

    def first_request(self, base: PageRequest) -> PageRequest:
        return base

    def next_request(self, page: Page) -> PageRequest | None:
        self.records_seen += len(page.records)
        if not page.records and self.config.stop_on_empty:
            return None
        target = parse_link_header(page.response.header("link") or "").get(self.config.rel)
        if not target:
            return None
        return _next_request(page, target, self.config.carry_params)


class SinglePaginator(_Counting):
    """One request, one page."""

    def first_request(self, base: PageRequest) -> PageRequest:
        return base

    def next_request(self, page: Page) -> PageRequest | None:
        self.records_seen += len(page.records)
        return None


def make_paginator(config: Pagination) -> Paginator:
    """The paginator for an endpoint's ``[pagination]`` table."""
    match config:
        case PageNumberPagination():
            return PageNumberPaginator(config)
        case OffsetPagination():
            return OffsetPaginator(config)
        case CursorPagination():
            return CursorPaginator(config)
        case NextUrlPagination():
            return NextUrlPaginator(config)
        case LinkHeaderPagination():
            return LinkHeaderPaginator(config)
        case SinglePage():
            return SinglePaginator()
    raise AssertionError(f"unhandled pagination style {config!r}")
