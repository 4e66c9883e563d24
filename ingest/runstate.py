"""The state a run shares between its parts: options, partitions, counters, the commit gate.

Kept apart from :mod:`ingest.pipeline` (which wires producers and consumers) and
:mod:`ingest.batches` (which writes one batch), so both read the same definitions.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ingest.config import Endpoint
from ingest.copyenc import RecordEncoder
from ingest.cursor import CursorKind, CursorValue
from ingest.db import Connection
from ingest.events import NullObserver, RunObserver
from ingest.evolve import Decision
from ingest.log import LogFormat
from ingest.rows import RowBuilder
from ingest.server_load import ServerLoad
from ingest.sink import TableSink
from ingest.typed import PageParser


@dataclass(frozen=True, slots=True)
class RunOptions:
    """What a caller may vary per run."""

    command: str = "run"
    endpoints: tuple[str, ...] = ()
    restart: bool = False
    max_dead_letters: int | None = None
    stop: asyncio.Event | None = None
    observer: RunObserver = field(default_factory=NullObserver)
    #: The run's log settings, for the writer processes it starts (``pipeline.writer_processes``).
    log_level: str = "info"
    log_format: LogFormat = "auto"
    #: The run's id, when the caller logs under it before the run starts (``ingest run``).
    run_id: uuid.UUID | None = None
    #: Told where the run writes (database, host, port, role) before anything is written.
    announce_database: Callable[[str], None] | None = None


#: Called inside each batch's transaction, after the batch's turn has come and before the
#: checkpoint is written; ``done`` is true for the batch that ends the walk. Raising rolls the
#: batch back (a backfill worker uses it to prove it still holds its partition's lease).
Fence = Callable[[Connection, bool], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Partition:
    """One window of a backfill: its checkpoint key, its extra query parameters, its fence."""

    key: str
    params: Mapping[str, str]
    fence: Fence | None = None


@dataclass(slots=True)
class EndpointStats:
    """Counters for one endpoint in one run; committed numbers only."""

    pages: int = 0
    records: int = 0
    dead_letters: int = 0
    batches: int = 0
    #: Pages whose records the typed decoder converted (the rest took the Python row loop).
    typed_pages: int = 0
    resumed: bool = False
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None

    @property
    def seconds(self) -> float:
        return (self.finished or time.monotonic()) - self.started

    @property
    def records_per_second(self) -> float:
        return self.records / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "pages": self.pages,
            "records": self.records,
            "dead_letters": self.dead_letters,
            "batches": self.batches,
            "typed_pages": self.typed_pages,
            "resumed": self.resumed,
            "seconds": round(self.seconds, 3),
            "records_per_second": round(self.records_per_second, 1),
        }


@dataclass(slots=True)
class RunResult:
    run_id: uuid.UUID
    endpoints: dict[str, EndpointStats]
    retries: Counter[str]
    interrupted: bool = False


def attach_result(error: BaseException, result: RunResult) -> None:
    """Keep what a failed or interrupted run did on its error, so the CLI can still print the
    per-endpoint table and the run id (see :func:`result_of`)."""
    error.ingest_run_result = result  # type: ignore[attr-defined]


def result_of(error: BaseException) -> RunResult | None:
    """The partial result :func:`attach_result` kept on ``error``, if any."""
    result = getattr(error, "ingest_run_result", None)
    return result if isinstance(result, RunResult) else None


class CommitGate:
    """Lets batch ``n`` commit only after batch ``n - 1`` has committed."""

    def __init__(self) -> None:
        self._next = 0
        self._changed = asyncio.Condition()

    async def wait_turn(self, sequence: int) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self._next == sequence)

    async def committed(self, sequence: int) -> None:
        async with self._changed:
            self._next = sequence + 1
            self._changed.notify_all()

    @property
    def next(self) -> int:
        """The batch whose turn it is (every batch before it has committed)."""
        return self._next


class MergeKeys:
    """The keys of an endpoint's merge batches that are written or being written, not committed.

    Why: a direct merge batch (every key new) may COPY into the target before its turn only if
    no uncommitted batch before it brings one of its keys. An uncommitted insert makes a second
    insert of the same key wait for its transaction, and an earlier batch waiting on a later
    one, which waits for the earlier one's commit, would never finish. Every merge batch
    registers its keys as soon as it has them, before it writes anything; a batch whose
    earlier batches have not all registered yet, or share a key with it, COPYs at its turn.
    """

    def __init__(self) -> None:
        self._keys: dict[int, set[Any]] = {}

    def register(self, sequence: int, keys: set[Any]) -> None:
        self._keys[sequence] = keys

    def may_copy_early(self, sequence: int, first_uncommitted: int) -> bool:
        """Whether batch ``sequence`` may COPY now: every uncommitted batch before it has
        registered keys, and none of them is one of its own."""
        mine = self._keys[sequence]
        for earlier in range(first_uncommitted, sequence):
            theirs = self._keys.get(earlier)
            if theirs is None or not mine.isdisjoint(theirs):
                return False
        return True

    def release(self, sequence: int) -> None:
        """The batch committed (or failed, ending the run): its keys no longer hold anyone."""
        self._keys.pop(sequence, None)


@dataclass(slots=True)
class EndpointRun:
    """Shared state of one endpoint's producer and consumers."""

    run_id: uuid.UUID
    source: str
    endpoint: Endpoint
    sink: TableSink
    builder: RowBuilder
    server: ServerLoad | None
    #: The endpoint's page parser: its typed decoder (pages straight to rows), the envelope-only
    #: parser when writer processes convert its pages, or None (orjson).
    typed: PageParser | None
    queue: asyncio.Queue[Any]
    stats: EndpointStats
    base_records: int
    base_pages: int
    partition: Partition | None = None
    #: The batch transactions' check that the run still holds its source lock (None in a
    #: backfill worker, whose windows their leases fence instead).
    lock_fence: Fence | None = None
    cursor: CursorKind | None = None
    cursor_max: CursorValue | None = None
    high_water: CursorValue | None = None
    gate: CommitGate = field(default_factory=CommitGate)
    merge_keys: MergeKeys = field(default_factory=MergeKeys)
    #: Batches borrow writer processes in batch order: a batch that holds one while it waits
    #: for its commit turn then always has its predecessors holding one too (no deadlock with
    #: fewer writers than batches in flight).
    writer_order: CommitGate = field(default_factory=CommitGate)
    take_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    next_sequence: int = 0
    ended: bool = False
    interrupted: bool = False
    #: Its batches are converted and written by the run's writer processes (ingest.offload).
    offloaded: bool = False
    #: Its batches go from raw records straight to COPY bytes in C where it can
    #: (:class:`ingest.copyenc.RecordEncoder`), else None.
    encoder: RecordEncoder | None = None
    #: Merge batches go straight into the target by COPY while every key they bring is new
    #: (:meth:`ingest.sink.TableSink.copy_new`); the first known key turns it off for the walk.
    merge_direct: bool = True
    #: An endpoint without declared columns: the columns decided so far (ingest.evolve); its
    #: ``endpoint.table`` holds them. None for declared columns.
    decisions: list[Decision] | None = None

    @property
    def raw_records(self) -> bool:
        """Pages keep their records as raw JSON and their bodies (decoded later, if at all)."""
        return self.offloaded or self.encoder is not None

    @property
    def partition_key(self) -> str:
        return self.partition.key if self.partition else ""


def larger(first: CursorValue | None, second: CursorValue | None) -> CursorValue | None:
    """The later of two cursor values, either of which may be missing."""
    if first is None:
        return second
    if second is None:
        return first
    return max(first, second)
