from collections.abc import Sequence
from typing import Any

KIND: dict[str, int]

def encode(rows: Sequence[tuple[Any, ...]], kinds: bytes, /) -> bytes | None: ...
def encode_records(
    records: Sequence[Any], spec: tuple[Any, ...], /
) -> tuple[bytes, list[Any] | None, list[Any] | None] | None: ...
def validate(body: bytes, /) -> str | None: ...
