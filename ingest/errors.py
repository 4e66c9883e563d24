"""Errors users see, each carrying the exit code the CLI returns for it.

Every message is one line that names where the problem is (file, field, endpoint, URL) and,
where it helps, what to do. Tracebacks are only printed with ``--debug``.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Process exit codes; documented in the README and stable across releases."""

    OK = 0
    FAILED = 1
    CONFIG = 2
    LOCKED = 3
    INTERRUPTED = 4
    DEAD_LETTERS = 5


def one_line(error: BaseException) -> str:
    """An exception's message on one line (whitespace folded), or its type when it has none."""
    return " ".join(str(error).split()) or type(error).__name__


class IngestError(Exception):
    """Base class: a failure explained in one line."""

    exit_code: ExitCode = ExitCode.FAILED


class ConfigError(IngestError):
    """The config file, an environment variable it references, or a CLI flag is wrong."""

    exit_code = ExitCode.CONFIG


class SourceError(IngestError):
    """The HTTP source misbehaved in a way retries could not fix."""


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
