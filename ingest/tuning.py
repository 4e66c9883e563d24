"""Process-level tuning for the duration of a run: the cyclic garbage collector.

Why: records are acyclic (dicts, lists, strings), but every one of them is a container the
cyclic GC tracks. With the default thresholds (700 allocations) the collector runs every few
hundred records and re-scans the pages waiting in the queue each time; measured on the
benchmark (1M records, docs/performance.md) that was ~30 % of the pipeline's CPU. Raising the
young-generation threshold makes those scans rare while still collecting real cycles (from
exceptions, closed connections, ...) within a bounded number of allocations, and ``gc.freeze``
moves everything that exists at start (imported modules, config) out of the scans for good.

The price of rare collections: whatever a page leaves in reference cycles waits for the next one,
up to ~100k objects. So a page must leave none (the HTTP client keeps tenacity's cyclic retry
state off the path of a first attempt that succeeds; ``tests/test_cyclic_garbage.py`` checks a
run's garbage does not grow with its pages); otherwise a long run's peak memory ends up above a
short run's.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

#: Young-generation threshold during a run: ~100 records' worth of pages between collections
#: would be too often; 100k allocations is about 7 pages of 1,000 records of 15 objects.
RUN_GC_THRESHOLD = (100_000, 50, 100)


@contextlib.contextmanager
def relaxed_gc() -> Iterator[None]:
    """Raise the GC thresholds and freeze start-up objects; restore both on exit."""
    previous = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(*RUN_GC_THRESHOLD)
    try:
        yield
    finally:
        gc.set_threshold(*previous)
        gc.unfreeze()
