"""``ingest init URL``: sample an API's first pages and write a commented, valid source config.

Why a guesser at all: a user's first minute should end with a config that validates and runs,
not with a blank TOML file. Every guess is written down: what was seen decides each key, and a
``# check:`` comment marks what the sample could not settle, so no guess is silent.

The probe uses ingest's own :class:`~ingest.http.client.HttpClient` (retries, the response size
cap, redaction, no credentials to other hosts), at most four requests: the first page, then
the second page as the detected pagination style would ask for it, which both confirms the
style and widens the sample the columns are inferred from.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urljoin, urlsplit

from ingest.config import ENV_REFERENCE, SENSITIVE_HEADERS, Source, parse_config
from ingest.errors import ConfigError, IngestError, SourceError
from ingest.http.client import HttpClient
from ingest.http.messages import HttpResponse, PageRequest
from ingest.infer import DEFAULT_DEPTH, InferredColumn, infer_columns, snake_case
from ingest.paginate import parse_link_header
from ingest.paths import MISSING, compile_path, lenient_int
from ingest.secrets import Redactor, Secret

#: List keys tried first when a body holds several lists of objects.
RECORD_KEYS = ("data", "items", "results", "records", "entries", "objects", "rows", "hits")
PAGE_PARAMS = ("page", "p", "page_number", "pagenumber", "pageno")
OFFSET_PARAMS = ("offset", "skip", "start", "from")
SIZE_PARAMS = ("per_page", "page_size", "pagesize", "limit", "size", "count", "take", "max")
TOTAL_KEYS = ("total", "totalcount", "total_count", "count", "totalresults", "total_results")
TOTAL_PAGES_KEYS = ("total_pages", "totalpages", "pages", "page_count", "pagecount", "last_page")
HAS_MORE_KEYS = ("has_more", "hasmore", "has_next", "hasnext", "hasnextpage", "more")
TOTAL_HEADERS = ("X-Total-Count", "X-Total", "Total-Count")
TOTAL_PAGES_HEADERS = ("X-Total-Pages", "X-Page-Count")
CURSOR_PARAMS = ("cursor", "after", "page_token", "pageToken", "token", "starting_after")
UPDATED_NAMES = re.compile(r"(updated|modified|changed|last_?edit)", re.IGNORECASE)
KEY_NAMES = ("id", "uuid", "guid", "key")


@dataclass(frozen=True)
class InitOptions:
    url: str
    headers: Mapping[str, str] = field(default_factory=dict)
    records_path: str | None = None
    depth: int = DEFAULT_DEPTH


@dataclass
class Guess:
    """What the sample told: each config key with the comment that explains or questions it."""

    base_url: str
    path: str
    params: dict[str, str]
    records_path: str
    records_note: str
    pagination: dict[str, Any]
    pagination_notes: list[str]
    columns: list[InferredColumn]
    primary_key: str | None
    key_note: str
    cursor: InferredColumn | None
    sampled: int
    pages: int


def parse_header(text: str) -> tuple[str, str]:
    """``'Name: value'`` from ``--header``; a one-line error otherwise."""
    name, sep, value = text.partition(":")
    name = name.strip()
    if not sep or not re.match(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$", name):
        raise ConfigError(f"--header {name or text!r}: expected 'Name: value'")
    return name, value.strip()


def _probe_source(options: InitOptions, environ: Mapping[str, str]) -> tuple[Source, str, str]:
    """A throwaway :class:`Source` for the probe requests, plus the base URL and path."""
    parts = urlsplit(options.url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"URL {options.url!r} must start with http:// or https:// and a host")
    base_url = f"{parts.scheme}://{parts.netloc}"
    path = parts.path or "/"
    headers: dict[str, Secret | str] = {}
    for name, value in options.headers.items():
        missing = [var for var in ENV_REFERENCE.findall(value) if not environ.get(var)]
        if missing:
            raise ConfigError(
                f"--header {name}: environment variable {missing[0]} is not set "
                f"(export {missing[0]}=... before running)"
            )
        resolved = ENV_REFERENCE.sub(lambda match: environ[match.group(1)], value)
        sensitive = resolved != value or name.lower() in SENSITIVE_HEADERS
        headers[name] = Secret(resolved) if sensitive else resolved
    probe = {
        "name": "init",
        "base_url": base_url,
        "endpoints": [
            {
                "name": "probe",
                "path": path,
                "table": {"name": "probe", "mode": "append", "columns": {"x": {"path": "x"}}},
            }
        ],
    }
    source = Source.model_validate(probe).model_copy(update={"headers": headers})
    return source, base_url, path


async def guess_config(options: InitOptions, redactor: Redactor) -> Guess:
    """Fetch the first page (and the second where pagination is found) and guess every key."""
    source, base_url, path = _probe_source(options, os.environ)
    params = dict(parse_qsl(urlsplit(options.url).query, keep_blank_values=True))
    first = PageRequest(base_url + path, tuple(params.items()))
    async with HttpClient(source, redactor) as http:
        page1 = await http.fetch(first, "init")
        records_path, records_note = _records_path(page1.document, options.records_path)
        records1 = _records(page1, records_path)
        if not records1:
            raise SourceError(
                f"{redactor.url(options.url)}: the first page has no records at "
                f"{records_path or 'the top level'!r}; point ingest init at a URL that returns "
                "some (or pass --records-path)"
            )
        prober = _Prober(http, first, records_path, records1)
        pagination, notes, more = await prober.detect(page1, params)
    sample = records1 + more
    columns = infer_columns(sample, options.depth)
    if not columns:
        raise SourceError(
            f"{redactor.url(options.url)}: the records are not JSON objects; ingest init "
            "needs objects with fields (pass --records-path to point at them)"
        )
    key, key_note = _primary_key(columns, len(sample))
    cursor = next(
        (c for c in columns if c.type == "timestamptz" and UPDATED_NAMES.search(c.path)), None
    )
    for name in ("cursor_param", "page_param", "offset_param"):
        params.pop(pagination.get(name, ""), None)
    return Guess(
        base_url=base_url,
        path=path,
        params=params,
        records_path=records_path,
        records_note=records_note,
        pagination=pagination,
        pagination_notes=notes,
        columns=columns,
        primary_key=key,
        key_note=key_note,
        cursor=cursor,
        sampled=len(sample),
        pages=1 + (1 if more else 0),
    )


def _records(response: HttpResponse, records_path: str) -> list[Any]:
    value = compile_path(records_path)(response.document)
    if value is MISSING or value is None:
        return []
    if isinstance(value, dict):
        return [value]
    return list(value) if isinstance(value, list) else []


def _records_path(document: Any, override: str | None) -> tuple[str, str]:
    """The dotted path of the record list: the body itself, or the largest list of objects."""
    if override is not None:
        return override, "given with --records-path"
    if isinstance(document, list):
        return "", "the body is the list of records"
    found: list[tuple[str, int]] = []

    def walk(value: Any, prefix: str, level: int) -> None:
        if not isinstance(value, dict) or level > 3:
            return
        for key, child in value.items():
            if not isinstance(key, str) or "." in key or not key:
                continue
            path = f"{prefix}.{key}" if prefix else key
            if isinstance(child, list) and child and all(isinstance(i, dict) for i in child):
                found.append((path, len(child)))
            walk(child, path, level + 1)

    walk(document, "", 0)
    if not found:
        empty = _empty_list(document)
        if empty is not None:
            return empty, "an empty list on the first page: check it is where records are"
        return "", "no list of objects in the body: each response is taken as one record; check"

    def rank(item: tuple[str, int]) -> tuple[int, int]:
        last = item[0].rsplit(".", 1)[-1].lower()
        return (item[1], 1 if last in RECORD_KEYS else 0)

    best = max(found, key=rank)
    if len(found) > 1:
        others = ", ".join(path for path, _ in found if path != best[0])
        return best[0], f"the largest list of objects; others in the body: {others} (check)"
    return best[0], "the list of objects in the body"


def _empty_list(document: Any, prefix: str = "", level: int = 0) -> str | None:
    """The path of an empty list under a records-like key (``data.items: []``), if any."""
    if not isinstance(document, dict) or level > 3:
        return None
    for key, value in document.items():
        if not isinstance(key, str) or "." in key or not key:
            continue
        path = f"{prefix}.{key}" if prefix else key
        if value == [] and key.lower() in RECORD_KEYS:
            return path
        found = _empty_list(value, path, level + 1)
        if found is not None:
            return found
    return None


def _fields(document: Any, skip: str, prefix: str = "", level: int = 0) -> list[tuple[str, Any]]:
    """Scalar fields of a body (dotted path, value), outside the records, three levels deep."""
    out: list[tuple[str, Any]] = []
    if not isinstance(document, dict) or level > 3:
        return out
    for key, value in document.items():
        if not isinstance(key, str) or "." in key or not key:
            continue
        path = f"{prefix}.{key}" if prefix else key
        if path == skip:
            continue
        if isinstance(value, dict):
            out.extend(_fields(value, skip, path, level + 1))
        elif not isinstance(value, list):
            out.append((path, value))
    return out


def _norm(path: str) -> str:
    return path.rsplit(".", 1)[-1].lower().replace("-", "_")


def _looks_like_url(value: Any) -> bool:
    return isinstance(value, str) and bool(re.match(r"^(https?://|/)", value.strip()))


def _signature(records: Sequence[Any]) -> list[bytes]:
    return [json.dumps(record, sort_keys=True, default=str).encode() for record in records]


class _Prober:
    """Tries the second page the way each pagination style would ask for it."""

    def __init__(
        self, http: HttpClient, first: PageRequest, records_path: str, records: list[Any]
    ) -> None:
        self.http = http
        self.first = first
        self.records_path = records_path
        self.records = records
        self.seen = set(_signature(records))

    async def _new_records(self, request: PageRequest) -> list[Any] | None:
        """The page's records if it holds records the first page did not; else None."""
        try:
            response = await self.http.fetch(request, "init")
        except IngestError:
            return None
        records = _records(response, self.records_path)
        if not records or not set(_signature(records)) - self.seen:
            return None
        return records

    async def detect(
        self, page: HttpResponse, params: dict[str, str]
    ) -> tuple[dict[str, Any], list[str], list[Any]]:
        """(pagination table, comments, the second page's records if one was fetched)."""
        document = page.document
        fields = _fields(document, self.records_path)
        totals = _totals(fields, page, len(self.records))
        has_more = next(
            (p for p, v in fields if _norm(p) in HAS_MORE_KEYS and isinstance(v, bool)), None
        )
        links = parse_link_header(page.header("link") or "")
        if links.get("next"):
            more = await self._new_records(PageRequest(urljoin(page.url, links["next"])))
            notes = [] if more else ["check: the Link header's next page repeated the first"]
            return {"style": "link_header"}, notes, more or []
        if page.header("link") is not None and links:
            return (
                {"style": "link_header"},
                ["a Link header without rel=next on the first page: one page only? check"],
                [],
            )
        reference = _next_reference(fields)
        if reference is not None:
            return await self._body_reference(page, reference, has_more, fields)
        return await self._counting(params, totals, has_more)

    async def _body_reference(
        self,
        page: HttpResponse,
        reference: tuple[str, Any],
        has_more: str | None,
        fields: list[tuple[str, Any]],
    ) -> tuple[dict[str, Any], list[str], list[Any]]:
        path, value = reference
        extra = {"has_more_path": has_more} if has_more else {}
        name = _norm(path)
        if _looks_like_url(value) or (
            value is None and any(word in name for word in ("url", "link", "href"))
        ):
            table = {"style": "next_url", "next_url_path": path, **extra}
            if value is None:
                return table, [f"check: {path} was null on the first page (one page only?)"], []
            more = await self._new_records(PageRequest(urljoin(page.url, value.strip())))
            notes = [] if more else [f"check: the page at {path} repeated the first page"]
            return table, notes, more or []
        table = {"style": "cursor", "cursor_path": path, **extra}
        if value is None or value == "":
            table["cursor_param"] = _cursor_param(path)
            note = f"check: {path} was empty on the first page; cursor_param is a guess"
            return table, [note], []
        for param in dict.fromkeys((_cursor_param(path), *CURSOR_PARAMS)):
            more = await self._new_records(self.first.with_params(**{param: value}))
            if more:
                table["cursor_param"] = param
                return table, [], more
        table["cursor_param"] = _cursor_param(path)
        return (
            table,
            [f"check: sending {path}'s value back as cursor_param gave no new records"],
            [],
        )

    async def _counting(
        self, params: dict[str, str], totals: dict[str, str], has_more: str | None
    ) -> tuple[dict[str, Any], list[str], list[Any]]:
        lowered = {name.lower(): name for name in params}
        size = len(self.records)
        page_param = next((lowered[p] for p in PAGE_PARAMS if p in lowered), None)
        offset_param = next((lowered[p] for p in OFFSET_PARAMS if p in lowered), None)
        size_param = next((lowered[p] for p in SIZE_PARAMS if p in lowered), None)
        extra = {"has_more_path": has_more} if has_more else {}
        if offset_param is None:
            page_param = page_param or "page"
            start = lenient_int(params.get(page_param, "1"))
            start = 1 if start is None else start
            more = await self._new_records(self.first.with_params(**{page_param: start + 1}))
            if more:
                table: dict[str, Any] = {"style": "page_number", "page_param": page_param}
                if start != 1:
                    table["start_page"] = start
                for key in ("total_path", "total_header", "total_pages_path", "total_pages_header"):
                    if key in totals:
                        table[key] = totals[key]
                notes = []
                if size_param is None:
                    notes.append(
                        f"pages of {size} records; if the API takes a page size parameter "
                        "(per_page, page_size...), add it to params for fewer requests"
                    )
                return {**table, **extra}, notes, more
        offset_param = offset_param or "offset"
        limit_param = size_param or "limit"
        limit = lenient_int(params.get(limit_param)) or size
        request = self.first.with_params(**{offset_param: size, limit_param: limit})
        more = await self._new_records(request)
        if more:
            table = {
                "style": "offset",
                "offset_param": offset_param,
                "limit_param": limit_param,
                "limit": limit,
            }
            for key in ("total_path", "total_header"):
                if key in totals:
                    table[key] = totals[key]
            return {**table, **extra}, [], more
        total = next(iter(totals.values()), None)
        notes = [
            "no second page found (page=2, offset and a next link were tried): one page only; "
            "if the API pages, set the style (docs/configuration.md#pagination)"
        ]
        if total:
            notes.append(f"check: the body reports a total at {total} but no second page came")
        return {"style": "single"}, notes, []


