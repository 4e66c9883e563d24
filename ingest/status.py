"""``ingest status``: what every source and endpoint last did, and where it stands now.

Read-only by construction: every query runs in a ``READ ONLY`` transaction, and a run that is
in progress is recognised by the advisory lock its process holds (looked up in ``pg_locks``,
never taken), so asking for status can neither block nor disturb a run. A run row still marked
``running`` whose lock nobody holds belongs to a process that died without recording its end;
it is shown as ``abandoned``.

The reads live here rather than in :mod:`ingest.state` because they are reporting queries over
several tables; nothing here writes.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import orjson

from ingest.config import LoadedConfig
from ingest.db import Connection
from ingest.errors import ConfigError
from ingest.secrets import REDACTED, SENSITIVE_PARAMS
from ingest.state import lock_key
from ingest.validate import check_config

#: Partition states counted in the table, in display order.
PARTITION_STATES = ("done", "pending", "leased", "failed")


@dataclass(frozen=True, slots=True)
class LastRun:
    """The most recent run that touched an endpoint."""

    run_id: str
    command: str
    result: str  # running | succeeded | failed | interrupted | abandoned
    host: str
    started_at: dt.datetime
    finished_at: dt.datetime | None
    seconds: float
    records: int | None
    pages: int | None
    retries: int | None
    dead_letters: int | None
    error: str | None


@dataclass(frozen=True, slots=True)
class CheckpointStatus:
    """The committed position of an endpoint's walk."""

    done: bool
    records: int
    pages: int
    position: str  # "done", the next request's query ("page=5"), or an incremental cursor
    cursor_time: dt.datetime | None
    lag_seconds: float | None
    updated_at: dt.datetime
    run_id: str | None


@dataclass(frozen=True, slots=True)
class EndpointStatus:
    endpoint: str
    last_run: LastRun | None
    checkpoint: CheckpointStatus | None
    dead_letters: int
    partitions: dict[str, int] = field(default_factory=dict)
    #: A child endpoint with ``parents = "changed"``: its next walk visits only the parent rows
    #: loaded at or after this moment (when its last complete walk started). None before the
    #: first complete walk, and for every other endpoint.
    parents_changed_since: dt.datetime | None = None


@dataclass(frozen=True, slots=True)
class SourceStatus:
    source: str
    endpoints: tuple[EndpointStatus, ...]
    last_success: dt.datetime | None


@dataclass(frozen=True, slots=True)
class StatusReport:
    generated_at: dt.datetime
    sources: tuple[SourceStatus, ...]

    def to_json(self) -> str:
        """Machine-readable form (``ingest status --json``); times are ISO 8601 UTC."""
        return orjson.dumps(asdict(self), option=orjson.OPT_INDENT_2 | orjson.OPT_UTC_Z).decode()


def load_for_status(path: str | Path, environ: Mapping[str, str] | None = None) -> LoadedConfig:
    """A config for naming its source and endpoints; its ``${VAR}`` secrets need not be set.

    An operator asking for status often lacks the job's credentials; they are not needed here.
    """
    check = check_config(path, os.environ if environ is None else environ)
    if check.loaded is None:
        raise ConfigError(str(check.problems[-1]))
    return check.loaded


async def collect_status(
    connection: Connection, loaded: LoadedConfig | None = None
) -> StatusReport:
    """Status of the configured source, or of every source the database knows about."""
    async with connection.transaction(readonly=True):
        if not await connection.fetchval("SELECT to_regclass('ingest.runs') IS NOT NULL"):
            raise ConfigError("ingest's schema is not in this database: run `ingest migrate` first")
        now: dt.datetime = await connection.fetchval("SELECT now()")
        if loaded is not None:
            wanted = {loaded.source.name: [endpoint.name for endpoint in loaded.source.endpoints]}
        else:
            wanted = await _known_endpoints(connection)
        sources = [
            await _source_status(connection, name, endpoints, now)
            for name, endpoints in sorted(wanted.items())
        ]
    return StatusReport(now, tuple(sources))


async def _known_endpoints(connection: Connection) -> dict[str, list[str]]:
    """Every (source, endpoint) seen in runs, checkpoints or dead letters."""
    rows = await connection.fetch(
        "SELECT source, endpoint FROM ingest.checkpoints "
        "UNION SELECT source, jsonb_object_keys(endpoints) FROM ingest.runs "
        "UNION SELECT DISTINCT source, endpoint FROM ingest.dead_letters "
        "UNION SELECT source, NULL FROM ingest.runs"
    )
    known: dict[str, list[str]] = {}
    for row in rows:
        names = known.setdefault(row["source"], [])
        if row["endpoint"] is not None and row["endpoint"] not in names:
            names.append(row["endpoint"])
    for names in known.values():
        names.sort()
    return known


