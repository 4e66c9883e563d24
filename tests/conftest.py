"""Fixtures: a real PostgreSQL (never a mock) and helpers to run the pipeline against it.

Where PostgreSQL comes from, in order:
1. ``INGEST_TEST_DSN`` if set (any reachable server; each test gets its own database);
2. a testcontainers ``PostgresContainer`` when a Docker engine answers;
3. a throwaway local cluster: ``initdb``/``pg_ctl`` from PATH or /usr/lib/postgresql when not
   running as root (PostgreSQL refuses root), else the ``pgserver`` package's embedded server.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
import warnings
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from ingest.migrate import migrate

ROOT = Path(__file__).resolve().parent.parent


def _docker_answers() -> bool:
    try:
        import docker  # noqa: PLC0415

        client = docker.from_env(timeout=2)
        client.ping()
        return True
    except Exception:
        return False


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _find_pg_binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


@contextlib.contextmanager
def _local_cluster() -> Iterator[str]:
    """initdb + pg_ctl in a temp dir on a free loopback port; stopped and deleted afterwards."""
    initdb, pg_ctl = _find_pg_binary("initdb"), _find_pg_binary("pg_ctl")
    if os.geteuid() != 0 and initdb and pg_ctl:
        directory = tempfile.mkdtemp(prefix="ingest-test-pg-")
        data = os.path.join(directory, "data")
        port = _free_port()
        subprocess.run(
            [initdb, "-D", data, "-U", "postgres", "-A", "trust", "--no-sync"],
            check=True,
            capture_output=True,
        )
        subprocess.run(
            [
                pg_ctl,
                "-D",
                data,
                "-l",
                os.path.join(directory, "log"),
                "-w",
                "-o",
                f"-h 127.0.0.1 -p {port} -k {directory} -F",
                "start",
            ],
            check=True,
            capture_output=True,
        )
        try:
            yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
        finally:
            subprocess.run(
                [pg_ctl, "-D", data, "-m", "immediate", "stop"], check=False, capture_output=True
            )
            shutil.rmtree(directory, ignore_errors=True)
        return
    warnings.filterwarnings("ignore", module="platformdirs")
    from ingest.db import embedded_postgres  # noqa: PLC0415

    with embedded_postgres() as dsn:
        yield dsn


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """A DSN for a server the tests may create databases on."""
    dsn = os.environ.get("INGEST_TEST_DSN")
    if dsn:
        yield dsn
        return
    if _docker_answers():
        from testcontainers.postgres import PostgresContainer  # noqa: PLC0415

        with PostgresContainer("postgres:16-alpine", driver=None) as container:
            yield container.get_connection_url()
        return
    with _local_cluster() as local_dsn:
        yield local_dsn


def _with_database(dsn: str, database: str) -> str:
    if "?" in dsn:
        head, query = dsn.split("?", 1)
        return f"{head.rsplit('/', 1)[0]}/{database}?{query}"
    return f"{dsn.rsplit('/', 1)[0]}/{database}"


@contextlib.asynccontextmanager
async def _fresh_database(
    server: str, prefix: str, template: str | None = None
) -> AsyncIterator[tuple[str, str]]:
    """Create a uniquely named database (optionally cloned from ``template``); drop it after.

    Yields its name and its DSN."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    clause = f' TEMPLATE "{template}"' if template else ""
    admin = await asyncpg.connect(server)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"{clause}')
    finally:
        await admin.close()
    try:
        yield name, _with_database(server, name)
    finally:
        admin = await asyncpg.connect(server)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


@pytest.fixture(scope="session")
async def template_database(postgres_server: str) -> AsyncIterator[str]:
    """A database with ingest's schema migrated once; tests clone it (fast) per test.

    Its name is unique per session so test sessions can share one server.
    """
    async with _fresh_database(postgres_server, "ingest_template") as (template, dsn):
        connection = await asyncpg.connect(dsn)
        try:
            await migrate(connection)
        finally:
            await connection.close()
        yield template


@pytest.fixture
async def database(postgres_server: str, template_database: str) -> AsyncIterator[str]:
    """A fresh, migrated database for one test; dropped afterwards. Yields its DSN."""
    async with _fresh_database(postgres_server, "ingest_test", template_database) as (_, dsn):
        yield dsn


@pytest.fixture
async def empty_database(postgres_server: str) -> AsyncIterator[str]:
    """A fresh database without ingest's schema (for migration tests)."""
    async with _fresh_database(postgres_server, "ingest_empty") as (_, dsn):
        yield dsn


@pytest.fixture
async def db(database: str) -> AsyncIterator[asyncpg.Connection[Any]]:
    connection = await asyncpg.connect(database)
    try:
        yield connection
    finally:
        await connection.close()


@pytest.fixture
def cli_env(database: str) -> dict[str, str]:
    """Environment for running ``python -m ingest`` against the test database."""
    environment = {
        key: value for key, value in os.environ.items() if not key.startswith(("PG", "DATABASE"))
    }
    environment["DATABASE_URL"] = database
    environment["PYTHONPATH"] = str(ROOT)
    return environment


PYTHON = sys.executable
