"""``python -m bench``: generate the dataset, serve it, run every contender, print the ratios.

Contenders run one after another against the same PostgreSQL and the same local HTTP server,
each in its own process so its CPU and peak RSS are its own (see :mod:`bench.measure`).
"""

from __future__ import annotations

import argparse
import asyncio
import compileall
import contextlib
import datetime as dt
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg

from bench.dataset import MODES, Dataset, ensure_dataset
from bench.measure import Measured, PostgresCpu, run_child
from bench.report import render, targets
from bench.server import nginx_binary, serve
from bench.target import ingest_config

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
DLT_VENV = BENCH / ".venv-dlt"
RESULTS = BENCH / "results"
CONTENDERS = (
    "http",
    "copy",
    "naive",
    "dlt",
    "append",
    "merge",
    "append-writers",
    "merge-writers",
    "append-server",
    "merge-server",
)
#: Writer processes of the ``*-writers`` contenders (``pipeline.writer_processes``).
WRITERS = 2


def ingest_run_command(python: str, config: Path, dsn: str) -> list[str]:
    """``ingest run`` as every ingest contender starts it (loopback and remote): from the first
    page (``--restart``), JSON logs at warning."""
    return [
        python,
        "-m",
        "ingest",
        "run",
        str(config),
        "--dsn",
        dsn,
        "--restart",
        "--log-format",
        "json",
        "--log-level",
        "warning",
    ]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description="ingest vs. the machine's ceilings and dlt"
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help=f"{MODES['quick']:,} records")
    size.add_argument("--large", action="store_true", help=f"{MODES['large']:,} records")
    size.add_argument("--records", type=int, help="any number of records")
    parser.add_argument("--dsn", help="PostgreSQL (default: DATABASE_URL, else embedded pgserver)")
    parser.add_argument("--server", choices=["auto", "nginx", "aiohttp"], default="auto")
    parser.add_argument(
        "--install-nginx",
        action="store_true",
        help="apt-get install nginx-light first if missing (root; the service is not started)",
    )
    parser.add_argument(
        "--only", default=",".join(CONTENDERS), help=f"comma list of {', '.join(CONTENDERS)}"
    )
    parser.add_argument("--store-raw", action="store_true", help="ingest also stores raw JSONB")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override an ingest setting, e.g. pipeline.batch_size=10000 (repeatable)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run the contenders (dlt once) in N round-robin rounds and keep each one's fastest "
        "run: on a shared 2-core machine single runs vary by 20 %% or more, and the speed drifts "
        "over minutes",
    )
    parser.add_argument(
        "--compare-ref",
        metavar="GIT_REF",
        help="also run ingest as of this git commit (e.g. the one before an optimisation), "
        "in the same run, as 'ingest ... @REF'",
    )
    parser.add_argument("--label", default="", help="stored with the JSON results")
    parser.add_argument("--keep-db", action="store_true", help="keep the benchmark database")
    return parser.parse_args(argv)


def _overrides(items: list[str]) -> dict[str, dict[str, Any]]:
    sections: dict[str, dict[str, Any]] = {"pipeline": {}, "http": {}}
    for item in items:
        key, _, raw = item.partition("=")
        section, _, name = key.partition(".")
        if section not in sections or not name or not raw:
            raise SystemExit(
                f"bench: --set {item!r}: expected pipeline.KEY=VALUE or http.KEY=VALUE"
            )
        value: Any = raw
        with contextlib.suppress(ValueError):
            value = json.loads(raw)
        sections[section][name] = value
    return sections


@contextlib.contextmanager
def database(dsn: str | None, keep: bool) -> Iterator[tuple[str, str]]:
    """A fresh database for this run on the given server, or an embedded pgserver."""
    dsn = dsn or os.environ.get("DATABASE_URL")
    if not dsn:
        from ingest.db import embedded_postgres  # noqa: PLC0415

        warnings.filterwarnings("ignore", module="platformdirs")
        with embedded_postgres() as embedded:
            yield embedded, "embedded pgserver"
        return
    name = f"ingest_bench_{uuid.uuid4().hex[:8]}"

    async def admin(sql: str) -> None:
        connection = await asyncpg.connect(dsn)
        try:
            await connection.execute(sql)
        finally:
            await connection.close()

    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    base, mark, query = dsn.partition("?")
    prefix = base.rsplit("/", 1)[0] if base.count("/") > 2 else base
    target = f"{prefix}/{name}{mark}{query}"
    try:
        yield target, f"{prefix.split('@')[-1]}/{name} (from DSN)"
    finally:
        if not keep:
            asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


