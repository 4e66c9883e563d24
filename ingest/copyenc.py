"""Binary COPY bytes for a batch, built in C when the extension is installed.

Why: asyncpg's ``copy_records_to_table`` spends ~2.3 s of CPU per 1M bench records encoding
values through its generic codecs; :mod:`ingest._copyenc` writes the same binary format for the
plain values ingest's converters produce in ~0.4 s (docs/performance.md, fourth round).

Never a different table: the encoder returns None for any value it does not take exactly as
asyncpg would (anything but exact str/int/float/bool/aware datetime/date/None, or out of the
column type's range), and for those batches the sink lets asyncpg encode as before. It only
encodes for columns whose PostgreSQL type is exactly the configured one (the sink checks a
target table it did not create, see :meth:`ingest.sink.TableSink.target_matches`), because a
binary COPY sends bytes for a type: asyncpg adapts to the table's actual types, this does not.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import struct
from collections.abc import Callable, Sequence
from typing import Any

import orjson
import structlog

from ingest.config import PARENT_PREFIX, Endpoint
from ingest.pgcodecs import decode_timestamptz

log = structlog.get_logger("ingest.copyenc")

#: rows -> the whole COPY stream, or None (asyncpg encodes this batch)
Encode = Callable[[Sequence[tuple[Any, ...]]], bytes | None]

try:
    from ingest._copyenc import KIND as _KIND
    from ingest._copyenc import encode as _encode
    from ingest._copyenc import encode_records as _encode_records
    from ingest._copyenc import validate as _validate
except ImportError:  # built without a C compiler: asyncpg encodes every batch
    _KIND = {}
    _validate = None  # type: ignore[assignment]


def json_problem(body: bytes) -> str | None:
    """Why ``orjson.loads(body)`` would refuse the page, or None if it would take it.

    Why: a page is valid only if it is JSON by orjson's rules (UTF-8, numbers finite as
    doubles, at most 1024 levels deep), whichever parser reads it. msgspec skips the values no
    column reads, so it takes pages orjson refuses (invalid UTF-8 or ``1e400`` in a field
    nobody reads); the typed decoders ask this first and refuse the same pages. One pass in C
    (~7 % of ``orjson.loads``'s time), or ``orjson.loads`` itself without the extension.
    """
    if _validate is not None:
        return _validate(body)
    try:
        orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        return str(exc)
    return None


def available() -> bool:
    """Whether the C encoder was built with this install."""
    return bool(_KIND)


def binary_encoder(column_types: Sequence[str]) -> Encode | None:
    """An encoder for rows of ``column_types`` (ingest's config names), or None when the
    extension is missing or a type has no C encoding (numeric and numeric[]: asyncpg encodes
    those tables). Arrays are lists of the element type's values, NULL items as None."""
    if not _KIND or any(kind not in _KIND for kind in column_types):
        return None
    codes = bytes(_KIND[kind] for kind in column_types)

    def encode_rows(rows: Sequence[tuple[Any, ...]]) -> bytes | None:
        try:
            return _encode(rows, codes)
        except MemoryError:  # no room for the stream: asyncpg encodes it in parts
            return None

    return encode_rows


class EncodedBatch:
    """A batch already in binary COPY form (the rows never existed as Python objects).

    ``keys`` holds each record's primary key (merge tables; all distinct) and ``key_set`` the
    same as a set, ``cursors`` each record's incremental cursor value as plain JSON
    (incremental endpoints), else None.
    """

    __slots__ = ("count", "cursors", "data", "key_set", "keys")

    def __init__(
        self,
        data: bytes,
        count: int,
        keys: list[Any] | None,
        cursors: list[Any] | None,
        key_set: set[Any] | None = None,
    ) -> None:
        self.data = data
        self.count = count
        self.keys = keys
        self.cursors = cursors
        self.key_set = key_set if key_set is not None else set(keys or ())

    def __len__(self) -> int:
        return self.count


_SIGNATURE_SIZE = 11 + 4 + 4  # PGCOPY\n\377\r\n\0, flags, header extension length
_PG_EPOCH = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)
_PG_EPOCH_DATE = dt.date(2000, 1, 1)


def _decode_value(kind: str, data: bytes) -> Any:
    if kind == "text":
        return data.decode()
    if kind in ("jsonb", "raw"):
        return data[1:].decode()  # version byte 1, then the JSON text
    if kind == "bigint":
        return int.from_bytes(data, "big", signed=True)
    if kind == "integer":
        return int.from_bytes(data, "big", signed=True)
    if kind == "double":
        return struct.unpack("!d", data)[0]
    if kind == "boolean":
        return data != b"\x00"
    if kind == "timestamptz":
        micros = int.from_bytes(data, "big", signed=True)
        return decode_timestamptz((micros,))
    if kind == "date":
        days = int.from_bytes(data, "big", signed=True)
        if days == 0x7FFF_FFFF:
            return dt.date.max  # asyncpg's sentinels for PostgreSQL's +/-infinity
        if days == -0x8000_0000:
            return dt.date.min
        return _PG_EPOCH_DATE + dt.timedelta(days=days)
    raise ValueError(f"no decoding for {kind}")


def decode_rows(batch: EncodedBatch, column_types: Sequence[str]) -> list[tuple[Any, ...]]:
    """The row tuples of an encoded batch, as the Python path would have built them.

    Only for a batch PostgreSQL refused (see :meth:`ingest.sink.TableSink.copy_refusing`): its
    rows are COPYed in parts to find the ones it refuses, so they must exist one by one.
    ``column_types``: the configured types, ``jsonb`` for the raw record column.
    """
    data = memoryview(batch.data)
    at = _SIGNATURE_SIZE
    rows: list[tuple[Any, ...]] = []
    for _ in range(batch.count):
        (fields,) = struct.unpack_from("!h", data, at)
        at += 2
        values: list[Any] = []
        for index in range(fields):
            (length,) = struct.unpack_from("!i", data, at)
            at += 4
            if length < 0:
                values.append(None)
                continue
            values.append(_decode_value(column_types[index], bytes(data[at : at + length])))
            at += length
        rows.append(tuple(values))
    return rows


#: What the sink writes: row tuples, or a batch the C record encoder already encoded.
Rows = Sequence[tuple[Any, ...]] | EncodedBatch

#: After this many batches in a row that the record encoder declined, it rests ...
DECLINES_BEFORE_REST = 8
#: ... for this many batches (converted the usual way without trying), then tries again.
REST_BATCHES = 64
#: Config types a merge key may have for the record encoder (it hands keys back as int/str).
_KEY_TYPES = frozenset({"bigint", "integer", "text"})
#: _copyenc's code for the raw record column (``store_raw``).
_RAW_KIND = 101


class RecordEncoder:
    """One endpoint's records (raw JSON text, e.g. :class:`ingest.typed.RawRecords`) straight
    to binary COPY bytes in C, for the values where the Python path's conversion is not in
    doubt; ``encode`` returns None for any other batch and the caller converts it as before.

    Where it declines, and why (the conversions are :mod:`ingest.rows`'s):

    - text only from JSON strings (numbers and objects as text: the Python path formats them);
    - bigint/integer only from JSON integers in range (``1.0`` and ``"1"``: the Python path);
    - double from JSON numbers, boolean from true/false;
    - timestamptz only from ``YYYY-MM-DD[T ]HH:MM:SS[.ffffff][Z|±HH:MM]`` (naive means UTC),
      the forms where ``datetime.fromisoformat`` is not in doubt; epoch numbers: Python path;
    - date only from ``YYYY-MM-DD``;
    - jsonb as the server's JSON text, so only without fractions, exponents or integers past
      64 bits inside (their spelling may differ from orjson's re-encoding);
    - any escaped NUL, malformed UTF-8 or JSON, a record that is not an object, a path
      through a value that is not an object, or a required value missing: the Python path
      decides (dead letters included);
    - a merge batch in which a key repeats (the rows path keeps its last occurrence).

    The raw record column (``store_raw``) holds the record's text as the server sent it, as
    the typed decoder stores it.
    """

    def __init__(self, spec: tuple[Any, ...], keyed: bool, endpoint: str = "") -> None:
        self._spec = spec
        self._keyed = keyed
        self._endpoint = endpoint
        self._declined_in_a_row = 0
        self._rest = 0
        #: Batches encoded, and batches declined (converted the usual way), so far.
        self.encoded_batches = 0
        self.declined_batches = 0

    @classmethod
    def for_endpoint(cls, endpoint: Endpoint) -> RecordEncoder | None:
        """The encoder for ``endpoint``'s table, or None when some column needs Python always."""
        if not _KIND or endpoint.table.load != "python":
            return None
        table = endpoint.table
        required_keys = set(table.primary_key)
        columns: list[tuple[tuple[str, ...] | None, int, bool]] = []
        for name, column in table.columns.items():
            steps = _plain_steps(column.path)
            # Arrays: the typed decoder builds the lists and encode() writes them.
            if steps is None or column.type not in _KIND or column.type.endswith("[]"):
                return None
            required = name in required_keys or not column.nullable
            columns.append((steps, _KIND[column.type], required))
        if table.store_raw:
            columns.append((None, _RAW_KIND, False))
        names = list(table.columns)
        if any(table.columns[key].type not in _KEY_TYPES for key in table.primary_key):
            return None
        keys = tuple(names.index(key) for key in table.primary_key) if table.mode == "merge" else ()
        cursor: tuple[str, ...] | None = None
        if endpoint.incremental is not None:
            cursor = _plain_steps(endpoint.incremental.cursor_path)
            if cursor is None:
                return None
        return cls((tuple(columns), keys, cursor), keyed=bool(keys), endpoint=endpoint.name)

    def encode(self, records: Sequence[Any]) -> EncodedBatch | None:
        """The batch's COPY stream, or None: the caller converts these records the usual way.

        After :data:`DECLINES_BEFORE_REST` declined batches in a row it does not try for
        :data:`REST_BATCHES` batches, so an API whose records it never takes costs a failed
        attempt on at most ~1 batch in 9 (the attempt stops at the first value it declines).
        """
        if self._resting():
            return None
        try:
            result = _encode_records(records, self._spec)
        except MemoryError:  # declined: the batch takes the Python path, never fails the run
            result = None
        return self._finish(result, len(records))

    async def encode_beside(self, records: Sequence[Any]) -> EncodedBatch | None:
        """:meth:`encode` with the parse in a worker thread. The C code parses without the GIL,
        so meanwhile the event loop goes on fetching and reading pages, on the other core."""
        if self._resting():
            return None
        try:
            result = await asyncio.to_thread(_encode_records, records, self._spec)
        except MemoryError:  # declined: the batch takes the Python path, never fails the run
            result = None
        return self._finish(result, len(records))

    def _resting(self) -> bool:
        if not self._rest:
            return False
        self._rest -= 1
        self.declined_batches += 1
        return True

    def _finish(
        self, result: tuple[bytes, list[Any] | None, list[Any] | None] | None, count: int
    ) -> EncodedBatch | None:
        if result is not None:
            data, keys, cursors = result
            distinct = set(keys or ())
            if not self._keyed or keys is None or len(distinct) == len(keys):
                self._declined_in_a_row = 0
                self.encoded_batches += 1
                return EncodedBatch(data, count, keys, cursors, distinct)
        self.declined_batches += 1
        self._declined_in_a_row += 1
        if self._declined_in_a_row == 1 and not self.encoded_batches:
            log.info("record_encoder_declined", endpoint=self._endpoint)
        if self._declined_in_a_row >= DECLINES_BEFORE_REST:
            self._declined_in_a_row = 0
            self._rest = REST_BATCHES
        return None


def _plain_steps(path: str) -> tuple[str, ...] | None:
    """The object keys of ``path``; None for what the encoder does not walk (a list index, the
    parent row, the document itself)."""
    if path.startswith(PARENT_PREFIX):
        return None
    steps = tuple(step for step in path.split(".") if step)
    if not steps or any(step.isdigit() or step[:1] == "-" for step in steps):
        return None
    return steps
