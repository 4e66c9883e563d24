"""A real local HTTP source that misbehaves on purpose, at configurable rates.

Per request, one seeded draw picks the outcome: a 5xx, a 429 with ``Retry-After``, a dropped
connection (closed before any response), a stalled response (slower than the client's read
timeout), a truncated body (``Content-Length`` promises more than is sent), invalid JSON, or
the right page. Every outcome is logged with its time so tests can check what the client did
(for instance that it waited ``Retry-After`` before asking again).

The data is served page-number style: ``/items?page=N&per_page=M`` ->
``{"data": [...], "total": T}``.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from tests.servers import json_response


@dataclass(frozen=True)
class Faults:
    """Probabilities (0..1) of each failure per request, and their parameters."""

    server_error: float = 0.0
    rate_limited: float = 0.0
    retry_after: float = 0.3
    reset: float = 0.0
    stall: float = 0.0
    stall_seconds: float = 1.5
    truncate: float = 0.0
    invalid_json: float = 0.0
    latency: float = 0.0
    seed: int = 1234


@dataclass
class Served:
    """One request and what the server did with it."""

    at: float
    key: str
    outcome: str
    headers: dict[str, str] = field(default_factory=dict)


class FaultServer:
    """``app`` serves ``records``; ``log`` lists every request's outcome in arrival order."""

    def __init__(self, records: list[dict[str, Any]], faults: Faults) -> None:
        self.records = records
        self.faults = faults
        self.rng = random.Random(faults.seed)
        self.log: list[Served] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.app = web.Application()
        self.app.router.add_get("/items", self.handle)

    def _pick(self) -> str:
        draw = self.rng.random()
        for outcome in (
            "server_error",
            "rate_limited",
            "reset",
            "stall",
            "truncate",
            "invalid_json",
        ):
            rate: float = getattr(self.faults, outcome)
            if draw < rate:
                return outcome
            draw -= rate
        return "ok"

    def outcomes(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for served in self.log:
            counts[served.outcome] = counts.get(served.outcome, 0) + 1
        return counts

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return await self._handle(request)
        finally:
            self.in_flight -= 1

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        outcome = self._pick()
        key = request.query_string
        self.log.append(Served(time.monotonic(), key, outcome, dict(request.headers)))
        if self.faults.latency:
            await asyncio.sleep(self.faults.latency)
        page = int(request.query.get("page", "1"))
        size = int(request.query.get("per_page", "10"))
        body = orjson.dumps(
            {"data": self.records[(page - 1) * size : page * size], "total": len(self.records)}
        )
        match outcome:
            case "server_error":
                status = self.rng.choice([500, 502, 503, 504])
                return web.Response(status=status, text=f"injected {status}")
            case "rate_limited":
                return web.Response(
                    status=429,
                    text="slow down",
                    headers={"Retry-After": f"{self.faults.retry_after:g}"},
                )
            case "reset":
                assert request.transport is not None
                request.transport.close()
                return web.Response(status=200)  # never reaches the client
            case "stall":
                await asyncio.sleep(self.faults.stall_seconds)
                return json_response(orjson.loads(body))
            case "truncate":
                response = web.StreamResponse(headers={"Content-Type": "application/json"})
                response.content_length = len(body)
                await response.prepare(request)
                await response.write(body[: len(body) // 2])
                assert request.transport is not None
                request.transport.close()
                return response
            case "invalid_json":
                return web.Response(body=body[:-3] + b"}}", content_type="application/json")
        return web.Response(body=body, content_type="application/json")
