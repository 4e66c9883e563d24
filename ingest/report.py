"""Human-readable summaries of a run, printed on stdout (logs go to stderr)."""

from __future__ import annotations

import shlex

from ingest.runstate import RunResult


def summary_table(
    result: RunResult, config: str | None = None, *, status: str = "succeeded"
) -> str:
    """Per endpoint: pages, records, dead letters, seconds, records/s; then retries by reason,
    and where to find this run's dead letters when it has any (``config``: the command's
    config path, for the command line shown); then ``run <id>: <status>`` (succeeded, failed,
    interrupted). A failed or interrupted run shows what it committed before it stopped."""
    header = ("endpoint", "pages", "records", "dead", "seconds", "records/s")
    rows = [
        (
            name,
            str(stats.pages),
            str(stats.records),
            str(stats.dead_letters),
            f"{stats.seconds:.2f}",
            f"{stats.records_per_second:,.0f}",
        )
        for name, stats in result.endpoints.items()
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(
            cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(row)
        )
        for row in [header, *rows]
    ]
    retries = ", ".join(f"{reason}={count}" for reason, count in sorted(result.retries.items()))
    lines.append(f"retries: {retries or 'none'}")
    dead = sum(stats.dead_letters for stats in result.endpoints.values())
    if dead:
        lines.append(dead_letter_pointer(result, dead, config))
    lines.append(f"run {result.run_id}: {status}")
    return "\n".join(lines)


def dead_letter_pointer(result: RunResult, dead: int, config: str | None) -> str:
    """Where a person finds the run's dead letters, and how to load them after a config fix."""
    command = f"ingest dead-letters list {shlex.quote(config) if config else 'CONFIG'}"
    return (
        f"dead letters: {dead} in ingest.dead_letters ({command}, or "
        f"SELECT error, record FROM ingest.dead_letters WHERE run_id = '{result.run_id}'; "
        "after a config fix: ingest dead-letters replay)"
    )
