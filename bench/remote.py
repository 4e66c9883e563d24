"""``python -m bench --remote``: ingest and dlt against an API that answers like a remote one.

The loopback benchmark measures CPU: its server answers in microseconds. Real APIs answer in
50-300 ms, and there a loader's speed is how well it hides that latency (concurrency, prefetch)
without being impolite. This mode serves the benchmark's records from
:mod:`bench.remote_server` (every answer after ~100 ms, optionally rate limited or refusing
concurrency) in every pagination style, and runs per style, one after another against the same
PostgreSQL: dlt ``rest_api`` with its defaults (and ``parallelized: True`` for the child
endpoint), ingest with its **default** config, ingest tuned.

Per run it prints the wall time, the requests the server saw (and refused), the rows loaded, the
serial time (the requests a one-at-a-time walk needs x the mean latency), the bound a
concurrency limit allows (serial / limit) or, for the rate-limited server, requests / rate; and
the ratios to both and to dlt. Then the issue-14 targets, each PASS or FAIL.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.cli import (
    BENCH,
    RESULTS,
    ROOT,
    compile_bytecode,
    database,
    ensure_dlt,
    ingest_run_command,
    sql,
)
from bench.measure import PostgresCpu, run_child
from bench.remote_server import Settings
from bench.remote_styles import (
    INCREMENTAL,
    NUMBERED,
    RANGED,
    STYLES,
    expected_rows,
    mean_latency,
    pagination,
    serial_requests,
)
from bench.server import _wait_listening, free_port
from bench.target import COLUMNS, _toml
from ingest.config import HttpSettings

CONTENDERS = ("dlt", "default", "tuned")
#: What "ingest tuned" sets (a user who read docs/performance.md).
TUNED = {"max_concurrency": 16, "pages_ahead": 32}
#: dlt runs ``parallelized`` resources in a pool of this many extract workers (its default).
DLT_WORKERS = 5


@dataclass(frozen=True, slots=True)
class Run:
    profile: str
    style: str
    contender: str  # "dlt", "dlt parallelized", "default", "tuned"


@dataclass(slots=True)
class Result:
    profile: str
    style: str
    contender: str
    wall: float
    requests: int
    refused: int
    max_in_flight: int
    rows: int
    expected: int
    serial: float
    limit: float
    concurrency: int
    note: str = ""
    #: The contender's config declares the server's range filter (slices may cut the walk).
    ranged: bool = False
    #: Seconds from the server's first request of the run to its last answer.
    window: float = 0.0

    @property
    def exact(self) -> bool:
        return self.rows == self.expected


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench --remote",
        description="ingest vs. dlt against a local API with remote-like latency",
    )
    defaults = Settings()
    parser.add_argument("--records", type=int, default=defaults.records)
    parser.add_argument("--page-size", type=int, default=defaults.page_size)
    parser.add_argument("--parents", type=int, default=defaults.parents)
    parser.add_argument("--latency", type=float, default=defaults.latency, help="seconds")
    parser.add_argument("--jitter", type=float, default=defaults.jitter, help="+/- fraction")
    parser.add_argument("--sigma", type=float, default=defaults.sigma, help="lognormal sigma")
    parser.add_argument("--rate", type=float, default=defaults.rate, help="requests/s (rate)")
    parser.add_argument("--styles", default=",".join(STYLES))
    parser.add_argument("--contenders", default=",".join(CONTENDERS))
    parser.add_argument(
        "--profiles",
        default="fixed,lognormal,rate,solo",
        help="fixed: every style; lognormal, rate, solo: page_total only",
    )
    parser.add_argument("--dsn", help="PostgreSQL (default: DATABASE_URL, else embedded pgserver)")
    parser.add_argument("--label", default="")
    parser.add_argument("--results-dir", type=Path, default=RESULTS, help="where the JSON goes")
    parser.add_argument("--keep-db", action="store_true")
    return parser.parse_args(argv)


def _names(raw: str, allowed: tuple[str, ...], what: str) -> list[str]:
    names = [name.strip() for name in raw.split(",") if name.strip()]
    unknown = sorted(set(names) - set(allowed))
    if unknown:
        raise SystemExit(f"bench --remote: --{what}: unknown {unknown[0]!r}")
    return names


def plan(styles: list[str], contenders: list[str], profiles: list[str]) -> list[Run]:
    """Every style under ``fixed``; the page_total walk under the other profiles."""
    runs: list[Run] = []
    for profile in profiles:
        for style in styles if profile == "fixed" else ["page_total"]:
            if style not in styles:
                continue
            for contender in contenders:
                if contender == "dlt" and profile in ("rate", "solo", "lognormal"):
                    continue  # dlt's serial walk is not what these profiles test
                runs.append(Run(profile, style, contender))
                if contender == "dlt" and style == "children":
                    runs.append(Run(profile, style, "dlt parallelized"))
    return runs


def concurrency_of(contender: str) -> int:
    if contender == "default":
        return HttpSettings().max_concurrency
    if contender == "tuned":
        return int(TUNED["max_concurrency"])
    return DLT_WORKERS if contender == "dlt parallelized" else 1


def ranged(run: Run) -> bool:
    """Whether the run's config declares the server's range filter (ingest, serial styles)."""
    return run.style in RANGED and not run.contender.startswith("dlt")


def ingest_config(
    base_url: str, run: Run, table: str, http: dict[str, Any], page_size: int = 100
) -> str:
    """The contender's config: one endpoint (two for the parent -> child pair).

    The source is named after the table: an incremental endpoint's high-water mark is kept per
    source and endpoint, and each run must be a first load.
    """
    lines = ["[source]", f"name = {_toml(table)}", f"base_url = {_toml(base_url)}", "[http]"]
    lines += [f"{key} = {_toml(value)}" for key, value in http.items()]
    columns = [
        f"{name} = {_toml({'path': path, 'type': kind})}" for name, (path, kind) in COLUMNS.items()
    ]
    if run.style == "children":
        lines += [
            "[[endpoints]]",
            'name = "parents"',
            f'path = "/{run.profile}/parents"',
            'records_path = "data"',
            "[endpoints.table]",
            f"name = {_toml(table + '_parents')}",
            'mode = "append"',
            "[endpoints.table.columns]",
            'id = { path = "id", type = "bigint" }',
            "[[endpoints]]",
            'name = "children"',
            'parent = "parents"',
            f'path = "/{run.profile}/parents/{{id}}/children"',
            'records_path = "data"',
            "[endpoints.table]",
            f"name = {_toml(table)}",
            'mode = "append"',
            "[endpoints.table.columns]",
            *columns,
            'parent_id = { path = "$parent.id", type = "bigint" }',
        ]
    else:
        lines += [
            "[[endpoints]]",
            'name = "items"',
            f'path = "/{run.profile}/{run.style}"',
            'records_path = "data"',
            f"pagination = {_toml(pagination(run.style, page_size))}",
            "[endpoints.table]",
            f"name = {_toml(table)}",
            'mode = "append"',
            "[endpoints.table.columns]",
            *columns,
        ]
        if ranged(run):
            lines += ["[endpoints.incremental]"]
            lines += [f"{key} = {_toml(value)}" for key, value in INCREMENTAL.items()]
    return "\n".join(lines) + "\n"


def _call(base_url: str, path: str, method: str = "GET") -> Any:
    request = urllib.request.Request(
        base_url + path, method=method, data=b"" if method == "POST" else None
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        return json.loads(answer.read())


@contextmanager
def remote_server(settings: Settings) -> Iterator[str]:
    """The remote-mode server in its own process on 127.0.0.1, stopped by PID."""
    port = free_port()
    command = [sys.executable, "-m", "bench.remote_server", str(port)]
    for name, value in asdict(settings).items():
        command += [f"--{name.replace('_', '-')}", str(value)]
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, cwd=ROOT)
    try:
        _wait_listening(port, process, "remote server")
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _command(  # noqa: PLR0917 - one call site, all inputs of a run
    run: Run,
    base_url: str,
    dsn: str,
    scratch: str,
    table: str,
    dlt_python: Path | None,
    page_size: int,
) -> list[str] | None:
    if run.contender.startswith("dlt"):
        if dlt_python is None:
            return None
        extra = ["parallelized"] if run.contender == "dlt parallelized" else []
        dataset = table
        return [
            str(dlt_python),
            str(BENCH / "dlt_remote.py"),
            base_url,
            dsn,
            dataset,
            scratch,
            run.profile,
            run.style,
            str(page_size),
            *extra,
        ]
    http = dict(TUNED) if run.contender == "tuned" else {}
    config = Path(scratch) / f"{table}.toml"
    config.write_text(ingest_config(base_url, run, table, http, page_size))
    return ingest_run_command(sys.executable, config, dsn)


def measure(  # noqa: PLR0917 - one call site, all inputs of a run
    run: Run,
    settings: Settings,
    base_url: str,
    dsn: str,
    scratch: str,
    dlt_python: Path | None,
    postgres: PostgresCpu,
    log: Any,
) -> Result | None:
    slug = "".join(
        ch if ch.isalnum() else "_" for ch in f"r_{run.profile}_{run.style}_{run.contender}"
    )
    command = _command(run, base_url, dsn, scratch, slug, dlt_python, settings.page_size)
    if command is None:
        return None
    _call(base_url, "/_reset", "POST")
    log(f"{run.profile}/{run.style}: {run.contender} ...")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    try:
        measured, _, _ = run_child(
            run.contender, command, env=env, postgres=postgres, cwd=str(ROOT)
        )
    except RuntimeError as exc:
        log(f"  failed: {str(exc).splitlines()[-1] if str(exc) else exc}")
        return None
    stats = _call(base_url, "/_stats")[run.profile]
    if run.contender.startswith("dlt"):
        rows = int(measured.output.get("records", 0))
    else:
        rows = int(sql(dsn, f'SELECT count(*) FROM "{slug}"'))
    serial = serial_requests(run.style, settings) * mean_latency(run.profile, settings)
    concurrency = concurrency_of(run.contender)
    limit = serial / concurrency
    if run.profile == "rate":
        limit = serial_requests(run.style, settings) / settings.rate
    elif run.profile == "solo":
        limit = serial
    result = Result(
        profile=run.profile,
        style=run.style,
        contender=run.contender,
        wall=measured.wall,
        requests=int(stats["requests"]),
        refused=int(stats["refused"]),
        max_in_flight=int(stats["max_in_flight"]),
        rows=rows,
        expected=expected_rows(run.style, settings),
        serial=serial,
        limit=limit,
        concurrency=concurrency,
        note=str(measured.output.get("version", "")),
        ranged=ranged(run),
        window=float(stats["window"] or 0.0),
    )
    log(
        f"  {result.wall:.1f} s, {result.requests} requests ({result.refused} refused), "
        f"{result.rows:,} rows"
    )
    return result


def render(results: list[Result]) -> str:
    dlt = {(r.profile, r.style): r.wall for r in results if r.contender == "dlt"}
    header = (
        f"{'profile/style':<22} {'contender':<17} {'range':<5} {'wall s':>7} {'reqs':>5} "
        f"{'429s':>5} "
        f"{'peak':>4} {'rows':>7} {'serial s':>8} {'limit s':>7} {'x serial':>8} "
        f"{'x limit':>7} {'dlt/this':>8}"
    )
    lines = [header, "-" * len(header)]
    for r in results:
        versus = dlt.get((r.profile, r.style))
        lines.append(
            f"{r.profile + '/' + r.style:<22} {r.contender:<17} {'yes' if r.ranged else '':<5} "
            f"{r.wall:>7.2f} {r.requests:>5} {r.refused:>5} {r.max_in_flight:>4} "
            f"{r.rows:>7,}{'' if r.exact else '!'} "
            f"{r.serial:>8.1f} {r.limit:>7.2f} {r.wall / r.serial:>8.2f} "
            f"{r.wall / r.limit:>7.2f} {'' if versus is None else f'{versus / r.wall:>7.1f}x':>8}"
        )
    return "\n".join(lines)


def rate_share(result: Result, settings: Settings) -> float:
    """The share of what the rate-limited server allowed that the run used, over its requests'
    window (first request to last answer; the process's start-up and shutdown send nothing).

    The server's bucket starts full (one second's burst), so in ``window`` seconds it allows
    ``rate`` (the burst) + ``rate x window`` requests.
    """
    accepted = result.requests - result.refused
    allowed = settings.rate * (1 + result.window)
    return accepted / allowed if allowed > 0 else 0.0


def targets(results: list[Result], settings: Settings) -> list[tuple[str, bool]]:
    """Issue 14's targets for the default config, each with its verdict."""
    found = {(r.profile, r.style, r.contender): r for r in results}
    verdicts: list[tuple[str, bool]] = []
    for style in NUMBERED + RANGED:
        mine, theirs = found.get(("fixed", style, "default")), found.get(("fixed", style, "dlt"))
        if mine is None:
            continue
        ratio = mine.wall / mine.serial
        ranges = " with a range filter" if mine.ranged else ""
        text = f"fixed/{style}: default{ranges} {ratio:.2f}x serial (<= 0.35)"
        ok = ratio <= 0.35 and mine.exact
        if theirs is not None:
            text += f", {theirs.wall / mine.wall:.1f}x dlt (>= 3)"
            ok = ok and theirs.wall / mine.wall >= 3
        verdicts.append((text, ok))
    mine = found.get(("lognormal", "page_total", "default"))
    if mine is not None:
        ratio = mine.wall / mine.serial
        verdicts.append(
            (f"lognormal/page_total: default {ratio:.2f}x serial (<= 0.35)", ratio <= 0.35)
        )
    mine = found.get(("rate", "page_total", "default"))
    if mine is not None:
        share = rate_share(mine, settings)
        over_wall = (mine.requests - mine.refused) / mine.wall / settings.rate
        refused = mine.refused / max(1, mine.requests)
        verdicts.append(
            (
                f"rate/page_total: {share:.1%} of the {settings.rate:g} req/s allowed over its "
                f"requests' {mine.window:.2f} s (>= 90 %; {over_wall:.1%} over the process's "
                f"{mine.wall:.2f} s), 429s {refused:.1%} of requests (<= 5 %), "
                f"rows exact: {mine.exact}",
                share >= 0.9 and refused <= 0.05 and mine.exact,
            )
        )
    mine = found.get(("solo", "page_total", "default"))
    if mine is not None:
        ratio = mine.wall / mine.serial
        verdicts.append(
            (
                f"solo/page_total: {ratio:.2f}x serial (<= 1.2), {mine.refused} refused, "
                f"rows exact: {mine.exact}",
                ratio <= 1.2 and mine.exact,
            )
        )
    mine = found.get(("fixed", "children", "default"))
    if mine is not None:
        ratio = mine.wall / mine.serial
        parallel = found.get(("fixed", "children", "dlt parallelized"))
        text = f"fixed/children: default {ratio:.2f}x serial (<= 0.35)"
        ok = ratio <= 0.35 and mine.exact
        if parallel is not None:
            text += f", {mine.wall:.2f} s vs dlt parallelized {parallel.wall:.2f} s"
            ok = ok and mine.wall <= parallel.wall
        verdicts.append((text, ok))
    return verdicts


