"""A "remote" API on 127.0.0.1: every answer after a network-like delay, optionally rate limited.

``python -m bench.remote_server PORT [options]`` serves the benchmark's records (the same
deterministic records as the loopback benchmark, :func:`bench.dataset.record`) in every
pagination style ingest knows, under a *profile* that says how the server behaves:

``/{profile}/{style}``, profiles:

* ``fixed``: each answer after ``latency`` seconds times a uniform jitter of +/- ``jitter``;
* ``lognormal``: after ``latency * 0.9 * exp(N(0, sigma))`` seconds (median ~0.09 s, p99 ~0.9 s
  at the defaults): the heavy tail real APIs have;
* ``rate``: ``fixed`` latency, and a token bucket of ``rate`` requests per second (one second's
  burst); a request without a token is answered at once with 429 and ``Retry-After: 1``;
* ``solo``: ``fixed`` latency, and 429 with ``Retry-After: 1`` to any request that arrives while
  another one of this profile is in flight (a server that refuses concurrency).

Styles (``page_size`` records a page, ``records`` in all):

* ``page_total`` ``?page=N``, with ``meta.total`` and ``meta.total_pages``; ``page`` without;
* ``offset_total`` ``?offset=O&limit=L`` with ``meta.total``; ``offset`` without;
* ``cursor`` ``?cursor=C`` (``next_cursor`` in the body, null on the last page);
* ``next_url`` ``?after=N`` (``next``: the absolute URL of the next page, null at the end);
* ``link`` ``?page=N`` with an RFC 8288 ``Link: <...>; rel="next"`` header;
* the three serial styles also take a range filter, ``since`` and ``until`` (ISO 8601): only
  records with ``since <= updated_at < until`` (records come ordered by ``updated_at``), the
  next cursor, URL or Link keeping the range. A walk without them gets every record.
* ``parents`` (``parents`` records, one page) and ``parents/{id}/children`` (one page of
  ``page_size`` records per parent).

Records are :func:`bench.dataset.record`'s, except that ``updated_at`` is moved so that the
records are ``STEP`` seconds apart and the newest is an hour older than the server's start:
history up to now, as a first load of a real API sees it (ingest's slices cut the range from
the walk's lower bound to *now*).

Past the end every numbered style answers an empty page. ``GET /_stats`` returns the counters
per profile (requests, refused, most in flight at once, the *window* from the first
request's arrival to the last answer) and ``POST /_reset`` zeroes them.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import math
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from bench.dataset import record

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
PROFILES = ("fixed", "lognormal", "rate", "solo")
#: Seconds between two records' ``updated_at``.
STEP = 7


@dataclass(slots=True)
class Counters:
    requests: int = 0
    refused: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    latencies: list[float] = field(default_factory=list)
    #: When the first request arrived and the last answer left (monotonic seconds).
    first: float | None = None
    last: float | None = None

    def as_dict(self) -> dict[str, Any]:
        ordered = sorted(self.latencies)

        def quantile(q: float) -> float | None:
            return round(ordered[int(q * (len(ordered) - 1))], 4) if ordered else None

        return {
            "requests": self.requests,
            "refused": self.refused,
            "max_in_flight": self.max_in_flight,
            "latency_p50": quantile(0.5),
            "latency_p99": quantile(0.99),
            "window": (
                round(self.last - self.first, 4)
                if self.first is not None and self.last is not None
                else None
            ),
        }


@dataclass(frozen=True, slots=True)
class Settings:
    records: int = 20_000
    page_size: int = 100
    parents: int = 100
    latency: float = 0.1
    jitter: float = 0.2
    sigma: float = 1.0
    rate: float = 20.0
    seed: int = 14


class Bucket:
    """A token bucket: ``rate`` tokens a second, at most ``rate`` (one second's burst) saved."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.tokens = rate
        self.at = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.rate, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


def _json(document: Any, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=orjson.dumps(document), content_type="application/json", headers=headers
    )


def _int(request: web.Request, name: str, default: int) -> int:
    raw = request.query.get(name, "")
    return int(raw) if raw.lstrip("-").isdigit() else default


def _moment(text: str | None) -> dt.datetime | None:
    """A ``since``/``until`` bound (None: absent); a malformed one is the client's error."""
    if not text:
        return None
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        raise web.HTTPBadRequest(text=f"not an ISO 8601 time: {text!r}") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)