async def _source_status(
    connection: Connection, source: str, endpoints: Sequence[str], now: dt.datetime
) -> SourceStatus:
    running = await _lock_held(connection, source)
    runs = await _last_runs(connection, source, endpoints, now, running)
    checkpoints = await _checkpoints(connection, source, now)
    dead = {
        row["endpoint"]: row["count"]
        for row in await connection.fetch(
            "SELECT endpoint, count(*) AS count FROM ingest.dead_letters "
            "WHERE source = $1 GROUP BY endpoint",
            source,
        )
    }
    partitions = await partition_counts(connection, source)
    walks = await parent_walks(connection, source)
    last_success = await connection.fetchval(
        "SELECT max(finished_at) FROM ingest.runs WHERE source = $1 AND status = 'succeeded'",
        source,
    )
    return SourceStatus(
        source=source,
        endpoints=tuple(
            EndpointStatus(
                endpoint=name,
                last_run=runs.get(name),
                checkpoint=checkpoints.get(name),
                dead_letters=dead.get(name, 0),
                partitions=partitions.get(name, {}),
                parents_changed_since=walks.get(name),
            )
            for name in endpoints
        ),
        last_success=last_success,
    )


async def _lock_held(connection: Connection, source: str) -> bool:
    """Whether some session holds the source's run lock (see :func:`ingest.state.try_lock_source`).

    A bigint advisory lock appears in ``pg_locks`` split into ``classid`` (high 32 bits) and
    ``objid`` (low 32 bits) with ``objsubid = 1``.
    """
    held: bool = await connection.fetchval(
        "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted "
        "AND objsubid = 1 AND database = (SELECT oid FROM pg_database "
        "WHERE datname = current_database()) "
        "AND ((classid::bigint << 32) | objid::bigint) = hashtextextended($1, 0))",
        lock_key(source),
    )
    return held


async def _last_runs(
    connection: Connection,
    source: str,
    endpoints: Sequence[str],
    now: dt.datetime,
    running: bool,
) -> dict[str, LastRun]:
    """Per endpoint, the newest run whose stats name it, or that ran the whole source.

    A run in progress (or one that failed before any endpoint started) has no per-endpoint stats
    yet: it counts for the endpoints it was limited to (``--endpoint``, recorded at its start
    with empty stats), or for every endpoint of the source.
    """
    rows = await connection.fetch(
        "SELECT DISTINCT ON (e.name) e.name, r.run_id, r.command, r.host, r.started_at, "
        "r.finished_at, r.status, r.endpoints -> e.name AS stats, r.error "
        "FROM unnest($2::text[]) AS e(name) "
        "JOIN ingest.runs r ON r.source = $1 "
        "AND (r.endpoints ? e.name OR r.endpoints = '{}'::jsonb) "
        "ORDER BY e.name, r.started_at DESC",
        source,
        list(endpoints),
    )
    runs: dict[str, LastRun] = {}
    for row in rows:
        stats: dict[str, Any] = orjson.loads(row["stats"]) if row["stats"] else {}
        result = row["status"]
        if result == "running" and not running:
            result = "abandoned"
        finished = row["finished_at"]
        runs[row["name"]] = LastRun(
            run_id=str(row["run_id"]),
            command=row["command"],
            result=result,
            host=row["host"],
            started_at=row["started_at"],
            finished_at=finished,
            seconds=round(((finished or now) - row["started_at"]).total_seconds(), 3),
            records=stats.get("records"),
            pages=stats.get("pages"),
            retries=stats.get("retries"),
            dead_letters=stats.get("dead_letters"),
            error=row["error"],
        )
    return runs


