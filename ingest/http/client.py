"""The one HTTP client: aiohttp session, credentials kept to their origin, retries via tenacity.

Why tenacity: it gives the retry loop (stop after N attempts or before a time budget runs out,
custom waits, a hook per retry) as a tested object instead of a hand-written loop; the policy
itself lives in :mod:`ingest.http.retry`.

Every attempt goes through, in order: the adaptive concurrency limit
(:mod:`ingest.http.concurrency`), the rate limiter and any pause the server asked for
(:mod:`ingest.http.ratelimit`), then the credentials of :mod:`ingest.http.auth`.

Where credentials go: only to the source's own origin (scheme, host, port of ``base_url``).
A next link or redirect to another host is refused unless that host is in ``http.allow_hosts``,
and then it is requested *without* credentials (no auth, no secret headers). Redirects are
followed here, hop by hop, not by aiohttp: aiohttp drops ``Authorization`` on a cross-origin
redirect but would forward a custom API-key header.
"""

from __future__ import annotations

import random
import ssl
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from types import TracebackType
from typing import Any
from urllib.parse import parse_qsl, urlencode, urljoin, urlsplit, urlunsplit

import aiohttp
import orjson
import structlog
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    stop_before_delay,
)

from ingest.config import HttpSettings, Source
from ingest.errors import ConfigError, SourceAccessError, SourceError
from ingest.events import NullObserver, RunObserver
from ingest.http.auth import Authenticator, Credentials, make_authenticator
from ingest.http.concurrency import AdaptiveConcurrency, Ticket
from ingest.http.messages import HttpResponse, PageRequest, ParseBody
from ingest.http.ratelimit import RateLimiter
from ingest.http.retry import (
    OVERLOAD_STATUSES,
    REFUSED_STATUSES,
    RETRYABLE_STATUSES,
    HttpStatusError,
    RetryableError,
    full_jitter,
    parse_reset,
    parse_retry_after,
)
from ingest.secrets import Redactor, Secret

log = structlog.get_logger("ingest.http")

EXCERPT_BYTES = 200
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
NO_CREDENTIALS = Credentials({}, {})


def origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme, (parts.hostname or "").lower(), port


