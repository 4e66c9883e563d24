"""``ingest validate``: is this config ready to run here, now? Checked without writing anything.

Checks, in order, each problem reported as one line:

1. every ``${VAR}`` the config references is set (all of them are listed, not just the first);
2. the config itself validates;
3. one request per endpoint: the first page answers, is JSON, has ``records_path``, and its
   records convert to the declared columns;
4. PostgreSQL answers and ingest's schema is up to date.

Nothing is written: the database is only read, inside a ``READ ONLY`` transaction, and no target
table is created. A header whose variable is missing is left out of the probe requests rather
than sent with a placeholder. Every line passes through the :class:`~ingest.secrets.Redactor`
that knows the config's secrets, so a credential never reaches the terminal.
"""

from __future__ import annotations

import asyncio
import os
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import aiohttp
import asyncpg

from ingest.children import ParentRows, fill_path
from ingest.config import (
    AUTH_SECRET_FIELDS,
    ENV_REFERENCE,
    Endpoint,
    LoadedConfig,
    parse_config,
    read_secret_file,
)
from ingest.db import REFUSED_CONNECTION, describe_dsn
from ingest.errors import ExitCode, IngestError, SourceError, one_line
from ingest.http.client import HttpClient
from ingest.migrate import pending
from ingest.paginate import make_paginator
from ingest.rows import RowBuilder
from ingest.secrets import Redactor, Secret
from ingest.slices import serial_reason
from ingest.source import extract_records, start_request
from ingest.typed import typed_pages_for, why_not_typed

