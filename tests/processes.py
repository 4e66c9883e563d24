"""Running ``python -m ingest`` as a real subprocess, and waiting on it or on the database.

Output goes to files, not pipes: a chatty child can never block on a full pipe, and a failing
test can print what the child said.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Cli:
    """One ``python -m ingest`` child process."""

    process: asyncio.subprocess.Process
    stdout: Path
    stderr: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def output(self) -> str:
        return self.stdout.read_text(errors="replace") + self.stderr.read_text(errors="replace")

    def signal(self, signum: signal.Signals) -> None:
        if self.process.returncode is None:
            os.kill(self.process.pid, signum)

    async def wait(self, seconds: float = 60.0) -> int:
        try:
            async with asyncio.timeout(seconds):
                return await self.process.wait()
        except TimeoutError:
            self.signal(signal.SIGKILL)
            await self.process.wait()
            raise AssertionError(
                f"ingest did not exit within {seconds}s:\n{self.output()}"
            ) from None

    async def kill(self) -> None:
        """SIGKILL (only this child, by its pid) and reap it."""
        self.signal(signal.SIGKILL)
        await self.process.wait()


async def spawn(args: Sequence[str], env: dict[str, str], directory: Path, name: str) -> Cli:
    stdout, stderr = directory / f"{name}.out", directory / f"{name}.err"
    with stdout.open("wb") as out, stderr.open("wb") as err:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "ingest", *args, env=env, stdout=out, stderr=err
        )
    return Cli(process, stdout, stderr)


async def run_cli(
    args: Sequence[str], env: dict[str, str], directory: Path, name: str, seconds: float = 60.0
) -> tuple[int, str]:
    cli = await spawn(args, env, directory, name)
    code = await cli.wait(seconds)
    return code, cli.output()


async def wait_until(
    check: Callable[[], Awaitable[bool]], seconds: float = 30.0, what: str = "condition"
) -> None:
    deadline = time.monotonic() + seconds
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {seconds}s waiting for {what}")
        await asyncio.sleep(0.02)


async def run_ingest(
    *args: str, env: dict[str, str], seconds: float = 120.0
) -> tuple[int, str, str]:
    """Run ``python -m ingest ARGS`` to completion; its exit code, stdout and stderr."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "ingest",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=seconds)
    return process.returncode or 0, out.decode(), err.decode()
