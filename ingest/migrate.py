"""Apply ``migrations/NNNN_name.sql`` in order, each once, recorded in ``ingest.schema_migrations``.

Two processes migrating at once are serialised by a transaction-level advisory lock, and each
file runs in the same transaction as its bookkeeping row, so a failed file leaves no trace.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ingest.assets import migrations_dir
from ingest.db import Connection
from ingest.errors import ConfigError

FILE_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
LOCK_KEY = "ingest:migrate"


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


def discover(directory: Path | None = None) -> list[Migration]:
    """The migrations in ``directory`` (default: the ones shipped with ingest), in order."""
    if directory is None:
        directory = migrations_dir()
    if not directory.is_dir():
        raise ConfigError(f"{directory}: migrations folder not found")
    migrations: list[Migration] = []
    for path in sorted(directory.glob("*.sql")):
        match = FILE_NAME.match(path.name)
        if not match:
            raise ConfigError(f"{path}: migration files must be named NNNN_name.sql")
        migrations.append(Migration(int(match.group(1)), match.group(2), path.read_text()))
    versions = [migration.version for migration in migrations]
    if len(set(versions)) != len(versions):
        raise ConfigError(f"{directory}: two migrations share a version number")
    return migrations


async def migrate(connection: Connection, directory: Path | None = None) -> list[str]:
    """Apply what is pending; return the names applied (empty when up to date)."""
    migrations = discover(directory)
    applied_now: list[str] = []
    async with connection.transaction():
        await connection.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", LOCK_KEY)
        await connection.execute(
            "CREATE SCHEMA IF NOT EXISTS ingest; "
            "CREATE TABLE IF NOT EXISTS ingest.schema_migrations ("
            " version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {
            row["version"]
            for row in await connection.fetch("SELECT version FROM ingest.schema_migrations")
        }
        for migration in migrations:
            if migration.version in done:
                continue
            await connection.execute(migration.sql)
            await connection.execute(
                "INSERT INTO ingest.schema_migrations (version, name) VALUES ($1, $2)",
                migration.version,
                migration.name,
            )
            applied_now.append(f"{migration.version:04d}_{migration.name}")
    return applied_now


async def pending(connection: Connection, directory: Path | None = None) -> list[str]:
    """Migrations not yet applied (all of them when ingest's schema does not exist)."""
    exists = await connection.fetchval("SELECT to_regclass('ingest.schema_migrations') IS NOT NULL")
    done: set[int] = set()
    if exists:
        done = {
            row["version"]
            for row in await connection.fetch("SELECT version FROM ingest.schema_migrations")
        }
    return [
        f"{migration.version:04d}_{migration.name}"
        for migration in discover(directory)
        if migration.version not in done
    ]
