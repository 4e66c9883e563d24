"""The opt-in server load path (``[endpoints.table] load = "server"``): PostgreSQL unpacks pages.

Why: on a small machine the ingest process is CPU-bound in Python, and building row tuples plus
COPY encoding is more than half of it (docs/performance.md). With ``load = "server"`` Python
still fetches and parses each page (pagination and stop conditions need the records), but it
sends the page's raw body: one ``COPY`` row per page into a temporary table, then one
``INSERT ... SELECT`` that expands the records with ``jsonb_array_elements``, reads each column
with ``#>>`` and casts it to the column's type. The conversion then runs in the PostgreSQL
backend, on another core.

Exactness: the caller runs :meth:`ServerLoad.load` inside a savepoint. Any data error
(an invalid cast, a NUL character, a value out of range, a missing required value) rolls the
savepoint back and the caller writes the same batch through the Python path, which dead-letters
exactly the bad records with the usual reasons. Values the two paths would read differently are
made to fail on purpose (a JSON number in a timestamptz or date column: Python reads an epoch),
so they take the Python path too. The remaining differences are listed in the README.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import asyncpg

from ingest.config import Endpoint
from ingest.db import Connection
from ingest.rows import POSTGRES_TYPES
from ingest.sink import RAW_COLUMN, TableSink, quote

if TYPE_CHECKING:
    from ingest.source import FetchedPage


#: Errors that mean "some value does not fit": the batch goes through the Python path instead.
#: Class 22 (data exception: casts, NUL, ranges), 23 (integrity: a NOT NULL column) and 54
#: (a limit, e.g. a page too large for one jsonb value).
#: work_mem for the merge's sort of one batch (10,000 records of ~1 KB sort in well under this).
MERGE_WORK_MEM = "64MB"


class FallBack(Exception):
    """The batch cannot be loaded by the server path exactly; write it the Python way."""


FALLBACK_ERRORS: tuple[type[Exception], ...] = (
    asyncpg.DataError,
    asyncpg.IntegrityConstraintViolationError,
    asyncpg.ProgramLimitExceededError,
    FallBack,
)


class Parameters:
    """The values a statement sends as ``$n`` parameters, never spliced into its text.

    Column paths come from config and may hold any character: a quote, or a backslash that
    ends a literal when the server runs with ``standard_conforming_strings = off``. Sent as
    parameters, no value is ever SQL text, and the statement runs through the extended
    protocol, which refuses a second statement.
    """

    def __init__(self) -> None:
        self.values: list[object] = []

    def add(self, value: object, sql_type: str) -> str:
        """The placeholder for ``value`` (a new one per distinct value), cast to ``sql_type``."""
        for index, known in enumerate(self.values, start=1):
            if type(known) is type(value) and known == value:
                return f"${index}::{sql_type}"
        self.values.append(value)
        return f"${len(self.values)}::{sql_type}"


def path_steps(path: str) -> list[str]:
    """A dotted path's steps for ``#>`` / ``#>>`` (``tags.0`` -> ``["tags", "0"]``)."""
    return [step for step in path.split(".") if step] if path else []


def json_path(path: str, parameters: Parameters) -> str:
    """A dotted path as a ``text[]`` parameter for ``#>`` / ``#>>``."""
    return parameters.add(path_steps(path), "text[]")


def _fails(value: str, kind: str, why: str, parameters: Parameters) -> str:
    """An expression that raises a data error (a cast of text no type accepts) for this row."""
    return f"({parameters.add(f'ingest: {why}: ', 'text')} || coalesce({value}, ''))::{kind}"


def column_expression(path: str, kind: str, parameters: Parameters, element: str = "r.e") -> str:
    """SQL that reads ``path`` from the record ``element`` as the column type ``kind``."""
    steps = json_path(path, parameters)
    node = f"({element} #> {steps})"
    text = f"({element} #>> {steps})"
    pg_type = POSTGRES_TYPES[kind]
    if kind.endswith("[]"):
        # Each item read as the scalar column would read it (so the scalar's exactness and its
        # deliberate failures carry over); a value that is not a list fails, as in Python.
        item = column_expression("", kind.removesuffix("[]"), parameters, "a.x")
        if kind == "text[]":  # an object or list item: Python writes orjson's spelling of it
            nested = "an object or list item in a text[] column"
            item = (
                "CASE WHEN jsonb_typeof(a.x) IN ('object', 'array') "
                f"THEN {_fails('a.x::text', 'text', nested, parameters)} ELSE {item} END"
            )
        why = f"not a list for a {kind} column"
        return (
            f"CASE coalesce(jsonb_typeof({node}), 'null') WHEN 'null' THEN NULL "
            f"WHEN 'array' THEN coalesce("
            f"(SELECT array_agg({item} ORDER BY a.n) "
            f"FROM jsonb_array_elements({node}) WITH ORDINALITY AS a(x, n)), "
            f"'{{}}'::{pg_type}) "
            f"ELSE {_fails(text, pg_type, why, parameters)} END"
        )
    if kind == "jsonb":
        return f"NULLIF({node}, 'null'::jsonb)"
    if kind == "text":
        return text
    if kind in ("timestamptz", "date"):
        # Python reads a JSON number as epoch seconds/ms (timestamptz) or rejects it (date);
        # PostgreSQL would read 20240105 as a date. Let the Python path decide.
        value = text if kind == "timestamptz" else f"left(btrim({text}), 10)"
        why = "a number for a " + kind + " column"
        return (
            f"CASE WHEN jsonb_typeof({node}) = 'number' "
            f"THEN {_fails(text, pg_type, why, parameters)} "
            f"ELSE {value}::{pg_type} END"
        )
    return f"{text}::{pg_type}"


