"""Column types from sample records: the rules ``ingest init`` writes a config with.

Why one module: the rules (flattening, names, one type per column) are what a user reads in
docs/configuration.md; keeping them in one place, free of HTTP and SQL, lets them be tested on
plain values and reused wherever records are sampled.

Rules, in order, for the non-null values seen at one path:

- all objects, above the flattening depth: one column per key (``profile.plan`` ->
  ``profile__plan``);
- lists of one scalar kind: that type's array (``text[]``, ``bigint[]``...); other lists and
  objects below the depth: ``jsonb``;
- all booleans: ``boolean``; all integers: ``bigint`` (``numeric`` past 64 bits);
  integers and floats: ``double``;
- all ISO 8601 timestamps: ``timestamptz``; all ISO 8601 dates: ``date`` (mixed: ``timestamptz``);
- other strings: ``text``; a mix of kinds: ``text`` (scalars) or ``jsonb`` (with objects/lists),
  with a note; only nulls: ``text``, with a note.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from ingest.config import IDENTIFIER

#: How many levels of nested objects become their own columns by default.
DEFAULT_DEPTH = 2
INT64 = (-(2**63), 2**63 - 1)
_TIMESTAMP = re.compile(
    r"^\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(:\d{2}(\.\d{1,9})?)?(Z|[+-]\d{2}(:?\d{2})?)?$"
)
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")


@dataclass(frozen=True, slots=True)
class InferredColumn:
    """One column: its name, the dotted path it reads, its type and what a person should check."""

    name: str
    path: str
    type: str
    note: str = ""
    #: Non-null values seen (a sample, for primary-key and cursor guesses).
    values: tuple[Any, ...] = ()
    #: Records of the sample that had no value (missing or null) here.
    nulls: int = 0


def _is_timestamp(value: str) -> bool:
    if not _TIMESTAMP.match(value):
        return False
    try:
        dt.datetime.fromisoformat(value)
    except ValueError:
        return False
    return True


def _is_date(value: str) -> bool:
    if not _DATE.match(value):
        return False
    try:
        dt.date.fromisoformat(value)
    except ValueError:
        return False
    return True


def value_kind(value: Any) -> str:
    """The kind of one JSON value (boolean, integer, float, timestamp, date, string, ...)."""
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer" if INT64[0] <= value <= INT64[1] else "bignum"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        if _is_timestamp(value):
            return "timestamp"
        if _is_date(value):
            return "date"
        return "string"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "object"
    return "string"


def column_type(values: Sequence[Any]) -> tuple[str, str]:
    """One type for all the non-null ``values`` of a column, and a note when it is a guess."""
    kinds = {value_kind(value) for value in values}
    if not kinds:
        return "text", "only nulls in the sample: text is a guess, check the API's documentation"
    if kinds <= {"list"}:
        return _list_type(values)
    if kinds <= {"object"}:
        return "jsonb", ""
    if kinds == {"boolean"}:
        return "boolean", ""
    if kinds == {"integer"}:
        return "bigint", ""
    if kinds <= {"integer", "bignum"}:
        return "numeric", "integers past 64 bits in the sample"
    if kinds <= {"integer", "bignum", "float"}:
        return "double", ""
    if kinds == {"timestamp"}:
        return "timestamptz", ""
    if kinds == {"date"}:
        return "date", ""
    if kinds == {"timestamp", "date"}:
        return "timestamptz", "dates and timestamps mixed in the sample"
    if kinds == {"string"}:
        return "text", ""
    seen = ", ".join(sorted(kinds))
    if kinds & {"list", "object"}:
        return "jsonb", f"mixed values in the sample ({seen}): jsonb keeps them all"
    return "text", f"mixed values in the sample ({seen}): text keeps them all"


#: Scalar types that have an array column type (``rows.ARRAY_ITEM_TYPES``); a list of other
#: items (dates, objects, lists, mixed kinds) stays whole in ``jsonb``.
_ARRAY_ITEMS = ("text", "bigint", "double", "numeric", "boolean", "timestamptz")


def _list_type(lists: Sequence[Any]) -> tuple[str, str]:
    """A column of lists: an array of the items' one scalar type, else ``jsonb``.

    Items are typed by the scalar rules; NULL items are allowed. Lists that are all empty tell
    nothing of their items, so they are kept as ``jsonb`` with a note."""
    items = [item for value in lists for item in value if item is not None]
    if not items:
        return "jsonb", "only empty lists in the sample: jsonb is a guess, an array may fit"
    kind, note = column_type(items)
    if kind in _ARRAY_ITEMS and not note.startswith("mixed"):
        return f"{kind}[]", note
    return "jsonb", ""


def snake_case(key: str) -> str:
    """``createdAt`` -> ``created_at``; anything not a letter, digit or _ becomes _."""
    name = _CAMEL.sub("_", key).lower()
    name = re.sub(r"[^a-z0-9_]+", "_", name).strip("_")
    return name


def unique_name(name: str, taken: set[str]) -> str:
    """``name`` made a valid column name not in ``taken`` (suffix ``_2``, ...); adds it."""
    name = name or "field"
    if name[0].isdigit():
        name = f"f_{name}"
    if name.startswith("_ingest"):
        name = f"f{name}"
    name = name[:63]
    candidate, number = name, 2
    while candidate in taken:
        suffix = f"_{number}"
        candidate, number = name[: 63 - len(suffix)] + suffix, number + 1
    taken.add(candidate)
    assert IDENTIFIER.match(candidate)
    return candidate


def infer_columns(records: Iterable[Any], depth: int = DEFAULT_DEPTH) -> list[InferredColumn]:
    """Columns for ``records`` (objects; anything else is ignored), in first-seen key order.

    Keys that a dotted path cannot address (with a ``.`` in them, or empty) are left out: the raw
    record keeps them.
    """
    objects = [record for record in records if isinstance(record, dict)]
    leaves: list[tuple[tuple[str, ...], list[Any]]] = []
    _collect(objects, (), depth, leaves)
    taken: set[str] = set()
    columns: list[InferredColumn] = []
    for steps, values in leaves:
        present = [value for value in values if value is not None]
        kind, note = column_type(present)
        name = unique_name("__".join(snake_case(step) for step in steps), taken)
        columns.append(
            InferredColumn(
                name=name,
                path=".".join(steps),
                type=kind,
                note=note,
                values=tuple(present),
                nulls=len(values) - len(present),
            )
        )
    return columns


def _collect(
    values: list[Any],
    prefix: tuple[str, ...],
    depth: int,
    leaves: list[tuple[tuple[str, ...], list[Any]]],
) -> None:
    """Descend into keys while every non-null value at this path is an object."""
    present = [value for value in values if value is not None]
    nested = bool(present) and all(isinstance(value, dict) for value in present)
    if prefix and (not nested or len(prefix) > depth):
        leaves.append((prefix, values))
        return
    keys: dict[str, None] = {}
    for value in present:
        for key in value:
            if key and "." not in key and key.strip():
                keys.setdefault(key, None)
    for key in keys:
        children = [value.get(key) if isinstance(value, dict) else None for value in values]
        _collect(children, (*prefix, key), depth, leaves)