async def _checkpoints(
    connection: Connection, source: str, now: dt.datetime
) -> dict[str, CheckpointStatus]:
    """The main (unpartitioned) checkpoint of each endpoint.

    Rows are read whole (``to_jsonb``) so columns added by later migrations reach
    :func:`cursor_of` without this query changing.
    """
    rows = await connection.fetch(
        "SELECT to_jsonb(c) || jsonb_build_object('cursor', coalesce(k.value, c.cursor_max)) "
        "AS row, c.updated_at FROM ingest.checkpoints c "
        "LEFT JOIN ingest.cursors k ON k.source = c.source AND k.endpoint = c.endpoint "
        "WHERE c.source = $1 AND c.partition = ''",
        source,
    )
    checkpoints: dict[str, CheckpointStatus] = {}
    for row in rows:
        data: dict[str, Any] = orjson.loads(row["row"])
        position, moment = cursor_of(data)
        checkpoints[data["endpoint"]] = CheckpointStatus(
            done=bool(data.get("done")),
            records=int(data.get("records") or 0),
            pages=int(data.get("pages") or 0),
            position=position,
            cursor_time=moment,
            lag_seconds=round((now - moment).total_seconds(), 3) if moment else None,
            updated_at=row["updated_at"],
            run_id=data.get("run_id"),
        )
    return checkpoints


def cursor_of(row: Mapping[str, Any]) -> tuple[str, dt.datetime | None]:
    """A checkpoint row's position as text, and as a time when it is one (for the lag).

    An incremental cursor wins when there is one (the committed high-water mark from
    ``ingest.cursors``, else the walk's ``cursor_max`` so far); otherwise the position is the
    next page request's query, or ``done``. Sensitive query values are hidden.
    """
    state = row.get("state") if isinstance(row.get("state"), dict) else {}
    assert isinstance(state, dict)
    for value in (row.get("cursor"), row.get("cursor_value"), state.get("cursor")):
        if value is None or value == "":
            continue
        text = orjson.dumps(value).decode() if isinstance(value, dict | list) else str(value)
        return text, _as_time(value)
    if row.get("done"):
        return "done", None
    request = state.get("request")
    if isinstance(request, dict):
        params = {str(name): str(value) for name, value in request.get("params", [])}
        if not params:
            params = dict(parse_qsl(urlsplit(str(request.get("url", ""))).query))
        shown = [
            f"{name}={REDACTED if name.lower() in SENSITIVE_PARAMS else value}"
            for name, value in params.items()
        ]
        if shown:
            return "&".join(shown), None
        return str(request.get("url", "?")).rsplit("/", 1)[-1] or "?", None
    if "after" in state or "from" in state:  # a child walk (ingest.children)
        after = state.get("after")
        done = "parents done through " + ",".join(map(str, after)) if after else "no parent done"
        return f"{done}; {len(state.get('open', ()))} open", None
    return "start", None


def _as_time(value: Any) -> dt.datetime | None:
    if isinstance(value, dt.datetime):
        return value if value.tzinfo else value.replace(tzinfo=dt.UTC)
    if not isinstance(value, str) or len(value) < 10:
        return None
    try:
        moment = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)


async def partition_counts(connection: Connection, source: str) -> dict[str, dict[str, int]]:
    """Backfill partitions per endpoint: done, pending, leased (a live lease), failed.

    A running partition whose lease has expired counts as pending: any worker may claim it.
    Before migration 0002 there is no partitions table and every endpoint shows none.
    """
    if not await connection.fetchval("SELECT to_regclass('ingest.partitions') IS NOT NULL"):
        return {}
    rows = await connection.fetch(
        "SELECT endpoint, CASE WHEN status <> 'running' THEN status "
        "WHEN lease_expires_at > now() THEN 'leased' ELSE 'pending' END AS state, "
        "count(*) AS count FROM ingest.partitions WHERE source = $1 GROUP BY 1, 2",
        source,
    )
    counts: dict[str, dict[str, int]] = {}
    for row in rows:
        counts.setdefault(row["endpoint"], {})[row["state"]] = row["count"]
    return counts


async def parent_walks(connection: Connection, source: str) -> dict[str, dt.datetime]:
    """Per child endpoint with ``parents = "changed"``: the start of its last complete walk.

    Before migration 0003 there is no such table and no endpoint has a bound.
    """
    if not await connection.fetchval("SELECT to_regclass('ingest.parent_walks') IS NOT NULL"):
        return {}
    rows = await connection.fetch(
        "SELECT endpoint, started_at FROM ingest.parent_walks WHERE source = $1", source
    )
    return {row["endpoint"]: row["started_at"] for row in rows}


# --- rendering -------------------------------------------------------------------------------

HEADER = (
    "endpoint",
    "last run",
    "result",
    "records",
    "duration",
    "checkpoint",
    "lag",
    "partitions d/p/l/f",
    "dead",
)


