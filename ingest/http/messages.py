"""Requests and responses as small immutable values that paginators and checkpoints share."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import orjson

#: Turns a page's bytes into its document; raises ``orjson.JSONDecodeError`` on malformed JSON.
ParseBody = Callable[[bytes], Any]


@dataclass(frozen=True, slots=True)
class PageRequest:
    """An absolute URL plus query parameters that override the URL's own, the method, and for
    a POST the JSON body (as its text, so the value stays immutable and hashable).

    This is also what a checkpoint stores: the request that fetches the next page, its body
    (with the page/offset/cursor a paginator placed in it) included.
    """

    url: str
    params: tuple[tuple[str, str], ...] = ()
    method: str = "GET"
    #: The JSON body of a POST, as text; None: no body.
    body: str | None = None

    def with_params(self, **updates: Any) -> PageRequest:
        merged = dict(self.params)
        for name, value in updates.items():
            if value is None:
                merged.pop(name, None)
            else:
                merged[name] = _param_text(value)
        return replace(self, params=tuple(merged.items()))

    def with_body_value(self, path: str, value: Any) -> PageRequest:
        """This request with the body's value at the dotted ``path`` set (None: removed).

        Objects on the way are created; a step through something that is not an object is a
        ValueError (the body template and the paginator's ``*_param`` disagree).
        """
        document = orjson.loads(self.body) if self.body else {}
        steps = [step for step in path.split(".") if step]
        node = document
        for step in steps[:-1]:
            if not isinstance(node, dict):
                raise ValueError(f"body path {path!r} runs through a value that is not an object")
            node = node.setdefault(step, {})
        if not isinstance(node, dict):
            raise ValueError(f"body path {path!r} runs through a value that is not an object")
        if value is None:
            node.pop(steps[-1], None)
        else:
            node[steps[-1]] = value
        return replace(self, body=orjson.dumps(document).decode())

    def body_value(self, path: str) -> Any:
        """The body's value at the dotted ``path``; None when absent (or no body)."""
        node: Any = orjson.loads(self.body) if self.body else None
        for step in (step for step in path.split(".") if step):
            if not isinstance(node, dict):
                return None
            node = node.get(step)
        return node

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
        return replace(
            self,
            url=urlunsplit(parts._replace(query=query)),
            params=tuple((name, value) for name, value in self.params if name not in names),
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
        """A canonical identity used by the loop guard (a POST's body is part of it)."""
        parts = urlsplit(self.full_url())
        query = urlencode(sorted(parse_qsl(parts.query, keep_blank_values=True)))
        url = urlunsplit(parts._replace(query=query, fragment=""))
        if self.method == "GET" and self.body is None:
            return url
        body = orjson.loads(self.body) if self.body else None
        return f"{self.method} {url} {orjson.dumps(body, option=orjson.OPT_SORT_KEYS).decode()}"

    def to_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"url": self.url, "params": [list(pair) for pair in self.params]}
        if self.method != "GET":
            state["method"] = self.method
        if self.body is not None:
            state["body"] = self.body
        return state

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> PageRequest:
        body = state.get("body")
        return cls(
            str(state["url"]),
            tuple((str(k), str(v)) for k, v in state.get("params", [])),
            str(state.get("method", "GET")),
            str(body) if body is not None else None,
        )


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
