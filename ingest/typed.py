"""Typed page decoding: a page's bytes straight to row tuples, the fast path of ``load = "python"``.

Why: parsing a page with ``orjson.loads`` builds a dict per record, and the row loop then reads
every dict back and checks every value's type in Python; together that was ~45 % of ingest's CPU.
Here msgspec decodes the records into structs generated from the table's columns (types checked
in C, unknown keys skipped without building anything) and one generated loop turns the structs
into row tuples.

Exactly the Python path's rows, or nothing: the structs only accept values whose conversion is
unambiguous (a JSON string for text, an integer in range for bigint, a boolean for boolean, ...);
timestamps are taken as strings and parsed by the same ``fromisoformat``; numbers and flags sent
as strings switch the endpoint to a lenient variant that hands each string to the Python path's
converter. A page with anything else (``1.0`` for an integer, a missing required value, a record
that is not an object, an escaped NUL) is parsed with ``orjson`` as before and converted by
:class:`ingest.rows.RowBuilder`, dead letters included. So this module changes how fast a page
is converted, never what is written. numeric and jsonb values, the cursor field of an
incremental endpoint and the value before a list index (``tags`` of ``tags.0``) are decoded as
plain JSON and go through the same converters and path getters as the Python path; a child
endpoint's ``$parent.`` values are converted once per page.

The one visible difference: with ``store_raw`` the raw column holds the record's JSON text as the
server sent it instead of orjson's re-encoding; as jsonb the two are equal (jsonb normalises
whitespace and key order), only number spellings such as ``1e2`` vs ``100.0`` may differ.

The paginator still gets a document: the envelope's other keys that a pagination ``*_path``
names, decoded as plain JSON, with the records replaced by :class:`BuiltRows`.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Annotated, Any, Protocol

import msgspec
import orjson
import structlog

from ingest.config import PARENT_PREFIX, Endpoint
from ingest.copyenc import json_problem
from ingest.paths import compile_path
from ingest.rows import (
    CONVERTERS,
    INT32,
    INT64,
    RowError,
    column_slow_path,
    parse_timestamp_lines,
    required_column,
)

log = structlog.get_logger("ingest.typed")

#: Column types msgspec decodes to exactly what the Python converter would return, for every
#: value it accepts (everything else fails the page over to the Python path).
_NATIVE: dict[str, Any] = {
    "text": str,
    "bigint": Annotated[int, msgspec.Meta(ge=INT64[0], le=INT64[1])],
    "integer": Annotated[int, msgspec.Meta(ge=INT32[0], le=INT32[1])],
    "double": float,
    "boolean": bool,
    # As a string, parsed by the same ``fromisoformat`` as the Python path: msgspec's own parser
    # rounds (not truncates) past microseconds and accepts a lowercase "t"/"z", which Python's
    # does not.
    "timestamptz": str,
    "date": dt.date,
}

#: Arrays whose items msgspec decodes exactly as :func:`ingest.rows._array` converts them (NULL
#: items kept). Only in the strict variant: once a page sent a string where a number or flag
#: belongs, the lenient variant leaves these arrays to the Python converter, item by item.
_NATIVE_ARRAYS: dict[str, Any] = {
    "text[]": list[str | None],
    "bigint[]": list[Annotated[int, msgspec.Meta(ge=INT64[0], le=INT64[1])] | None],
    "integer[]": list[Annotated[int, msgspec.Meta(ge=INT32[0], le=INT32[1])] | None],
    "double[]": list[float | None],
    "boolean[]": list[bool | None],
}

#: Types whose values APIs often send as JSON strings ("42", "true"). The strict variant refuses a
#: string there; once a page shows one, the endpoint switches to a lenient variant that accepts
#: ``T | str`` and converts each string with the Python path's converter (exact same rules).
_STRINGS_TOO = frozenset({"bigint", "integer", "double", "boolean"})
#: After this many pages in a row that the typed decoder refused, it rests ...
FALLBACKS_BEFORE_REST = 8
#: ... for this many pages (straight to orjson), then tries again: an endpoint whose every page
#: falls back pays for the failed attempts on at most ~1 page in 9, not on every page.
REST_PAGES = 64

#: A pagination field the page did not have (as opposed to one that was JSON null).
_ABSENT: Any = type("Absent", (), {"__repr__": lambda self: "<absent>"})()
#: An escaped NUL anywhere in the page: PostgreSQL text cannot store it, the Python path decides.
_NUL = b"\\u0000"


class BuiltRows(list[tuple[Any, ...]]):
    """A page's records, already converted to row tuples (in order, one per record).

    ``cursor_values`` holds each record's incremental cursor field as plain JSON (or is None
    when the endpoint has no cursor).
    """

    cursor_values: list[Any] | None = None


class RawRecords(list[msgspec.Raw]):
    """A page's records as the server's JSON text, one item per record, not yet converted.

    What the run's process keeps of a page a writer process converts (:mod:`ingest.offload`):
    the walk needs only how many records there are and the first and last for its repeat guard.
    """


class PageParser(Protocol):
    """Turns a page body into its document (an HTTP client's ``parse``), per endpoint."""

    def __call__(self, body: bytes, parent: Any = None) -> Any: ...

    def for_parent(self, parent: Any) -> Callable[[bytes], Any]: ...


class Refused(Exception):
    """The typed decoder will not convert this page; the Python path takes it."""


@dataclass(frozen=True, slots=True)
class _Variant:
    """One generated decoder + row loop; ``lenient`` ones accept numbers and flags as strings."""

    decoder: msgspec.json.Decoder[Any]
    #: (records, converted $parent values) -> (rows, cursor values or None)
    build: Callable[[Iterable[Any], tuple[Any, ...]], Any]
    lenient: bool


@dataclass
class _Node:
    """One JSON object level: its keys, each a leaf or a nested object."""

    children: dict[str, _Node | _Leaf] = field(default_factory=dict)
    #: Some column under this object must be present, so the object itself is required.
    required: bool = False


@dataclass
class _Leaf:
    """A key whose value the loop reads: as is, or (when anything reads into it) as plain JSON."""

    columns: list[int] = field(default_factory=list)
    #: Columns whose path goes on past this key through a list index (``tags.0``): (column,
    #: getter for the rest of the path), applied to the plain JSON value in the loop.
    extractors: list[tuple[int, Callable[[Any], Any]]] = field(default_factory=list)
    cursor: bool = False
    cursor_rest: Callable[[Any], Any] | None = None

    @property
    def plain_json(self) -> bool:
        return self.cursor or bool(self.extractors) or len(self.columns) != 1


def _plain_steps(path: str) -> list[str] | None:
    """The keys of a dotted path, or None when a step is an index (not representable here)."""
    steps = [step for step in path.split(".") if step]
    if any(_is_index(step) for step in steps):
        return None
    return steps


def _is_index(step: str) -> bool:
    return step.lstrip("-").isdigit()


def _split_path(path: str) -> tuple[list[str], str]:
    """The plain keys before the first list index, and the rest of the path (from the index)."""
    steps = [step for step in path.split(".") if step]
    for position, step in enumerate(steps):
        if _is_index(step):
            return steps[:position], ".".join(steps[position:])
    return steps, ""


def why_not_typed(endpoint: Endpoint) -> str | None:
    """Why this endpoint must use the Python path for every page, or None if it need not."""
    table = endpoint.table
    if table.load != "python":
        return "load is server"
    records = _plain_steps(endpoint.records_path)
    if records is None:
        return "records_path has an index"
    for column in table.columns.values():
        if column.path.startswith(PARENT_PREFIX):
            continue  # read from the parent row, once per page
        if not _split_path(column.path)[0]:
            return f"column path {column.path!r} starts with a list index"
    if endpoint.incremental is not None and not _split_path(endpoint.incremental.cursor_path)[0]:
        return "cursor_path starts with a list index"
    for path in pagination_paths(endpoint):
        keys = _split_path(path)[0]
        # Into the records, or the object holding them: the paginator needs the records as JSON.
        if not keys or keys[: len(records)] == records or records[: len(keys)] == keys:
            return f"pagination path {path!r} reads the records"
    return None


def pagination_paths(endpoint: Endpoint) -> list[str]:
    """Every body path the paginator reads: the style's ``*_path`` settings."""
    settings = endpoint.pagination.model_dump()
    return [
        value
        for name, value in settings.items()
        if name.endswith("_path") and isinstance(value, str) and value
    ]


class TypedPages:
    """``parse(body)``: the page's document with the records as :class:`BuiltRows`, or orjson's.

    Built once per endpoint run. Counts pages both ways, and logs the first page that takes the
    Python path with the reason (types and JSON position only, never record values).
    """

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint.name
        self.typed_pages = 0
        self.fallback_pages = 0
        #: Pages sent straight to orjson while resting after repeated fallbacks (also counted
        #: in ``fallback_pages``).
        self.rested_pages = 0
        #: Why the last page took the Python path (types and JSON position, never values).
        self.last_reason: str | None = None
        self._fallbacks_in_a_row = 0
        self._rest = 0
        #: Generated page struct -> its (attribute, JSON key) pairs, for the paginator's document.
        self._field_keys: dict[type, tuple[tuple[str, str], ...]] = {}
        self._records_steps = _plain_steps(endpoint.records_path) or []
        table = endpoint.table
        record = _Node()
        required = set(table.primary_key)
        self._slow: dict[int, Callable[[Any], Any]] = {}
        #: ``$parent.`` columns of a child endpoint: (index, getter on the parent row).
        self._parent_columns: list[tuple[int, Callable[[Any], Any]]] = []
        for index, (name, column) in enumerate(table.columns.items()):
            self._slow[index] = column_slow_path(
                name, CONVERTERS[column.type], required_column(name, column, required)
            )
            if column.path.startswith(PARENT_PREFIX):
                getter = compile_path(column.path.removeprefix(PARENT_PREFIX))
                self._parent_columns.append((index, getter))
                continue
            keys, rest = _split_path(column.path)
            leaf = _insert(record, keys, _Leaf)
            if rest:  # the value is read from the plain JSON at ``keys``, like the Python path
                leaf.extractors.append((index, compile_path(rest)))
                continue
            leaf.columns.append(index)
            if required_column(name, column, required):
                _mark_required(record, keys)
        self._cursor_steps: list[str] | None = None
        if endpoint.incremental is not None:
            self._cursor_steps, rest = _split_path(endpoint.incremental.cursor_path)
            leaf = _insert(record, self._cursor_steps, _Leaf)
            leaf.cursor = True
            leaf.cursor_rest = compile_path(rest) if rest else None
        self._types = [column.type for column in table.columns.values()]
        self._required = [
            required_column(name, column, required) for name, column in table.columns.items()
        ]
        self.store_raw = table.store_raw
        self._record = record
        self._envelope_node = _Node()
        for path in pagination_paths(endpoint):
            _insert(self._envelope_node, _split_path(path)[0], _Leaf)
        self._current = self._variant(lenient=False)

    def envelope(self) -> EnvelopePages:
        """A parser that reads only the envelope and leaves the records as raw JSON text.

        For pages a writer process converts: it runs this decoder again on the body, so the run's
        process does not build rows it would only throw away.
        """
        page_type = self._envelope(self._envelope_node, self._records_steps, list[msgspec.Raw])
        return EnvelopePages(self, msgspec.json.Decoder(page_type))

    def _variant(self, *, lenient: bool) -> _Variant:
        record_type = self._struct("Record", self._record, lenient)
        record_decoder: msgspec.json.Decoder[Any] = msgspec.json.Decoder(record_type)
        build = self._compile(self._record, record_decoder, lenient)
        items: Any = list[msgspec.Raw] if self.store_raw else list[record_type]  # type: ignore[valid-type]
        page_type = self._envelope(self._envelope_node, self._records_steps, items)
        return _Variant(msgspec.json.Decoder(page_type), build, lenient)

    # -- decoding ---------------------------------------------------------------------------------

    def for_parent(self, parent: Any) -> Callable[[bytes], Any]:
        """The parser for one parent's child walk: ``$parent.`` columns read ``parent``."""
        return lambda body: self(body, parent)

    def __call__(self, body: bytes, parent: Any = None) -> Any:
        """The page's document; raises only what ``orjson.loads`` raises (malformed JSON)."""
        if self._rest:
            self._rest -= 1
            self.rested_pages += 1
            self.fallback_pages += 1
            return orjson.loads(body)
        if json_problem(body) is not None:  # what msgspec would skip: orjson's error
            return orjson.loads(body)
        try:
            # memchr for a backslash first: most pages have none, and it is ~10x the speed.
            if b"\\" in body and _NUL in body:
                raise Refused("an escaped NUL")
            # Converted as the Python path converts them, once per page rather than per record.
            parents = tuple(self._slow[index](get(parent)) for index, get in self._parent_columns)
            try:
                document = self._decode(self._current, body, parents)
            except msgspec.ValidationError as exc:
                if self._current.lenient or "got `str`" not in str(exc):
                    raise
                log.info("typed_decode_lenient", endpoint=self.endpoint, reason=str(exc))
                self._current = self._variant(lenient=True)
                document = self._decode(self._current, body, parents)
        except Exception as exc:  # any doubt at all: the Python path decides
            self._fell_back(exc)
            return orjson.loads(body)
        self._fallbacks_in_a_row = 0
        self.typed_pages += 1
        return document

    def _decode(self, variant: _Variant, body: bytes, parents: tuple[Any, ...]) -> Any:
        decoded = variant.decoder.decode(body)
        rows, cursors = variant.build(self._records_of(decoded), parents)
        built = BuiltRows(rows)
        built.cursor_values = cursors
        return self._document(decoded, built, self._records_steps)

    def _fell_back(self, exc: Exception) -> None:
        self.fallback_pages += 1
        # RowError messages quote the value; msgspec's and ours name types and positions.
        if isinstance(exc, msgspec.ValidationError | Refused):
            self.last_reason = str(exc)
        elif isinstance(exc, msgspec.DecodeError | RecursionError):
            self.last_reason = "the page is not valid JSON to msgspec"
        elif not isinstance(exc, RowError):  # inline code of the loop (orjson.dumps, say)
            self.last_reason = f"{type(exc).__name__} in the typed loop"
        else:
            self.last_reason = "a value only the Python converters can decide (or dead-letter)"
        if self.fallback_pages == 1:
            log.info("typed_decode_fallback", endpoint=self.endpoint, reason=self.last_reason)
        self._fallbacks_in_a_row += 1
        if self._fallbacks_in_a_row >= FALLBACKS_BEFORE_REST:
            self._fallbacks_in_a_row = 0
            self._rest = REST_PAGES
            log.info(
                "typed_decode_resting",
                endpoint=self.endpoint,
                pages=REST_PAGES,
                reason=self.last_reason,
            )

    def _records_of(self, decoded: Any) -> Any:
        for _ in self._records_steps:
            decoded = decoded.records
        return decoded

    def _document(self, decoded: Any, built: list[Any], steps: list[str]) -> Any:
        """The envelope as plain dicts (absent keys left out), records replaced by ``built``."""
        if not steps:
            return built
        document: dict[str, Any] = {}
        struct = decoded.__class__
        keys = self._field_keys.get(struct)
        if keys is None:  # msgspec.structs.fields re-reads the annotations: once per type
            keys = self._field_keys[struct] = tuple(
                (spec.name, spec.encode_name) for spec in msgspec.structs.fields(struct)
            )
        for name, key in keys:
            value = getattr(decoded, name)
            if name == "records":
                document[key] = self._document(value, built, steps[1:])
            elif value is not _ABSENT:
                document[key] = value
        return document

    # -- generated types and loop ---------------------------------------------------------------

    def _struct(self, name: str, node: _Node, lenient: bool) -> Any:
        """A msgspec struct for ``node``; fields are f0, f1, ... renamed to the JSON keys."""
        fields: list[tuple[str, Any, Any]] = []
        for position, (key, child) in enumerate(node.children.items()):
            attribute = f"f{position}"
            if isinstance(child, _Node):
                kind = self._struct(f"{name}_{position}", child, lenient)
                required = child.required
            else:
                kind, required = self._leaf_type(child, lenient)
            if required:
                fields.append((attribute, kind, msgspec.field(name=key)))
            else:
                fields.append((attribute, kind | None, msgspec.field(name=key, default=None)))
        return msgspec.defstruct(name, fields, gc=False, kw_only=True)

    def _leaf_type(self, leaf: _Leaf, lenient: bool) -> tuple[Any, bool]:
        """Native when one column alone reads the leaf and its type has a native decoding."""
        if leaf.plain_json:
            return Any, False
        index = leaf.columns[0]
        native = self._native(self._types[index], lenient)
        if native is None:
            return Any, False
        if lenient and self._types[index] in _STRINGS_TOO:
            native = native | str
        return native, self._required[index]

    @staticmethod
    def _native(kind: str, lenient: bool) -> Any:
        """The msgspec type a column of ``kind`` decodes to as is, or None (plain JSON)."""
        native = _NATIVE.get(kind)
        if native is None and not lenient:
            native = _NATIVE_ARRAYS.get(kind)
        return native

    def _envelope(self, node: _Node, steps: list[str], items: Any) -> Any:
        """The page struct: the records at ``steps`` plus the paginator's keys (plain JSON)."""
        if not steps:
            return items
        fields: list[tuple[str, Any, Any]] = [
            (
                "records",
                self._envelope(_child_node(node, steps[0]), steps[1:], items),
                msgspec.field(name=steps[0]),
            )
        ]
        for position, key in enumerate(node.children):
            if key != steps[0]:
                fields.append((f"p{position}", Any, msgspec.field(name=key, default=_ABSENT)))
        return msgspec.defstruct("Page", fields, gc=False, kw_only=True)

    def _compile(
        self, record: _Node, record_decoder: msgspec.json.Decoder[Any], lenient: bool
    ) -> Callable[[Iterable[Any], tuple[Any, ...]], Any]:
        """One loop for the table: attribute reads, a converter call only for plain-JSON leaves.

        Only generated names and ``repr`` of integers go into the source.
        """
        namespace: dict[str, Any] = {
            "utf8": "utf-8",
            "fromisoformat": dt.datetime.fromisoformat,
            "UTC": dt.UTC,
            "dumps": orjson.dumps,
        }
        body: list[str] = []
        values: dict[int, str] = {}
        cursor_value = "None"

        def walk(node: _Node, holder: str, optional_holder: bool) -> None:
            nonlocal cursor_value
            for position, child in enumerate(node.children.values()):
                read = f"{holder}.f{position}"
                if optional_holder:
                    read = f"({read} if {holder} is not None else None)"
                target = f"n{len(body)}"
                body.append(f"{target} = {read}")
                if isinstance(child, _Node):
                    walk(child, target, not child.required)
                    continue
                if child.cursor:
                    cursor_value = target
                    if child.cursor_rest is not None:
                        namespace["cursor_rest"] = child.cursor_rest
                        cursor_value = f"cursor_rest({target})"
                native = (
                    not child.plain_json
                    and self._native(self._types[child.columns[0]], lenient) is not None
                )
                for index, rest in child.extractors:
                    namespace[f"slow{index}"] = self._slow[index]
                    namespace[f"rest{index}"] = rest
                    body.append(f"v{index} = slow{index}(rest{index}({target}))")
                    values[index] = f"v{index}"
                for index in child.columns:
                    if not native and self._types[index] == "jsonb":
                        # The Python path's _jsonb inline: the page holds no escaped NUL.
                        body.append(
                            f"v{index} = dumps({target}).decode() if {target} is not None else "
                            + (f"slow{index}(None)" if self._required[index] else "None")
                        )
                        namespace[f"slow{index}"] = self._slow[index]
                        values[index] = f"v{index}"
                    elif native and self._types[index] == "timestamptz":
                        namespace[f"slow{index}"] = self._slow[index]
                        body.extend(_timestamp_lines(target, index, self._required[index]))
                        values[index] = target
                    elif native:
                        if lenient and self._types[index] in _STRINGS_TOO:
                            namespace[f"slow{index}"] = self._slow[index]
                            body.append(
                                f"if type({target}) is str: {target} = slow{index}({target})"
                            )
                        values[index] = target
                    else:
                        namespace[f"slow{index}"] = self._slow[index]
                        body.append(f"v{index} = slow{index}({target})")
                        values[index] = f"v{index}"

        walk(record, "r", False)
        unpack = []
        for position, (index, _) in enumerate(self._parent_columns):
            values[index] = f"p{position}"
            unpack.append(f"    p{position} = parents[{position}]")
        row = [values[index] for index in range(len(self._types))]
        if self.store_raw:
            row.append("text")
            namespace["decode"] = record_decoder.decode
        indent = " " * 8
        source = "\n".join(
            [
                "def build(records, parents):",
                *unpack,
                "    rows = []",
                "    cursors = []" if self._cursor_steps is not None else "    cursors = None",
                "    append = rows.append",
                "    for r in records:",
                *(
                    [indent + "text = str(r, utf8)", indent + "r = decode(r)"]
                    if self.store_raw
                    else []
                ),
                *(indent + line for line in body),
                indent + f"append(({', '.join(row)},))",
                *(
                    [indent + f"cursors.append({cursor_value})"]
                    if self._cursor_steps is not None
                    else []
                ),
                "    return rows, cursors",
            ]
        )
        exec(compile(source, f"<typed rows for {self.endpoint}>", "exec"), namespace)
        built: Callable[[Iterable[Any], tuple[Any, ...]], Any] = namespace["build"]
        return built


class EnvelopePages:
    """``parse(body)``: the page's document with the records as :class:`RawRecords`.

    Anything the envelope struct does not take (a missing or non-list records key, say) is
    parsed with orjson instead, exactly as :class:`TypedPages` falls back, so the walk sees the
    same records and errors; malformed JSON raises what ``orjson.loads`` raises.
    """

    def __init__(self, typed: TypedPages, decoder: msgspec.json.Decoder[Any]) -> None:
        self._typed = typed
        self._decoder = decoder

    @property
    def full(self) -> TypedPages:
        """The endpoint's full typed decoder, for pages whose records must become rows after all."""
        return self._typed

    def for_parent(self, parent: Any) -> Callable[[bytes], Any]:
        return self

    def __call__(self, body: bytes, parent: Any = None) -> Any:
        if json_problem(body) is not None:  # what msgspec would skip: orjson's error
            return orjson.loads(body)
        try:
            decoded = self._decoder.decode(body)
        except (msgspec.ValidationError, msgspec.DecodeError, RecursionError):
            return orjson.loads(body)
        typed = self._typed
        records = RawRecords(typed._records_of(decoded))
        return typed._document(decoded, records, typed._records_steps)


def _insert(node: _Node, steps: list[str], kind: type[_Leaf]) -> _Leaf:
    """The leaf at ``steps`` under ``node``, created (with its parents) if new."""
    for step in steps[:-1]:
        child = node.children.setdefault(step, _Node())
        if isinstance(child, _Leaf):  # a column reads the whole object and another a key in it
            raise ValueError(f"path step {step!r} is both a value and an object")
        node = child
    leaf = node.children.setdefault(steps[-1], kind())
    if isinstance(leaf, _Node):
        raise ValueError(f"path step {steps[-1]!r} is both a value and an object")
    return leaf


def _timestamp_lines(value: str, index: int, required: bool) -> list[str]:
    """``value = fromisoformat(value)`` as the Python path does it; on any doubt its slow path."""
    lines = parse_timestamp_lines(value, f"slow{index}")
    if required:
        return lines
    return [f"if {value} is not None:", *("    " + line for line in lines)]


def _mark_required(node: _Node, steps: list[str]) -> None:
    for step in steps[:-1]:
        child = node.children[step]
        assert isinstance(child, _Node)
        child.required = True
        node = child


def _child_node(node: _Node, key: str) -> _Node:
    child = node.children.get(key)
    return child if isinstance(child, _Node) else _Node()


def typed_pages_for(endpoint: Endpoint, enabled: bool = True) -> TypedPages | None:
    """The typed decoder for ``endpoint``, or None when it must use the Python path throughout."""
    if not enabled:
        return None
    reason = why_not_typed(endpoint)
    if reason is None:
        try:
            return TypedPages(endpoint)
        except ValueError as exc:  # overlapping paths: the Python path handles them
            reason = str(exc)
    log.debug("typed_decode_off", endpoint=endpoint.name, reason=reason)
    return None
