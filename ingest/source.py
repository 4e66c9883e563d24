"""The async generator that walks one endpoint, page by page, and yields its records.

Each yielded :class:`FetchedPage` carries the checkpoint that resumes *after* it, so whoever
commits the page's records can commit that checkpoint in the same transaction.

Guards that apply to every pagination style live here, not in the paginators:

* a next request that was already made in this walk stops the run with an error (loop guard);
* for numbered styles (page, offset), a page identical to the previous one, or a 404 after the
  first page, means the server ran past its end: the walk ends without writing the repeat.

With ``pages_ahead > 1`` numbered styles fetch that many pages at once (:mod:`ingest.prefetch`);
the walk below still takes them one by one, in order, so none of the above changes.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections import OrderedDict
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec
import orjson
import structlog

from ingest.config import Endpoint
from ingest.errors import PaginationError, SourceError
from ingest.http.messages import HttpResponse, PageRequest, ParseBody
from ingest.http.retry import HttpStatusError
from ingest.paginate import Page, Paginator
from ingest.paths import MISSING, compile_path
from ingest.prefetch import Prefetcher

log = structlog.get_logger("ingest.source")

#: How many recent page requests the loop guard remembers (bounded memory on endless walks).
LOOP_GUARD_WINDOW = 10_000


class Fetcher(Protocol):
    async def fetch(
        self, request: PageRequest, endpoint: str, parse: ParseBody | None = None
    ) -> HttpResponse: ...


@dataclass(frozen=True, slots=True)
class FetchedPage:
    """One page's records and the checkpoint that resumes after it (``None``: walk finished)."""

    number: int
    records: Sequence[Any]
    checkpoint: dict[str, Any] | None
    total: int | None = None  # the record total the server reported so far, if any
    #: For a child endpoint: the parent row this page was fetched for (``$parent.`` columns).
    parent: Mapping[str, Any] | None = None
    #: The raw page body, kept only for tables with ``load = "server"`` (PostgreSQL unpacks it).
    body: bytes | None = None
    #: When the walk this page ends started, on the last page of a ``parents = "changed"`` child
    #: walk: saved with that page's checkpoint, it bounds the next walk's parents.
    walk_started: dt.datetime | None = None


def start_request(base_url: str, endpoint: Endpoint, path: str | None = None) -> PageRequest:
    """The endpoint's first URL and params; ``path`` overrides it (a child's filled path)."""
    path = endpoint.path if path is None else path
    path = path if path.startswith("/") else f"/{path}"
    body = None
    if endpoint.method == "POST":
        body = orjson.dumps(endpoint.body if endpoint.body is not None else {}).decode()
    return PageRequest(base_url + path, (), endpoint.method, body).with_params(**endpoint.params)


def checkpoint_for(request: PageRequest | None, paginator: Paginator) -> dict[str, Any] | None:
    if request is None:
        return None
    return {"request": request.to_state(), "paginator": paginator.snapshot()}


def resume_request(state: dict[str, Any], paginator: Paginator) -> PageRequest:
    paginator.restore(dict(state.get("paginator", {})))
    return PageRequest.from_state(state["request"])


class _LoopGuard:
    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        # 16-byte digests of the request keys: a window of URLs would cost ~10x the memory.
        self.seen: OrderedDict[bytes, int] = OrderedDict()

    def check(self, request: PageRequest, page_number: int, redact: Any) -> None:
        key = hashlib.blake2b(request.key().encode(), digest_size=16).digest()
        if key in self.seen:
            raise PaginationError(
                f"endpoint {self.endpoint}: next page reference repeats "
                f"({redact(request.full_url())}, first requested as page {self.seen[key]}, "
                f"again after page {page_number}); stopping instead of looping"
            )
        self.seen[key] = page_number
        if len(self.seen) > LOOP_GUARD_WINDOW:
            self.seen.popitem(last=False)


class _RepeatGuard:
    """Spots a page whose records repeat an earlier page of this walk.

    A fingerprint (count, first record, last record) is cheap and, for real data with keys,
    as good as comparing whole pages. A bounded window of recent pages is remembered, as
    16-byte digests: orjson's output buffers are ~4 KB each, and keeping two per page for 10,000
    pages grew a run's memory with the dataset (and fragmented the heap around them).
    """

    def __init__(self) -> None:
        self.seen: OrderedDict[tuple[int, bytes], int] = OrderedDict()

    def earlier(self, records: Sequence[Any], number: int) -> int | None:
        """The page number ``records`` repeat, or None (and remember this page)."""
        if not records:
            return None
        digest = hashlib.blake2b(digest_size=16)
        digest.update(_fingerprint(records[0]))
        digest.update(b"\n")  # not valid inside orjson output: the two parts stay apart
        digest.update(_fingerprint(records[-1]))
        key = (len(records), digest.digest())
        if key in self.seen:
            return self.seen[key]
        self.seen[key] = number
        if len(self.seen) > LOOP_GUARD_WINDOW:
            self.seen.popitem(last=False)
        return None


