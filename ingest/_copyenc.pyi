from collections.abc import Sequence
from typing import Any

KIND: dict[str, int]

def encode(rows: Sequence[tuple[Any, ...]], kinds: bytes, /) -> bytes | None: ...
