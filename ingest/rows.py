"""Record -> row tuple, with per-column converters compiled once per table.

This is the per-record hot path: one getter and one converter call per column, one tuple build,
nothing else. A record that cannot be converted raises :class:`RowError` with a reason naming
the column; the pipeline sends it to the dead-letter table instead of failing the run.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from decimal import Decimal, InvalidOperation
from typing import Any

import orjson

from ingest.config import PARENT_PREFIX, Column, Table
from ingest.paths import MISSING, compile_path

Converter = Callable[[Any], Any]
INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)


class RowError(ValueError):
    """A record that does not fit the table; the message says which column and why."""


def _text(value: Any) -> str:
    if isinstance(value, str):
        text = value
    elif isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, int | float):
        text = repr(value) if isinstance(value, float) else str(value)
    else:
        text = orjson.dumps(value).decode()
    if "\x00" in text:
        raise ValueError("contains a NUL character, which PostgreSQL text cannot store")
    return text


def _integer(bounds: tuple[int, int]) -> Converter:
    low, high = bounds

    def convert(value: Any) -> int:
        if isinstance(value, bool):
            raise ValueError(f"{value!r} is a boolean, not an integer")
        if isinstance(value, int):
            number = value
        elif isinstance(value, float):
            if not value.is_integer():
                raise ValueError(f"{value!r} is not a whole number")
            number = int(value)
        elif isinstance(value, str):
            text = value.strip()
            try:
                number = int(text)
            except ValueError:
                try:
                    as_float = float(text)
                except ValueError:
                    raise ValueError(f"{value!r} is not an integer") from None
                if not as_float.is_integer():
                    raise ValueError(f"{value!r} is not a whole number") from None
                number = int(as_float)
        else:
            raise ValueError(f"{type(value).__name__} is not an integer")
        if not low <= number <= high:
            raise ValueError(f"{number} is out of range")
        return number

    return convert


def _double(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"{value!r} is not a number")
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"{value!r} is not a number") from None


def _numeric(value: Any) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"{value!r} is not a number")
    try:
        number = Decimal(str(value).strip())
    except InvalidOperation:
        raise ValueError(f"{value!r} is not a number") from None
    if not number.is_finite():
        raise ValueError(f"{value!r} is not a finite number")
    return number


_TRUE = frozenset({"true", "t", "yes", "y", "1"})
_FALSE = frozenset({"false", "f", "no", "n", "0"})


def _boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
    raise ValueError(f"{value!r} is not a boolean")


def _timestamptz(value: Any) -> dt.datetime:
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a timestamp")
    if isinstance(value, int | float):
        seconds = value / 1000 if abs(value) > 100_000_000_000 else value  # epoch ms or s
        return dt.datetime.fromtimestamp(seconds, tz=dt.UTC)
    if isinstance(value, str):
        try:
            moment = dt.datetime.fromisoformat(value.strip())
        except ValueError:
            raise ValueError(f"{value!r} is not an ISO 8601 timestamp") from None
        return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)
    raise ValueError(f"{value!r} is not a timestamp")


def _date(value: Any) -> dt.date:
    if isinstance(value, str):
        try:
            return dt.date.fromisoformat(value.strip()[:10])
        except ValueError:
            raise ValueError(f"{value!r} is not an ISO 8601 date") from None
    raise ValueError(f"{value!r} is not a date")


def _jsonb(value: Any) -> str:
    encoded = orjson.dumps(value)
    if b"\\u0000" in encoded:
        raise ValueError("contains a NUL character, which PostgreSQL jsonb cannot store")
    return encoded.decode()


CONVERTERS: dict[str, Converter] = {
    "text": _text,
    "bigint": _integer(INT64),
    "integer": _integer(INT32),
    "double": _double,
    "numeric": _numeric,
    "boolean": _boolean,
    "timestamptz": _timestamptz,
    "date": _date,
    "jsonb": _jsonb,
}

POSTGRES_TYPES: dict[str, str] = {
    "text": "text",
    "bigint": "bigint",
    "integer": "integer",
    "double": "double precision",
    "numeric": "numeric",
    "boolean": "boolean",
    "timestamptz": "timestamptz",
    "date": "date",
    "jsonb": "jsonb",
}


class RowBuilder:
    """Builds the tuple for one record: the declared columns, then the raw JSON if stored."""

    def __init__(self, table: Table) -> None:
        self.columns: tuple[str, ...] = tuple(table.columns)
        self.store_raw = table.store_raw
        required = set(table.primary_key)
        self._plan: list[tuple[str, Callable[[Any], Any], Converter, bool, bool]] = [
            (
                name,
                compile_path(column.path.removeprefix(PARENT_PREFIX)),
                CONVERTERS[column.type],
                _required(name, column, required),
                column.path.startswith(PARENT_PREFIX),
            )
            for name, column in table.columns.items()
        ]

    def build(self, record: Any, parent: Any = None) -> tuple[Any, ...]:
        """The row for ``record``, or :class:`RowError` naming the column that failed.

        ``parent`` is the parent row of a child endpoint's record (for ``$parent.`` columns).
        """
        values: list[Any] = []
        append = values.append
        for name, get, convert, required, from_parent in self._plan:
            value = get(parent if from_parent else record)
            if value is MISSING or value is None:
                if required:
                    raise RowError(f"column {name}: required value is missing")
                append(None)
                continue
            try:
                append(convert(value))
            except ValueError as exc:
                raise RowError(f"column {name}: {exc}") from None
        if self.store_raw:
            append(_jsonb_raw(record))
        return tuple(values)

    def build_many(
        self, records: Sequence[Any], parent: Any = None
    ) -> tuple[list[tuple[Any, ...]], list[tuple[Any, str]]]:
        """Rows for the good records and (record, reason) for the ones to dead-letter."""
        rows: list[tuple[Any, ...]] = []
        rejected: list[tuple[Any, str]] = []
        build = self.build
        for record in records:
            try:
                rows.append(build(record, parent))
            except RowError as exc:
                rejected.append((record, str(exc)))
        return rows, rejected


def _required(name: str, column: Column, primary_key: set[str]) -> bool:
    return name in primary_key or not column.nullable


def _jsonb_raw(record: Any) -> str:
    encoded = orjson.dumps(record)
    if b"\\u0000" in encoded:
        raise RowError("raw record contains a NUL character, which PostgreSQL jsonb cannot store")
    return encoded.decode()
