"""Human-readable summaries of a run, printed on stdout (logs go to stderr)."""

from __future__ import annotations

from ingest.runstate import RunResult


def summary_table(result: RunResult) -> str:
    """Per endpoint: pages, records, dead letters, seconds, records/s; then retries by reason."""
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
    lines.append(f"run {result.run_id}: succeeded")
    return "\n".join(lines)
