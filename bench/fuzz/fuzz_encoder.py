"""Coverage-guided differential fuzz of the C record encoder (atheris/libFuzzer).

Each input picks a table (up to four columns: type, a path of one or two keys, nullable, raw
record stored or not) and a record's bytes. Checked, for every input:

- ``_copyenc.validate`` (the page check the typed decoders make first) refuses exactly what
  ``orjson.loads`` refuses;
- where the C record encoder takes the record, its row equals the Python path's (orjson +
  ``RowBuilder``) bit for bit, and the Python path did not dead-letter it;
- where the typed decoder (msgspec) builds the row itself, the same;
- the C row encoder (``_copyenc.encode``) runs on the Python path's row without a crash;
- nothing raises but what the callers handle.

Under AddressSanitizer/UBSan (docs/development.md, "Fuzzing the C encoder") a memory error
stops the run with a report; a disagreement raises AssertionError and libFuzzer saves the
input as ``crash-*``. Not collected by pytest: tests/test_encoder_differential.py is the
bounded version that runs with the suite.

    python bench/fuzz/fuzz_encoder.py -max_total_time=600 bench/fuzz/corpus

``INGEST_COPYENC=/path/to/_copyenc.so`` loads that build of the extension (the sanitized one)
instead of the installed one.
"""

from __future__ import annotations

import datetime as dt
import functools
import importlib.util
import logging
import os
import struct
import sys
from typing import Any

import atheris
import structlog

with atheris.instrument_imports():
    import orjson

if os.environ.get("INGEST_COPYENC"):  # the sanitized build, before ingest imports its own
    _spec = importlib.util.spec_from_file_location("ingest._copyenc", os.environ["INGEST_COPYENC"])
    assert _spec is not None and _spec.loader is not None
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["ingest._copyenc"] = _module
    _spec.loader.exec_module(_module)

with atheris.instrument_imports(include=["ingest"]):
    from ingest import _copyenc
    from ingest.config import Endpoint
    from ingest.copyenc import RecordEncoder, binary_encoder, decode_rows
    from ingest.rows import RowBuilder
    from ingest.typed import BuiltRows, TypedPages

TYPES = ["text", "bigint", "integer", "double", "boolean", "timestamptz", "date", "jsonb"]
KEYS = ["id", "a", "b", "ключ", "наименование_товара_на_складе_в_магазине_номер_один" * 3, "x y"]


@functools.lru_cache(maxsize=4096)
def _table(spec: tuple[tuple[int, tuple[int, ...], bool], ...], store_raw: bool) -> Any:
    """(endpoint, record encoder or None, typed decoder, row builder, C row encoder, kinds)."""
    columns: dict[str, Any] = {}
    paths: list[tuple[str, ...]] = []
    for index, (kind, keys, nullable) in enumerate(spec):
        path = tuple(KEYS[key] for key in keys)
        if any(path[: len(other)] == other or other[: len(path)] == path for other in paths):
            continue
        paths.append(path)
        columns[f"c{index}"] = {"path": ".".join(path), "type": TYPES[kind], "nullable": nullable}
    endpoint = Endpoint.model_validate(
        {
            "name": "items",
            "path": "/items",
            "records_path": "data",
            "table": {
                "name": "items",
                "mode": "append",
                "store_raw": store_raw,
                "columns": columns,
            },
        }
    )
    kinds = [column.type for column in endpoint.table.columns.values()]
    kinds += ["jsonb"] if store_raw else []
    return (
        RecordEncoder.for_endpoint(endpoint),
        TypedPages(endpoint),
        RowBuilder(endpoint.table),
        binary_encoder(kinds),
        kinds,
    )


def _same(a: Any, b: Any, kind: str) -> bool:
    if a is None or b is None:
        return a is b
    if kind == "double":
        return struct.pack("!d", a) == struct.pack("!d", b)
    if kind == "jsonb":
        return bool(orjson.loads(a) == orjson.loads(b))
    if kind == "timestamptz":  # PostgreSQL's infinity decodes as asyncpg's naive sentinels
        return bool(_aware(a) == _aware(b))
    return bool(type(a) is type(b) and a == b)


def _aware(moment: dt.datetime) -> dt.datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=dt.UTC)


def _check_row(got: tuple[Any, ...], want: tuple[Any, ...], kinds: list[str], body: bytes) -> None:
    for value, expected, kind in zip(got, want, kinds, strict=True):
        if not _same(value, expected, kind):
            raise AssertionError(f"{kind}: {value!r} != {expected!r} for {body!r}")


def test_one_input(data: bytes) -> None:
    provider = atheris.FuzzedDataProvider(data)
    count = provider.ConsumeIntInRange(1, 4)
    spec = tuple(
        (
            provider.ConsumeIntInRange(0, len(TYPES) - 1),
            tuple(
                provider.ConsumeIntInRange(0, len(KEYS) - 1)
                for _ in range(provider.ConsumeIntInRange(1, 2))
            ),
            provider.ConsumeBool(),
        )
        for _ in range(count)
    )
    store_raw = provider.ConsumeBool()
    body = provider.ConsumeBytes(provider.remaining_bytes())
    page = b'{"data": [' + body + b"]}"
    encoder, typed, builder, row_encoder, kinds = _table(spec, store_raw)

    problem = _copyenc.validate(page)
    try:
        records = orjson.loads(page)["data"]
    except orjson.JSONDecodeError:
        if problem is None:
            raise AssertionError(f"validate() took what orjson refuses: {page!r}") from None
        return
    if problem is not None:
        raise AssertionError(f"validate() refused what orjson takes ({problem}): {page!r}")
    if len(records) != 1:  # "1, 2": two records; the check is per record
        return
    record = records[0]
    rows, rejected = builder.build_many([record])
    if rows and row_encoder is not None:
        row_encoder(rows)  # memory safety of the row encoder on whatever Python built

    if encoder is not None:
        encoder._rest = 0  # never resting: every input is tried
        encoded = encoder.encode([body])
        if encoded is not None:
            if rejected:
                raise AssertionError(f"C took a dead letter ({rejected[0][1]}): {body!r}")
            _check_row(decode_rows(encoded, kinds)[0], rows[0], kinds, body)

    typed._rest = 0
    built = typed(page)["data"]
    if isinstance(built, BuiltRows):
        if rejected:
            raise AssertionError(f"typed took a dead letter ({rejected[0][1]}): {body!r}")
        _check_row(built[0], rows[0], kinds, body)


def main() -> None:
    # The decoders log their first fallback per table: a line per input here, so quiet.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
