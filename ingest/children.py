"""Child endpoints: one walk per row of the parent's table, the path filled from that row.

Why read the parents back from PostgreSQL instead of from the parent's stream: the parent's rows
are committed, so the child has a stable, ordered list to resume in. Several parents are walked
at once; the checkpoint after each page says "every parent up to K is done; after K these are
done and these are open at request R", and nothing about the parent's own walk (its pagination,
its retries) leaks into the child's. The pipeline runs a parent before its children in the same
run.

Why one stream of pages with whole-walk checkpoints rather than one checkpoint per parent: the
pipeline already commits an endpoint's batches strictly in order, each with the checkpoint of
its last page, so a snapshot taken as each page is handed on covers exactly the pages before
it, whatever order the parents finish in. No new table, and a kill at any point resumes from
one row.

Parents are ordered by the text of their key columns (the parent table's primary key, or the
columns the child uses), which is stable and needs no knowledge of the column types.
"""

from __future__ import annotations

import asyncio
import dataclasses
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


#: Parents started but not yet past the frontier (every parent before it done), per walker
#: slot: bounds the checkpoint (it names each of them) when one parent's walk is long.
WINDOW_PER_SLOT = 4


class _Progress:
    """Which parents are done, in flight or not started: the snapshot every checkpoint holds.

    Parents are started in key order. The *frontier* is the last key before which every parent
    is done; after it, ``started`` lists the parents begun since, in key order, each done or
    not, and ``open`` the next request of each unfinished walk that yielded a page. A resumed
    walk skips the done ones, resumes the open ones and starts the rest afresh, so any order of
    completion commits each parent's pages exactly once.
    """

    def __init__(self, frontier: list[str] | None, *, inclusive: bool = False) -> None:
        self.frontier = frontier
        #: The frontier is the first parent not known to be done (a serial walk's checkpoint
        #: inside that parent), not the last one done.
        self.inclusive = inclusive
        self.started: dict[tuple[str, ...], bool] = {}
        self.open: dict[tuple[str, ...], dict[str, Any]] = {}

    def start(self, key: tuple[str, ...], *, done: bool = False) -> None:
        self.started[key] = done
        self._advance()

    def page(self, key: tuple[str, ...], checkpoint: dict[str, Any] | None) -> None:
        """A page of ``key``'s walk was handed on; ``checkpoint`` None: its walk is over."""
        if checkpoint is None:
            self.open.pop(key, None)
            self.started[key] = True
            self._advance()
        else:
            self.open[key] = checkpoint

    def _advance(self) -> None:
        for key, done in list(self.started.items()):
            if not done:
                break
            del self.started[key]
            self.frontier, self.inclusive = list(key), False

    @property
    def pending(self) -> int:
        """Parents started since the frontier (done or not)."""
        return len(self.started)

    def snapshot(self, window: Mapping[str, str]) -> dict[str, Any]:
        done = [list(key) for key, finished in self.started.items() if finished]
        walks = [[list(key), state] for key, state in self.open.items()]
        return {
            ("from" if self.inclusive else "after"): self.frontier,
            **({"done": done} if done else {}),
            **({"open": walks} if walks else {}),
            **window,
        }