async def _sql(dsn: str, sql: str) -> Any:
    connection = await asyncpg.connect(dsn)
    try:
        return await connection.fetchval(sql)
    finally:
        await connection.close()


def sql(dsn: str, query: str) -> Any:
    return asyncio.run(_sql(dsn, query))


def ensure_dlt(log: Any) -> Path | None:
    """The benchmark's own venv with ``dlt[postgres]``; None (and a message) if it can't be had."""
    python = DLT_VENV / "bin" / "python"
    probe = [str(python), "-c", "import dlt, psycopg2"]
    if python.exists() and subprocess.run(probe, capture_output=True, check=False).returncode == 0:
        return python
    log(f"installing dlt[postgres] into {DLT_VENV} ...")
    try:
        subprocess.run([sys.executable, "-m", "venv", str(DLT_VENV)], check=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", "dlt[postgres]"],
            check=True,
            capture_output=True,
        )
    except (subprocess.CalledProcessError, OSError) as exc:
        log(f"dlt could not be installed ({exc}); continuing without it")
        return None
    return python


def install_nginx(log: Any) -> None:
    if nginx_binary() or shutil.which("apt-get") is None or os.geteuid() != 0:
        return
    log("installing nginx-light from Debian's packages ...")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive", "RUNLEVEL": "1"}
    result = subprocess.run(
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", "nginx-light"],
        capture_output=True,
        env=env,
        check=False,
    )
    if result.returncode != 0:
        log("nginx could not be installed; using the aiohttp static server")


def _run_once(
    key: str,
    name: str,
    *,
    command: list[str],
    table: str | None,
    reset: str | None,
    env: dict[str, str],
    dsn: str,
    postgres: PostgresCpu,
    records: int,
    log: Any,
    label: str,
) -> Measured | None:
    """One run of one contender from a clean start; its rows are counted before the next reset."""
    if reset:
        sql(dsn, reset)
    sql(dsn, "CHECKPOINT")
    log(f"running {name}{label} ...")
    try:
        measured, _, _ = run_child(name, command, env=env, postgres=postgres, cwd=env["PYTHONPATH"])
    except RuntimeError as exc:
        if key != "dlt":
            raise
        log(f"  dlt failed, continuing without it: {exc}")
        return None
    if key == "copy":
        measured.wall = float(measured.output["timed_seconds"])
        measured.cpu = float(measured.output["timed_cpu"])
        measured.note = "COPY phase only; RSS holds all pre-built rows"
    measured.records = measured.records or records
    if table:
        measured.records = int(sql(dsn, f"SELECT count(*) FROM {table}"))
        if measured.records != records:
            measured.note = f"expected {records} rows"
    if key == "dlt":
        measured.note = f"dlt {measured.output.get('version')} {measured.output.get('phases')}"
    log(f"  {measured.wall:.1f} s, {measured.rate:,.0f} records/s")
    # What this run loaded is vacuumed and analysed now, untimed: otherwise the autovacuum
    # daemon (every minute) does it in the middle of a later contender's run, at that run's cost.
    sql(dsn, "VACUUM ANALYZE")
    return measured


