"""Secret values: never printed, logged or stored.

A :class:`Secret` hides its value in ``str``/``repr``; :class:`Redactor` scrubs known secret values
out of any text (error messages, log events, URLs) as a last line of defence.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from pydantic_core import core_schema

REDACTED = "***"
# Query parameter names whose values are credentials.
SENSITIVE_PARAMS = frozenset(
    {"api_key", "apikey", "key", "token", "access_token", "secret", "password", "client_secret"}
)


class Secret:
    """A string that only :meth:`reveal` gives back."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"Secret({REDACTED!r})"

    def __str__(self) -> str:
        return REDACTED

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: Any) -> core_schema.CoreSchema:
        return core_schema.is_instance_schema(cls)


def reveal(value: Secret | str) -> str:
    return value.reveal() if isinstance(value, Secret) else value


class Redactor:
    """Replaces every known secret value (and sensitive query parameters) with ``***``."""

    def __init__(self, secrets: Iterable[Secret | str] = ()) -> None:
        self._values: set[str] = set()
        self.add(*secrets)

    def add(self, *secrets: Secret | str) -> None:
        for secret in secrets:
            value = reveal(secret)
            if len(value) >= 4:  # shorter values would scrub ordinary text
                self._values.add(value)
                # "Bearer abc" also leaks as "abc" alone.
                for part in value.split():
                    if len(part) >= 8:
                        self._values.add(part)

    def __call__(self, text: str) -> str:
        for value in sorted(self._values, key=len, reverse=True):
            if value in text:
                text = text.replace(value, REDACTED)
        return text

    def url(self, url: str) -> str:
        """A URL fit for logs: user-info and sensitive query values hidden."""
        parts = urlsplit(url)
        netloc = parts.netloc.rsplit("@", 1)[-1]
        if "@" in parts.netloc:
            netloc = f"{REDACTED}@{netloc}"
        query = urlencode(
            [
                (name, REDACTED if name.lower() in SENSITIVE_PARAMS else value)
                for name, value in parse_qsl(parts.query, keep_blank_values=True)
            ],
            safe="*",
        )
        return self(urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment)))
