"""A run leaves no cyclic garbage per page.

Why it matters: during a run the collector runs rarely (``ingest.tuning``), so whatever a page
leaves in reference cycles piles up for thousands of pages before it is freed, and the peak
memory of a long run ends up above a short one's: memory bound by the data, not the config.
"""

from __future__ import annotations

import gc

import pytest

from tests.helpers import make_config, run
from tests.servers import make_records, page_number_app, serve

#: Objects in cycles a page may leave behind (before the fix: about 40, tenacity's retry state).
PER_PAGE_ALLOWANCE = 2


async def _garbage_of_a_run(database: str, pages: int, mode: str) -> int:
    """Cyclic garbage left by one run over ``pages`` pages, with the collector off meanwhile."""
    records = make_records(pages * 10)
    async with serve(page_number_app(records)) as base:
        loaded = make_config(
            base,
            records_path="data.items",
            params={"per_page": 10},
            pagination={"style": "page_number", "total_path": "meta.total"},
            table=f"garbage_{mode}",
            mode=mode,
            store_raw=False,
        )
        gc.collect()
        gc.disable()
        try:
            result = await run(loaded, database, restart=True)
            assert result.endpoints["items"].records == pages * 10
            return gc.collect()
        finally:
            gc.enable()


@pytest.mark.parametrize("mode", ["append", "merge"])
async def test_garbage_does_not_grow_with_the_pages(database: str, mode: str) -> None:
    await _garbage_of_a_run(database, 5, mode)  # warm-up: one-off caches, lazy imports
    short = await _garbage_of_a_run(database, 10, mode)
    long = await _garbage_of_a_run(database, 60, mode)
    assert long - short <= 50 * PER_PAGE_ALLOWANCE, (short, long)