def log(message: str) -> None:
    print(f"[bench --remote] {message}", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = Settings(
        records=args.records,
        page_size=args.page_size,
        parents=args.parents,
        latency=args.latency,
        jitter=args.jitter,
        sigma=args.sigma,
        rate=args.rate,
    )
    styles = _names(args.styles, STYLES, "styles")
    contenders = _names(args.contenders, CONTENDERS, "contenders")
    profiles = _names(args.profiles, ("fixed", "lognormal", "rate", "solo"), "profiles")
    runs = plan(styles, contenders, profiles)
    dlt_python = ensure_dlt(log) if "dlt" in contenders else None
    compile_bytecode(ROOT / "ingest", log)
    results: list[Result] = []
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with (
        database(args.dsn, args.keep_db) as (dsn, db_label),
        remote_server(settings) as base_url,
        tempfile.TemporaryDirectory(prefix="ingest-bench-remote-") as scratch,
    ):
        log(
            f"{settings.records:,} records, {settings.page_size} a page, latency "
            f"{settings.latency * 1000:.0f} ms +/- {settings.jitter:.0%} (lognormal sigma "
            f"{settings.sigma:g}), rate profile {settings.rate:g} req/s; {base_url}; {db_label}"
        )
        postgres = asyncio.run(PostgresCpu.find(dsn))
        migrate = [sys.executable, "-m", "ingest", "migrate", "--dsn", dsn]
        run_child("migrate", migrate, env=env, postgres=postgres)
        for run in runs:
            result = measure(run, settings, base_url, dsn, scratch, dlt_python, postgres, log)
            if result is not None:
                results.append(result)
    print(render(results))
    verdicts = targets(results, settings)
    for text, ok in verdicts:
        print(f"{'PASS' if ok else 'FAIL'}  {text}")
    results_dir: Path = args.results_dir
    results_dir.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    report = {
        "meta": {
            "when": stamp,
            "label": args.label,
            "settings": asdict(settings),
            "default_http": {
                "max_concurrency": HttpSettings().max_concurrency,
                "pages_ahead": HttpSettings().default_pages_ahead(),
            },
            "tuned_http": TUNED,
            "cpus": os.cpu_count(),
        },
        "results": [{**asdict(r), "exact": r.exact} for r in results],
        "targets": [{"target": text, "pass": ok} for text, ok in verdicts],
    }
    path = results_dir / f"remote-{stamp}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    (results_dir / "remote-latest.json").write_text(json.dumps(report, indent=2) + "\n")
    log(f"results written to {path}")
    return 0
