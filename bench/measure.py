"""Run one contender as a child process and measure it: wall, CPU, peak RSS, Postgres CPU.

CPU and peak RSS come from ``os.wait4`` on that child alone (its own rusage, including any
processes it waited for), so each number is the contender's own. Postgres CPU is the server's
(postmaster, its live backends, and exited backends via the postmaster's children times) when the
server runs on this machine; ``None`` otherwise.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import psutil


@dataclass(slots=True)
class Measured:
    name: str
    records: int
    wall: float
    cpu: float
    peak_rss_mb: float
    pg_cpu: float | None
    output: dict[str, Any] = field(default_factory=dict)
    note: str = ""

    @property
    def rate(self) -> float:
        return self.records / self.wall if self.wall > 0 else 0.0

    def per_million(self, seconds: float | None) -> float | None:
        if seconds is None or not self.records:
            return None
        return seconds * 1_000_000 / self.records

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "records": self.records,
            "wall_s": round(self.wall, 3),
            "records_per_s": round(self.rate, 1),
            "cpu_s": round(self.cpu, 3),
            "cpu_s_per_million": _round(self.per_million(self.cpu)),
            "pg_cpu_s_per_million": _round(self.per_million(self.pg_cpu)),
            "peak_rss_mb": round(self.peak_rss_mb, 1),
            "note": self.note,
            "output": self.output,
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


class PostgresCpu:
    """Total CPU seconds used so far by a local PostgreSQL server (found from a backend PID).

    The server is shared with whatever else uses it; on a busy shared server the number
    includes their work too, so prefer the embedded server (the default) for this column.
    """

    def __init__(self, postmaster: psutil.Process | None) -> None:
        self.postmaster = postmaster

    @classmethod
    async def find(cls, dsn: str) -> PostgresCpu:
        """Look up the postmaster as the parent of our own backend, while it is alive."""
        connection = await asyncpg.connect(dsn)
        try:
            backend = await connection.fetchval("SELECT pg_backend_pid()")
            try:
                return cls(psutil.Process(backend).parent())
            except (psutil.Error, OSError):
                return cls(None)
        finally:
            await connection.close()

    def total(self) -> float | None:
        if self.postmaster is None:
            return None
        try:
            times = self.postmaster.cpu_times()
            total = times.user + times.system + times.children_user + times.children_system
            for child in self.postmaster.children():
                try:
                    child_times = child.cpu_times()
                except psutil.Error:
                    continue
                total += child_times.user + child_times.system
            return total
        except psutil.Error:
            return None


def run_child(
    name: str,
    command: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    postgres: PostgresCpu,
    cwd: str | None = None,
    timeout: float = 3600,
) -> tuple[Measured, str, str]:
    """Run ``command``; returns the measurement plus its stdout and stderr text."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        pg_before = postgres.total()
        started = time.perf_counter()
        process = subprocess.Popen(
            list(command),
            stdout=out,
            stderr=err,
            stdin=subprocess.DEVNULL,
            env=dict(env or os.environ),
            cwd=cwd,
        )
        deadline = started + timeout
        try:
            while True:
                pid, status, usage = os.wait4(process.pid, os.WNOHANG)
                if pid:
                    break
                if time.perf_counter() > deadline:
                    process.kill()
                    pid, status, usage = os.wait4(process.pid, 0)
                    break
                time.sleep(0.02)
        except BaseException:  # Ctrl-C or SIGTERM: the contender goes too, not orphaned
            process.kill()
            process.wait()
            raise
        wall = time.perf_counter() - started
        pg_after = postgres.total()
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode(errors="replace")
        stderr = err.read().decode(errors="replace")
    if process.returncode != 0:
        tail = "\n".join(stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"{name}: exited with {process.returncode}:\n{tail}")
    output: dict[str, Any] = {}
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith("{"):
            output = json.loads(line)
            break
    pg_cpu = None if pg_before is None or pg_after is None else pg_after - pg_before
    measured = Measured(
        name=name,
        records=int(output.get("records", 0)),
        wall=wall,
        cpu=usage.ru_utime + usage.ru_stime,
        peak_rss_mb=usage.ru_maxrss / 1024,
        pg_cpu=pg_cpu,
        output=output,
    )
    return measured, stdout, stderr