class HttpClient:
    """Fetches pages for one source. Use as ``async with HttpClient(source, redactor) as http``."""

    def __init__(
        self,
        source: Source,
        redactor: Redactor,
        *,
        rng: random.Random | None = None,
        observer: RunObserver | None = None,
    ) -> None:
        self.observer: RunObserver = observer or NullObserver()
        self.source = source
        self.settings: HttpSettings = source.http
        self.redactor = redactor
        #: Retries by reason (``http_429``, ``timeout``, ``auth_refresh``...), for the summary.
        self.retries: Counter[str] = Counter()
        #: Retries per endpoint and reason, for the per-endpoint counts in ``ingest.runs``.
        self.retries_by_endpoint: dict[str, Counter[str]] = {}
        self.requests = 0
        self._origin = origin(source.base_url)
        redactor.add(*source.secrets())
        self._public_headers = {
            name: value for name, value in source.headers.items() if isinstance(value, str)
        }
        self._own_headers = {
            name: value.reveal() if isinstance(value, Secret) else value
            for name, value in source.headers.items()
        }
        self.auth: Authenticator = make_authenticator(source.auth, redactor, self._post_token)
        self.limiter = RateLimiter(
            self.settings.max_requests_per_second, self.settings.rate_limit_burst
        )
        self.concurrency = AdaptiveConcurrency(
            minimum=self.settings.min_concurrency,
            maximum=self.settings.max_concurrency,
            adaptive=self.settings.adaptive_concurrency,
            decrease_factor=self.settings.decrease_factor,
            latency_spike_factor=self.settings.latency_spike_factor,
        )
        self._rng = rng or random.Random()
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> HttpClient:
        ssl_context: ssl.SSLContext | bool = True
        if not self.settings.verify_tls:
            log.warning("tls_verification_disabled", source=self.source.name)
            ssl_context = False
        elif self.settings.ca_bundle:
            try:
                ssl_context = ssl.create_default_context(cafile=self.settings.ca_bundle)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(
                    f"http.ca_bundle: cannot load {self.settings.ca_bundle}: {exc}"
                ) from None
        timeout = aiohttp.ClientTimeout(
            total=self.settings.total_timeout,
            sock_connect=self.settings.connect_timeout,
            sock_read=self.settings.read_timeout,
        )
        self._session = aiohttp.ClientSession(
            timeout=timeout,
            connector=aiohttp.TCPConnector(limit=self.settings.max_concurrency, ssl=ssl_context),
            headers={"Accept": "application/json", "User-Agent": "ingest/0.1"},
            raise_for_status=False,
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- where a URL may go, and with what -------------------------------------------------------

    def is_own(self, url: str, endpoint: str = "") -> bool:
        """True for the source's origin; False for an allowed foreign host; else a SourceError."""
        target = origin(url)
        if target == self._origin:
            return True
        _, host, port = target
        if host in self.settings.allow_hosts or f"{host}:{port}" in self.settings.allow_hosts:
            return False
        where = f"endpoint {endpoint}: " if endpoint else ""
        raise SourceError(
            f"{where}refusing to request {self.redactor.url(url)}: host {host}:{port} is not the "
            f"source's origin {self.source.base_url}; add it to http.allow_hosts to follow it "
            "(without credentials)"
        )

    def headers_for(self, url: str) -> dict[str, str]:
        """Configured headers: all of them for the own origin, only non-secret ones elsewhere."""
        return dict(self._own_headers if self.is_own(url) else self._public_headers)

    # -- public API ------------------------------------------------------------------------------

    async def fetch(
        self, request: PageRequest, endpoint: str, parse: ParseBody | None = None
    ) -> HttpResponse:
        """One page, parsed; retried on transient failures, then a one-line :class:`SourceError`.

        ``parse`` replaces ``orjson.loads`` for the body (the endpoint's typed decoder, see
        :mod:`ingest.typed`); a body it finds malformed is retried like any other.

        A 401 from the source's origin with a refreshable credential (OAuth2) fetches a new
        token once and tries again; a second 401 is final.
        """
        url = request.full_url()
        self.is_own(url, endpoint)
        json_body = request.body.encode() if request.body is not None else None
        used = NO_CREDENTIALS
        refreshed = False

        async def attempt() -> HttpResponse:
            nonlocal used
            used = await self.auth.credentials() if self.is_own(url) else NO_CREDENTIALS
            return await self._attempt(
                request.method, url, endpoint, used, parse=parse, json_body=json_body, page=True
            )

        while True:
            try:
                return await self._retrying(endpoint, url, attempt)
            except HttpStatusError as exc:
                if exc.status != 401 or not self.auth.refreshable or not self.is_own(url):
                    raise
                if refreshed:
                    raise SourceAccessError(
                        f"endpoint {endpoint}: {self.redactor.url(url)}: HTTP 401 again after "
                        "fetching a new OAuth2 token; check the client's grants and auth.scope"
                    ) from None
                refreshed = True
                self.retries["auth_refresh"] += 1
                self.observer.retried(endpoint, reason="auth_refresh")
                log.warning(
                    "unauthorized_refreshing_token", endpoint=endpoint, url=self.redactor.url(url)
                )
                await self.auth.refresh(used)

    async def post_form(
        self, url: str, headers: Mapping[str, str], form: Mapping[str, str], what: str
    ) -> Any:
        """POST a form (an OAuth2 token request) with the same retries; returns the JSON body."""
        response = await self._retrying(
            what,
            url,
            lambda: self._attempt("POST", url, what, Credentials(dict(headers), {}), form=form),
            notify=False,
        )
        return response.document

    async def _post_token(self, url: str, headers: dict[str, str], form: dict[str, str]) -> Any:
        try:
            return await self.post_form(url, headers, form, "auth")
        except HttpStatusError as exc:
            # RFC 6749 answers a bad client id/secret with 400 or 401: a person must fix it.
            error = SourceAccessError if exc.status in {400, *REFUSED_STATUSES} else SourceError
            raise error(f"auth: token request failed: {self.redactor(str(exc))}") from None

    # -- retries ---------------------------------------------------------------------------------

    async def _retrying(
        self,
        endpoint: str,
        url: str,
        attempt: Callable[[], Awaitable[HttpResponse]],
        *,
        notify: bool = True,
    ) -> HttpResponse:
        """Run ``attempt`` under the retry policy; ``notify``: tell the observer (pages only).

        The first attempt runs outside tenacity: an ``AsyncRetrying`` with its call state is a
        few dozen objects in reference cycles, so one per page left cyclic garbage that only the
        (deliberately rare, see ``tuning``) collections freed, and a long run's memory grew by
        thousands of them before the first one. When the first attempt fails, tenacity gets the
        failure replayed as its own first attempt, so waits (Retry-After included), counts and
        the time budget are what they were.
        """
        started = time.monotonic()
        try:
            return await attempt()
        except RetryableError as exc:
            first_failure = exc
        budget = self.settings.max_retry_seconds - (time.monotonic() - started)
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.settings.max_attempts) | stop_before_delay(budget),
            wait=self._wait,
            retry=retry_if_exception_type(RetryableError),
            before_sleep=lambda state: self._count_retry(state, endpoint, url, notify),
            reraise=True,
        )
        try:
            async for trial in retrying:
                with trial:
                    if trial.retry_state.attempt_number == 1:
                        raise first_failure
                    return await attempt()
        except RetryableError as exc:
            seconds = time.monotonic() - started
            attempts = retrying.statistics.get("attempt_number", self.settings.max_attempts)
            where = f"endpoint {endpoint}" if notify else "auth: token_url"
            raise SourceError(
                f"{where}: {self.redactor.url(url)}: gave up after {attempts} "
                f"attempt{'' if attempts == 1 else 's'} in {seconds:.1f}s: "
                f"{self.redactor(str(exc))}"
            ) from None
        raise AssertionError("unreachable: tenacity either returns or raises")

    def _wait(self, state: RetryCallState) -> float:
        backoff = full_jitter(
            state.attempt_number,
            self.settings.backoff_initial,
            self.settings.backoff_max,
            self._rng,
        )
        error = state.outcome.exception() if state.outcome else None
        asked = error.wait_at_least if isinstance(error, RetryableError) else 0.0
        return max(backoff, asked)

    def _count_retry(self, state: RetryCallState, endpoint: str, url: str, notify: bool) -> None:
        error = state.outcome.exception() if state.outcome else None
        reason = error.reason if isinstance(error, RetryableError) else "error"
        self.retries[reason] += 1
        self.retries_by_endpoint.setdefault(endpoint, Counter())[reason] += 1
        if notify:
            self.observer.retried(endpoint, reason=reason)
        log.warning(
            "retrying",
            endpoint=endpoint,
            url=self.redactor.url(url),
            reason=reason,
            attempt=state.attempt_number,
            wait_s=round(state.upcoming_sleep, 3),
            error=self.redactor(str(error)),
        )

    # -- one attempt -----------------------------------------------------------------------------

    async def _attempt(
        self,
        method: str,
        url: str,
        endpoint: str,
        credentials: Credentials,
        *,
        form: Mapping[str, str] | None = None,
        parse: ParseBody | None = None,
        json_body: bytes | None = None,
        page: bool = False,
    ) -> HttpResponse:
        """One exchange; ``page``: an endpoint's page (GET, or POST with ``json_body``), else a
        token request (POST ``form``, only the given headers)."""
        async with self.concurrency.slot() as ticket:
            await self.limiter.acquire()
            ticket.started = time.monotonic()
            status, final_url, headers, body = await self._exchange(
                method,
                url,
                endpoint,
                credentials,
                form=form,
                ticket=ticket,
                json_body=json_body,
                page=page,
            )
            if page:  # token requests are not an endpoint's
                self.observer.request_finished(
                    endpoint, status=status, seconds=time.monotonic() - ticket.started
                )
            self._note_rate_headers(headers)
            if status in RETRYABLE_STATUSES:
                wait = parse_retry_after(headers.get("retry-after"))
                if wait is None and status in OVERLOAD_STATUSES:
                    wait = parse_reset(headers.get(self.settings.rate_limit_reset_header.lower()))
                if status in OVERLOAD_STATUSES:
                    self.concurrency.overloaded(ticket, f"HTTP {status}", wait or 0.0)
                    if wait:
                        self.limiter.pause(wait, reason=f"HTTP {status}")
                raise RetryableError(
                    f"HTTP {status}: {self.redactor.excerpt(body, EXCERPT_BYTES)}",
                    f"http_{status}",
                    wait_at_least=wait or 0.0,
                )
            self.concurrency.success(ticket)
        where = f"endpoint {endpoint}: " if endpoint != "auth" else "token_url "
        if status >= 400 or status in REDIRECT_STATUSES:
            raise HttpStatusError(
                f"{where}{self.redactor.url(final_url)}: HTTP {status}: "
                f"{self.redactor.excerpt(body, EXCERPT_BYTES)}",
                status,
            )
        if status == 204:
            # No Content: some APIs answer a page past the end this way; it is an empty page.
            return HttpResponse(final_url, status, headers, body, None)
        content_type = headers.get("content-type", "")
        if content_type and "json" not in content_type.lower():
            raise RetryableError(f"content type {content_type!r} is not JSON", "content_type")
        try:
            document: Any = (parse or orjson.loads)(body)
        except orjson.JSONDecodeError as exc:
            raise RetryableError(
                f"malformed JSON ({exc}) in {len(body)} bytes: "
                f"{self.redactor.excerpt(body, EXCERPT_BYTES)}",
                "malformed_json",
            ) from None
        return HttpResponse(final_url, status, headers, body, document)

    async def _exchange(
        self,
        method: str,
        url: str,
        endpoint: str,
        credentials: Credentials,
        *,
        form: Mapping[str, str] | None,
        ticket: Ticket,
        json_body: bytes | None = None,
        page: bool = False,
    ) -> tuple[int, str, dict[str, str], bytes]:
        """Send, following redirects hop by hop; returns (status, final URL, headers, body).

        A page POST follows only 307/308 (which keep the method and body); a token request
        follows none.
        """
        assert self._session is not None, "HttpClient used outside 'async with'"
        current = url
        own = page and self.is_own(current, endpoint)
        data: Any = form if json_body is None else json_body
        for _ in range(self.settings.max_redirects + 1):
            headers = dict(self._own_headers if own else self._public_headers)
            if not page:  # a token request: only the headers it was given
                headers = {}
            headers.update(credentials.headers if (own or not page) else {})
            if json_body is not None:
                headers["Content-Type"] = "application/json"
            target = _with_query(current, credentials.params) if own else current
            self.requests += 1
            try:
                async with self._session.request(
                    method, target, headers=headers, data=data, allow_redirects=False
                ) as response:
                    body = await self._read_capped(response, current, endpoint)
                    status = response.status
                    response_headers = _flatten(response.headers)
            except TimeoutError as exc:
                self.concurrency.overloaded(ticket, "timeout")
                raise RetryableError(f"timed out ({type(exc).__name__})", "timeout") from None
            except aiohttp.ClientPayloadError as exc:
                raise RetryableError(
                    f"truncated body: {self.redactor(str(exc))}", "truncated"
                ) from None
            except aiohttp.ClientConnectionError as exc:
                raise RetryableError(
                    f"connection failed: {self.redactor(str(exc))}", "connection"
                ) from None
            except aiohttp.ClientResponseError as exc:  # unparseable status line or headers
                raise RetryableError(
                    f"invalid HTTP response: {self.redactor(str(exc))}", "protocol"
                ) from None
            except aiohttp.InvalidURL:
                raise SourceError(
                    f"endpoint {endpoint}: not a valid URL: {self.redactor.url(current)}"
                ) from None
            location = response_headers.get("location")
            if (
                not page
                or status not in REDIRECT_STATUSES
                or not location
                or (method != "GET" and status not in (307, 308))
            ):
                return status, current, response_headers, body
            following = urljoin(current, location)
            own = own and self.is_own(following, endpoint)
            current = following
            log.debug("redirect", endpoint=endpoint, status=status, to=self.redactor.url(current))
        raise SourceError(
            f"endpoint {endpoint}: {self.redactor.url(url)}: more than "
            f"http.max_redirects={self.settings.max_redirects} redirects"
        )

    def _note_rate_headers(self, headers: Mapping[str, str]) -> None:
        """``X-RateLimit-Remaining: 0`` with a reset time: pause everyone until the reset."""
        remaining = headers.get(self.settings.rate_limit_remaining_header.lower())
        if remaining is None or remaining.strip() not in {"0", "0.0"}:
            return
        wait = parse_reset(headers.get(self.settings.rate_limit_reset_header.lower()))
        if wait:
            self.limiter.pause(wait, reason="rate limit remaining 0")

    async def _read_capped(
        self, response: aiohttp.ClientResponse, url: str, endpoint: str
    ) -> bytes:
        """The body, at most ``http.max_response_bytes`` of it on the wire and once decoded.

        A compressed body is inflated chunk by chunk as it is read (aiohttp bounds each step),
        and the decoded size is counted as it grows: a small gzip body that inflates to
        gigabytes fails at the cap instead of being inflated whole first.
        """
        limit = self.settings.max_response_bytes
        where = f"endpoint {endpoint}: " if endpoint != "auth" else "token_url "
        declared = response.content_length
        if declared is not None and declared > limit:
            raise SourceError(
                f"{where}{self.redactor.url(url)}: response of {declared} bytes exceeds "
                f"http.max_response_bytes={limit}"
            )
        encoding = response.headers.get("Content-Encoding", "").strip().lower()
        if declared is not None and encoding in ("", "identity"):
            return await response.read()  # exactly the declared bytes, in one buffer
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.content.iter_chunked(1 << 16):
            size += len(chunk)
            if size > limit:
                decoded = f" once decoded ({encoding})" if encoding else ""
                raise SourceError(
                    f"{where}{self.redactor.url(url)}: response exceeds "
                    f"http.max_response_bytes={limit}{decoded}"
                )
            chunks.append(chunk)
        return b"".join(chunks)


def _with_query(url: str, params: Mapping[str, str]) -> str:
    if not params:
        return url
    parts = urlsplit(url)
    query = [
        (name, value)
        for name, value in parse_qsl(parts.query, keep_blank_values=True)
        if name not in params
    ]
    query.extend(params.items())
    return urlunsplit(parts._replace(query=urlencode(query)))


def _flatten(headers: Any) -> dict[str, str]:
    """Lower-case header names; repeated headers (several Link lines) joined with ", "."""
    flat: dict[str, str] = {}
    for name, value in headers.items():
        key = name.lower()
        flat[key] = f"{flat[key]}, {value}" if key in flat else value
    return flat
