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

import msgspec
import orjson

from ingest.config import PARENT_PREFIX, Column, Table
from ingest.paths import MISSING, compile_path

Converter = Callable[[Any], Any]
#: records -> (rows, [(record, reason)]): the compiled per-table loop.
BuildMany = Callable[[Sequence[Any]], tuple[list[tuple[Any, ...]], list[tuple[Any, str]]]]
INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)
#: PostgreSQL numeric's limits: digits after the decimal point, and before it.
NUMERIC_SCALE = 16383
NUMERIC_WEIGHT = 131072


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
    exponent = number.as_tuple().exponent
    assert isinstance(exponent, int)  # finite
    if -exponent > NUMERIC_SCALE or number.adjusted() >= NUMERIC_WEIGHT:
        raise ValueError(f"{value!r} is out of range for numeric")
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
        try:
            return dt.datetime.fromtimestamp(seconds, tz=dt.UTC)
        except (OverflowError, OSError, ValueError):  # past year 9999, or NaN/infinity
            raise ValueError(f"{value!r} is out of range for an epoch timestamp") from None
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


def json_bytes(value: Any) -> bytes:
    """``value`` as JSON: orjson's, or msgspec's for what orjson will not write (nested past
    its 254 levels; the typed decoders keep such a record's text as the server sent it).
    ValueError if neither can (nested past Python's recursion limit)."""
    try:
        return orjson.dumps(value)
    except TypeError:  # orjson's JSONEncodeError
        try:
            return msgspec.json.encode(value)
        except (RecursionError, TypeError, ValueError, OverflowError) as exc:
            raise ValueError(f"cannot be stored as JSON ({type(exc).__name__})") from None


def _jsonb(value: Any) -> str:
    encoded = json_bytes(value)
    if b"\\u0000" in encoded:
        raise ValueError("contains a NUL character, which PostgreSQL jsonb cannot store")
    return encoded.decode()


def _array(item: Converter) -> Converter:
    """A list whose items all convert by ``item`` (the scalar type's rules); None items stay."""

    def convert(value: Any) -> list[Any]:
        if type(value) is not list:
            raise ValueError(f"{type(value).__name__} is not a list")
        converted: list[Any] = []
        append = converted.append
        for position, element in enumerate(value):
            if element is None:
                append(None)
                continue
            try:
                append(item(element))
            except Exception as exc:  # the item's failure, named by its position
                raise ValueError(f"item {position}: {_reason(exc)}") from None
        return converted

    return convert


#: The scalar types an array column may hold (``text[]`` ... ``timestamptz[]``).
ARRAY_ITEM_TYPES = ("text", "bigint", "integer", "double", "numeric", "boolean", "timestamptz")

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
CONVERTERS.update({f"{kind}[]": _array(CONVERTERS[kind]) for kind in ARRAY_ITEM_TYPES})

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
POSTGRES_TYPES.update({f"{kind}[]": f"{POSTGRES_TYPES[kind]}[]" for kind in ARRAY_ITEM_TYPES})


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
                required_column(name, column, required),
                column.path.startswith(PARENT_PREFIX),
            )
            for name, column in table.columns.items()
        ]
        # The compiled loop reads only the record; tables with $parent. columns use the generic one.
        self._build_many: BuildMany | None = (
            None
            if any(from_parent for *_, from_parent in self._plan)
            else _compile_build_many(table, [step[:4] for step in self._plan], self.build)
        )

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
            except Exception as exc:  # any converter failure is this record's, never the run's
                raise RowError(f"column {name}: {_reason(exc)}") from None
        if self.store_raw:
            append(_jsonb_raw(record))
        return tuple(values)

    def build_many(
        self, records: Sequence[Any], parent: Any = None
    ) -> tuple[list[tuple[Any, ...]], list[tuple[Any, str]]]:
        """Rows for the good records and (record, reason) for the ones to dead-letter.

        Same result as calling :meth:`build` per record, but through a function compiled for
        this table (see :func:`_compile_build_many`), which is the per-record hot path.
        """
        if self._build_many is None or parent is not None:
            return self._build_each(records, parent)
        return self._build_many(records)

    def _build_each(
        self, records: Sequence[Any], parent: Any
    ) -> tuple[list[tuple[Any, ...]], list[tuple[Any, str]]]:
        """The generic loop: for child endpoints, whose ``$parent.`` columns read the parent."""
        rows: list[tuple[Any, ...]] = []
        rejected: list[tuple[Any, str]] = []
        build = self.build
        for record in records:
            try:
                rows.append(build(record, parent))
            except RowError as exc:
                rejected.append((record, str(exc)))
        return rows, rejected


def column_slow_path(name: str, convert: Converter, required: bool) -> Callable[[Any], Any]:
    """Full handling of one value: missing/None, conversion, errors naming the column."""

    def slow(value: Any) -> Any:
        if value is MISSING or value is None:
            if required:
                raise RowError(f"column {name}: required value is missing")
            return None
        try:
            return convert(value)
        except Exception as exc:  # any converter failure is this record's, never the run's
            raise RowError(f"column {name}: {_reason(exc)}") from None

    return slow


def _reason(exc: Exception) -> str:
    """A converter's failure as a dead letter's reason: its message, with the exception's class
    when it is not one of the converters' own ValueErrors."""
    if type(exc) is ValueError:
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def build_checked(
    build: Callable[[Any], tuple[Any, ...]],
    record: Any,
    rows: list[tuple[Any, ...]],
    rejected: list[tuple[Any, str]],
) -> None:
    """``record``'s row into ``rows`` or (record, reason) into ``rejected``, by the generic
    ``build``: for a record the generated loop's inline code failed on (an exception other than
    :class:`RowError`), so the reason names the column as the generic path does."""
    try:
        rows.append(build(record))
    except RowError as exc:
        rejected.append((record, str(exc)))


