"""How far does running ingest in several processes go on this machine?

Starts N ``ingest run`` processes at once, each loading the whole standard dataset (served by
nginx, or the aiohttp fallback) into a table of its own, and reports the records per second of
all of them together. N = 1 is ``ingest append`` as in the benchmark. The gain from N = 2 is the
most that splitting one endpoint's pages over processes could buy (it would also need per-range
checkpoints), since here the processes share nothing but the machine::

    python -m bench.experiments.processes --dsn postgresql://postgres@127.0.0.1:5432/postgres

Uses a scratch database ``bench_processes`` on that server, dropped at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from bench.cli import sql
from bench.dataset import MODES, ensure_dataset
from bench.server import serve
from bench.target import ingest_config

SCRATCH = "bench_processes"


def run(dsn: str, processes: int, dataset_root: Path, workdir: Path) -> float:
    """Wall seconds for ``processes`` concurrent appends of the whole dataset."""
    with serve(dataset_root) as served:
        commands = []
        for index in range(processes):
            config = workdir / f"source{index}.toml"
            text = ingest_config(served.base_url, table=f"items{index}", mode="append")
            config.write_text(text.replace('name = "bench"', f'name = "bench{index}"', 1))
            commands.append([sys.executable, "-m", "ingest", "run", str(config), "--dsn", dsn])
        started = time.perf_counter()
        logs = [workdir / f"source{index}.log" for index in range(processes)]
        with contextlib.ExitStack() as files:
            children = [
                subprocess.Popen(
                    command, stdout=subprocess.DEVNULL, stderr=files.enter_context(log.open("wb"))
                )
                for command, log in zip(commands, logs, strict=True)
            ]
            codes = [child.wait() for child in children]
        seconds = time.perf_counter() - started
    for code, log in zip(codes, logs, strict=True):
        if code:
            raise SystemExit(f"an ingest process failed ({code}): {log.read_text()[-2000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", required=True, help="a server where a database may be created")
    parser.add_argument("--max-processes", type=int, default=2)
    args = parser.parse_args()
    dataset = ensure_dataset(MODES["standard"])
    parts = urlsplit(args.dsn)
    scratch = urlunsplit(parts._replace(path=f"/{SCRATCH}"))
    for processes in range(1, args.max_processes + 1):
        sql(args.dsn, f"DROP DATABASE IF EXISTS {SCRATCH}")
        sql(args.dsn, f"CREATE DATABASE {SCRATCH}")
        try:
            subprocess.run(
                [sys.executable, "-m", "ingest", "migrate", "--dsn", scratch],
                check=True,
                stdout=subprocess.DEVNULL,
            )
            with tempfile.TemporaryDirectory(prefix="ingest-processes-") as workdir:
                seconds = run(scratch, processes, dataset.root, Path(workdir))
        finally:
            sql(args.dsn, f"DROP DATABASE IF EXISTS {SCRATCH}")
        records = processes * dataset.records
        print(
            f"{processes} process(es): {records:,} records in {seconds:.2f} s = "
            f"{records / seconds:,.0f} records/s"
        )


if __name__ == "__main__":
    main()