def compile_bytecode(package: Path, log: Any) -> None:
    """Write ``package``'s bytecode, as installing a wheel does, before any contender runs.

    An editable checkout has none, and where ``PYTHONDONTWRITEBYTECODE`` is set (this machine,
    many container images) Python never writes it, so every ``ingest run`` would compile its
    ~40 modules again: about 0.15 s of CPU, a tenth of the work of a 1M-record run. A user's
    installed ingest does not pay that, so neither does the measured one.
    """
    if not compileall.compile_dir(str(package), quiet=1):
        raise SystemExit(f"bench: could not compile {package}")
    if os.environ.get("PYTHONDONTWRITEBYTECODE"):
        log(f"compiled {package.name}'s bytecode (PYTHONDONTWRITEBYTECODE is set here)")


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    """SIGTERM (a CI timeout, ``kill``) unwinds like Ctrl-C: the ``with`` blocks below stop
    nginx, the embedded PostgreSQL and the running contender instead of leaving them behind."""
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--remote" in argv:  # its own options: python -m bench --remote --help
        from bench.remote import main as remote  # noqa: PLC0415 - imports this module

        return remote([arg for arg in argv if arg != "--remote"])
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    log = lambda message: print(f"[bench] {message}", flush=True)  # noqa: E731
    records = (
        args.records or MODES["quick" if args.quick else "large" if args.large else "standard"]
    )
    only = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(only) - set(CONTENDERS))
    if unknown:
        raise SystemExit(f"bench: --only: unknown contender {unknown[0]!r}")
    overrides = _overrides(args.set)
    dataset = ensure_dataset(records, log=log)
    if args.install_nginx:
        install_nginx(log)
    dlt_python = ensure_dlt(log) if "dlt" in only else None
    compile_bytecode(ROOT / "ingest", log)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    results: list[Measured] = []
    with (
        database(args.dsn, args.keep_db) as (dsn, db_label),
        serve(dataset.root, args.server) as served,
        tempfile.TemporaryDirectory(prefix="ingest-bench-") as scratch,
    ):
        log(f"{records:,} records, {dataset.pages:,} pages, {dataset.bytes / 1e6:.0f} MB of JSON")
        log(f"HTTP server: {served.kind} at {served.base_url}; PostgreSQL: {db_label}")
        postgres = asyncio.run(PostgresCpu.find(dsn))
        run_child(
            "migrate",
            [sys.executable, "-m", "ingest", "migrate", "--dsn", dsn],
            env=env,
            postgres=postgres,
        )
        common = ["--pages", str(dataset.pages), "--records", str(records)]
        contenders = _plan(
            args, dataset, served.base_url, dsn, common, dlt_python, scratch, overrides
        )
        if args.compare_ref:
            contenders += _compare_plan(args.compare_ref, served.base_url, dsn, scratch, args)
        selected = [contender for contender in contenders if contender[0] in only]
        rounds = max(1, args.repeat)
        runs: dict[str, list[Measured]] = {contender[1]: [] for contender in selected}
        # Round-robin, not each contender N times in a row: this machine's speed drifts over
        # minutes, so every contender's best run comes from the same stretch of time and the
        # ratios between them do not depend on which one ran in a fast minute.
        for attempt in range(rounds):
            for key, name, command, table, reset, *extra in selected:
                if key == "dlt" and attempt:
                    continue
                measured = _run_once(
                    key,
                    name,
                    command=command,
                    table=table,
                    reset=reset,
                    env={**env, **extra[0]} if extra else env,
                    dsn=dsn,
                    postgres=postgres,
                    records=records,
                    log=log,
                    label=f" (round {attempt + 1}/{rounds})" if rounds > 1 and key != "dlt" else "",
                )
                if measured is not None:
                    runs[name].append(measured)
        for _, name, *_ in selected:
            if not runs[name]:
                continue
            measured = min(runs[name], key=lambda m: m.wall)
            measured.output["runs_wall_s"] = [round(m.wall, 3) for m in runs[name]]
            results.append(measured)
            log(
                f"  {name}: {measured.records:,} records in {measured.wall:.1f} s = "
                f"{measured.rate:,.0f}/s, peak RSS {measured.peak_rss_mb:.0f} MB"
            )
        meta = {
            "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "label": args.label,
            "records": records,
            "pages": dataset.pages,
            "json_bytes": dataset.bytes,
            "http_server": served.kind,
            "postgres": db_label,
            "postgres_version": sql(dsn, "SHOW server_version"),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "store_raw": args.store_raw,
            "repeat": args.repeat,
            "overrides": overrides,
        }
    report = {
        "meta": meta,
        "results": [m.as_dict() for m in results],
        **targets(results, meta["cpus"]),
    }
    print(render(meta, results))
    RESULTS.mkdir(exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    path = RESULTS / f"{records}-{stamp}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / "latest.json").write_text(json.dumps(report, indent=2) + "\n")
    log(f"results written to {path}")
    return 0


def _plan(  # noqa: PLR0917 - one call site, all inputs of the plan
    args: argparse.Namespace,
    dataset: Dataset,
    base_url: str,
    dsn: str,
    common: list[str],
    dlt_python: Path | None,
    scratch: str,
    overrides: dict[str, dict[str, Any]],
) -> list[tuple[str, str, list[str], str | None, str | None]]:
    """(key, name, command, table to count, SQL before each run) per contender, in run order."""
    py = sys.executable
    copy_reset = "DROP TABLE IF EXISTS bench_copy"
    contenders: list[tuple[str, str, list[str], str | None, str | None]] = [
        (
            "http",
            "HTTP+parse ceiling",
            [py, "-m", "bench.contenders", "http", "--base-url", base_url, *common],
            None,
            None,
        ),
        *(
            (
                "copy",
                f"COPY ceiling, {connections} conn{'s' if connections > 1 else ''}",
                [
                    *(py, "-m", "bench.contenders", "copy", "--dsn", dsn),
                    *("--data", str(dataset.root), "--connections", str(connections), *common),
                ],
                None if connections == 1 else "bench_copy",
                copy_reset,
            )
            for connections in (1, 2)
        ),
        (
            "naive",
            "naive gather+executemany",
            [py, "-m", "bench.contenders", "naive", "--base-url", base_url, "--dsn", dsn, *common],
            "bench_naive",
            "DROP TABLE IF EXISTS bench_naive",
        ),
    ]
    if dlt_python is not None:
        contenders.append(
            (
                "dlt",
                "dlt rest_api",
                [str(dlt_python), str(BENCH / "dlt_run.py"), base_url, dsn, "dlt_bench", scratch],
                "dlt_bench.items",
                None,
            )
        )
    variants = (
        ("append", "ingest_append", "python"),
        ("merge", "ingest_merge", "python"),
        ("append", "ingest_append_writers", "writers"),
        ("merge", "ingest_merge_writers", "writers"),
        ("append", "ingest_append_server", "server"),
        ("merge", "ingest_merge_server", "server"),
    )
    for mode, table, load in variants:
        config = Path(scratch) / f"{table}.toml"
        settings = {**overrides, "pipeline": dict(overrides["pipeline"])}
        if load == "writers":
            settings["pipeline"]["writer_processes"] = WRITERS
        config.write_text(
            ingest_config(
                base_url,
                table=table,
                mode=mode,
                store_raw=args.store_raw,
                load="server" if load == "server" else "python",
                **settings,
            )
        )
        command = ingest_run_command(py, config, dsn)
        key = mode if load == "python" else f"{mode}-{load}"
        suffix = {"python": "", "writers": f" ({WRITERS} writers)", "server": " (server)"}[load]
        contenders.append(
            (key, f"ingest {mode}{suffix}", command, table, f"DROP TABLE IF EXISTS {table}")
        )
        if mode == "merge":
            into = "1M" if dataset.records == 1_000_000 else f"{dataset.records:,}"
            contenders.append(
                (key, f"ingest merge into {into}-row table{suffix}", command, table, None)
            )
    return contenders


def _compare_plan(
    ref: str, base_url: str, dsn: str, scratch: str, args: argparse.Namespace
) -> list[Any]:
    """ingest append and merge as of ``ref`` (git archive into the scratch dir), own tables.

    The ref's own C extension is built there too: without it, ``import ingest._copyenc`` in the
    ref's package would fall through to the editable install's finder and load this checkout's
    extension, so "before" would run today's encoder.
    """
    root = Path(scratch) / f"ingest-{ref}"
    root.mkdir()
    paths = ["ingest", "migrations"]
    has_setup = (
        subprocess.run(
            ["git", "-C", str(ROOT), "cat-file", "-e", f"{ref}:setup.py"],
            check=False,
            capture_output=True,
        ).returncode
        == 0
    )
    if has_setup:
        paths.append("setup.py")
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", ref, *paths], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(root)], input=archive, check=True)
    if has_setup:
        built = subprocess.run(
            [sys.executable, "setup.py", "-q", "build_ext", "--inplace"],
            check=False,
            cwd=root,
            capture_output=True,
            text=True,
        )
        if built.returncode != 0 or not list((root / "ingest").glob("_copyenc*.so")):
            tail = (built.stderr or built.stdout).strip().splitlines()[-1:]
            raise SystemExit(f"bench: --compare-ref {ref}: building its C extension failed: {tail}")
    compile_bytecode(root / "ingest", lambda message: None)
    env = {"PYTHONPATH": str(root)}
    plan: list[Any] = []
    for mode in ("append", "merge"):
        table = f"ingest_{mode}_before"
        config = Path(scratch) / f"{table}.toml"
        config.write_text(ingest_config(base_url, table=table, mode=mode, store_raw=args.store_raw))
        command = [sys.executable, "-m", "ingest", "run", str(config), "--dsn", dsn, "--restart"]
        command += ["--log-format", "json", "--log-level", "warning"]
        drop = f"DROP TABLE IF EXISTS {table}"
        plan.append((mode, f"ingest {mode} @{ref}", command, table, drop, env))
        if mode == "merge":
            plan.append((mode, f"ingest merge into full @{ref}", command, table, None, env))
    return plan
