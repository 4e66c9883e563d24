"""PostgreSQL connections: where the DSN comes from, the pool, and the embedded demo server.

Order of precedence for the DSN: ``--dsn``, then ``DATABASE_URL``, then libpq's ``PG*``
variables (asyncpg reads PGHOST, PGPORT, PGUSER, PGPASSWORD, PGDATABASE itself).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from urllib.parse import urlsplit

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from ingest.errors import AccessError, IngestError, one_line
from ingest.pgcodecs import install_codecs

#: A connection, whether held directly or borrowed from a pool.
Connection = asyncpg.Connection | PoolConnectionProxy

#: What a lost or refused connection raises: the server restarting or shutting down (class
#: 57, operator intervention), a dropped socket, a connection that is gone.
CONNECTION_LOST: tuple[type[Exception], ...] = (
    OSError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
)

#: Connection failures no retry can fix: ``database "x" does not exist`` (3D000), ``role "x"
#: does not exist`` and other authorization failures (28000), wrong passwords (28P01, a subclass).
REFUSED_CONNECTION = (
    asyncpg.InvalidCatalogNameError,
    asyncpg.InvalidAuthorizationSpecificationError,
)

PG_VARIABLES = ("PGHOST", "PGPORT", "PGUSER", "PGDATABASE", "PGPASSWORD", "PGSERVICE")


def resolve_dsn(flag: str | None, environ: Mapping[str, str] | None = None) -> str | None:
    """The DSN to connect with, or None to let asyncpg read the ``PG*`` variables."""
    environment = os.environ if environ is None else environ
    return flag or environment.get("DATABASE_URL") or None


def has_database_settings(flag: str | None, environ: Mapping[str, str] | None = None) -> bool:
    environment = os.environ if environ is None else environ
    return bool(resolve_dsn(flag, environment)) or any(name in environment for name in PG_VARIABLES)


def describe_dsn(dsn: str | None) -> str:
    """The DSN without its password, for messages."""
    if not dsn:
        return "the PG* environment variables"
    try:
        parts = urlsplit(dsn)
        host = parts.hostname or "local socket"
        return f"postgresql://{parts.username or ''}@{host}:{parts.port or 5432}{parts.path}"
    except ValueError:
        return "a malformed DSN (expected postgresql://user:password@host:port/database)"


@dataclass(frozen=True, slots=True)
class DatabaseInUse:
    """Where a connection landed, as the server reports it (never the password)."""

    database: str
    user: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"database {self.database} on {self.host}:{self.port} as {self.user}"


async def database_in_use(connection: Connection) -> DatabaseInUse:
    """Ask the server where we are: a DSN, ``PG*`` variables and service files all resolve to
    this, so a message built from it names the database the rows really go to."""
    row = await connection.fetchrow(
        "SELECT current_database() AS database, current_user AS user, "
        "host(inet_server_addr()) AS host, "
        "coalesce(inet_server_port(), current_setting('port')::int) AS port"
    )
    assert row is not None
    return DatabaseInUse(
        database=row["database"],
        user=row["user"],
        host=row["host"] or "a local socket",
        port=row["port"],
    )


@asynccontextmanager
async def open_pool(dsn: str | None, *, size: int) -> AsyncIterator[asyncpg.Pool]:
    """A connection pool; a connection failure becomes a one-line error naming the server.

    No connection floor (``min_size=0``): asyncpg replaces a floor connection in the background
    and logs a traceback each time that fails, e.g. all through a server restart. The first
    connection is opened here all the same, so a wrong DSN fails at once.
    """
    pool: asyncpg.Pool | None = None
    try:
        pool = await asyncpg.create_pool(
            dsn, min_size=0, max_size=max(2, size), init=install_codecs
        )
        async with pool.acquire():
            pass
    except REFUSED_CONNECTION as exc:
        if pool is not None:
            pool.terminate()
        raise AccessError(
            f"PostgreSQL at {describe_dsn(dsn)} refused the connection: {one_line(exc)} "
            "(fix the DSN, the role or its password, or create the database)"
        ) from None
    except (OSError, ValueError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        if pool is not None:
            pool.terminate()
        raise IngestError(
            f"cannot connect to PostgreSQL at {describe_dsn(dsn)}: {one_line(exc)} "
            "(set --dsn, DATABASE_URL or PG* variables)"
        ) from None
    try:
        yield pool
    finally:
        await pool.close()


@contextmanager
def embedded_postgres() -> Iterator[str]:
    """A throwaway PostgreSQL from the ``pgserver`` package; deleted on exit. Yields its DSN."""
    from pgserver import get_server  # type: ignore[attr-defined]  # noqa: PLC0415

    directory = tempfile.mkdtemp(prefix="ingest-pg-")
    server = get_server(directory, cleanup_mode="delete")
    try:
        yield str(server.get_uri())
    finally:
        server.cleanup()
