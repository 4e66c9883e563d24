"""Requests and responses as small immutable values that paginators and checkpoints share."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

#: Turns a page's bytes into its document; raises ``orjson.JSONDecodeError`` on malformed JSON.
ParseBody = Callable[[bytes], Any]


@dataclass(frozen=True, slots=True)
class PageRequest:
    """An absolute URL plus query parameters that override the URL's own.

    This is also what a checkpoint stores: the request that fetches the next page.
    """

    url: str
    params: tuple[tuple[str, str], ...] = ()

    def with_params(self, **updates: Any) -> PageRequest:
        merged = dict(self.params)
        for name, value in updates.items():
            if value is None:
                merged.pop(name, None)
            else:
                merged[name] = _param_text(value)
        return PageRequest(self.url, tuple(merged.items()))

    def without(self, names: frozenset[str]) -> PageRequest:
        """This request minus the query parameters ``names``, in ``params`` and in the URL.

        Used to keep credentials that travel in the query (``auth.style = "api_key_query"``) out
        of next-page requests a server echoed them into, so checkpoints never store them; the
        client adds the credential back when it sends the request.
        """
        parts = urlsplit(self.url)
        pairs = parse_qsl(parts.query, keep_blank_values=True)
        if not any(name in names for name, _ in [*pairs, *self.params]):
            return self
        query = urlencode([(name, value) for name, value in pairs if name not in names])
        return PageRequest(
            urlunsplit(parts._replace(query=query)),
            tuple((name, value) for name, value in self.params if name not in names),
        )

    def param(self, name: str) -> str | None:
        return dict(self.params).get(name)

    def full_url(self) -> str:
        """The URL with ``params`` merged into its query string (params win)."""
        if not self.params:
            return self.url
        parts = urlsplit(self.url)
        overridden = dict(self.params)
        query = [
            (name, value)
            for name, value in parse_qsl(parts.query, keep_blank_values=True)
            if name not in overridden
        ]
        query.extend(self.params)
        return urlunsplit(parts._replace(query=urlencode(query)))

    def key(self) -> str:
        """A canonical identity used by the loop guard."""
        parts = urlsplit(self.full_url())
        query = urlencode(sorted(parse_qsl(parts.query, keep_blank_values=True)))
        return urlunsplit(parts._replace(query=query, fragment=""))

    def to_state(self) -> dict[str, Any]:
        return {"url": self.url, "params": [list(pair) for pair in self.params]}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> PageRequest:
        return cls(str(state["url"]), tuple((str(k), str(v)) for k, v in state.get("params", [])))


def _param_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


@dataclass(frozen=True, slots=True)
class HttpResponse:
    """A fetched page: final URL, status, headers (lower-case names), body, parsed JSON."""

    url: str
    status: int
    headers: Mapping[str, str]
    body: bytes
    document: Any = None

    def header(self, name: str) -> str | None:
        """Header lookup by any case; repeated headers arrive joined with ", "."""
        return self.headers.get(name.lower())
