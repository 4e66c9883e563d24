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

from ingest.config import ENV_REFERENCE, Endpoint, LoadedConfig, parse_config
from ingest.db import describe_dsn
from ingest.errors import ExitCode, IngestError, one_line
from ingest.http.client import HttpClient
from ingest.migrate import pending
from ingest.paginate import make_paginator
from ingest.rows import RowBuilder
from ingest.secrets import Redactor, Secret
from ingest.source import extract_records, start_request
from ingest.typed import typed_pages_for, why_not_typed

#: Per-check time limit: validation should answer in seconds, not wait out a retry policy.
DEFAULT_CHECK_SECONDS = 10.0
#: How many records of each first page are test-converted.
SAMPLE_RECORDS = 100
PLACEHOLDER_URL = "http://unset.invalid"
BASE_URL_FIELD = "source.base_url"
HEADER_FIELD = "source.headers."


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


def check_config(path: str | Path, environ: Mapping[str, str]) -> ConfigCheck:
    """Every missing variable, then the first config error (pydantic stops at the first)."""
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
        field.removeprefix(HEADER_FIELD) for field, _ in missing if field != BASE_URL_FIELD
    )
    url_unknown = any(field == BASE_URL_FIELD for field, _ in missing)
    try:
        loaded: LoadedConfig | None = parse_config(text, file, {**environ, **placeholders})
    except IngestError as exc:
        problems.append(Problem("config", str(exc)))
        loaded = None
    return ConfigCheck(loaded, tuple(problems), unset_headers, url_unknown)


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
    notes: list[str] = []
    checked = 0
    if not config.url_unknown:
        problems += await _check_endpoints(
            config.loaded, config.unset_headers, redactor, check_seconds, notes
        )
        checked = len(config.loaded.source.endpoints)
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

    Only the fields ingest interpolates are scanned (``source.base_url``, ``source.headers.*``),
    so a ``${VAR}`` in a comment or elsewhere is not mistaken for a requirement.
    """
    source = document.get("source")
    if not isinstance(source, dict):
        return []
    fields: list[tuple[str, Any]] = [(BASE_URL_FIELD, source.get("base_url"))]
    headers = source.get("headers")
    if isinstance(headers, dict):
        fields += [(f"{HEADER_FIELD}{name}", value) for name, value in headers.items()]
    return [
        (field, name)
        for field, value in fields
        if isinstance(value, str)
        for name in ENV_REFERENCE.findall(value)
        if not environ.get(name)
    ]


async def _check_endpoints(
    loaded: LoadedConfig,
    unset_headers: frozenset[str],
    redactor: Redactor,
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
    # Secrets of the real config too, even the headers left out of the probe.
    redactor.add(*(value for value in source.headers.values() if isinstance(value, Secret)))
    async with HttpClient(probe, redactor) as http, asyncio.TaskGroup() as group:
        tasks = [
            group.create_task(_check_endpoint(http, probe.base_url, endpoint, redactor, notes))
            for endpoint in source.endpoints
        ]
    return [problem for task in tasks for problem in task.result()]


async def _check_endpoint(
    http: HttpClient, base_url: str, endpoint: Endpoint, redactor: Redactor, notes: list[str]
) -> list[Problem]:
    paginator = make_paginator(endpoint.pagination)
    request = paginator.first_request(start_request(base_url, endpoint))
    url = redactor.url(request.full_url())
    try:
        response = await http.fetch(request, endpoint.name)
        records = extract_records(response.document, endpoint.records_path, endpoint.name, url)
    except (IngestError, aiohttp.ClientError, ValueError) as exc:
        message = one_line(exc)
        if not message.startswith(f"endpoint {endpoint.name}:"):
            message = f"endpoint {endpoint.name}: {url}: {message}"
        return [Problem("endpoint", message)]
    if note := _typed_note(endpoint, response.body):
        notes.append(f"endpoint {endpoint.name}: {url}: {note}")
    sample = records[:SAMPLE_RECORDS]
    _, rejected = RowBuilder(endpoint.table).build_many(sample)
    if not rejected:
        return []
    return [
        Problem(
            "endpoint",
            f"endpoint {endpoint.name}: {url}: {len(rejected)} of the first {len(sample)} "
            f"records would be dead-lettered, e.g. {rejected[0][1]}",
        )
    ]


def _typed_note(endpoint: Endpoint, body: bytes) -> str | None:
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
        typed(body)
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
        return [Problem("database", f"{where}: cannot connect: {message}")]
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
