"""Dotted paths into JSON documents (``data.items``, ``meta.total``, ``tags.0``).

Paths are compiled once into small getters so the per-record hot path does no string parsing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Getter = Callable[[Any], Any]
MISSING: Any = object()


def compile_path(path: str) -> Getter:
    """Return a function that walks ``path``; it returns :data:`MISSING` where a step is absent.

    An empty path returns the document itself.
    """
    steps = [step for step in path.split(".") if step] if path else []
    if not steps:
        return lambda document: document
    if len(steps) == 1:
        key = steps[0]

        def get_one(document: Any) -> Any:
            if isinstance(document, dict):
                return document.get(key, MISSING)
            return _step(document, key)

        return get_one

    def get_many(document: Any) -> Any:
        value = document
        for step in steps:
            value = _step(value, step)
            if value is MISSING:
                return MISSING
        return value

    return get_many


def _step(value: Any, step: str) -> Any:
    if isinstance(value, dict):
        return value.get(step, MISSING)
    if isinstance(value, list) and (step.isdigit() or (step[:1] == "-" and step[1:].isdigit())):
        index = int(step)
        return value[index] if -len(value) <= index < len(value) else MISSING
    return MISSING


def lenient_int(value: Any) -> int | None:
    """An integer from an API field that may be a number, a numeric string, or empty."""
    if value is MISSING or value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip():
        try:
            return int(float(value.strip())) if "." in value else int(value.strip())
        except ValueError:
            return None
    return None


def lenient_bool(value: Any) -> bool | None:
    """A flag sent as true/false, 1/0 or "true"/"false"; None when absent or unclear."""
    if value is MISSING or value is None:
        return None
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return bool(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in {"true", "1", "yes", "y", "t"}:
            return True
        if text in {"false", "0", "no", "n", "f"}:
            return False
    return None