def build_app(settings: Settings) -> web.Application:
    rng = random.Random(settings.seed)
    counters = {profile: Counters() for profile in PROFILES}
    buckets = {"rate": Bucket(settings.rate)}
    size = settings.page_size
    total = settings.records
    total_pages = -(-total // size)
    # Position p (0-based) is record p + 1, updated at ``base + (p + 1) * STEP``.
    newest = dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(hours=1)
    base = newest - dt.timedelta(seconds=total * STEP)

    def updated_at(position: int) -> str:
        return (base + dt.timedelta(seconds=(position + 1) * STEP)).strftime("%Y-%m-%dT%H:%M:%SZ")

    def records(start: int, count: int) -> list[dict[str, Any]]:
        """Records ``start`` .. ``start + count - 1`` (0-based positions), clipped to the end."""
        return [
            {**record(index + 1), "updated_at": updated_at(index)}
            for index in range(max(0, start), min(total, start + count))
        ]

    def first_at(moment: dt.datetime) -> int:
        """The position of the first record updated at or after ``moment``."""
        seconds = (moment - base).total_seconds()
        return min(total, max(0, math.ceil(seconds / STEP) - 1))

    def window(request: web.Request) -> tuple[int, int]:
        """Positions ``[low, high)`` that ``since``/``until`` select (all records without)."""
        since, until = _moment(request.query.get("since")), _moment(request.query.get("until"))
        low = first_at(since) if since is not None else 0
        high = first_at(until) if until is not None else total
        return low, max(low, high)

    def delay(profile: str) -> float:
        if profile == "lognormal":
            return settings.latency * 0.9 * math.exp(rng.gauss(0.0, settings.sigma))
        return settings.latency * (1 + settings.jitter * (2 * rng.random() - 1))

    def served(handler: Handler) -> Handler:
        async def wrapped(request: web.Request) -> web.StreamResponse:
            profile = request.match_info["profile"]
            if profile not in counters:
                raise web.HTTPNotFound()
            count = counters[profile]
            count.requests += 1
            if count.first is None:
                count.first = time.monotonic()
            refuse = (profile == "solo" and count.in_flight > 0) or (
                profile in buckets and not buckets[profile].take()
            )
            if refuse:
                count.refused += 1
                count.last = time.monotonic()
                return web.Response(status=429, headers={"Retry-After": "1"}, text="slow down")
            count.in_flight += 1
            count.max_in_flight = max(count.max_in_flight, count.in_flight)
            try:
                seconds = delay(profile)
                count.latencies.append(seconds)
                await asyncio.sleep(seconds)
                return await handler(request)
            finally:
                count.in_flight -= 1
                count.last = time.monotonic()

        return wrapped

    async def page_total(request: web.Request) -> web.Response:
        page = _int(request, "page", 1)
        data = records((page - 1) * size, size)
        return _json({"data": data, "meta": {"total": total, "total_pages": total_pages}})

    async def page(request: web.Request) -> web.Response:
        number = _int(request, "page", 1)
        return _json({"data": records((number - 1) * size, size)})

    async def offset_total(request: web.Request) -> web.Response:
        offset, limit = _int(request, "offset", 0), min(size, _int(request, "limit", size))
        return _json({"data": records(offset, limit), "meta": {"total": total}})

    async def offset(request: web.Request) -> web.Response:
        start, limit = _int(request, "offset", 0), min(size, _int(request, "limit", size))
        return _json({"data": records(start, limit)})

    async def cursor(request: web.Request) -> web.Response:
        low, high = window(request)
        raw = request.query.get("cursor", "c0")
        start = max(low, int(raw[1:]) if raw[1:].isdigit() else 0)
        following = start + size
        return _json(
            {
                "data": records(start, min(size, high - start)),
                "next_cursor": f"c{following}" if following < high else None,
            }
        )

    async def next_url(request: web.Request) -> web.Response:
        low, high = window(request)
        start = max(low, _int(request, "after", 0))
        following = start + size
        link = str(request.url.update_query(after=following)) if following < high else None
        return _json({"data": records(start, min(size, high - start)), "next": link})

    async def link(request: web.Request) -> web.Response:
        low, high = window(request)
        number = _int(request, "page", 1)
        start = low + (number - 1) * size
        headers = {}
        if start + size < high:
            headers["Link"] = f'<{request.url.update_query(page=number + 1)}>; rel="next"'
        return _json({"data": records(start, min(size, high - start))}, headers)

    async def parents(request: web.Request) -> web.Response:
        return _json({"data": [record(index) for index in range(1, settings.parents + 1)]})

    async def children(request: web.Request) -> web.Response:
        parent = int(request.match_info["parent"])
        if not 1 <= parent <= settings.parents:
            raise web.HTTPNotFound()
        return _json({"data": records((parent - 1) * size, size)})

    async def stats(request: web.Request) -> web.Response:
        return _json({profile: count.as_dict() for profile, count in counters.items()})

    async def reset(request: web.Request) -> web.Response:
        for profile in PROFILES:
            counters[profile] = Counters()
        buckets["rate"] = Bucket(settings.rate)
        return _json({"reset": True})

    app = web.Application()
    routes = {
        "page_total": page_total,
        "page": page,
        "offset_total": offset_total,
        "offset": offset,
        "cursor": cursor,
        "next_url": next_url,
        "link": link,
        "parents": parents,
        r"parents/{parent:\d+}/children": children,
    }
    app.router.add_get("/_stats", stats)
    app.router.add_post("/_reset", reset)
    for path, handler in routes.items():
        app.router.add_get("/{profile}/" + path, served(handler))
    return app


def parse_args(argv: list[str] | None = None) -> tuple[int, Settings]:
    parser = argparse.ArgumentParser(prog="python -m bench.remote_server")
    parser.add_argument("port", type=int)
    defaults = Settings()
    for name in ("records", "page_size", "parents", "seed"):
        parser.add_argument(
            f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name)
        )
    for name in ("latency", "jitter", "sigma", "rate"):
        parser.add_argument(f"--{name}", type=float, default=getattr(defaults, name))
    args = parser.parse_args(argv)
    values = {name: getattr(args, name) for name in Settings.__dataclass_fields__}
    return args.port, Settings(**values)


def main(argv: list[str] | None = None) -> None:
    port, settings = parse_args(argv)
    web.run_app(build_app(settings), host="127.0.0.1", port=port, access_log=None, print=None)


if __name__ == "__main__":
    main()