def _totals(fields: list[tuple[str, Any]], page: HttpResponse, seen: int) -> dict[str, str]:
    found: dict[str, str] = {}
    for path, value in fields:
        number = lenient_int(value)
        if number is None:
            continue
        name = _norm(path)
        if name in TOTAL_KEYS and number >= seen and "total_path" not in found:
            found["total_path"] = path
        if name in TOTAL_PAGES_KEYS and number >= 1 and "total_pages_path" not in found:
            found["total_pages_path"] = path
    for header in TOTAL_HEADERS:
        if lenient_int(page.header(header)) is not None:
            found.setdefault("total_header", header)
    for header in TOTAL_PAGES_HEADERS:
        if lenient_int(page.header(header)) is not None:
            found.setdefault("total_pages_header", header)
    return found


def _next_reference(fields: list[tuple[str, Any]]) -> tuple[str, Any] | None:
    """A body field that points at the next page: a URL, a cursor or a token."""
    candidates = [
        (path, value)
        for path, value in fields
        if not isinstance(value, bool)
        and (
            "next" in _norm(path).replace("_", "")
            or any(word in _norm(path) for word in ("cursor", "continuation", "page_token"))
        )
        and not (isinstance(value, int) and "page" in _norm(path))  # next_page = 2: counting
    ]
    if not candidates:
        return None
    with_value = [item for item in candidates if item[1] not in (None, "")]
    return (with_value or candidates)[0]


