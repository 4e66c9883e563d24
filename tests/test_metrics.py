"""Prometheus metrics: scraped over real HTTP while a run is held mid-way, and as a textfile."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import asyncpg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ingest.errors import SourceError
from ingest.metrics import RunMetrics, exporting
from tests.conftest import PYTHON
from tests.gated import RELEASE, gated_app, gated_config, wait_committed
from tests.helpers import config_text, make_config, run
from tests.servers import serve

Connection = asyncpg.Connection
ITEMS = {"source": "test", "endpoint": "items"}


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, keyed by name and sorted labels."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(
    scraped: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return scraped[(name, tuple(sorted(labels.items())))]


async def test_metrics_endpoint_serves_live_counts_during_a_run(
    database: str, db: Connection
) -> None:
    app = gated_app(50, hold_at=4, unavailable_once_at=2)
    async with serve(app) as base:
        loaded = make_config(base, **gated_config())
        metrics = RunMetrics("test")
        with exporting(metrics, port=0) as port:
            assert port
            running = asyncio.create_task(run(loaded, database, observer=metrics))
            try:
                await wait_committed(db, 30)  # pages 1-3 committed; page 4 is held
                async with (
                    aiohttp.ClientSession() as client,
                    client.get(f"http://127.0.0.1:{port}/metrics") as response,
                ):
                    assert response.status == 200
                    assert response.headers["Content-Type"].startswith("text/plain")
                    body = await response.text()
            finally:
                app[RELEASE].set()
            await running
        url = f"http://127.0.0.1:{port}/metrics"

    scraped = samples(body)
    assert value(scraped, "ingest_records_total", **ITEMS) == 30
    assert value(scraped, "ingest_pages_total", **ITEMS) == 3
    assert value(scraped, "ingest_retries_total", **ITEMS, reason="http_503") == 1
    assert value(scraped, "ingest_http_responses_total", **ITEMS, status="200") == 3
    assert value(scraped, "ingest_http_responses_total", **ITEMS, status="503") == 1
    assert value(scraped, "ingest_errors_total", **ITEMS, kind="http_503") == 1
    assert value(scraped, "ingest_dead_letters_total", **ITEMS) == 0
    assert value(scraped, "ingest_request_duration_seconds_count", **ITEMS) == 4
    assert value(scraped, "ingest_request_duration_seconds_bucket", **ITEMS, le="+Inf") == 4
    assert value(scraped, "ingest_endpoints_running", source="test") == 1
    assert ("ingest_queue_depth", tuple(sorted(ITEMS.items()))) in scraped
    assert ("ingest_run_success", (("source", "test"),)) not in scraped  # not over yet

    registry = metrics.registry
    assert registry.get_sample_value("ingest_records_total", ITEMS) == 50
    assert registry.get_sample_value("ingest_pages_total", ITEMS) == 5
    assert registry.get_sample_value("ingest_run_success", {"source": "test"}) == 1
    assert registry.get_sample_value("ingest_endpoints_running", {"source": "test"}) == 0
    with pytest.raises(aiohttp.ClientConnectionError):  # the exporter stopped with the run
        async with aiohttp.ClientSession() as client, client.get(url):
            pass


async def test_textfile_records_a_failed_short_run_for_node_exporter(
    database: str, tmp_path: Path
) -> None:
    textfile = tmp_path / "ingest_test.prom"
    async with serve(gated_app(50, fail_at=2)) as base:
        loaded = make_config(base, **gated_config())
        metrics = RunMetrics("test")
        with pytest.raises(SourceError), exporting(metrics, textfile=textfile):
            await run(loaded, database, observer=metrics)
    scraped = samples(textfile.read_text())
    assert value(scraped, "ingest_run_success", source="test") == 0
    assert value(scraped, "ingest_run_end_time_seconds", source="test") > 1.7e9
    assert value(scraped, "ingest_errors_total", **ITEMS, kind="http_400") == 1
    assert value(scraped, "ingest_errors_total", **ITEMS, kind="endpoint_failed") == 1
    assert value(scraped, "ingest_pages_total", **ITEMS) == 1
    left = await asyncio.to_thread(lambda: [path.name for path in tmp_path.iterdir()])
    assert left == ["ingest_test.prom"]  # the temporary file was renamed, not left behind


async def test_cli_metrics_port_is_scrapable_mid_run_and_textfile_written_at_the_end(
    database: str, cli_env: dict[str, str], tmp_path: Path
) -> None:
    app = gated_app(40, hold_at=3)
    textfile = tmp_path / "run.prom"
    async with serve(app) as base:
        config = tmp_path / "test.toml"
        config.write_text(config_text(base, **gated_config()))
        process = await asyncio.create_subprocess_exec(
            PYTHON, "-m", "ingest", "run", str(config), "--metrics-port", "0",
            "--metrics-textfile", str(textfile), "--log-format", "json",
            env=cli_env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert process.stderr is not None
        try:
            async with asyncio.timeout(60):
                url = ""
                while not url:
                    line = await process.stderr.readline()
                    assert line, "ingest exited before serving metrics"
                    event = json.loads(line)
                    if event["event"] == "metrics_serving":
                        url = event["url"]
                        serving = event
                assert url.startswith("http://127.0.0.1:") and url.endswith("/metrics")
                async with aiohttp.ClientSession() as client:
                    scraped: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
                    while scraped.get(("ingest_records_total", tuple(sorted(ITEMS.items())))) != 20:
                        await asyncio.sleep(0.05)
                        async with client.get(url) as response:
                            text = await response.text()
                            scraped = samples(text)
                    assert "_created" not in text  # creation times are not metrics
            assert value(scraped, "ingest_pages_total", **ITEMS) == 2
        finally:
            app[RELEASE].set()
        stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, stderr.decode()
    final = samples(textfile.read_text())
    assert "_created" not in textfile.read_text()
    connection = await asyncpg.connect(database)
    try:
        run_id = str(await connection.fetchval("SELECT run_id FROM ingest.runs"))
    finally:
        await connection.close()
    assert (serving["run_id"], serving["source"]) == (run_id, "test")
    assert value(final, "ingest_records_total", **ITEMS) == 40
    assert value(final, "ingest_run_success", source="test") == 1
    assert b"succeeded" in stdout
