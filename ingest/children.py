"""Child endpoints: one walk per row of the parent's table, the path filled from that row.

Why read the parents back from PostgreSQL instead of from the parent's stream: the parent's rows
are committed, so the child has a stable, ordered list to resume in. Its checkpoint is either
"inside parent K, next request R" or "every parent up to K is done", and nothing about the
parent's own walk (its pagination, its retries) leaks into the child's. The pipeline runs a
parent before its children in the same run.

Parents are ordered by the text of their key columns (the parent table's primary key, or the
columns the child uses), which is stable and needs no knowledge of the column types.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncGenerator, Mapping
from typing import Any
from urllib.parse import quote as quote_url

import asyncpg
import structlog

from ingest.config import PATH_PLACEHOLDER, Endpoint
from ingest.errors import SourceError
from ingest.paginate import make_paginator
from ingest.sink import LOADED_AT_COLUMN, quote
from ingest.source import FetchedPage, Fetcher, resume_request, start_request, walk_endpoint
from ingest.state import load_parent_walk
from ingest.typed import PageParser

log = structlog.get_logger("ingest.children")

#: Parent rows read per query (keyset pagination over the parent table).
PARENT_BATCH = 500


class ParentRows:
    """The SQL that lists a child endpoint's parents in key order, in batches."""

    def __init__(self, parent: Endpoint, child: Endpoint) -> None:
        table = parent.table
        self.child, self.parent = child.name, parent.name
        self.table = f"{table.schema_}.{table.name}"
        self.placeholders = tuple(dict.fromkeys(PATH_PLACEHOLDER.findall(child.path)))
        self.keys = table.primary_key or tuple(
            sorted({*self.placeholders, *child.parent_columns().values()})
        )
        self.columns = tuple(
            dict.fromkeys((*self.keys, *child.parent_columns().values(), *self.placeholders))
        )
        key_text = ", ".join(f"{quote(key)}::text" for key in self.keys)
        selected = ", ".join(quote(column) for column in self.columns)
        not_null = " AND ".join(f"{quote(column)} IS NOT NULL" for column in self.placeholders)
        where = f"WHERE {not_null or 'true'}"
        after = ", ".join(f"${index + 1}" for index in range(len(self.keys)))
        base = (
            f"SELECT DISTINCT ON ({key_text}) {selected}, ARRAY[{key_text}] AS _ingest_key "
            f"FROM {quote(table.schema_)}.{quote(table.name)} {where}"
        )
        order = f" ORDER BY {key_text} LIMIT {PARENT_BATCH}"
        # (after a key?, inclusive?, since a time?) -> SQL; the time is the last parameter.
        self._sql: dict[tuple[bool, bool, bool], str] = {}
        for since in (False, True):
            loaded = f" AND {quote(LOADED_AT_COLUMN)} >= $" if since else ""
            first = f"{loaded}1" if since else ""
            later = f"{loaded}{len(self.keys) + 1}" if since else ""
            self._sql[False, False, since] = base + first + order
            self._sql[True, False, since] = base + f" AND ({key_text}) > ({after})" + later + order
            self._sql[True, True, since] = base + f" AND ({key_text}) >= ({after})" + later + order

    async def fetch(
        self,
        pool: asyncpg.Pool,
        key: list[str] | None,
        *,
        inclusive: bool,
        since: dt.datetime | None = None,
    ) -> list[asyncpg.Record]:
        """The next batch of parents after ``key``; only those loaded at/after ``since``."""
        sql = self._sql[key is not None, key is not None and inclusive, since is not None]
        arguments = [*(key or ()), *((since,) if since is not None else ())]
        try:
            async with pool.acquire() as connection:
                return list(await connection.fetch(sql, *arguments))
        except asyncpg.UndefinedTableError:
            raise SourceError(
                f"endpoint {self.child}: the table of its parent {self.parent} "
                f"({self.table}) does not exist yet: run endpoint {self.parent} first"
            ) from None


def fill_path(path: str, row: Mapping[str, Any]) -> str:
    """``/customers/{id}/orders`` with ``{id}`` replaced by the URL-quoted parent value."""
    return PATH_PLACEHOLDER.sub(lambda match: quote_url(str(row[match.group(1)]), safe=""), path)


