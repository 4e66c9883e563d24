"""Fetching up to K pages ahead for numbered pagination styles, handed out strictly in order.

Page-number and offset walks know (or can guess) the next requests before the current page
arrives: page ``n + 1``, ``n + 2``...; offset ``o + step``, ``o + 2 * step``... A
:class:`Prefetcher` keeps up to ``pages_ahead`` of those requests in flight, but the walker still
asks for pages one at a time and in order, and the paginator still decides from each page what
the real next request is. So:

* the walker yields (and the checkpoint advances over) a contiguous prefix only;
* every stop condition works as before (empty page, total reached, ``has_more`` false, 404 past
  the end, a repeated page): speculative fetches past the end are simply discarded;
* a wrong guess (a server that caps the page size, so offsets move by less than ``limit``)
  costs wasted requests, never a wrong page: a request that is not the one the walker asks for
  is cancelled and the right one is fetched;
* memory is bounded by ``pages_ahead`` responses.

Errors of speculative requests are kept until (and unless) the walker asks for that page: a 404
two pages past the end is not an error, it is never asked for.

With ``pages_ahead = 1`` it is a plain pass-through to the fetcher, exactly the serial walk.

**Only as deep as useful.** ``pages_ahead`` hides a slow server's round trips. Against a fast
one (the pipeline, not the server, is the bottleneck) pages arrive before they are asked for,
and every page fetched ahead only waits in memory. So the depth adapts between
:data:`MIN_DEPTH` and ``pages_ahead``: once a whole window (``depth`` pages in a row) was
there before the walker asked for it, every further page that was takes one off the depth; a
page the walker has to wait for doubles it. A slow server's pages come in bursts (the pages
sent together arrive together, then the walker waits), so they keep the full depth. Only new
requests follow the depth: requests in flight are never cancelled for it.
"""

from __future__ import annotations

import asyncio
from typing import Protocol, runtime_checkable

import structlog

from ingest.http.messages import HttpResponse, PageRequest, ParseBody

log = structlog.get_logger("ingest.prefetch")

#: The least depth: the page asked for and one more, so a fast server's next page still
#: arrives while this one is processed.
MIN_DEPTH = 2


class Fetcher(Protocol):
    """What the prefetcher needs of the HTTP client (the same shape as the walker's)."""

    async def fetch(
        self, request: PageRequest, endpoint: str, parse: ParseBody | None = None
    ) -> HttpResponse: ...


@runtime_checkable
class Predicting(Protocol):
    """A paginator that can guess the request ``steps`` pages after ``request``."""

    def predict(self, request: PageRequest, steps: int) -> PageRequest | None:
        """The guessed request, or ``None`` when that page is known to be past the end."""


def _retrieve(task: asyncio.Task[HttpResponse]) -> None:
    """Mark a discarded task's outcome as seen, so asyncio does not log it as lost."""
    if not task.cancelled():
        task.exception()


class Prefetcher:
    """``await prefetcher.get(request)``: that page's response, with the next K-1 in flight."""

    def __init__(
        self,
        fetcher: Fetcher,
        endpoint: str,
        paginator: object,
        pages_ahead: int,
        parse: ParseBody | None = None,
    ) -> None:
        self.fetcher = fetcher
        self.parse = parse
        self.endpoint = endpoint
        self.predictor = paginator if isinstance(paginator, Predicting) else None
        self.pages_ahead = pages_ahead if self.predictor is not None else 1
        self._inflight: dict[str, asyncio.Task[HttpResponse]] = {}
        #: Requests started but then discarded (past the end or wrongly guessed).
        self.discarded = 0
        #: Pages (this one included) new requests may reach ahead now (see the module doc).
        self.depth = self.pages_ahead
        #: Pages in a row that had arrived before the walker asked for them.
        self._ready_streak = 0
        #: The least depth this walk came down to (logged at the end: did it adapt?).
        self.shallowest = self.depth

    async def get(self, request: PageRequest) -> HttpResponse:
        if self.pages_ahead <= 1 or self.predictor is None:
            return await self.fetcher.fetch(request, self.endpoint, self.parse)
        wanted = [request]
        for steps in range(1, self.pages_ahead):
            guess = self.predictor.predict(request, steps)
            if guess is None:
                break
            wanted.append(guess)
        keys = [item.key() for item in wanted]
        for key in [key for key in self._inflight if key not in keys]:
            self._discard(key)
        self._adapt(keys)
        for index, (key, item) in enumerate(zip(keys, wanted, strict=True)):
            if key not in self._inflight and index < self.depth:
                self._inflight[key] = asyncio.create_task(
                    self.fetcher.fetch(item, self.endpoint, self.parse),
                    name=f"prefetch:{self.endpoint}",
                )
        task = self._inflight.pop(keys[0])
        return await task

    def _adapt(self, keys: list[str]) -> None:
        """Shallower while pages wait to be asked for; deeper when the walker waits."""
        head = self._inflight.get(keys[0])
        if head is None or not head.done():
            self.depth = min(self.pages_ahead, 2 * self.depth)
            self._ready_streak = 0
            return
        self._ready_streak += 1
        if self._ready_streak >= self.depth:
            self.depth = max(MIN_DEPTH, self.depth - 1)
            self.shallowest = min(self.shallowest, self.depth)

    def _discard(self, key: str) -> None:
        task = self._inflight.pop(key)
        task.cancel()
        task.add_done_callback(_retrieve)
        self.discarded += 1

    async def close(self) -> None:
        """Cancel whatever is still in flight (the walk ended or failed) and wait for it."""
        tasks = list(self._inflight.values())
        for key in list(self._inflight):
            self._discard(key)
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self.discarded:
            log.debug("prefetch_discarded", endpoint=self.endpoint, requests=self.discarded)
        if self.pages_ahead > 1:
            log.debug(
                "prefetch_depth", endpoint=self.endpoint, depth=self.depth, least=self.shallowest
            )
