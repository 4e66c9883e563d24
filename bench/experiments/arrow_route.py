"""Is a native Arrow route cheaper than ingest's own, from page bytes to rows in PostgreSQL?

Route **ingest**: ingest's typed decoder (msgspec) builds row tuples from each page, and asyncpg
encodes them for a binary COPY (with ingest's timestamptz codec), as ``ingest run`` does.
Route **arrow**: polars reads each page's record array into columns (the envelope is skipped
with ``msgspec.Raw``), converts them to the table's types (timestamps parsed, ``profile.*``
unnested, ``tags`` encoded as JSON text), and pgpq encodes the Arrow batch into binary COPY
bytes that asyncpg sends as they are.

Both COPY the same pages into the same table shape, one transaction per 10 pages; the client's
CPU (``time.process_time``: every thread of this process, so polars' worker threads count) is
reported per 1M records, with the cyclic GC relaxed as during ``ingest run``. Needs packages
ingest does not depend on::

    pip install polars pyarrow pgpq
    python -m bench.experiments.arrow_route --dsn postgresql://postgres@127.0.0.1:5432/postgres

The dataset must exist (``python -m bench`` writes it on its first run).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import pgpq  # type: ignore[import-not-found]
import pgpq.encoders  # type: ignore[import-not-found]
import pgpq.schema  # type: ignore[import-not-found]
import polars as pl  # type: ignore[import-not-found]

from bench.dataset import DATA_ROOT, PAGE_SIZE
from bench.target import COLUMNS, ingest_config
from ingest.config import parse_config
from ingest.pgcodecs import install_codecs
from ingest.tuning import relaxed_gc
from ingest.typed import TypedPages

TABLE = "bench_arrow_route"
SQL_TYPES = {
    "bigint": "bigint",
    "text": "text",
    "double": "double precision",
    "jsonb": "jsonb",
    "timestamptz": "timestamptz",
    "integer": "integer",
    "boolean": "boolean",
}
SCHEMA = {
    "id": pl.Int64,
    "name": pl.String,
    "email": pl.String,
    "status": pl.String,
    "score": pl.Float64,
    "tags": pl.List(pl.String),
    "updated_at": pl.String,
    "profile": pl.Struct(
        {"plan": pl.String, "seats": pl.Int64, "country": pl.String, "verified": pl.Boolean}
    ),
}


class Envelope(msgspec.Struct):
    data: msgspec.Raw


def arrow_batch(body: bytes, envelope: msgspec.json.Decoder[Envelope]) -> Any:
    """One page as an Arrow table with the target table's columns, in its column order."""
    frame = pl.read_json(bytes(envelope.decode(body).data), schema=SCHEMA)
    profile = pl.col("profile").struct
    return frame.select(
        "id",
        "name",
        "email",
        "status",
        "score",
        pl.struct("tags").struct.json_encode().alias("tags"),
        pl.col("updated_at").str.to_datetime(
            "%Y-%m-%dT%H:%M:%S%.fZ", time_unit="us", time_zone="UTC", strict=True
        ),
        profile.field("plan"),
        profile.field("seats").cast(pl.Int32, strict=True),
        profile.field("country"),
        profile.field("verified"),
    ).to_arrow()


def encoder_for(schema: Any) -> Any:
    """pgpq's encoder for ``schema``, with ``tags`` (JSON text) sent as jsonb."""
    encoders = {
        field.name: pgpq.ArrowToPostgresBinaryEncoder.infer_encoder(field)
        for field in schema
        if field.name != "tags"
    }
    encoders["tags"] = pgpq.encoders.LargeStringEncoderBuilder.new_with_output(
        schema.field("tags"), pgpq.schema.Jsonb()
    )
    return pgpq.ArrowToPostgresBinaryEncoder.new_with_encoders(schema, encoders)


async def timed(label: str, records: int, work: Callable[[], Awaitable[None]]) -> None:
    cpu, wall = time.process_time(), time.perf_counter()
    await work()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    scale = 1_000_000 / records
    print(f"{label:<8} client CPU {cpu * scale:5.2f} s per 1M records, wall {wall * scale:5.2f} s")


async def main(dsn: str, pages: Sequence[bytes]) -> None:
    config = ingest_config("http://127.0.0.1:1", table=TABLE, mode="append")
    loaded = parse_config(config, Path("arrow_route.toml"))
    typed = TypedPages(loaded.source.endpoints[0])
    envelope = msgspec.json.Decoder(Envelope)
    columns = list(COLUMNS)
    records = len(pages) * PAGE_SIZE
    connection = await asyncpg.connect(dsn)
    await install_codecs(connection)
    definition = ", ".join(f"{name} {SQL_TYPES[kind]}" for name, (_, kind) in COLUMNS.items())
    await connection.execute(f"DROP TABLE IF EXISTS {TABLE}; CREATE TABLE {TABLE} ({definition})")

    async def ingest_route() -> None:
        for start in range(0, len(pages), 10):
            rows = [row for body in pages[start : start + 10] for row in typed(body)["data"]]
            async with connection.transaction():
                await connection.copy_records_to_table(TABLE, columns=columns, records=rows)

    async def arrow_route() -> None:
        for start in range(0, len(pages), 10):
            tables = [arrow_batch(body, envelope) for body in pages[start : start + 10]]
            encoder = encoder_for(tables[0].schema)
            chunks = [encoder.write_header()]
            chunks += [encoder.write_batch(b) for table in tables for b in table.to_batches()]
            chunks.append(encoder.finish())
            async with connection.transaction():
                await connection.copy_to_table(
                    TABLE, source=io.BytesIO(b"".join(chunks)), columns=columns, format="binary"
                )

    try:
        for _ in range(2):  # the second round is the warm one
            for label, route in (("ingest", ingest_route), ("arrow", arrow_route)):
                await connection.execute(f"TRUNCATE {TABLE}")
                await timed(label, records, route)
        same = await connection.fetchval(f"SELECT count(*) FROM {TABLE}")
        print(f"rows in the table after the last route: {same:,}")
    finally:
        await connection.execute(f"DROP TABLE IF EXISTS {TABLE}")
        await connection.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--pages", type=int, default=200)
    args = parser.parse_args()
    root = DATA_ROOT / f"1000000x{PAGE_SIZE}" / "pages"
    bodies = [(root / f"{number}.json").read_bytes() for number in range(1, args.pages + 1)]
    with relaxed_gc():  # as during `ingest run`
        asyncio.run(main(args.dsn, bodies))