def _fingerprint(record: Any) -> bytes:
    """A record as canonical JSON: key order and the page's spelling of it do not count."""
    if isinstance(record, msgspec.Raw):  # left as JSON text for a writer process to convert
        record = orjson.loads(bytes(record))
    # default=str: rows built by the typed decoder may hold Decimal values.
    return orjson.dumps(record, option=orjson.OPT_SORT_KEYS, default=str)


def extract_records(document: Any, records_path: str, endpoint: str, url: str) -> list[Any]:
    """The list of records in a page body; a missing path is an error, null is an empty page.

    A body that is null altogether (or an HTTP 204) is an empty page too.
    """
    if document is None:
        return []
    value = compile_path(records_path)(document)
    if value is MISSING:
        keys = (
            ", ".join(list(document)[:8]) if isinstance(document, dict) else type(document).__name__
        )
        raise SourceError(
            f"endpoint {endpoint}: {url}: records_path {records_path!r} not found in the page "
            f"(top-level keys: {keys}); check records_path"
        )
    if value is None:
        return []
    if isinstance(value, list):
        return value
    if isinstance(value, dict):
        return [value]
    raise SourceError(
        f"endpoint {endpoint}: {url}: records_path {records_path!r} holds a "
        f"{type(value).__name__}, not a list of records"
    )


async def walk_endpoint(
    endpoint: Endpoint,
    fetcher: Fetcher,
    paginator: Paginator,
    first: PageRequest,
    *,
    resumed: bool = False,
    redact_url: Any = str,
    pages_ahead: int = 1,
    credential_params: frozenset[str] = frozenset(),
    parse: ParseBody | None = None,
    keep_body: bool = False,
) -> AsyncGenerator[FetchedPage, None]:
    """Yield every page from ``first`` on; the last page's checkpoint is ``None``.

    ``parse`` is the endpoint's typed decoder (:mod:`ingest.typed`), if it has one: the records
    of a page it decoded arrive already converted to rows (:class:`ingest.typed.BuiltRows`).

    ``credential_params`` are dropped from every next request (a server may echo an API key into
    its next links); the HTTP client adds the credential back when sending.

    ``keep_body`` keeps each page's body on the :class:`FetchedPage` (always with ``load =
    "server"``): for PostgreSQL or a writer process to convert.
    """
    guard = _LoopGuard(endpoint.name)
    repeats = _RepeatGuard()
    keep_body = keep_body or endpoint.table.load == "server"
    request: PageRequest | None = first
    number = 0
    ahead = Prefetcher(
        fetcher, endpoint.name, paginator, pages_ahead if paginator.numbered else 1, parse
    )
    try:
        while request is not None:
            guard.check(request, number, redact_url)
            # Bound in the producer's context: HTTP retry events name the page being fetched.
            structlog.contextvars.bind_contextvars(page=number + 1)
            try:
                response = await ahead.get(request)
            except HttpStatusError as exc:
                if exc.status == 404 and paginator.numbered and (number > 0 or resumed):
                    log.info(
                        "end_by_404", endpoint=endpoint.name, url=redact_url(request.full_url())
                    )
                    yield FetchedPage(number + 1, [], None)
                    return
                raise
            records = extract_records(
                response.document, endpoint.records_path, endpoint.name, redact_url(response.url)
            )
            number += 1
            repeated = repeats.earlier(records, number)
            if repeated is not None:
                if not paginator.numbered:
                    raise PaginationError(
                        f"endpoint {endpoint.name}: page {number} "
                        f"({redact_url(request.full_url())}) repeats the records of page "
                        f"{repeated} although the request changed: the server may ignore the "
                        "pagination parameter; stopping instead of writing them again"
                    )
                # A numbered walk past the server's end: it repeats the last (or first) page.
                log.info(
                    "end_by_repeated_page", endpoint=endpoint.name, page=number, repeats=repeated
                )
                yield FetchedPage(number, [], None)
                return
            following = paginator.next_request(Page(request, response, records))
            if following is not None and credential_params:
                following = following.without(credential_params)
            yield FetchedPage(
                number,
                records,
                checkpoint_for(following, paginator),
                paginator.reported_total,
                body=response.body if keep_body else None,
            )
            request = following
    finally:
        await ahead.close()