def _resume_point(
    state: dict[str, Any] | None,
) -> tuple[list[str] | None, bool, set[tuple[str, ...]], dict[tuple[str, ...], dict[str, Any]]]:
    """(scan from key, inclusive?, parents done, open walks) of a checkpoint, old forms too."""
    if not state:
        return None, False, set(), {}
    if "request" in state:  # one parent's walk in progress (a serial walk's checkpoint)
        key = list(state["parent"])
        walk: dict[str, Any] = {
            name: state[name] for name in ("request", "paginator") if name in state
        }
        return key, True, set(), {tuple(key): walk}
    inclusive = state.get("from") is not None
    bound = state.get("from") if inclusive else state.get("after")
    after = list(bound) if bound is not None else None
    done = {tuple(key) for key in state.get("done", ())}
    walks = {tuple(key): walk for key, walk in state.get("open", ())}
    return after, inclusive, done, walks


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
    parallel: int = 1,
) -> AsyncGenerator[FetchedPage, None]:
    """Yield the pages of every parent's child walk; the last page's checkpoint is ``None``.

    ``typed`` is the child endpoint's typed decoder, bound to each parent row in turn.

    Up to ``parallel`` parents are walked at once (their requests all go through ``fetcher``,
    the source's one client with its concurrency and rate limits); their pages are yielded as
    they arrive, each with a checkpoint of the whole walk (:class:`_Progress`): ``{"after":
    key, "done": [...], "open": [[key, {"request": ..., "paginator": ...}], ...]}``. Memory:
    ``parallel`` walks, a queue of ``2 * parallel`` pages, ``WINDOW_PER_SLOT * parallel``
    parents in the checkpoint at most.

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
    key, inclusive, done, walks = _resume_point(state)
    progress = _Progress(key, inclusive=inclusive)
    parallel = max(1, parallel)
    queue: asyncio.Queue[tuple[tuple[str, ...], FetchedPage] | BaseException] = asyncio.Queue(
        maxsize=2 * parallel
    )
    tasks: set[asyncio.Task[None]] = set()

    async def walk_one(
        row_key: tuple[str, ...], values: dict[str, Any], resumed: dict[str, Any] | None
    ) -> None:
        paginator = make_paginator(endpoint.pagination)
        if resumed is not None:
            first = resume_request(resumed, paginator)
        else:
            base = start_request(base_url, endpoint, fill_path(endpoint.path, values))
            first = paginator.first_request(base.with_params(**params))
        pages = walk_endpoint(
            endpoint,
            fetcher,
            paginator,
            first,
            resumed=resumed is not None,
            redact_url=redact_url,
            pages_ahead=pages_ahead,
            credential_params=credential_params,
            parse=typed.for_parent(values) if typed is not None else None,
            keep_body=keep_body,
        )
        try:
            async for page in pages:
                await queue.put((row_key, dataclasses.replace(page, parent=values)))
        except Exception as exc:  # handed to the generator, which raises it
            await queue.put(exc)
        finally:
            await pages.aclose()

    rows: list[asyncpg.Record] = []
    exhausted = False
    running = 0
    number = 0
    held: FetchedPage | None = None
    try:
        while True:
            while (
                not exhausted
                and running < parallel
                and progress.pending < (WINDOW_PER_SLOT * parallel)
            ):
                if not rows:
                    rows = await parents.fetch(pool, key, inclusive=inclusive, since=since)
                    inclusive = False
                    if not rows:
                        exhausted = True
                        break
                    rows.reverse()
                row = rows.pop()
                key = list(row["_ingest_key"])
                row_key = tuple(key)
                if row_key in done:
                    progress.start(row_key, done=True)
                    continue
                progress.start(row_key)
                resumed = walks.pop(row_key, None)
                if resumed is not None:
                    # Open from the start: until its next page comes, every checkpoint must
                    # still resume it where it stood, not start it over.
                    progress.page(row_key, resumed)
                values = {column: row[column] for column in parents.columns}
                running += 1
                task = asyncio.create_task(
                    walk_one(row_key, values, resumed), name=f"child:{endpoint.name}"
                )
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if running == 0:
                break
            item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            row_key, page = item
            progress.page(row_key, page.checkpoint)
            if page.checkpoint is None:
                running -= 1
            number += 1
            if held is not None:
                yield held
            held = FetchedPage(
                number, page.records, progress.snapshot(window), parent=page.parent, body=page.body
            )
    finally:
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
    # The last page ends the walk (a walk over no parent at all: one empty page).
    last = held or FetchedPage(0, [], None)
    yield dataclasses.replace(last, checkpoint=None, walk_started=started)


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