def _cursor_param(path: str) -> str:
    """``next_cursor`` -> ``cursor``, ``nextPageToken`` -> ``pageToken``, ``next`` -> ``cursor``."""
    name = path.rsplit(".", 1)[-1]
    for prefix in ("next_", "next-", "next"):
        if name.lower().startswith(prefix) and len(name) > len(prefix):
            rest = name[len(prefix) :]
            return rest[0].lower() + rest[1:]
    return "cursor" if name.lower() == "next" else name


def _primary_key(columns: list[InferredColumn], sampled: int) -> tuple[str | None, str]:
    """An ``id``-like top-level column, never null and unique on the sampled records."""

    def usable(column: InferredColumn) -> bool:
        return (
            "." not in column.path
            and column.type in ("bigint", "text")
            and column.nulls == 0
            and len(column.values) == sampled
            and len(set(column.values)) == sampled
        )

    def rank(column: InferredColumn) -> int:
        name = column.name
        if name in KEY_NAMES:
            return KEY_NAMES.index(name)
        if name.endswith("_id") or name.endswith("_key"):
            return len(KEY_NAMES)
        return -1

    candidates = sorted(
        (c for c in columns if rank(c) >= 0 and usable(c)), key=lambda c: (rank(c), c.name)
    )
    if not candidates:
        return None, (
            "no id-like field unique on the sampled records: rows are appended; set "
            'mode = "merge" and primary_key once you know the key'
        )
    best = candidates[0]
    note = f"unique on the {sampled} sampled records"
    if best.name not in KEY_NAMES:
        note += f"; check that {best.path} identifies a record"
    return best.name, note


