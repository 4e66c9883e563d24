"""What a run reports as it goes: a narrow observer protocol for progress displays and metrics.

The pipeline and the HTTP client call these hooks; they never know who listens. Hooks are plain
synchronous calls on the event loop and must be cheap (no I/O).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class RunObserver(Protocol):
    def endpoint_started(self, endpoint: str, *, resumed: bool, total: int | None) -> None: ...

    def page_fetched(self, endpoint: str, *, records: int, queue_depth: int) -> None: ...

    def total_known(self, endpoint: str, *, total: int) -> None:
        """The server reported how many records this run has left to fetch (for an ETA)."""

    def request_finished(self, endpoint: str, *, status: int, seconds: float) -> None: ...

    def retried(self, endpoint: str, *, reason: str) -> None: ...

    def batch_committed(
        self, endpoint: str, *, rows: int, pages: int, dead_letters: int
    ) -> None: ...

    def endpoint_finished(self, endpoint: str, *, ok: bool) -> None: ...


class NullObserver:
    """Listens to nothing."""

    def endpoint_started(self, endpoint: str, *, resumed: bool, total: int | None) -> None:
        pass

    def page_fetched(self, endpoint: str, *, records: int, queue_depth: int) -> None:
        pass

    def total_known(self, endpoint: str, *, total: int) -> None:
        pass

    def request_finished(self, endpoint: str, *, status: int, seconds: float) -> None:
        pass

    def retried(self, endpoint: str, *, reason: str) -> None:
        pass

    def batch_committed(self, endpoint: str, *, rows: int, pages: int, dead_letters: int) -> None:
        pass

    def endpoint_finished(self, endpoint: str, *, ok: bool) -> None:
        pass


class FanOut:
    """Forwards every event to several observers."""

    def __init__(self, observers: Sequence[RunObserver]) -> None:
        self.observers = tuple(observers)

    def endpoint_started(self, endpoint: str, *, resumed: bool, total: int | None) -> None:
        for observer in self.observers:
            observer.endpoint_started(endpoint, resumed=resumed, total=total)

    def page_fetched(self, endpoint: str, *, records: int, queue_depth: int) -> None:
        for observer in self.observers:
            observer.page_fetched(endpoint, records=records, queue_depth=queue_depth)

    def total_known(self, endpoint: str, *, total: int) -> None:
        for observer in self.observers:
            observer.total_known(endpoint, total=total)

    def request_finished(self, endpoint: str, *, status: int, seconds: float) -> None:
        for observer in self.observers:
            observer.request_finished(endpoint, status=status, seconds=seconds)

    def retried(self, endpoint: str, *, reason: str) -> None:
        for observer in self.observers:
            observer.retried(endpoint, reason=reason)

    def batch_committed(self, endpoint: str, *, rows: int, pages: int, dead_letters: int) -> None:
        for observer in self.observers:
            observer.batch_committed(endpoint, rows=rows, pages=pages, dead_letters=dead_letters)

    def endpoint_finished(self, endpoint: str, *, ok: bool) -> None:
        for observer in self.observers:
            observer.endpoint_finished(endpoint, ok=ok)
