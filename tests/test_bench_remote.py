"""``python -m bench --remote`` keeps working: a tiny run (few pages, 5 ms latency), no timings.

The benchmark itself is not a test; this only checks that every part of the remote mode runs
end to end (its server, every pagination style's ingest config, the parent -> child pair, the
server that refuses concurrency) and that every run loads exactly its rows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from bench.remote_server import Settings
from bench.remote_styles import PAGINATION, STYLES, expected_rows, serial_requests

ROOT = Path(__file__).resolve().parent.parent


def test_every_style_has_an_ingest_pagination_and_serial_counts_are_right() -> None:
    assert set(STYLES) - set(PAGINATION) == {"children"}
    settings = Settings(records=20_000, page_size=100, parents=100)
    assert serial_requests("page_total", settings) == 200
    assert serial_requests("page", settings) == 201  # the empty page that ends the walk
    assert serial_requests("children", settings) == 101
    assert expected_rows("children", settings) == 10_000


def test_a_tiny_remote_bench_runs_every_style_and_loads_exact_rows(
    postgres_server: str, tmp_path: Path
) -> None:
    command = [
        sys.executable,
        "-m",
        "bench",
        "--remote",
        *("--records", "120", "--page-size", "20", "--parents", "3", "--latency", "0.005"),
        *("--contenders", "default", "--profiles", "fixed,solo", "--dsn", postgres_server),
        *("--results-dir", str(tmp_path)),
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "remote-latest.json").read_text())
    runs = {(r["profile"], r["style"]): r for r in report["results"]}
    assert set(runs) == {("fixed", style) for style in STYLES} | {("solo", "page_total")}
    assert all(r["exact"] for r in runs.values()), runs
    assert runs[("fixed", "children")]["rows"] == 60
    assert "x serial" in done.stdout
