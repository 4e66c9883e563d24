"""The benchmark's dataset and ingest config are valid (the benchmark itself is not a test)."""

from __future__ import annotations

from pathlib import Path

import orjson

from bench.dataset import PAGE_SIZE, ensure_dataset, page_document, record
from bench.measure import Measured
from bench.report import cpu_bound, targets
from bench.target import COLUMNS, ingest_config
from ingest.config import parse_config
from ingest.rows import RowBuilder


def test_records_are_about_260_bytes_and_deterministic() -> None:
    sizes = [len(orjson.dumps(record(index))) for index in (1, 999, 123_456, 4_999_999)]
    assert all(220 <= size <= 290 for size in sizes), sizes
    assert record(42) == record(42)


def test_pages_carry_the_total_and_the_last_page_is_short(tmp_path: Path) -> None:
    dataset = ensure_dataset(2_500, root=tmp_path, log=lambda _: None)
    assert dataset.pages == 3
    last = orjson.loads(dataset.page_path(3).read_bytes())
    assert [item["id"] for item in last["data"]] == list(range(2_001, 2_501))
    assert last["meta"] == {"page": 3, "total_pages": 3, "total": 2_500}
    assert len(page_document(1, 2_500)["data"]) == PAGE_SIZE
    assert ensure_dataset(2_500, root=tmp_path, log=lambda _: None) == dataset


def test_ingest_config_converts_every_generated_record() -> None:
    for mode, load in (("append", "python"), ("merge", "python"), ("merge", "server")):
        text = ingest_config("http://127.0.0.1:1", table="bench_items", mode=mode, load=load)
        loaded = parse_config(text, Path("bench.toml"), {})
        table = loaded.source.endpoints[0].table
        assert table.load == load
        assert tuple(table.columns) == tuple(COLUMNS)
        rows, rejected = RowBuilder(table).build_many(page_document(7, 10_000)["data"])
        assert rejected == []
        assert len(rows) == PAGE_SIZE


def test_cpu_bound_spreads_the_measured_cpu_over_every_core() -> None:
    copy = Measured("COPY ceiling, 2 conns", 1_000_000, 1.5, 0.8, 700.0, 1.1)
    append = Measured("ingest append", 1_000_000, 3.5, 3.4, 89.0, 0.9)
    # 4.3 core-seconds per 1M records on 2 cores: at most 1M / 2.15 s.
    assert cpu_bound(append, copy, cpus=2) == {
        "records_per_s": 465_116,
        "core_s_per_million": 4.3,
        "vs_copy": round(465_116 / (1_000_000 / 1.5), 3),
    }
    assert cpu_bound(Measured("ingest merge", 0, 1.0, 1.0, 90.0, None), copy, cpus=2) is None
    assert "cpu_bounds" in targets([copy, append], cpus=2)


def test_ratios_by_round_pair_the_runs_of_each_round() -> None:
    """--repeat rounds: append/COPY per round, beside the ratio of the two best runs."""
    copy = Measured("COPY ceiling, 2 conns", 1_000_000, 2.0, 1.0, 700.0, 2.0)
    copy.output["runs_wall_s"] = [3.0, 2.0]
    append = Measured("ingest append", 1_000_000, 2.5, 2.5, 85.0, 1.8)
    append.output["runs_wall_s"] = [2.5, 3.2]
    summary = targets([copy, append], cpus=2)
    assert summary["ratios"]["append_vs_copy"] == 0.8
    assert summary["by_round"] == {"append_vs_copy": [1.2, 0.625]}
    single = Measured("ingest merge", 1_000_000, 4.0, 3.0, 88.0, 3.0)
    single.output["runs_wall_s"] = [4.0]
    assert "merge_vs_copy" not in targets([copy, append, single], cpus=2)["by_round"]
