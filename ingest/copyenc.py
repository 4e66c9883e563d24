"""Binary COPY bytes for a batch of row tuples, built in C when the extension is installed.

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

from collections.abc import Callable, Sequence
from typing import Any

#: rows -> the whole COPY stream, or None (asyncpg encodes this batch)
Encode = Callable[[Sequence[tuple[Any, ...]]], bytes | None]

try:
    from ingest._copyenc import KIND as _KIND
    from ingest._copyenc import encode as _encode
except ImportError:  # built without a C compiler: asyncpg encodes every batch
    _KIND = {}


def available() -> bool:
    """Whether the C encoder was built with this install."""
    return bool(_KIND)


def binary_encoder(column_types: Sequence[str]) -> Encode | None:
    """An encoder for rows of ``column_types`` (ingest's config names), or None when the
    extension is missing or a type has no C encoding (numeric: asyncpg encodes those tables)."""
    if not _KIND or any(kind not in _KIND for kind in column_types):
        return None
    codes = bytes(_KIND[kind] for kind in column_types)

    def encode_rows(rows: Sequence[tuple[Any, ...]]) -> bytes | None:
        return _encode(rows, codes)

    return encode_rows
