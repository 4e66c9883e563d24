"""The prefetcher's depth follows what is useful: shallow while pages wait to be asked for (a
fast server, the pipeline the bottleneck), the full ``pages_ahead`` when the walker waits (a
slow server). Behaviour only: the fetcher below answers when the test says so, never on time.

The fetcher is the prefetcher's narrow protocol (``fetch(request, endpoint, parse)``), not an
HTTP client: what is tested is which requests the prefetcher starts, and when.
"""

from __future__ import annotations

import asyncio

from ingest.http.messages import HttpResponse, PageRequest, ParseBody
from ingest.prefetch import MIN_DEPTH, Prefetcher


class Numbered:
    """Predicts ``?page=N+steps`` (a walk with no known end)."""

    def predict(self, request: PageRequest, steps: int) -> PageRequest | None:
        return page(number(request) + steps)


def page(n: int) -> PageRequest:
    return PageRequest("http://127.0.0.1/items", (("page", str(n)),))


def number(request: PageRequest) -> int:
    return int(dict(request.params)["page"])


class Server:
    """Answers at once (``fast``) or only when the test releases the page."""

    def __init__(self, *, fast: bool) -> None:
        self.fast = fast
        self.started: list[int] = []
        self.in_flight = 0
        self.released: dict[int, asyncio.Event] = {}

    def release(self, n: int) -> None:
        self.released.setdefault(n, asyncio.Event()).set()

    async def fetch(
        self, request: PageRequest, endpoint: str, parse: ParseBody | None = None
    ) -> HttpResponse:
        n = number(request)
        self.started.append(n)
        self.in_flight += 1
        try:
            if not self.fast:
                await self.released.setdefault(n, asyncio.Event()).wait()
            return HttpResponse(request.url, 200, {}, b"{}", {"page": n})
        finally:
            self.in_flight -= 1


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_fast_server_keeps_few_pages_ahead() -> None:
    server = Server(fast=True)
    ahead = Prefetcher(server, "items", Numbered(), pages_ahead=16)
    try:
        for n in range(1, 41):
            answer = await ahead.get(page(n))
            assert answer.document == {"page": n}
            await settle()  # the pipeline is slower than the server: every page has arrived
        assert ahead.depth == MIN_DEPTH
        # After the first window, only about MIN_DEPTH pages beyond the one asked for.
        assert max(server.started) <= 40 + MIN_DEPTH
        assert len(server.started) == len(set(server.started))  # nothing fetched twice
    finally:
        await ahead.close()
    assert ahead.discarded <= MIN_DEPTH


async def test_a_slow_server_gets_the_full_depth_and_it_comes_back_after_a_fast_spell() -> None:
    server = Server(fast=False)
    ahead = Prefetcher(server, "items", Numbered(), pages_ahead=8)
    try:
        # Pages 1..8 are asked for before they arrive: all 8 in flight.
        asking = asyncio.create_task(ahead.get(page(1)))
        await settle()
        assert server.in_flight == 8
        # A burst, as a slow server's pages sent together arrive together: the walker takes
        # them one after another, then waits again. The depth stays.
        for n in range(1, 9):
            server.release(n)
        assert (await asking).document == {"page": 1}
        for n in range(2, 9):
            await settle()
            assert (await ahead.get(page(n))).document == {"page": n}
        assert ahead.depth == 8
        # A fast spell: pages 9..40 are there before they are asked for: shallower.
        for n in range(9, 41):
            server.release(n)
        for n in range(9, 41):
            await settle()
            assert (await ahead.get(page(n))).document == {"page": n}
        assert ahead.depth == MIN_DEPTH
        # The walker waits again (page 41 has not arrived): the depth doubles, 8 again at the
        # second wait, and 8 pages are in flight.
        asking = asyncio.create_task(ahead.get(page(41)))
        await settle()
        assert ahead.depth == 2 * MIN_DEPTH
        server.release(41)
        assert (await asking).document == {"page": 41}
        asking = asyncio.create_task(ahead.get(page(42)))
        await settle()
        assert ahead.depth == 8
        assert server.in_flight == 8  # pages 42..49
        assert len(server.started) == len(set(server.started))
        server.release(42)
        assert (await asking).document == {"page": 42}
    finally:
        await ahead.close()
