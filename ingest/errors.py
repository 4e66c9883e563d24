"""Errors users see, each carrying the exit code the CLI returns for it.

Every message is one line that names where the problem is (file, field, endpoint, URL) and,
where it helps, what to do. Tracebacks are only printed with ``--debug``.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Process exit codes; documented in the README and stable across releases.

    What a scheduler does with each: 1 retry later (the API or the database had a bad moment);
    2 page a person (the config, a credential or a database name is wrong: no retry can fix
    it); 3 nothing (another run of the source is working); 4 rerun to resume; 5 look at the
    dead letters; 6 (``ingest status`` checks) alert.
    """

    OK = 0
    FAILED = 1
    CONFIG = 2
    LOCKED = 3
    INTERRUPTED = 4
    DEAD_LETTERS = 5
    #: ``ingest status --fail-on-failed-run`` / ``--max-lag``: a monitoring check failed. Its
    #: own code, so a check can tell "the pipeline is unhealthy" from "the check could not run".
    UNHEALTHY = 6


def one_line(error: BaseException) -> str:
    """An exception's message on one line (whitespace folded), or its type when it has none."""
    return " ".join(str(error).split()) or type(error).__name__


class IngestError(Exception):
    """Base class: a failure explained in one line."""

    exit_code: ExitCode = ExitCode.FAILED


class ConfigError(IngestError):
    """The config file, an environment variable it references, or a CLI flag is wrong."""

    exit_code = ExitCode.CONFIG


class AccessError(IngestError):
    """An API or PostgreSQL refused the credentials (HTTP 401/403, a wrong password), or the
    database or role named does not exist: a person must fix the config or the environment."""

    exit_code = ExitCode.CONFIG


class SourceError(IngestError):
    """The HTTP source misbehaved in a way retries could not fix."""


class SourceAccessError(SourceError, AccessError):
    """The API refused the credentials (a second 401 after a token refresh, a token request
    answered 400/401/403): a source failure that no retry can fix."""


class PaginationError(SourceError):
    """Pagination cannot continue safely (a repeating cursor, contradictory signals)."""


class SinkError(IngestError):
    """Writing to PostgreSQL failed."""


class DeadLetterLimitError(IngestError):
    """More records were dead-lettered than ``--max-dead-letters`` allows."""

    exit_code = ExitCode.DEAD_LETTERS


class LockedError(IngestError):
    """Another run of the same source holds its lock."""

    exit_code = ExitCode.LOCKED


class LockLostError(IngestError):
    """The session holding the source's lock ended (a PostgreSQL restart, say): the run stops
    before committing anything more, since another run may hold the lock now."""


class DatabaseLostError(IngestError):
    """The connection to PostgreSQL was lost or refused in the middle of a run."""


class LeaseLostError(IngestError):
    """A backfill partition's lease expired and another worker took it over."""


class InterruptedRun(IngestError):
    """A signal stopped the run after committing its checkpoint; rerun to resume."""

    exit_code = ExitCode.INTERRUPTED
