"""The one HTTP client: aiohttp session, credentials kept to their origin, retries via tenacity.

Why tenacity: it gives the retry loop (stop after N attempts or T seconds, custom waits, a hook
per retry) as a tested object instead of a hand-written loop; the policy itself lives in
:mod:`ingest.http.retry`.
"""

from __future__ import annotations

import asyncio
import random
import ssl
import time
from collections import Counter
from collections.abc import Mapping
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson
import structlog
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
)

from ingest.config import HttpSettings, Source
from ingest.errors import SourceError
from ingest.events import NullObserver, RunObserver
from ingest.http.messages import HttpResponse, PageRequest
from ingest.http.retry import (
    RETRYABLE_STATUSES,
    HttpStatusError,
    RetryableError,
    full_jitter,
    parse_reset,
    parse_retry_after,
)
from ingest.secrets import Redactor, Secret, reveal

log = structlog.get_logger("ingest.http")

EXCERPT_BYTES = 200


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
        self.retries: Counter[str] = Counter()
        #: Retries per endpoint and reason, for the per-endpoint counts in ``ingest.runs``.
        self.retries_by_endpoint: dict[str, Counter[str]] = {}
        self.requests = 0
        self._origin = origin(source.base_url)
        self._public_headers = {
            name: value for name, value in source.headers.items() if not isinstance(value, Secret)
        }
        self._all_headers = {name: reveal(value) for name, value in source.headers.items()}
        redactor.add(*(value for value in source.headers.values() if isinstance(value, Secret)))
        self._rng = rng or random.Random()
        self._session: aiohttp.ClientSession | None = None
        self._slots = asyncio.Semaphore(self.settings.max_concurrency)

    async def __aenter__(self) -> HttpClient:
        ssl_context: ssl.SSLContext | bool = True
        if not self.settings.verify_tls:
            ssl_context = False
        elif self.settings.ca_bundle:
            ssl_context = ssl.create_default_context(cafile=self.settings.ca_bundle)
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

    def headers_for(self, url: str) -> dict[str, str]:
        """Credentials only for the source's own origin; never for any other host."""
        if origin(url) == self._origin:
            return self._all_headers
        if any(isinstance(value, Secret) for value in self.source.headers.values()):
            raise SourceError(
                f"refusing to send credentials to {self.redactor.url(url)}: it is not the "
                f"source's origin {self.source.base_url}"
            )
        return {name: str(value) for name, value in self._public_headers.items()}

    async def fetch(self, request: PageRequest, endpoint: str) -> HttpResponse:
        """One page, parsed; retried on transient failures, then a one-line :class:`SourceError`."""
        url = request.full_url()
        headers = self.headers_for(url)
        started = time.monotonic()
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.settings.max_attempts)
            | stop_after_delay(self.settings.max_retry_seconds),
            wait=self._wait,
            retry=retry_if_exception_type(RetryableError),
            before_sleep=lambda state: self._count_retry(state, endpoint, url),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    return await self._attempt(url, headers, endpoint)
        except RetryableError as exc:
            seconds = time.monotonic() - started
            raise SourceError(
                f"endpoint {endpoint}: {self.redactor.url(url)}: gave up after "
                f"{self.settings.max_attempts} attempts in {seconds:.1f}s: {exc}"
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

    def _count_retry(self, state: RetryCallState, endpoint: str, url: str) -> None:
        error = state.outcome.exception() if state.outcome else None
        reason = error.reason if isinstance(error, RetryableError) else "error"
        self.retries[reason] += 1
        self.retries_by_endpoint.setdefault(endpoint, Counter())[reason] += 1
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

    async def _attempt(self, url: str, headers: Mapping[str, str], endpoint: str) -> HttpResponse:
        assert self._session is not None, "HttpClient used outside 'async with'"
        async with self._slots:
            self.requests += 1
            sent = time.monotonic()
            try:
                async with self._session.get(url, headers=headers) as response:
                    body = await self._read_capped(response, url)
                    status = response.status
                    final_url = str(response.url)
                    response_headers = _flatten(response.headers)
                self.observer.request_finished(
                    endpoint, status=status, seconds=time.monotonic() - sent
                )
            except TimeoutError as exc:
                raise RetryableError(f"timed out ({type(exc).__name__})", "timeout") from None
            except aiohttp.ClientPayloadError as exc:
                raise RetryableError(f"truncated body: {exc}", "truncated") from None
            except aiohttp.ClientConnectionError as exc:
                raise RetryableError(f"connection failed: {exc}", "connection") from None
        if status in RETRYABLE_STATUSES:
            wait = parse_retry_after(response_headers.get("retry-after"))
            if wait is None:
                wait = parse_reset(response_headers.get("x-ratelimit-reset"))
            raise RetryableError(
                f"HTTP {status}: {_excerpt(body)}", f"http_{status}", wait_at_least=wait or 0.0
            )
        if status >= 400:
            raise HttpStatusError(
                f"endpoint {endpoint}: {self.redactor.url(url)}: HTTP {status}: "
                f"{self.redactor(_excerpt(body))}",
                status,
            )
        content_type = response_headers.get("content-type", "")
        if content_type and "json" not in content_type.lower():
            raise RetryableError(f"content type {content_type!r} is not JSON", "content_type")
        try:
            document: Any = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise RetryableError(
                f"malformed JSON ({exc}) in {len(body)} bytes: {_excerpt(body)}", "malformed_json"
            ) from None
        return HttpResponse(final_url, status, response_headers, body, document)

    async def _read_capped(self, response: aiohttp.ClientResponse, url: str) -> bytes:
        limit = self.settings.max_response_bytes
        declared = response.content_length
        if declared is not None and declared > limit:
            raise SourceError(
                f"{self.redactor.url(url)}: response of {declared} bytes exceeds "
                f"http.max_response_bytes={limit}"
            )
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.content.iter_chunked(1 << 16):
            size += len(chunk)
            if size > limit:
                raise SourceError(
                    f"{self.redactor.url(url)}: response exceeds http.max_response_bytes={limit}"
                )
            chunks.append(chunk)
        return b"".join(chunks)


def _flatten(headers: Any) -> dict[str, str]:
    """Lower-case header names; repeated headers (several Link lines) joined with ", "."""
    flat: dict[str, str] = {}
    for name, value in headers.items():
        key = name.lower()
        flat[key] = f"{flat[key]}, {value}" if key in flat else value
    return flat


def _excerpt(body: bytes) -> str:
    text = body[:EXCERPT_BYTES].decode("utf-8", errors="replace")
    text = " ".join(text.split())
    return text + ("..." if len(body) > EXCERPT_BYTES else "")