#: Per type: a condition under which a value is already what asyncpg's binary codec wants
#: (so it passes through untouched). Anything else goes through the column's slow path.
_FAST_CHECKS: dict[str, str] = {
    "text": "type({v}) is str and '\\x00' not in {v}",
    "bigint": f"type({{v}}) is int and {INT64[0]} <= {{v}} <= {INT64[1]}",
    "integer": f"type({{v}}) is int and {INT32[0]} <= {{v}} <= {INT32[1]}",
    "double": "type({v}) is float",
    "boolean": "type({v}) is bool",
}


def _compile_build_many(
    table: Table,
    plan: Sequence[tuple[str, Callable[[Any], Any], Converter, bool]],
    generic: Callable[[Any], tuple[Any, ...]],
) -> BuildMany:
    """Generate one loop for the table: no per-column function call when values are typed.

    Why generated code: with ~10 columns the generic path costs two Python calls per column per
    record (getter and converter), which is most of the pipeline's CPU. The generated loop reads
    plain dict keys inline and keeps a value as-is when its type is already right (``int`` for
    bigint, ``str`` without NUL for text, ...); every other value, and every non-dict record,
    takes exactly the generic path, so results and error messages are the same. Only constants
    built with ``repr`` are interpolated into the source.
    """
    namespace: dict[str, Any] = {
        "RowError": RowError,
        "MISSING": MISSING,
        "generic": generic,
        "checked": build_checked,
        "raw": _jsonb_raw,
        "fromisoformat": dt.datetime.fromisoformat,
        "UTC": dt.UTC,
        "dumps": orjson.dumps,
        "loads": orjson.loads,
    }
    body: list[str] = []
    names: list[str] = []
    for index, (name, get, convert, required) in enumerate(plan):
        value = f"v{index}"
        names.append(value)
        namespace[f"slow{index}"] = column_slow_path(name, convert, required)
        namespace[f"get{index}"] = get
        steps = [step for step in table.columns[name].path.split(".") if step]
        if steps and not any(step.lstrip("-").isdigit() for step in steps):
            body.append(f"{value} = record.get({steps[0]!r})")
            for step in steps[1:]:
                body.append(
                    f"{value} = {value}.get({step!r}) if type({value}) is dict else MISSING"
                )
        else:
            body.append(f"{value} = get{index}(record)")
        kind = table.columns[name].type
        if kind == "timestamptz":
            # fromisoformat is the whole cost; on any doubt the slow path decides (and strips).
            body += [
                f"if type({value}) is str:",
                *("    " + line for line in parse_timestamp_lines(value, f"slow{index}")),
                f"else: {value} = slow{index}({value})",
            ]
            continue
        if kind == "jsonb":
            body += [
                f"if {value} is not None and {value} is not MISSING:",
                f"    {value} = dumps({value})",
                f"    if b'\\\\u0000' in {value}: {value} = slow{index}(loads({value}))",
                f"    else: {value} = {value}.decode()",
                f"else: {value} = slow{index}({value})",
            ]
            continue
        check = _FAST_CHECKS.get(kind)
        if check is None:
            body.append(f"{value} = slow{index}({value})")
            continue
        fast = check.format(v=value)
        if not required:
            fast = f"{value} is None or ({fast})"
        body.append(f"if not ({fast}): {value} = slow{index}({value})")
    if table.store_raw:
        names.append("raw(record)")
    row = "(" + ", ".join(names) + ("," if len(names) == 1 else "") + ")"
    indent = " " * 16
    source = "\n".join(
        [
            "def build_many(records):",
            "    rows = []",
            "    rejected = []",
            "    append = rows.append",
            "    for record in records:",
            "        try:",
            "            if type(record) is not dict:",
            "                append(generic(record))",
            "            else:",
            *(indent + line for line in body),
            f"{indent}append({row})",
            "        except RowError as exc:",
            "            rejected.append((record, str(exc)))",
            "        except Exception:",  # inline code (orjson.dumps, say): the generic path
            "            checked(generic, record, rows, rejected)",
            "    return rows, rejected",
        ]
    )
    exec(compile(source, f"<rows for {table.name}>", "exec"), namespace)
    built: BuildMany = namespace["build_many"]
    return built


def parse_timestamp_lines(value: str, slow: str) -> list[str]:
    """Generated code: ``value = fromisoformat(value)`` (a string), a naive result taken as UTC,
    exactly as :func:`_timestamptz` converts; on a ValueError, ``slow(value)`` decides (it
    strips and retries, or raises the column's RowError). Needs ``fromisoformat`` and ``UTC``
    in the generated code's namespace."""
    return [
        "try:",
        f"    {value} = fromisoformat({value})",
        "except ValueError:",
        f"    {value} = {slow}({value})",
        "else:",
        f"    if {value}.tzinfo is None: {value} = {value}.replace(tzinfo=UTC)",
    ]


def required_column(name: str, column: Column, primary_key: set[str]) -> bool:
    return name in primary_key or not column.nullable


def _jsonb_raw(record: Any) -> str:
    try:
        encoded = json_bytes(record)
    except ValueError as exc:
        raise RowError(f"raw record {exc}") from None
    if b"\\u0000" in encoded:
        raise RowError("raw record contains a NUL character, which PostgreSQL jsonb cannot store")
    return encoded.decode()