#: Per-check time limit: validation should answer in seconds, not wait out a retry policy.
DEFAULT_CHECK_SECONDS = 10.0
#: How many records of each first page are test-converted.
SAMPLE_RECORDS = 100
PLACEHOLDER_URL = "http://unset.invalid"
BASE_URL_FIELD = "source.base_url"
HEADER_FIELD = "source.headers."
AUTH_FIELD = "auth."
ENDPOINTS_FIELD = "endpoints."


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing that would stop or spoil a run. ``kind`` picks the exit code."""

    kind: Literal["config", "endpoint", "database"]
    message: str

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True, slots=True)
class Validation:
    problems: tuple[Problem, ...]
    endpoints_checked: int
    database_checked: bool
    #: Advice that does not stop a run (printed, exit code unchanged): e.g. a slow decode path.
    notes: tuple[str, ...] = ()

    @property
    def exit_code(self) -> ExitCode:
        if any(problem.kind == "config" for problem in self.problems):
            return ExitCode.CONFIG
        return ExitCode.FAILED if self.problems else ExitCode.OK


@dataclass(frozen=True, slots=True)
class ConfigCheck:
    """The offline half of validation: the config, with placeholders for missing variables."""

    loaded: LoadedConfig | None
    problems: tuple[Problem, ...]
    #: Headers whose variables are unset: left out of probe requests.
    unset_headers: frozenset[str]
    #: ``base_url`` itself references an unset variable: endpoints cannot be probed.
    url_unknown: bool
    #: [auth] fields whose variable is unset or whose secret file cannot be read: a probe
    #: without the credential would only prove the API refuses it, so none is sent.
    unset_auth: tuple[str, ...] = ()
    #: Endpoints with an unset variable in their params: not probed with a placeholder.
    unset_params: frozenset[str] = frozenset()


def check_config(path: str | Path, environ: Mapping[str, str]) -> ConfigCheck:
    """Every missing variable or secret file, then the first config error (pydantic stops at the
    first). Needs none of the secrets: a missing one is a problem, and a placeholder stands in
    for it, so the rest of the config is still checked (and ``ingest status`` can name things).
    """
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        return _config_only(f"{file}: no such config file")
    except (OSError, UnicodeDecodeError) as exc:
        return _config_only(f"{file}: cannot read config: {exc}")
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        return _config_only(f"{file}: not valid TOML: {exc}")
    missing = missing_variables(document, environ)
    problems = [
        Problem(
            "config",
            f"{file}: {field}: environment variable {name} is not set "
            f"(export {name}=... before running)",
        )
        for field, name in missing
    ]
    placeholders = {
        name: PLACEHOLDER_URL if field == BASE_URL_FIELD else "unset" for field, name in missing
    }
    unset_headers = frozenset(
        field.removeprefix(HEADER_FIELD) for field, _ in missing if field.startswith(HEADER_FIELD)
    )
    unset_auth = [field for field, _ in missing if field.startswith(AUTH_FIELD)]
    for field, problem in _unreadable_secret_files(document, environ, file):
        problems.append(Problem("config", problem))
        unset_auth.append(field)
    unset_params = frozenset(
        field.split(".")[1] for field, _ in missing if field.startswith(ENDPOINTS_FIELD)
    )
    url_unknown = any(field == BASE_URL_FIELD for field, _ in missing)
    try:
        # Secret files are read when all are readable: the probes send the real credential.
        offline = any(field.endswith("_file") for field in unset_auth)
        loaded: LoadedConfig | None = parse_config(
            text, file, {**environ, **placeholders}, offline=offline
        )
    except IngestError as exc:
        problems.append(Problem("config", str(exc)))
        loaded = None
    return ConfigCheck(
        loaded,
        tuple(problems),
        unset_headers,
        url_unknown,
        tuple(dict.fromkeys(unset_auth)),
        unset_params,
    )


def _unreadable_secret_files(
    document: Mapping[str, Any], environ: Mapping[str, str], file: Path
) -> list[tuple[str, str]]:
    """(field, problem) for each ``<secret>_file`` of [auth] that cannot be read or is empty."""
    auth = document.get("auth")
    if not isinstance(auth, dict):
        return []
    found: list[tuple[str, str]] = []
    for key, value in auth.items():
        if not (isinstance(value, str) and key.removesuffix("_file") in AUTH_SECRET_FIELDS):
            continue
        if not key.endswith("_file"):
            continue
        if any(not environ.get(name) for name in ENV_REFERENCE.findall(value)):
            continue  # reported as an unset variable
        path = ENV_REFERENCE.sub(lambda match: environ[match.group(1)], value)
        try:
            read_secret_file(path, file, f"{AUTH_FIELD}{key}")
        except IngestError as exc:
            found.append((f"{AUTH_FIELD}{key}", str(exc)))
    return found


async def validate(
    path: str | Path,
    dsn: str | None,
    redactor: Redactor,
    *,
    environ: Mapping[str, str] | None = None,
    check_seconds: float = DEFAULT_CHECK_SECONDS,
) -> Validation:
    """All checks; the result lists every problem found, redacted."""
    config = check_config(path, os.environ if environ is None else environ)
    if config.loaded is None:
        return Validation(_redacted(config.problems, redactor), 0, False)
    problems = list(config.problems)
    notes: list[str] = [
        f"endpoint {endpoint.name}: note: {reason}"
        for endpoint in config.loaded.source.endpoints
        if (reason := serial_reason(endpoint)) is not None
    ]
    checked = 0
    if config.unset_auth:
        notes.append(
            "note: no endpoint was requested: the [auth] credentials are not available here "
            f"({', '.join(config.unset_auth)})"
        )
    elif not config.url_unknown:
        endpoints = await _checked_endpoints(config, dsn, check_seconds, notes)
        problems += await _check_endpoints(
            config.loaded,
            endpoints,
            config.unset_headers,
            redactor,
            seconds=check_seconds,
            notes=notes,
        )
        checked = len(endpoints)
    problems += await _check_database(dsn, redactor, check_seconds)
    return Validation(
        _redacted(problems, redactor), checked, True, tuple(redactor(note) for note in notes)
    )


def _redacted(problems: Sequence[Problem], redactor: Redactor) -> tuple[Problem, ...]:
    return tuple(Problem(problem.kind, redactor(problem.message)) for problem in problems)


def _config_only(message: str) -> ConfigCheck:
    return ConfigCheck(None, (Problem("config", message),), frozenset(), True)


def missing_variables(
    document: Mapping[str, Any], environ: Mapping[str, str]
) -> list[tuple[str, str]]:
    """(field, variable) for every ``${VAR}`` reference that is unset or empty.

    Only the fields ingest interpolates are scanned (``source.base_url``, ``source.headers.*``,
    ``endpoints.<name>.params.*``, ``auth.*``), so a ``${VAR}`` in a comment is not mistaken for
    a requirement (one in any other field is a config error of its own).
    """
    source = document.get("source")
    if not isinstance(source, dict):
        return []
    fields: list[tuple[str, Any]] = [(BASE_URL_FIELD, source.get("base_url"))]
    headers = source.get("headers")
    if isinstance(headers, dict):
        fields += [(f"{HEADER_FIELD}{name}", value) for name, value in headers.items()]
    endpoints = document.get("endpoints")
    for index, endpoint in enumerate(endpoints if isinstance(endpoints, list) else []):
        params = endpoint.get("params") if isinstance(endpoint, dict) else None
        if isinstance(params, dict):
            name = endpoint.get("name")
            where = f"{ENDPOINTS_FIELD}{name if isinstance(name, str) else f'[{index}]'}"
            fields += [(f"{where}.params.{key}", value) for key, value in params.items()]
    auth = document.get("auth")
    if isinstance(auth, dict):
        fields += [(f"{AUTH_FIELD}{key}", value) for key, value in auth.items()]
    return [
        (field, name)
        for field, value in fields
        if isinstance(value, str)
        for name in ENV_REFERENCE.findall(value)
        if not environ.get(name)
    ]


@dataclass(frozen=True, slots=True)
class Probe:
    """One endpoint's first request: a child's path filled from ``parent``, one of its rows."""

    endpoint: Endpoint
    path: str | None = None
    parent: Mapping[str, Any] | None = None


async def _checked_endpoints(
    config: ConfigCheck, dsn: str | None, seconds: float, notes: list[str]
) -> list[Probe]:
    """The endpoints to request, each with its path: a child's filled from one parent row.

    A child endpoint's path (``/repos/{id}/issues``) is a template; requesting it as written
    only tells that the API has no repo called ``{id}``. Its probe uses the first row of the
    parent's table, and is skipped with a note while that table is empty or absent.
    """
    assert config.loaded is not None
    source = config.loaded.source
    chosen: list[Probe] = []
    for endpoint in source.endpoints:
        if endpoint.name in config.unset_params:
            notes.append(
                f"note: endpoint {endpoint.name}: not requested: a variable in its params is unset"
            )
        elif endpoint.parent is None:
            chosen.append(Probe(endpoint))
        else:
            parent = source.endpoint(endpoint.parent)
            row, why = await _first_parent_row(dsn, parent, endpoint, seconds)
            if row is None:
                notes.append(
                    f"note: endpoint {endpoint.name}: not requested: {why}; its path "
                    f"{endpoint.path} needs a row of {parent.name}'s table "
                    f"({parent.table.schema_}.{parent.table.name})"
                )
            else:
                chosen.append(Probe(endpoint, fill_path(endpoint.path, row), row))
    return chosen


async def _first_parent_row(
    dsn: str | None, parent: Endpoint, child: Endpoint, seconds: float
) -> tuple[Mapping[str, Any] | None, str]:
    """The first parent row a run would walk, read only; else None and why not."""
    rows = ParentRows(parent, child)
    try:
        pool = await asyncpg.create_pool(dsn, min_size=1, max_size=1, timeout=seconds)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
        return None, "the database is not reachable"
    try:
        async with asyncio.timeout(seconds):
            found = await rows.fetch(pool, None, inclusive=False)
    except SourceError:
        return None, "the parent's table does not exist yet"
    except (TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        return None, f"its parent rows cannot be read ({one_line(exc)})"
    finally:
        await pool.close()
    if not found:
        return None, "the parent's table has no rows yet"
    return {column: found[0][column] for column in rows.columns}, ""


async def _check_endpoints(
    loaded: LoadedConfig,
    endpoints: Sequence[Probe],
    unset_headers: frozenset[str],
    redactor: Redactor,
    *,
    seconds: float,
    notes: list[str],
) -> list[Problem]:
    source = loaded.source
    probe = source.model_copy(
        update={
            "headers": {
                name: value for name, value in source.headers.items() if name not in unset_headers
            },
            "http": source.http.model_copy(
                update={
                    "max_attempts": 1,
                    "total_timeout": min(source.http.total_timeout, seconds),
                    "connect_timeout": min(source.http.connect_timeout, seconds),
                    "read_timeout": min(source.http.read_timeout, seconds),
                }
            ),
        }
    )
    # Secrets of the real config too, even the headers left out of the probe (but not their
    # placeholders: those would scrub the word "unset" out of every line).
    redactor.add(
        *(
            value
            for name, value in source.headers.items()
            if isinstance(value, Secret) and name not in unset_headers
        )
    )
    async with HttpClient(probe, redactor) as http, asyncio.TaskGroup() as group:
        tasks = [
            group.create_task(
                _check_endpoint(http, probe.base_url, endpoint, redactor=redactor, notes=notes)
            )
            for endpoint in endpoints
        ]
    return [problem for task in tasks for problem in task.result()]


async def _check_endpoint(
    http: HttpClient,
    base_url: str,
    probe: Probe,
    *,
    redactor: Redactor,
    notes: list[str],
) -> list[Problem]:
    endpoint = probe.endpoint
    paginator = make_paginator(endpoint.pagination)
    request = paginator.first_request(start_request(base_url, endpoint, probe.path))
    url = redactor.url(request.full_url())
    try:
        response = await http.fetch(request, endpoint.name)
        records = extract_records(response.document, endpoint.records_path, endpoint.name, url)
    except (IngestError, aiohttp.ClientError, ValueError) as exc:
        message = one_line(exc)
        if not message.startswith(f"endpoint {endpoint.name}:"):
            message = f"endpoint {endpoint.name}: {url}: {message}"
        # Refused credentials (HTTP 401/403) are the config's to fix, as in `ingest run`.
        refused = isinstance(exc, IngestError) and exc.exit_code == ExitCode.CONFIG
        return [Problem("config" if refused else "endpoint", message)]
    if note := _typed_note(endpoint, response.body, probe.parent):
        notes.append(f"endpoint {endpoint.name}: {url}: {note}")
    sample = records[:SAMPLE_RECORDS]
    _, rejected = RowBuilder(endpoint.table).build_many(sample, probe.parent)
    if not rejected:
        return []
    return [
        Problem(
            "endpoint",
            f"endpoint {endpoint.name}: {url}: {len(rejected)} of the first {len(sample)} "
            f"records would be dead-lettered, e.g. {rejected[0][1]}",
        )
    ]


def _typed_note(endpoint: Endpoint, body: bytes, parent: Any = None) -> str | None:
    """Why this endpoint's pages would miss typed decoding (about half the CPU), if they would."""
    if endpoint.table.load != "python":
        return None
    typed = typed_pages_for(endpoint)
    if typed is None:
        return (
            f"note: pages will use the slower Python row path ({why_not_typed(endpoint)}); "
            "see README, typed decoding"
        )
    if not body:
        return None
    try:
        typed(body, parent)
    except ValueError:  # malformed: reported by the fetch already
        return None
    if typed.fallback_pages == 0:
        return None
    return (
        f"note: the first page takes the slower Python row path ({typed.last_reason}); "
        "see README, typed decoding"
    )


async def _check_database(dsn: str | None, redactor: Redactor, seconds: float) -> list[Problem]:
    where = f"database {describe_dsn(dsn)}"
    if dsn:
        password = urlsplit(dsn).password
        if password:
            redactor.add(password)
    try:
        connection = await asyncpg.connect(dsn, timeout=seconds)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        message = one_line(exc)
        # A database or role that does not exist, a wrong password: a person must fix them.
        kind: Literal["config", "database"] = (
            "config" if isinstance(exc, REFUSED_CONNECTION) else "database"
        )
        return [Problem(kind, f"{where}: cannot connect: {message}")]
    try:
        async with connection.transaction(readonly=True):
            await connection.fetchval("SELECT 1")
            missing = await pending(connection)
    except (asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        return [Problem("database", f"{where}: {' '.join(str(exc).split())}")]
    finally:
        await connection.close()
    if missing:
        return [
            Problem(
                "database",
                f"{where}: ingest's schema is not up to date (pending: {', '.join(missing)}): "
                "run `ingest migrate`",
            )
        ]
    return []
