"""Secret values: never printed, logged or stored.

A :class:`Secret` hides its value in ``str``/``repr``; :class:`Redactor` scrubs known secret values
out of any text (error messages, log events, URLs) as a last line of defence.
"""

from __future__ import annotations

import base64
import re
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


def _hex(byte: int) -> str:
    """``byte`` as two hex digits in either case (``%2b`` and ``%2B`` are the same byte)."""
    return "".join(f"[{d.lower()}{d.upper()}]" if d.isalpha() else d for d in f"{byte:02x}")


#: JSON's two-character escapes; any character may also be written ``\uXXXX``.
_JSON_SHORT = {
    '"': '\\"',
    "\\": "\\\\",
    "/": "\\/",
    "\b": "\\b",
    "\f": "\\f",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
}


def _char_forms(char: str) -> str:
    r"""A regex for one character of a secret in any of the encodings it travels in.

    Raw; percent-encoded (RFC 3986 ``quote`` and form ``quote_plus``: a space is ``+``, and a
    ``+`` read back as form data is a space), any hex case, and percent-encoded twice;
    JSON-escaped (``\/``, ``\uXXXX``, surrogate pairs). Each character matches on its own,
    so a value with some characters encoded and others not (a URL normalised by a client or
    echoed by a server) is still found.
    """
    utf8 = char.encode()
    forms = [
        re.escape(char),
        "".join("%" + _hex(byte) for byte in utf8),
        "".join("%25" + _hex(byte) for byte in utf8),
    ]
    if char == " ":
        forms.append(r"\+")
    if char == "+":
        forms.append(" ")
    if char in _JSON_SHORT:
        forms.append(re.escape(_JSON_SHORT[char]))
    units = char.encode("utf-16-be")
    forms.append(
        "".join(r"\\u" + _hex(units[i]) + _hex(units[i + 1]) for i in range(0, len(units), 2))
    )
    # Longest first: a raw "%" must not win over the "%25" that encodes it.
    return "(?:" + "|".join(sorted(forms, key=len, reverse=True)) + ")"


def encoded_forms(value: str) -> list[str]:
    """Literal re-encodings of ``value`` that are not character by character: base64."""
    raw = value.encode()
    forms = {base64.b64encode(raw).decode(), base64.urlsafe_b64encode(raw).decode()}
    return sorted(forms | {form.rstrip("=") for form in forms})


class Redactor:
    """Replaces every known secret value (and sensitive query parameters) with ``***``.

    A secret is found in every encoding it may come back in: raw, percent-encoded (once or
    twice, ``quote`` or ``quote_plus``), JSON-escaped, base64, or a mix of these, since a
    server that echoes the request (an error page quoting the URL) may re-encode part of it.
    """

    def __init__(self, secrets: Iterable[Secret | str] = ()) -> None:
        self._values: set[str] = set()
        self._pattern: re.Pattern[str] | None = None
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
                self._pattern = None

    def _compiled(self) -> re.Pattern[str] | None:
        if self._pattern is None and self._values:
            literals = {form for value in self._values for form in encoded_forms(value)}
            alternatives = [
                "".join(_char_forms(char) for char in value)
                for value in sorted(self._values, key=len, reverse=True)
            ] + [re.escape(form) for form in sorted(literals, key=len, reverse=True)]
            self._pattern = re.compile("|".join(alternatives))
        return self._pattern

    @property
    def reach(self) -> int:
        """An upper bound on the length of one secret in any of its encodings."""
        return max((len(value) for value in self._values), default=0) * 12 + 16

    def __call__(self, text: str) -> str:
        pattern = self._compiled()
        return text if pattern is None else pattern.sub(REDACTED, text)

    def excerpt(self, body: bytes, limit: int) -> str:
        """The first ``limit`` characters of a response body, for a message; secrets hidden.

        Redacted *before* it is cut: a secret the cut falls inside is hidden whole, never left
        as a prefix. Runs of whitespace become one space.
        """
        window = body[: 4 * limit + self.reach]
        text = window.decode("utf-8", errors="replace")
        pattern = self._compiled()
        pieces: list[str] = []
        position = 0
        if pattern is not None:
            for match in pattern.finditer(text):
                if match.start() >= limit:
                    break
                pieces += [text[position : match.start()], REDACTED]
                position = match.end()
        end = max(position, limit)
        pieces.append(text[position:end])
        cut = end < len(text) or len(body) > len(window)
        return " ".join("".join(pieces).split()) + ("..." if cut else "")

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
