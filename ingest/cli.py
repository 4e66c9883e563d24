"""The ``ingest`` command: parse arguments, call one coroutine, map the outcome to an exit code.

Errors are one line on stderr (``ingest: error: ...``); ``--debug`` adds the traceback. With
JSON logs (``--log-format json``, or stdout not a terminal) ``ingest run`` ends with one
``run_finished`` event instead (run id, status, exit code, error), success or not.

The modules of the commands other than ``run`` (backfill, worker, status, validate, demo) are
imported by their command only: without them a scheduled ``ingest run`` starts 0.03-0.05 s
sooner (of ~0.7 s on the benchmark machine), about 1 % of a million-record run there.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import io
import os
import sys
import textwrap
import traceback
import uuid
import warnings
from collections.abc import Sequence
from typing import Any, TextIO, cast

import structlog

from ingest import __version__
from ingest.config import load_config
from ingest.db import (
    database_in_use,
    embedded_postgres,
    has_database_settings,
    open_pool,
    resolve_dsn,
)
from ingest.errors import ConfigError, ExitCode, IngestError
from ingest.log import configure_logging, resolved_format
from ingest.migrate import migrate
from ingest.observe import ObserveOptions, observing
from ingest.report import summary_table
from ingest.runner import run_source
from ingest.runstate import RunOptions, RunResult, result_of
from ingest.secrets import Redactor

log = structlog.get_logger("ingest.cli")

#: Every exit code and what a scheduler should do about it; each command's ``--help`` lists
#: the ones it can return. The README's table says the same.
EXIT_CODES: dict[ExitCode, str] = {
    ExitCode.OK: "success",
    ExitCode.FAILED: "failed; a later retry may succeed (network, HTTP 5xx or 429 after "
    "retries, a malformed page, PostgreSQL unreachable)",
    ExitCode.CONFIG: "a person must fix something; retrying cannot help: the config or a flag, "
    "a missing environment variable, credentials refused (HTTP 401/403, a wrong PostgreSQL "
    "password), a database or role that does not exist, a schema that needs `ingest migrate`",
    ExitCode.LOCKED: "skipped, not a failure: another run of the same source is working",
    ExitCode.INTERRUPTED: "stopped by a signal after committing its checkpoint: rerun to resume",
    ExitCode.DEAD_LETTERS: "more records were dead-lettered than --max-dead-letters allows",
    ExitCode.UNHEALTHY: "`ingest status` only: a --fail-on-failed-run or --max-lag check failed",
}


def exit_codes_epilog(*codes: ExitCode) -> str:
    """The ``exit codes:`` section of a command's ``--help`` (every code when none is named)."""
    wanted = codes or tuple(EXIT_CODES)
    lines = [
        textwrap.fill(
            EXIT_CODES[code], width=79, initial_indent=f"  {int(code)}  ", subsequent_indent="     "
        )
        for code in wanted
    ]
    return "exit codes:\n" + "\n".join(lines)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the epilog's line breaks and shows each option's default when it has one."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        shown = default not in (None, False, argparse.SUPPRESS) and default != []
        if action.option_strings and shown and "%(default)" not in text:
            text = f"{text} (default: %(default)s)".strip()
        return text


