"""The in-house contenders, each run as its own process (``python -m bench.contenders KIND``).

- ``http``: the HTTP + JSON-parse ceiling: fetch and parse every page, keep nothing.
- ``copy``: the COPY ceiling: every page parsed and converted to row tuples *before* the clock
  starts, then ``copy_records_to_table`` in batches, one transaction each, on 1 or more
  connections in parallel.
- ``naive``: a seed-style pipeline: ``asyncio.gather`` over every page behind a Semaphore,
  ``resp.json()``, ``executemany`` INSERT of each 1,000-record page.

Each prints one JSON line: records written and the seconds of its timed section.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson

from bench.target import COLUMNS
from ingest.config import Table
from ingest.pgcodecs import install_codecs
from ingest.rows import RowBuilder
from ingest.sink import TableSink


def _table(name: str) -> Table:
    return Table.model_validate(
        {
            "name": name,
            "mode": "append",
            "store_raw": False,
            "columns": {key: {"path": path, "type": kind} for key, (path, kind) in COLUMNS.items()},
        }
    )


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def http_ceiling(base_url: str, pages: int, concurrency: int) -> int:
    records = 0
    slots = asyncio.Semaphore(concurrency)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(number: int) -> int:
            async with slots, session.get(f"{base_url}/items", params={"page": number}) as resp:
                resp.raise_for_status()
                return len(orjson.loads(await resp.read())["data"])

        # A sliding window of `concurrency` pages in flight, in page order.
        pending: set[asyncio.Task[int]] = set()
        for number in range(1, pages + 1):
            pending.add(asyncio.create_task(one(number)))
            if len(pending) >= concurrency * 2:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                records += sum(task.result() for task in done)
        for task in pending:
            records += await task
    return records


async def copy_ceiling(
    dsn: str, data: Path, *, pages: int, total: int, batch: int, connections: int
) -> tuple[int, float, float]:
    """COPY ``total`` rows; only the COPY phase is timed (returns records, seconds, cpu)."""
    builder = RowBuilder(_table("bench_copy"))
    prepared: list[tuple[Any, ...]] = []
    for number in range(1, min(pages, 1000) + 1):  # at most 1M rows held; cycled for 5M
        document = orjson.loads((data / "pages" / f"{number}.json").read_bytes())
        rows, rejected = builder.build_many(document["data"])
        assert not rejected, rejected[:1]
        prepared.extend(rows)
    sink = TableSink(_table("bench_copy"))
    columns = list(sink.columns)
    # The same timestamptz codec as ingest's pool, so the ceiling is the best COPY there is.
    pool = await asyncpg.create_pool(
        dsn, min_size=connections, max_size=connections, init=install_codecs
    )
    async with pool.acquire() as connection:
        await connection.execute(sink.create_sql())
    batches = asyncio.Queue[list[tuple[Any, ...]] | None]()
    written = 0
    while written < total:
        for start in range(0, len(prepared), batch):
            chunk = prepared[start : start + batch][: total - written]
            if not chunk:
                break
            batches.put_nowait(chunk)
            written += len(chunk)
    for _ in range(connections):
        batches.put_nowait(None)

    async def worker() -> None:
        async with pool.acquire() as connection:
            while (chunk := batches.get_nowait()) is not None:
                async with connection.transaction():
                    await connection.copy_records_to_table(
                        "bench_copy", columns=columns, records=chunk
                    )

    cpu, started = _cpu(), time.perf_counter()
    async with asyncio.TaskGroup() as group:
        for _ in range(connections):
            group.create_task(worker())
    seconds, cpu = time.perf_counter() - started, _cpu() - cpu
    await pool.close()
    return written, seconds, cpu


def _naive_row(record: dict[str, Any]) -> tuple[Any, ...]:
    profile = record.get("profile") or {}
    return (
        int(record["id"]),
        record.get("name"),
        record.get("email"),
        record.get("status"),
        float(record["score"]),
        json.dumps(record.get("tags")),
        dt.datetime.fromisoformat(record["updated_at"]),
        profile.get("plan"),
        profile.get("seats"),
        profile.get("country"),
        profile.get("verified"),
    )


async def naive(base_url: str, dsn: str, pages: int, concurrency: int) -> int:
    sink = TableSink(_table("bench_naive"))
    columns = ", ".join(sink.columns)
    placeholders = ", ".join(f"${index}" for index in range(1, len(sink.columns) + 1))
    insert = f"INSERT INTO bench_naive ({columns}) VALUES ({placeholders})"
    pool = await asyncpg.create_pool(dsn, min_size=concurrency, max_size=concurrency)
    async with pool.acquire() as connection:
        await connection.execute(sink.create_sql())
    slots = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession() as session:

        async def one(number: int) -> int:
            async with slots:
                async with session.get(f"{base_url}/items", params={"page": number}) as resp:
                    document = await resp.json()
                rows = [_naive_row(record) for record in document["data"]]
                async with pool.acquire() as connection:
                    await connection.executemany(insert, rows)
                return len(rows)

        counts = await asyncio.gather(*(one(number) for number in range(1, pages + 1)))
    await pool.close()
    return sum(counts)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.contenders")
    parser.add_argument("kind", choices=["http", "copy", "naive"])
    parser.add_argument("--base-url")
    parser.add_argument("--dsn")
    parser.add_argument("--data", type=Path)
    parser.add_argument("--pages", type=int, required=True)
    parser.add_argument("--records", type=int, required=True)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--batch", type=int, default=5000)
    parser.add_argument("--connections", type=int, default=1)
    args = parser.parse_args()
    cpu, started = _cpu(), time.perf_counter()
    result: dict[str, Any]
    if args.kind == "http":
        count = asyncio.run(http_ceiling(args.base_url, args.pages, args.concurrency))
        result = {"records": count}
    elif args.kind == "naive":
        count = asyncio.run(naive(args.base_url, args.dsn, args.pages, args.concurrency))
        result = {"records": count}
    else:
        count, seconds, copy_cpu = asyncio.run(
            copy_ceiling(
                args.dsn,
                args.data,
                pages=args.pages,
                total=args.records,
                batch=args.batch,
                connections=args.connections,
            )
        )
        result = {"records": count, "timed_seconds": seconds, "timed_cpu": copy_cpu}
    result.setdefault("timed_seconds", time.perf_counter() - started)
    result.setdefault("timed_cpu", _cpu() - cpu)
    print(json.dumps(result))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
