"""A throwaway PostgreSQL cluster a test owns, so it can stop, start and restart the server.

PostgreSQL refuses to run as root: as root the cluster belongs to an ordinary system user
(``postgres`` when the machine has one, else ``nobody``) and every ``initdb``/``pg_ctl`` runs
through ``runuser``. Binaries come from PATH or /usr/lib/postgresql, else from the ``pgserver``
package.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _binary(name: str) -> str:
    found = shutil.which(name) or next(
        iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None
    )
    if found:
        return found
    import pgserver  # noqa: PLC0415

    return str(Path(pgserver.__file__).parent / "pginstall" / "bin" / name)


def _owner() -> str | None:
    """The system user the cluster runs as: None for the current one (not root)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
        except KeyError:
            continue
        return name
    raise RuntimeError("running as root and no 'postgres' or 'nobody' user to run PostgreSQL")


class Cluster:
    """``initdb`` once, then ``start``/``stop``/``restart`` at the test's word."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.data = directory / "data"
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = int(probe.getsockname()[1])
        self.owner = _owner()
        self.dsn = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *command: str) -> None:
        prefix = ["runuser", "-u", self.owner, "--"] if self.owner else []
        done = subprocess.run([*prefix, *command], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{command[0]} failed: {done.stdout}{done.stderr}")

    def init(self) -> None:
        if self.owner:
            entry = pwd.getpwnam(self.owner)
            os.chown(self.directory, entry.pw_uid, entry.pw_gid)
        self._run(
            _binary("initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust", "--no-sync"
        )

    def start(self) -> None:
        options = f"-h 127.0.0.1 -p {self.port} -k {self.directory} -F"
        log = str(self.directory / "log")
        self._run(_binary("pg_ctl"), "-D", str(self.data), "-l", log, "-w", "-o", options, "start")

    def stop(self, mode: str = "fast") -> None:
        self._run(_binary("pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    async def restart(self) -> None:
        """Stop (fast: every session ends) and start again, off the event loop."""
        await asyncio.to_thread(self.stop)
        await asyncio.to_thread(self.start)


@contextmanager
def cluster() -> Iterator[Cluster]:
    directory = Path(tempfile.mkdtemp(prefix="ingest-restart-pg-"))
    directory.chmod(0o755)
    server = Cluster(directory)
    try:
        server.init()
        server.start()
        yield server
    finally:
        with contextlib.suppress(RuntimeError):  # already stopped
            server.stop("immediate")
        shutil.rmtree(directory, ignore_errors=True)