def render_status(report: StatusReport) -> str:
    """One table per source; below it a line per ``parents = "changed"`` bound and per error."""
    if not report.sources:
        return "no runs recorded yet"
    blocks: list[str] = []
    for source in report.sources:
        success = _when(source.last_success) if source.last_success else "never"
        lines = [f"source {source.source}  (last success: {success})"]
        rows = [_row(endpoint, report.generated_at) for endpoint in source.endpoints]
        lines += _table([HEADER, *rows]) if rows else ["  (no endpoints recorded)"]
        errors = {
            endpoint.last_run.error
            for endpoint in source.endpoints
            if endpoint.last_run is not None and endpoint.last_run.error
        }
        lines += [
            f"  {endpoint.endpoint}: next walk visits parents loaded since "
            f"{_when(endpoint.parents_changed_since)}"
            for endpoint in source.endpoints
            if endpoint.parents_changed_since is not None
        ]
        lines += [f"  error: {error}" for error in sorted(errors)]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _row(endpoint: EndpointStatus, now: dt.datetime) -> tuple[str, ...]:
    run = endpoint.last_run
    checkpoint = endpoint.checkpoint
    records = "-"
    if run is not None and run.records is not None:
        records = f"{run.records:,}"
    elif run is not None and run.result == "running" and checkpoint is not None:
        records = f"{checkpoint.records:,} so far"
    partitions = "-"
    if endpoint.partitions:
        partitions = "/".join(str(endpoint.partitions.get(state, 0)) for state in PARTITION_STATES)
    return (
        endpoint.endpoint,
        f"{_when(run.started_at)} ({_duration((now - run.started_at).total_seconds())} ago)"
        if run
        else "never",
        run.result if run else "-",
        records,
        _duration(run.seconds) if run else "-",
        _shorten(checkpoint.position) if checkpoint else "-",
        _duration(checkpoint.lag_seconds)
        if checkpoint and checkpoint.lag_seconds is not None
        else "-",
        partitions,
        str(endpoint.dead_letters),
    )


def _table(rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(row[index]) for row in rows) for index in range(len(rows[0]))]
    return [
        "  "
        + "  ".join(
            cell.ljust(widths[index]) if index in (0, 1, 2, 5) else cell.rjust(widths[index])
            for index, cell in enumerate(row)
        ).rstrip()
        for row in rows
    ]


def _when(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _duration(seconds: float) -> str:
    """Compact, human: 0.4s, 12s, 3m05s, 2h10m, 3d04h."""
    if seconds < 0:
        return "-" + _duration(-seconds)
    if seconds < 10:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"


def _shorten(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """``90s``, ``30m``, ``2h``, ``1d`` (or plain seconds) as seconds; a ConfigError otherwise."""
    value = text.strip().lower()
    unit = _DURATION_UNITS.get(value[-1:], 0)
    number = value[:-1] if unit else value
    try:
        seconds = float(number) * (unit or 1)
    except ValueError:
        seconds = -1.0
    if not seconds > 0 or seconds == float("inf"):
        raise ConfigError(f"--max-lag: {text!r} is not a duration such as 90s, 30m, 2h or 1d")
    return seconds


def health_problems(
    report: StatusReport, *, fail_on_failed_run: bool, max_lag_seconds: float | None
) -> list[str]:
    """What makes a monitoring check fail, one line each (empty: healthy).

    ``fail_on_failed_run``: an endpoint whose last run failed or was abandoned (its process
    died). ``max_lag_seconds``: an endpoint further behind than this: its incremental cursor's
    lag where it has a time cursor, else the age of the source's last successful run (a source
    that never succeeded is behind by definition).
    """
    problems: list[str] = []
    now = report.generated_at
    for source in report.sources:
        for endpoint in source.endpoints:
            where = f"{source.source}.{endpoint.endpoint}"
            run = endpoint.last_run
            if fail_on_failed_run and run is not None and run.result in {"failed", "abandoned"}:
                detail = f": {run.error}" if run.error else ""
                problems.append(f"{where}: last run {run.run_id} {run.result}{detail}")
            if max_lag_seconds is None:
                continue
            checkpoint = endpoint.checkpoint
            if checkpoint is not None and checkpoint.lag_seconds is not None:
                lag, what = checkpoint.lag_seconds, "cursor is {} behind"
            elif source.last_success is not None:
                lag, what = (now - source.last_success).total_seconds(), "last success {} ago"
            else:
                problems.append(f"{where}: no successful run yet")
                continue
            if lag > max_lag_seconds:
                problems.append(
                    f"{where}: {what.format(_duration(lag))}, more than --max-lag "
                    f"{_duration(max_lag_seconds)}"
                )
    return problems