async def walk_children(
    endpoint: Endpoint,
    parent: Endpoint,
    *,
    pool: asyncpg.Pool,
    fetcher: Fetcher,
    base_url: str,
    params: Mapping[str, str],
    state: dict[str, Any] | None,
    redact_url: Any = str,
    pages_ahead: int = 1,
    credential_params: frozenset[str] = frozenset(),
    typed: PageParser | None = None,
    source: str = "",
    only_changed: bool = False,
    keep_body: bool = False,
) -> AsyncGenerator[FetchedPage, None]:
    """Yield the pages of every parent's child walk; the last page's checkpoint is ``None``.

    ``typed`` is the child endpoint's typed decoder, bound to each parent row in turn.

    ``state`` is the checkpoint to resume from: ``{"parent": key, "request": ..., "paginator":
    ...}`` (inside a parent's walk) or ``{"after": key}`` (parents up to ``key`` are done).
    With ``only_changed`` (``parents = "changed"``, outside backfills) every checkpoint also holds
    the walk's ``started`` time and the ``since`` bound it uses, so a resumed walk visits the same
    set of parents.
    """
    parents = ParentRows(parent, endpoint)
    started, since = (
        await _changed_window(endpoint, pool, source, state) if only_changed else (None, None)
    )
    window = (
        {"started": started.isoformat(), **({"since": since.isoformat()} if since else {})}
        if started is not None
        else {}
    )
    resume_key: list[str] | None = None
    key: list[str] | None = None
    inclusive = False
    if state and "request" in state:
        resume_key = key = list(state["parent"])
        inclusive = True
    elif state and "after" in state:
        key = list(state["after"])
    number = 0
    while True:
        rows = await parents.fetch(pool, key, inclusive=inclusive, since=since)
        if not rows:
            break
        for row in rows:
            key = list(row["_ingest_key"])
            values = {column: row[column] for column in parents.columns}
            paginator = make_paginator(endpoint.pagination)
            resumed = state is not None and resume_key == key
            if resumed:
                assert state is not None
                first = resume_request(state, paginator)
            else:
                base = start_request(base_url, endpoint, fill_path(endpoint.path, values))
                first = paginator.first_request(base.with_params(**params))
            resume_key = None
            pages = walk_endpoint(
                endpoint,
                fetcher,
                paginator,
                first,
                resumed=resumed,
                redact_url=redact_url,
                pages_ahead=pages_ahead,
                credential_params=credential_params,
                parse=typed.for_parent(values) if typed is not None else None,
                keep_body=keep_body,
            )
            try:
                async for page in pages:
                    number += 1
                    checkpoint = (
                        {"parent": key, **page.checkpoint, **window}
                        if page.checkpoint
                        else {"after": key, **window}
                    )
                    yield FetchedPage(
                        number, page.records, checkpoint, parent=values, body=page.body
                    )
            finally:
                await pages.aclose()
        inclusive = False
    yield FetchedPage(number + 1, [], None, walk_started=started)


async def _changed_window(
    endpoint: Endpoint, pool: asyncpg.Pool, source: str, state: dict[str, Any] | None
) -> tuple[dt.datetime | None, dt.datetime | None]:
    """(this walk's start, the lower bound on the parents' load time) for ``parents = "changed"``.

    A fresh walk starts now (the database's clock, the one ``_ingest_loaded_at`` uses) and takes
    parents loaded since the start of the last complete walk; a resumed walk keeps both from its
    checkpoint.
    """
    if state and "started" in state:
        started = dt.datetime.fromisoformat(state["started"])
        since = dt.datetime.fromisoformat(state["since"]) if state.get("since") else None
    else:
        async with pool.acquire() as connection:
            started = await connection.fetchval("SELECT now()")
            since = await load_parent_walk(connection, source, endpoint.name)
    log.info(
        "child_walk_parents",
        endpoint=endpoint.name,
        loaded_since=since.isoformat() if since else "ever",
        resumed=bool(state and "started" in state),
    )
    return started, since