# -- writing ------------------------------------------------------------------------------------

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def toml_string(value: str) -> str:
    """A TOML basic string: JSON's escapes are TOML's, plus DEL."""
    return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")


def _key(name: str) -> str:
    return name if _BARE_KEY.match(name) else toml_string(name)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return toml_string(str(value))


def _sample(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    text = " ".join(text.split()).replace("\x7f", "\\u007f")
    return text if len(text) <= 40 else text[:37] + "..."


def _name_from(path: str, fallback: str) -> str:
    segments = [snake_case(s) for s in path.split("/") if s and not s.startswith("{")]
    name = next((s for s in reversed(segments) if s and not s.isdigit()), "") or fallback
    if name[0].isdigit():
        name = f"{fallback}_{name}"
    return name[:63]


def render(guess: Guess, options: InitOptions, url_for_comment: str) -> str:
    """The config text: a header, [source], one [[endpoints]] with its tables."""
    host = urlsplit(guess.base_url).hostname or "api"
    source_name = _name_from(host.replace(".", "/").replace("-", "_"), "source")
    if source_name in ("com", "org", "net", "io"):
        source_name = _name_from(host.rsplit(".", 1)[0].replace(".", "/"), "source")
    endpoint_name = _name_from(guess.path, "records")
    lines = [
        f"# Written by `ingest init {url_for_comment}` from {guess.sampled} records on "
        f"{guess.pages} page(s).",
        "# Every key below is a guess from that sample; `# check:` marks the ones to verify.",
        "# Next: `ingest validate THIS_FILE`, then `ingest run THIS_FILE`.",
        "# Reference: docs/configuration.md",
        "",
        "[source]",
        f"name = {_value(source_name)}",
        f"base_url = {_value(guess.base_url)}",
    ]
    if options.headers:
        lines += ["", "[source.headers]"]
        for name, value in options.headers.items():
            if name.lower() in SENSITIVE_HEADERS and not ENV_REFERENCE.search(value):
                lines.append(
                    "# check: a credential written literally; prefer ${VAR} from the environment"
                )
            lines.append(f"{_key(name)} = {_value(value)}")
    lines += [
        "",
        "[[endpoints]]",
        f"name = {_value(endpoint_name)}",
        f"path = {_value(guess.path)}",
    ]
    if guess.params:
        pairs = ", ".join(f"{_key(k)} = {_value(v)}" for k, v in guess.params.items())
        lines.append(f"params = {{ {pairs} }}")
    lines.append(f"# {guess.records_note}")
    lines.append(f"records_path = {_value(guess.records_path)}")
    lines += ["", "[endpoints.pagination]"]
    lines += [f"# {note}" for note in guess.pagination_notes]
    lines += [f"{_key(k)} = {_value(v)}" for k, v in guess.pagination.items()]
    lines += _incremental(guess)
    lines += ["", "[endpoints.table]", f"name = {_value(endpoint_name)}"]
    if guess.primary_key:
        lines += [
            f"# {guess.key_note}",
            'mode = "merge"',
            f"primary_key = [{_value(guess.primary_key)}]",
        ]
    else:
        lines += [f"# check: {guess.key_note}", 'mode = "append"']
    lines += [
        "",
        "# Typed columns inferred from the sample (docs/configuration.md#inference-rules);",
        "# the raw record is stored too (_ingest_raw), so nothing left out here is lost.",
        "# Without this table ingest infers the columns at run time and adds new fields as",
        '# columns (table.contract = "evolve"); declared columns never change on their own.',
        "[endpoints.table.columns]",
    ]
    for column in guess.columns:
        example = f"e.g. {_sample(column.values[0])}" if column.values else "always null"
        comment = f"# {example}" + (f"; check: {column.note}" if column.note else "")
        lines.append(
            f"{column.name} = {{ path = {_value(column.path)}, type = {_value(column.type)} }}"
            f"  {comment}"
        )
    return "\n".join(lines) + "\n"


def _incremental(guess: Guess) -> list[str]:
    if guess.cursor is None:
        return []
    return [
        "",
        f"# {guess.cursor.path} looks like a last-modified timestamp: if the API can filter on",
        "# it, uncomment to fetch only what changed since the last run (docs/incremental.md).",
        "# [endpoints.incremental]",
        f"# cursor_path = {_value(guess.cursor.path)}",
        '# param = "updated_since"  # check: the query parameter this API filters with',
    ]


async def init_config(
    options: InitOptions, output: Path, redactor: Redactor, *, force: bool = False
) -> Guess:
    """Probe, write ``output`` and check that ingest reads it back."""
    if await asyncio.to_thread(output.exists) and not force:
        raise ConfigError(f"{output}: already exists; pass --force to overwrite it")
    guess = await guess_config(options, redactor)
    text = render(guess, options, redactor.url(options.url))
    parse_config(text, output)  # the file must be one ingest accepts, or nothing is written
    try:
        await asyncio.to_thread(output.write_text, text, encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{output}: cannot write: {exc.strerror}") from None
    return guess
