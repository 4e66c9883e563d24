"""Progress: log events (and no escape codes) when not a terminal; bars with an ETA in one."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path

from rich.console import Console

from ingest.progress import EndpointProgress, showing_progress
from tests.conftest import PYTHON
from tests.gated import RELEASE, gated_app, gated_config
from tests.helpers import config_text
from tests.servers import serve


async def test_no_escape_codes_and_periodic_progress_events_when_stdout_is_not_a_tty(
    database: str, cli_env: dict[str, str], tmp_path: Path
) -> None:
    app = gated_app(40, hold_at=3, unavailable_once_at=2)
    async with serve(app) as base:
        config = tmp_path / "test.toml"
        config.write_text(config_text(base, **gated_config()))
        process = await asyncio.create_subprocess_exec(
            PYTHON, "-m", "ingest", "run", str(config), "--progress-interval", "0.1",
            env=cli_env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert process.stderr is not None
        seen: list[bytes] = []
        try:
            async with asyncio.timeout(60):
                while True:  # until a progress event shows pages 1-2 committed
                    line = await process.stderr.readline()
                    assert line, b"".join(seen).decode()
                    seen.append(line)
                    event = json.loads(line)
                    if event["event"] == "progress" and event["records"] == 20:
                        break
        finally:
            app[RELEASE].set()
        stdout, rest = await asyncio.wait_for(process.communicate(), 60)
    stderr = b"".join(seen) + rest
    assert process.returncode == 0, stderr.decode()
    assert b"\x1b" not in stdout and b"\x1b" not in stderr
    events = [json.loads(line) for line in stderr.splitlines()]  # every line is JSON
    run_id = next(event["run_id"] for event in events if event["event"] == "endpoint_done")

    progress = [event for event in events if event["event"] == "progress"]
    assert any(event["records"] == 20 for event in progress)
    for event in progress:
        assert (event["run_id"], event["source"], event["endpoint"]) == (run_id, "test", "items")
        assert {"pages", "records", "records_per_second", "retries", "eta_seconds"} <= set(event)
    [retry] = [event for event in events if event["event"] == "retrying"]
    assert (retry["run_id"], retry["source"], retry["endpoint"], retry["page"]) == (
        run_id, "test", "items", 2,
    )  # fmt: skip
    assert retry["reason"] == "http_503"
    assert stdout.decode().splitlines()[-1] == f"run {run_id}: succeeded"


async def test_bars_draw_in_a_terminal_with_an_eta_only_when_the_total_is_known() -> None:
    output = io.StringIO()
    console = Console(file=output, force_terminal=True, width=160, color_system="standard")
    async with showing_progress("bars", console=console) as observer:
        observer.endpoint_started("known", resumed=False, total=100)
        observer.endpoint_started("open", resumed=True, total=None)
        for _ in range(3):
            observer.page_fetched("known", records=10, queue_depth=1)
        observer.retried("known", reason="http_503")
        observer.batch_committed("known", rows=30, pages=3, dead_letters=2)
        observer.batch_committed("open", rows=7, pages=1, dead_letters=0)
        await asyncio.sleep(0.3)  # let rich's refresh thread draw once
    text = output.getvalue()
    assert "\x1b[" in text
    lines = [line for line in text.replace("\r", "\n").split("\n") if line.strip()]
    known = [line for line in lines if "known" in line and "records" in line][-1]
    opened = [line for line in lines if "open (resumed)" in line and "records" in line][-1]
    assert "3 pages" in known and "30 records" in known and "1 retries" in known
    assert "2 dead" in known and "eta " in known
    assert "7 records" in opened and "eta" not in opened


def test_eta_is_the_remaining_records_at_the_average_rate() -> None:
    progress = EndpointProgress(total=100, records=50, started=0.0)
    assert progress.rate(now=10.0) == 5.0
    assert progress.eta(now=10.0) == 10.0
    assert EndpointProgress(total=None, records=50, started=0.0).eta(now=10.0) is None


async def test_a_reported_total_reaches_the_observer_for_an_eta(database: str) -> None:
    from ingest.events import NullObserver  # noqa: PLC0415
    from tests.helpers import make_config, run  # noqa: PLC0415
    from tests.servers import make_records, page_number_app, serve  # noqa: PLC0415

    class Totals(NullObserver):
        def __init__(self) -> None:
            self.seen: list[tuple[str, int]] = []

        def total_known(self, endpoint: str, *, total: int) -> None:
            self.seen.append((endpoint, total))

    observer = Totals()
    async with serve(page_number_app(make_records(45), total_as_string=True)) as base:
        loaded = make_config(
            base,
            records_path="data.items",
            pagination={"style": "page_number", "total_path": "meta.total"},
        )
        await run(loaded, database, observer=observer)
    assert observer.seen == [("items", 45)]
