"""The walk's guards remember a bounded window of small digests, whatever the walk's length."""

from __future__ import annotations

import sys

from ingest.http.messages import PageRequest
from ingest.source import LOOP_GUARD_WINDOW, _LoopGuard, _RepeatGuard


def test_guard_windows_are_bounded_and_small() -> None:
    loop = _LoopGuard("items")
    repeats = _RepeatGuard()
    record = {"id": 0, "name": "x" * 300, "tags": ["a"] * 50}
    url = "http://127.0.0.1/items?" + "filter=long&" * 20
    for number in range(1, LOOP_GUARD_WINDOW + 500):
        request = PageRequest(url, (("page", str(number)),))
        loop.check(request, number, str)
        page = [{**record, "id": number * 2}, {**record, "id": number * 2 + 1}]
        assert repeats.earlier(page, number) is None
    assert len(loop.seen) == len(repeats.seen) == LOOP_GUARD_WINDOW
    assert all(len(key) == 16 for key in loop.seen)
    assert all(sys.getsizeof(digest) < 64 for _, digest in repeats.seen)
    # Still a guard: the last page again is spotted.
    last = LOOP_GUARD_WINDOW + 499
    assert repeats.earlier([{**record, "id": last * 2}, {**record, "id": last * 2 + 1}], 0) == last