class ServerLoad:
    """The SQL of the server load path for one endpoint, built once from its config."""

    def __init__(self, endpoint: Endpoint, sink: TableSink) -> None:
        table = endpoint.table
        self.table = table
        self.sink = sink
        self.pages_name = f"_ingest_pages_{table.name}"[:63]
        pages = quote(self.pages_name)
        # The body travels as text: measured faster than COPYing it as jsonb (the cast below
        # parses it once per page either way). STORAGE EXTERNAL: a page is read once, right
        # after it is written, so compressing it (pglz, the default) is pure cost: -25 %.
        self._pages_sql = (
            f"CREATE TEMP TABLE {pages} (page integer, body text) ON COMMIT DROP; "
            f"ALTER TABLE {pages} ALTER COLUMN body SET STORAGE EXTERNAL"
        )
        parameters = Parameters()
        found = (
            f"p.body::jsonb #> {json_path(endpoint.records_path, parameters)}"
            if endpoint.records_path
            else "p.body::jsonb"
        )
        # extract_records: a list is the records, an object is one record, null is none.
        # OFFSET 0 keeps the subquery from being inlined, so each body is parsed once.
        records = (
            "CASE jsonb_typeof(d.found) WHEN 'array' THEN d.found "
            "WHEN 'object' THEN jsonb_build_array(d.found) ELSE '[]'::jsonb END"
        )
        expressions = [
            f"{column_expression(column.path, column.type, parameters)} AS {quote(name)}"
            for name, column in table.columns.items()
        ]
        if table.store_raw:
            expressions.append(f"r.e AS {quote(RAW_COLUMN)}")
        column_list = ", ".join(quote(column) for column in sink.columns)
        source = (
            f"FROM {pages} AS p "
            f"CROSS JOIN LATERAL (SELECT {found} AS found OFFSET 0) AS d "
            f"CROSS JOIN LATERAL jsonb_array_elements({records}) WITH ORDINALITY AS r(e, n)"
        )
        select = "SELECT " + ", ".join(expressions)
        if table.mode == "append":
            self._load_sql = f"INSERT INTO {sink.qualified} ({column_list}) {select} {source}"
            self._staging_sql: str | None = None
        else:
            # The staging table the merge reads (TableSink's name), with NOT NULL where the
            # target has it, so every data error happens here, before the batch's turn.
            definitions = []
            for name, column in table.columns.items():
                required = name in table.primary_key or not column.nullable
                not_null = " NOT NULL" if required else ""
                definitions.append(f"{quote(name)} {POSTGRES_TYPES[column.type]}{not_null}")
            if table.store_raw:
                definitions.append(f"{quote(RAW_COLUMN)} jsonb")
            self._staging_sql = (
                f"CREATE TEMP TABLE {sink.staging} ({', '.join(definitions)}) ON COMMIT DROP"
            )
            keys = ", ".join(quote(key) for key in table.primary_key)
            ordered = ", ".join(f"{quote(key)}" for key in table.primary_key)
            # The last occurrence of a key wins: latest page, latest element within it.
            self._load_sql = (
                f"INSERT INTO {sink.staging} ({column_list}) "
                f"SELECT DISTINCT ON ({keys}) {column_list} FROM ("
                f"{select}, p.page AS _ingest_page, r.n AS _ingest_element {source}) AS converted "
                f"ORDER BY {ordered}, _ingest_page DESC, _ingest_element DESC"
            )

        self._load_parameters = tuple(parameters.values)

    async def load(self, connection: Connection, pages: Sequence[FetchedPage]) -> int:
        """Convert and write the batch's pages; the number of records read from them.

        Append mode inserts into the target; merge mode fills the staging table that
        :meth:`TableSink.merge` then upserts from. Raises :class:`FallBack` when the server
        path cannot load this batch exactly; data errors from PostgreSQL propagate (the caller
        holds the savepoint).
        """
        expected = sum(len(page.records) for page in pages)
        with_records = [(index, page) for index, page in enumerate(pages) if page.records]
        if any(page.body is None for _, page in with_records):
            raise FallBack("a page without its body")
        await connection.execute("SET LOCAL timezone = 'UTC'")
        if self._staging_sql is not None:
            # The DISTINCT ON sorts the batch: keep it in memory (4MB default spills to disk).
            await connection.execute(f"SET LOCAL work_mem = '{MERGE_WORK_MEM}'")
            await connection.execute(self._staging_sql)
        if not expected:
            return 0
        await connection.execute(self._pages_sql)
        # A generator: one decoded body at a time, not the batch's twice over.
        await connection.copy_records_to_table(
            self.pages_name,
            columns=["page", "body"],
            records=((index, page.body.decode()) for index, page in with_records if page.body),
        )
        status = await connection.execute(self._load_sql, *self._load_parameters)
        written = int(status.rsplit(" ", 1)[-1])
        if self.table.mode == "append" and written != expected:
            raise FallBack(f"PostgreSQL read {written} records where Python read {expected}")
        return expected
