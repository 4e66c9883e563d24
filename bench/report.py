"""The printed table, the ratios, and the targets of the benchmark issue."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from bench.measure import Measured

TARGETS = {"append_vs_copy": 0.85, "merge_vs_copy": 0.60, "vs_dlt": 20.0, "rss_mb": 150.0}


def _find(results: Sequence[Measured], prefix: str) -> Measured | None:
    matches = [m for m in results if m.name.startswith(prefix)]
    return max(matches, key=lambda m: m.rate) if matches else None


def _ratio(top: Measured | None, bottom: Measured | None) -> float | None:
    if top is None or bottom is None or bottom.rate == 0:
        return None
    return round(top.rate / bottom.rate, 3)


def _by_round(top: Measured | None, bottom: Measured | None) -> list[float] | None:
    """``top``'s records/s over ``bottom``'s in each round of ``--repeat`` (same data, so the
    inverse ratio of the walls): how much the headline ratio, a ratio of two best runs, owes to
    one fast or slow minute."""
    if top is None or bottom is None:
        return None
    tops, bottoms = top.output.get("runs_wall_s"), bottom.output.get("runs_wall_s")
    if not tops or not bottoms or len(tops) != len(bottoms) or len(tops) < 2:
        return None
    pairs = zip(tops, bottoms, strict=True)
    return [
        round(bottom_wall / top_wall, 3) if top_wall else 0.0 for top_wall, bottom_wall in pairs
    ]


def cpu_bound(run: Measured | None, copy: Measured | None, cpus: int) -> dict[str, float] | None:
    """The most ``run`` could reach at its measured CPU per record, spread perfectly over ``cpus``.

    Ingest's and PostgreSQL's CPU per record are both measured; with every core busy all the
    time and nothing else running (the HTTP server's CPU is not counted), records/s can be at
    most ``cpus / (ingest CPU + PostgreSQL CPU per record)``. It is an optimistic bound: when it
    is below a target, no scheduling of the same work (more processes, more connections) can
    reach that target on this machine; only less CPU per record can.
    """
    if run is None or run.pg_cpu is None or not run.records:
        return None
    per_record = (run.cpu + run.pg_cpu) / run.records
    if per_record <= 0:
        return None
    rate = cpus / per_record
    bound = {"records_per_s": round(rate), "core_s_per_million": round(per_record * 1e6, 2)}
    if copy is not None and copy.rate:
        bound["vs_copy"] = round(rate / copy.rate, 3)
    return bound


def targets(results: Sequence[Measured], cpus: int) -> dict[str, Any]:
    copy = _find(results, "COPY ceiling")
    current = [m for m in results if "@" not in m.name]
    # The default load path; the opt-in ``load = "server"`` rows get ratios of their own.
    append = next((m for m in current if m.name == "ingest append"), None)
    merge = next((m for m in current if m.name == "ingest merge"), None)
    named = {m.name: m for m in current}
    append_server = named.get("ingest append (server)")
    merge_server = named.get("ingest merge (server)")
    # Opt-in writer processes (pipeline.writer_processes): ratios of their own too.
    writers = [m for m in current if m.name.endswith(" writers)")]
    append_writers = next((m for m in writers if m.name.startswith("ingest append")), None)
    merge_writers = next((m for m in writers if m.name.startswith("ingest merge (")), None)
    merge_existing = next((m for m in current if m.name.startswith("ingest merge into")), None)
    ratios = {
        "append_vs_copy": _ratio(append, copy),
        "merge_vs_copy": _ratio(merge, copy),
        "merge_existing_vs_copy": _ratio(merge_existing, copy),
        "append_writers_vs_copy": _ratio(append_writers, copy),
        "merge_writers_vs_copy": _ratio(merge_writers, copy),
        "append_server_vs_copy": _ratio(append_server, copy),
        "merge_server_vs_copy": _ratio(merge_server, copy),
        "append_vs_dlt": _ratio(append, _find(results, "dlt")),
        "append_vs_naive": _ratio(append, _find(results, "naive")),
        "append_vs_http_ceiling": _ratio(append, _find(results, "HTTP")),
    }
    before = [m for m in results if "@" in m.name]
    if before:
        ratios["append_vs_before"] = _ratio(append, _find(before, "ingest append"))
        ratios["merge_vs_before"] = _ratio(
            merge, next((m for m in before if m.name.startswith("ingest merge @")), None)
        )
    ingest_rss = [m.peak_rss_mb for m in current if m.name.startswith("ingest")]
    checks = {
        "append >= 85% of COPY": _check(ratios["append_vs_copy"], TARGETS["append_vs_copy"]),
        "merge >= 60% of COPY": _check(ratios["merge_vs_copy"], TARGETS["merge_vs_copy"]),
        "ingest >= 20x dlt": _check(ratios["append_vs_dlt"], TARGETS["vs_dlt"]),
        "ingest peak RSS < 150 MB": (max(ingest_rss) < TARGETS["rss_mb"]) if ingest_rss else None,
    }
    bounds = {
        name: bound
        for name, run in (("append", append), ("merge", merge))
        if (bound := cpu_bound(run, copy, cpus)) is not None
    }
    by_round = {
        name: values
        for name, values in (
            ("append_vs_copy", _by_round(append, copy)),
            ("merge_vs_copy", _by_round(merge, copy)),
        )
        if values is not None
    }
    return {"ratios": ratios, "by_round": by_round, "targets": checks, "cpu_bounds": bounds}


def _check(value: float | None, floor: float) -> bool | None:
    return None if value is None else value >= floor


def _fmt(value: float | None, pattern: str) -> str:
    return "-" if value is None else format(value, pattern)


def render(meta: dict[str, Any], results: Sequence[Measured]) -> str:
    header = (
        f"{'contender':<44} {'records':>10} {'wall s':>8} {'records/s':>11} "
        f"{'CPU s/M':>8} {'PG CPU s/M':>10} {'peak RSS MB':>11}"
    )
    lines = [
        "",
        f"ingest benchmark: {meta['records']:,} records ({meta['json_bytes'] / 1e6:.0f} MB JSON), "
        f"HTTP {meta['http_server']}, PostgreSQL {meta['postgres_version']} ({meta['postgres']}), "
        f"{meta['cpus']} CPUs",
        header,
        "-" * len(header),
    ]
    for m in results:
        lines.append(
            f"{m.name:<44} {m.records:>10,} {m.wall:>8.1f} {m.rate:>11,.0f} "
            f"{_fmt(m.per_million(m.cpu), '.1f'):>8} {_fmt(m.per_million(m.pg_cpu), '.1f'):>10} "
            f"{m.peak_rss_mb:>11.0f}" + (f"  {m.note}" if m.note else "")
        )
    summary = targets(results, meta["cpus"])
    lines.append("")
    for name, value in summary["ratios"].items():
        lines.append(f"  {name:<26} {_fmt(value, '.3f')}")
    for name, values in summary["by_round"].items():
        lines.append(f"  {name + ' by round':<26} " + " ".join(f"{value:.3f}" for value in values))
    lines.append("")
    for name, ok in summary["targets"].items():
        verdict = "n/a" if ok is None else ("PASS" if ok else "FAIL")
        lines.append(f"  {verdict:<5} {name}")
    if summary["cpu_bounds"]:
        lines.append("")
        lines.append(
            f"  best case at the measured CPU per record (ingest + PostgreSQL) on {meta['cpus']} "
            "cores, every core busy, HTTP server not counted:"
        )
    for name, bound in summary["cpu_bounds"].items():
        versus = f" = {bound['vs_copy']:.2f} of COPY" if "vs_copy" in bound else ""
        lines.append(
            f"    ingest {name:<6} {bound['core_s_per_million']:>5.1f} core-s per 1M -> "
            f"at most {bound['records_per_s']:>9,} records/s{versus}"
        )
    return "\n".join(lines)