class CommandParser(argparse.ArgumentParser):
    """A command's parser: its help shows defaults and, unless it names its own, every exit
    code (so a command added later documents them too)."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        if kwargs.get("epilog") is None:
            kwargs["epilog"] = exit_codes_epilog()
        super().__init__(**kwargs)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dsn", help="PostgreSQL DSN (default: DATABASE_URL, then PG* variables)")
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="least severe log event written to stderr",
    )
    parser.add_argument(
        "--log-format",
        default="auto",
        choices=["auto", "json", "console"],
        help="auto: JSON lines when stdout is not a TTY, console otherwise",
    )
    parser.add_argument("--debug", action="store_true", help="print tracebacks on errors")


def observe_options(parser: argparse.ArgumentParser) -> None:
    """Progress and metrics flags for ``ingest run``."""
    parser.add_argument(
        "--progress",
        default="auto",
        choices=["auto", "bars", "log", "none"],
        help="auto: live bars when stdout and stderr are terminals, else a log event "
        "every --progress-interval seconds",
    )
    parser.add_argument(
        "--progress-interval",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="seconds between progress log events",
    )
    metrics_options(parser)


def metrics_options(parser: argparse.ArgumentParser) -> None:
    """Prometheus flags; long-running backfills and workers take these too."""
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        metavar="PORT",
        help="serve Prometheus metrics on this port while the run lasts (0: any free port)",
    )
    parser.add_argument(
        "--metrics-host",
        default="127.0.0.1",
        metavar="HOST",
        help="address the metrics server listens on (empty: every interface)",
    )
    parser.add_argument(
        "--metrics-textfile",
        default=None,
        metavar="PATH",
        help="write final metrics here for node_exporter's textfile collector (*.prom)",
    )


def _observe(args: argparse.Namespace) -> ObserveOptions:
    return ObserveOptions(
        # Backfills and workers have no progress display: their partitions come and go.
        progress=getattr(args, "progress", "none"),
        progress_interval=getattr(args, "progress_interval", 30.0),
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
        metrics_textfile=args.metrics_textfile,
    )


def _lease_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--lease-seconds",
        type=float,
        default=30.0,
        help="a partition is taken over when its worker misses heartbeats this long",
    )
    parser.add_argument(
        "--max-attempts", type=int, default=3, help="claims of a failing partition before failed"
    )
    parser.add_argument(
        "--max-dead-letters",
        type=int,
        default=None,
        metavar="N",
        help="fail a partition when more than N records are dead-lettered",
    )


def _positive(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        if getattr(args, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be greater than zero")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ingest",
        description="Paginated HTTP APIs into PostgreSQL, exactly once.",
        epilog="Run `ingest COMMAND --help` for a command's options.\n\n" + exit_codes_epilog(),
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"ingest {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=CommandParser)

    migrate_cmd = commands.add_parser(
        "migrate",
        help="create or upgrade ingest's own schema",
        description="Create or upgrade ingest's own schema (ingest.*) in the database; "
        "names the database first.",
        epilog=exit_codes_epilog(ExitCode.OK, ExitCode.FAILED, ExitCode.CONFIG),
    )
    _common(migrate_cmd)

    run_cmd = commands.add_parser(
        "run",
        help="fetch every endpoint of a source config",
        description="Fetch every endpoint of a source config into PostgreSQL; resumes an "
        "unfinished run from its last committed checkpoint.",
        epilog=exit_codes_epilog(*sorted(EXIT_CODES.keys() - {ExitCode.UNHEALTHY})),
    )
    run_cmd.add_argument("config", help="path to a source config (TOML)")
    run_cmd.add_argument(
        "--endpoint", action="append", default=[], help="only this endpoint (repeatable)"
    )
    run_cmd.add_argument(
        "--restart",
        action="store_true",
        help="start each walk from its first page instead of resuming an unfinished checkpoint; "
        "keeps the incremental high-water mark and the changed-parents mark, so an incremental "
        "walk still starts at the last cursor minus lookback (`ingest reset` clears those)",
    )
    run_cmd.add_argument(
        "--max-dead-letters",
        type=int,
        default=None,
        metavar="N",
        help="fail the run when more than N records are dead-lettered",
    )
    observe_options(run_cmd)
    _common(run_cmd)

    status_cmd = commands.add_parser(
        "status",
        help="last run, checkpoint, lag and dead letters per source and endpoint",
        description="Last run, checkpoint, lag and dead letters per source and endpoint. "
        "Read-only. With --fail-on-failed-run or --max-lag it is a monitoring check.",
        epilog=exit_codes_epilog(ExitCode.OK, ExitCode.FAILED, ExitCode.CONFIG, ExitCode.UNHEALTHY),
    )
    status_cmd.add_argument(
        "config", nargs="?", help="only this source config (default: every source recorded)"
    )
    status_cmd.add_argument("--json", action="store_true", help="machine-readable output")
    status_cmd.add_argument(
        "--fail-on-failed-run",
        action="store_true",
        help=f"exit {int(ExitCode.UNHEALTHY)} when an endpoint's last run failed or was "
        "abandoned (its process died)",
    )
    status_cmd.add_argument(
        "--max-lag",
        metavar="DURATION",
        help=f"exit {int(ExitCode.UNHEALTHY)} when an endpoint is further behind than this "
        "(90s, 30m, 2h, 1d): its time cursor's lag, else the age of the source's last "
        "successful run",
    )
    _common(status_cmd)

    validate_cmd = commands.add_parser(
        "validate",
        help="check a config, its environment, one request per endpoint and the database; "
        "writes nothing",
        epilog=exit_codes_epilog(ExitCode.OK, ExitCode.FAILED, ExitCode.CONFIG),
    )
    validate_cmd.add_argument("config", help="path to a source config (TOML)")
    validate_cmd.add_argument(
        "--timeout", type=float, default=10.0, metavar="SECONDS", help="per-check time limit"
    )
    _common(validate_cmd)
    backfill_cmd = commands.add_parser(
        "backfill",
        help="split a cursor range into partitions and work them with leases",
        epilog=exit_codes_epilog(
            ExitCode.OK,
            ExitCode.FAILED,
            ExitCode.CONFIG,
            ExitCode.INTERRUPTED,
            ExitCode.DEAD_LETTERS,
        ),
    )
    backfill_cmd.add_argument("config", help="path to a source config (TOML)")
    backfill_cmd.add_argument("--endpoint", required=True, help="the endpoint to backfill")
    backfill_cmd.add_argument(
        "--from", dest="start", required=True, help="lower bound (date, timestamp or integer)"
    )
    backfill_cmd.add_argument("--to", dest="end", required=True, help="upper bound (exclusive)")
    backfill_cmd.add_argument(
        "--window", required=True, help="partition size: 7d, 12h, 30m (an integer for ids)"
    )
    backfill_cmd.add_argument(
        "--parallel", type=int, default=2, metavar="N", help="partitions worked at once here"
    )
    backfill_cmd.add_argument(
        "--plan-only", action="store_true", help="store the partitions and exit (for workers)"
    )
    _lease_options(backfill_cmd)
    metrics_options(backfill_cmd)
    _common(backfill_cmd)

    worker_cmd = commands.add_parser(
        "worker",
        help="claim backfill partitions from PostgreSQL and work them",
        epilog=exit_codes_epilog(
            ExitCode.OK,
            ExitCode.FAILED,
            ExitCode.CONFIG,
            ExitCode.INTERRUPTED,
            ExitCode.DEAD_LETTERS,
        ),
    )
    worker_cmd.add_argument("config", help="path to a source config (TOML)")
    worker_cmd.add_argument(
        "--endpoint", action="append", default=[], help="only this endpoint (repeatable)"
    )
    worker_cmd.add_argument(
        "--concurrency", type=int, default=2, metavar="N", help="partitions worked at once"
    )
    worker_cmd.add_argument(
        "--drain", action="store_true", help="exit when no partition is left instead of polling"
    )
    worker_cmd.add_argument(
        "--poll-seconds", type=float, default=5.0, help="wait between claims when idle"
    )
    _lease_options(worker_cmd)
    metrics_options(worker_cmd)
    _common(worker_cmd)

    dead_cmd = commands.add_parser(
        "dead-letters", help="list dead-lettered records, or replay them after a config fix"
    )
    dead_actions = dead_cmd.add_subparsers(dest="action", required=True, metavar="ACTION")
    dead_list = dead_actions.add_parser(
        "list", help="count per endpoint and the newest records with their reasons"
    )
    dead_list.add_argument("config", help="path to a source config (TOML)")
    dead_list.add_argument(
        "--endpoint", action="append", default=[], help="only this endpoint (repeatable)"
    )
    dead_list.add_argument(
        "--limit", type=int, default=20, metavar="N", help="newest records shown (default 20)"
    )
    _common(dead_list)
    dead_replay = dead_actions.add_parser(
        "replay",
        help="convert the stored records with the current config: those that convert land in "
        "the endpoint's table (merge/append as a run) and leave ingest.dead_letters, the rest "
        "stay with their new reason; exactly once, under the source's lock",
    )
    dead_replay.add_argument("config", help="path to a source config (TOML)")
    dead_replay.add_argument(
        "--endpoint", action="append", default=[], help="only this endpoint (repeatable)"
    )
    _common(dead_replay)

    reset_cmd = commands.add_parser(
        "reset",
        help="clear endpoints' checkpoint, incremental cursor and child-walk state so the next "
        "run starts from scratch; never drops or empties loaded tables",
    )
    reset_cmd.add_argument("config", help="path to a source config (TOML)")
    reset_cmd.add_argument(
        "--endpoint",
        action="append",
        default=[],
        help="only this endpoint (repeatable; default: every endpoint of the config)",
    )
    reset_cmd.add_argument(
        "--yes", action="store_true", help="do not ask for confirmation (needed without a TTY)"
    )
    _common(reset_cmd)

    init_cmd = commands.add_parser(
        "init",
        help="sample an API's first pages and write a commented source config to start from",
    )
    init_cmd.add_argument("url", help="the URL of the first page (with any query parameters)")
    init_cmd.add_argument("--output", "-o", required=True, help="the config file to write")
    init_cmd.add_argument(
        "--header",
        action="append",
        default=[],
        metavar="'NAME: VALUE'",
        help="a request header (repeatable); ${VAR} is read from the environment and written "
        "to the config as ${VAR}",
    )
    init_cmd.add_argument(
        "--records-path", default=None, help="dotted path of the record list (default: guessed)"
    )
    init_cmd.add_argument(
        "--depth",
        type=int,
        default=2,
        help="levels of nested objects flattened into columns (default 2; deeper: jsonb)",
    )
    init_cmd.add_argument("--force", action="store_true", help="overwrite --output if it exists")
    init_cmd.add_argument(
        "--log-level", default="warning", choices=["debug", "info", "warning", "error"]
    )
    init_cmd.add_argument("--log-format", default="auto", choices=["auto", "json", "console"])
    init_cmd.add_argument("--debug", action="store_true", help="print tracebacks on errors")

    demo_cmd = commands.add_parser(
        "demo",
        help="run the bundled demo API into PostgreSQL (embedded if no DSN is set)",
        description="Serve a small demo API on 127.0.0.1, load it into PostgreSQL with "
        "config/demo.toml and show what arrived. Uses --dsn, DATABASE_URL or PG* variables "
        "when set (and names that database first), else a temporary embedded PostgreSQL.",
        epilog=exit_codes_epilog(ExitCode.OK, ExitCode.FAILED, ExitCode.CONFIG),
    )
    demo_cmd.add_argument("--users", type=int, default=2500, help="records the demo API serves")
    demo_cmd.add_argument(
        "--progress",
        default="auto",
        choices=["auto", "bars", "log", "none"],
        help="auto: live bars when stdout and stderr are terminals, else a log event a second",
    )
    _common(demo_cmd)
    # The demo's own info events would bury its bars and its sample; warnings still show.
    demo_cmd.set_defaults(log_level="warning")
    return parser


def _say(text: str) -> None:
    """A line on stdout, flushed: a person (or a log collector) sees it when it happens."""
    print(text, flush=True)


def _writing_to(where: str) -> None:
    _say(f"writing to {where}")


async def _migrate(dsn: str | None) -> int:
    async with open_pool(dsn, size=1) as pool, pool.acquire() as connection:
        _writing_to(str(await database_in_use(connection)))
        applied = await migrate(connection)
    _say(f"applied: {', '.join(applied)}" if applied else "schema is up to date")
    return ExitCode.OK


async def _run(args: argparse.Namespace, redactor: Redactor) -> int:
    loaded = load_config(args.config)
    # Known before anything starts, so every event of the run carries it and its source
    # (the metrics server's address, a signal received before the first page, the end).
    run_id = uuid.uuid4()
    args.run_id, args.source = run_id, loaded.source.name
    structlog.contextvars.bind_contextvars(run_id=str(run_id), source=loaded.source.name)
    async with observing(loaded.source.name, _observe(args)) as observer:
        options = RunOptions(
            command="run",
            endpoints=tuple(args.endpoint),
            restart=args.restart,
            max_dead_letters=args.max_dead_letters,
            observer=observer,
            log_level=args.log_level,
            log_format=args.log_format,
            run_id=run_id,
            announce_database=_writing_to,
        )
        result = await run_source(loaded, resolve_dsn(args.dsn), redactor, options)
    _say(summary_table(result, args.config))
    if resolved_format(args.log_format) == "json":
        _run_finished(args, result, "succeeded", ExitCode.OK, None)
    return ExitCode.OK


def _run_finished(
    args: argparse.Namespace,
    result: RunResult | None,
    status: str,
    code: ExitCode,
    error: str | None,
) -> None:
    """The last event of ``ingest run`` in JSON logs: one line a log pipeline can alert on."""
    run_id = result.run_id if result is not None else getattr(args, "run_id", None)
    emit = log.info if code == ExitCode.OK else log.error if status == "failed" else log.warning
    emit(
        "run_finished",
        run_id=str(run_id) if run_id else None,
        # Only a run that got past the source's lock has a row in ingest.runs.
        recorded=result is not None,
        source=getattr(args, "source", None),
        status=status,
        exit_code=int(code),
        error=error,
    )


async def _status(args: argparse.Namespace) -> int:
    from ingest.status import (  # noqa: PLC0415
        collect_status,
        health_problems,
        load_for_status,
        parse_duration,
        render_status,
    )

    max_lag = parse_duration(args.max_lag) if args.max_lag is not None else None
    loaded = load_for_status(args.config) if args.config else None
    async with open_pool(resolve_dsn(args.dsn), size=1) as pool, pool.acquire() as connection:
        report = await collect_status(connection, loaded)
    _say(report.to_json() if args.json else render_status(report))
    problems = health_problems(
        report, fail_on_failed_run=args.fail_on_failed_run, max_lag_seconds=max_lag
    )
    for problem in problems:
        print(f"ingest: unhealthy: {problem}", file=sys.stderr)
    return ExitCode.UNHEALTHY if problems else ExitCode.OK


async def _validate(args: argparse.Namespace, redactor: Redactor) -> int:
    from ingest.validate import validate  # noqa: PLC0415

    dsn = resolve_dsn(args.dsn)
    result = await validate(args.config, dsn, redactor, check_seconds=args.timeout)
    for problem in result.problems:
        print(problem)
    for note in result.notes:
        print(note)
    if result.problems:
        print(f"ingest: {len(result.problems)} problem(s) in {args.config}", file=sys.stderr)
    else:
        print(
            f"ok: {args.config}: config valid, {result.endpoints_checked} endpoint(s) answered, "
            "database reachable and migrated"
        )
    return int(result.exit_code)


async def _backfill(args: argparse.Namespace, redactor: Redactor) -> int:
    from ingest.backfill import plan_windows, run_backfill  # noqa: PLC0415
    from ingest.worker import WorkerOptions  # noqa: PLC0415
    from ingest.worker import summary as worker_summary  # noqa: PLC0415

    _positive(args, "parallel", "lease_seconds", "max_attempts")
    loaded = load_config(args.config)
    structlog.contextvars.bind_contextvars(source=loaded.source.name)
    plan = plan_windows(loaded.source.endpoint(args.endpoint), args.start, args.end, args.window)
    async with observing(loaded.source.name, _observe(args)) as observer:
        options = WorkerOptions(
            concurrency=args.parallel,
            lease_seconds=args.lease_seconds,
            max_attempts=args.max_attempts,
            max_dead_letters=args.max_dead_letters,
            observer=observer,
        )
        result = await run_backfill(
            loaded, resolve_dsn(args.dsn), redactor, plan, options, plan_only=args.plan_only
        )
    print(f"planned {result.planned} partitions ({result.new} new)")
    if result.worker is not None:
        print(worker_summary(result.worker, result.counts))
    return ExitCode.OK


async def _worker(args: argparse.Namespace, redactor: Redactor) -> int:
    from ingest.worker import WorkerOptions, run_worker  # noqa: PLC0415
    from ingest.worker import summary as worker_summary  # noqa: PLC0415

    _positive(args, "concurrency", "lease_seconds", "max_attempts", "poll_seconds")
    loaded = load_config(args.config)
    structlog.contextvars.bind_contextvars(source=loaded.source.name)
    async with observing(loaded.source.name, _observe(args)) as observer:
        options = WorkerOptions(
            endpoints=tuple(args.endpoint),
            concurrency=args.concurrency,
            lease_seconds=args.lease_seconds,
            poll_seconds=args.poll_seconds,
            drain=args.drain,
            max_attempts=args.max_attempts,
            max_dead_letters=args.max_dead_letters,
            observer=observer,
        )
        result = await run_worker(loaded, resolve_dsn(args.dsn), redactor, options)
    print(worker_summary(result))
    return ExitCode.FAILED if result.failed else ExitCode.OK


async def _dead_letters(args: argparse.Namespace) -> int:
    from ingest.deadletters import (  # noqa: PLC0415
        list_report,
        replay_dead_letters,
        replay_report,
    )
    from ingest.status import load_for_status  # noqa: PLC0415

    loaded = load_for_status(args.config)
    if args.action == "list":
        if args.limit < 0:
            raise ConfigError("--limit must not be negative")
        print(await list_report(loaded, resolve_dsn(args.dsn), args.endpoint, args.limit))
        return ExitCode.OK
    stats = await replay_dead_letters(loaded, resolve_dsn(args.dsn), args.endpoint)
    print(replay_report(loaded.source.name, stats))
    return ExitCode.OK


async def _reset(args: argparse.Namespace) -> int:
    from ingest.reset import confirm_on_terminal, reset_endpoints, reset_report  # noqa: PLC0415
    from ingest.status import load_for_status  # noqa: PLC0415

    if not args.yes and not sys.stdin.isatty():
        raise ConfigError(
            "ingest reset asks for confirmation on a terminal and stdin is not one: "
            "pass --yes to reset without asking"
        )
    loaded = load_for_status(args.config)
    confirm = confirm_on_terminal(loaded.source.name, ask=not args.yes)
    states = await reset_endpoints(loaded, resolve_dsn(args.dsn), args.endpoint, confirm)
    if states is None:
        print("reset cancelled: nothing changed")
        return ExitCode.FAILED
    print(reset_report(loaded.source.name, states))
    return ExitCode.OK


async def _init(args: argparse.Namespace, redactor: Redactor) -> int:
    from pathlib import Path  # noqa: PLC0415

    from ingest.scaffold import InitOptions, init_config, parse_header  # noqa: PLC0415

    if args.depth < 0:
        raise ConfigError("--depth must not be negative")
    headers = dict(parse_header(text) for text in args.header)
    options = InitOptions(
        url=args.url, headers=headers, records_path=args.records_path, depth=args.depth
    )
    output = Path(args.output)
    guess = await init_config(options, output, redactor, force=args.force)
    style = guess.pagination["style"]
    key = guess.primary_key or "none (append)"
    print(
        f"wrote {output}: {len(guess.columns)} columns from {guess.sampled} records on "
        f"{guess.pages} page(s); pagination {style}; primary key {key}"
    )
    print(f"next: ingest validate {output} && ingest run {output}")
    return ExitCode.OK


async def _demo(args: argparse.Namespace, redactor: Redactor, dsn: str | None) -> int:
    from ingest.demo import DEMO_CONFIG, next_steps, sample_report, serve_demo  # noqa: PLC0415

    async with serve_demo(users=args.users) as base_url:
        environ = {
            **os.environ,
            "INGEST_DEMO_URL": base_url,
            "INGEST_DEMO_TOKEN": "demo-secret-token",
        }
        loaded = load_config(DEMO_CONFIG, environ)
        _say(f"demo API on {base_url}, config {DEMO_CONFIG}")
        async with open_pool(dsn, size=1) as pool, pool.acquire() as connection:
            where = str(await database_in_use(connection))
            _writing_to(f"{where} (temporary, deleted on exit)" if args.embedded else where)
            await migrate(connection)
        progress = ObserveOptions(progress=args.progress, progress_interval=1.0)
        async with observing(loaded.source.name, progress) as observer:
            options = RunOptions(command="demo", restart=True, observer=observer)
            result = await run_source(loaded, dsn, redactor, options)
        _say(summary_table(result))
        async with open_pool(dsn, size=1) as pool, pool.acquire() as connection:
            rows = await connection.fetch(
                "SELECT id, name, email, score, updated_at, plan FROM demo_users "
                "ORDER BY id LIMIT 5"
            )
            users = await connection.fetchval("SELECT count(*) FROM demo_users")
            events = await connection.fetchval("SELECT count(*) FROM demo_events")
        _say("")
        _say(sample_report([dict(row) for row in rows], users, events))
        _say("")
        _say(next_steps(str(DEMO_CONFIG)))
    return ExitCode.OK


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # bare `ingest`: the help, as a usage error (nothing was done)
        parser.print_help(sys.stderr)
        return int(ExitCode.CONFIG)
    redactor = Redactor()
    configure_logging(redactor, level=args.log_level, fmt=args.log_format)
    try:
        if args.command == "migrate":
            return asyncio.run(_migrate(resolve_dsn(args.dsn)))
        if args.command == "run":
            return asyncio.run(_run(args, redactor))
        if args.command == "status":
            return asyncio.run(_status(args))
        if args.command == "validate":
            return asyncio.run(_validate(args, redactor))
        if args.command == "backfill":
            return asyncio.run(_backfill(args, redactor))
        if args.command == "worker":
            return asyncio.run(_worker(args, redactor))
        if args.command == "dead-letters":
            return asyncio.run(_dead_letters(args))
        if args.command == "reset":
            return asyncio.run(_reset(args))
        if args.command == "init":
            return asyncio.run(_init(args, redactor))
        if args.command == "demo":
            args.embedded = not has_database_settings(args.dsn)
            if not args.embedded:
                return asyncio.run(_demo(args, redactor, resolve_dsn(args.dsn)))
            warnings.filterwarnings("ignore", module="platformdirs")
            _say("starting a temporary PostgreSQL (no --dsn, DATABASE_URL or PG* set)...")
            with embedded_postgres() as dsn:
                return asyncio.run(_demo(args, redactor, dsn))
    except IngestError as exc:
        if args.debug:
            traceback.print_exc()
        return _failed(args, exc, exc.exit_code, redactor(str(exc)))
    except KeyboardInterrupt as exc:
        return _failed(args, exc, ExitCode.INTERRUPTED, "interrupted")
    except Exception as exc:  # a bug or an unforeseen failure: still one line, still redacted
        if args.debug:
            traceback.print_exc()
        detail = " ".join(str(exc).split()) or "no details"
        message = (
            f"unexpected {type(exc).__name__}: {redactor(detail)} "
            "(rerun with --debug for the traceback)"
        )
        return _failed(args, exc, ExitCode.FAILED, message)
    raise AssertionError(f"unhandled command {args.command}")


#: What the summary and the final event call a run that ended with each code.
_RUN_STATUS = {ExitCode.LOCKED: "skipped", ExitCode.INTERRUPTED: "interrupted"}


def _failed(args: argparse.Namespace, error: BaseException, code: ExitCode, message: str) -> int:
    """Report a command that did not succeed; returns its exit code.

    A run that was recorded prints its per-endpoint table and ``run <id>: failed`` (or
    ``interrupted``) on stdout, as a successful one does. The one-line reason goes to stderr:
    ``ingest: error: ...`` for failures, without ``error:`` for a skipped (locked) or
    interrupted run, which are not failures; with JSON logs, ``ingest run`` emits a
    ``run_finished`` event instead.
    """
    status = _RUN_STATUS.get(code, "failed")
    result = result_of(error)
    if result is not None:
        _say(summary_table(result, getattr(args, "config", None), status=status))
    if args.command == "run" and resolved_format(args.log_format) == "json":
        _run_finished(args, result, status, code, message)
    elif status == "failed":
        print(f"ingest: error: {message}", file=sys.stderr)
    elif message == "interrupted":
        print("ingest: interrupted", file=sys.stderr)
    else:
        print(f"ingest: {status}: {message}", file=sys.stderr)
    return int(code)


def console() -> int:
    """The process entry point (the ``ingest`` script, ``python -m ingest``): :func:`main`, then
    ready the interpreter to exit.

    Why ``gc.freeze()``: at exit CPython runs full collections over every object still alive,
    ~60k after the imports, which took 85-110 ms of a one-page run on the benchmark machine;
    frozen objects are not scanned, so exit takes ~12 ms. Everything the run opened is closed
    by now, and the operating system reclaims the memory; only objects that are garbage in
    reference cycles at exit go unfinalized, as CPython never promised otherwise. Not in
    :func:`main`, which tests and embedders call in a process that goes on.
    """
    sys.stdout = cast(TextIO, ClosedPipeTolerant(sys.stdout))
    code = main()
    gc.freeze()
    return code


class ClosedPipeTolerant(io.TextIOBase):
    """stdout that a closed pipe (``ingest demo | head -2``) cannot break.

    When the reader goes away, the rest of the output is dropped (fd 1 is pointed at
    ``/dev/null``) and the command carries on: a load is never cut short halfway by a pager
    or ``head``, and it exits with its own code (0 when it succeeded), not with a
    ``BrokenPipeError`` or 141.
    """

    def __init__(self, stream: TextIO) -> None:
        super().__init__()
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._drop_the_rest()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._drop_the_rest()

    def _drop_the_rest(self) -> None:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, self._stream.fileno())
        finally:
            os.close(devnull)
        self._stream.flush()  # what was buffered now goes to /dev/null

    def isatty(self) -> bool:
        return self._stream.isatty()

    def fileno(self) -> int:
        return self._stream.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return self._stream.encoding

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)
