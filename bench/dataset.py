"""The benchmark dataset: deterministic records of about 260 bytes of JSON, 1,000 per page.

Pages are written once as static files (``bench/.data/<records>/pages/<n>.json``) and reused, so
every contender reads exactly the same bytes from the same server. A page looks like a typical
API answer: ``{"data": [...], "meta": {"page": n, "total_pages": N, "total": R}}``.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

DATA_ROOT = Path(__file__).resolve().parent / ".data"
PAGE_SIZE = 1000
MODES = {"quick": 100_000, "standard": 1_000_000, "large": 5_000_000}

_FIRST = ("Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald", "Frances", "Ken", "Zoë", "Linus")
_LAST = ("Lovelace", "Hopper", "Turing", "Dijkstra", "Liskov", "Knuth", "Allen", "Thompson")
_STATUSES = ("active", "paused", "closed", "trial")
_TAGS = ("alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta")
_PLANS = ("free", "pro", "team", "enterprise")
_COUNTRIES = ("DE", "FR", "US", "BR", "JP", "IN", "NG", "SE")
_EPOCH = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def record(index: int) -> dict[str, Any]:
    """Record number ``index`` (1-based); the same index always gives the same record."""
    moment = _EPOCH + dt.timedelta(seconds=index * 7)
    first = _FIRST[index % len(_FIRST)]
    last = _LAST[index % len(_LAST)]
    return {
        "id": index,
        "name": f"{first} {last} #{index}",
        "email": f"{first.lower()}.{last.lower()}.{index}@example.com",
        "status": _STATUSES[index % len(_STATUSES)],
        "score": round((index * 37 % 10_000) / 7, 3),
        "tags": [_TAGS[index % 7], _TAGS[(index // 7) % 7]],
        "updated_at": moment.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "profile": {
            "plan": _PLANS[index % len(_PLANS)],
            "seats": index % 50,
            "country": _COUNTRIES[index % len(_COUNTRIES)],
            "verified": index % 3 == 0,
        },
    }


@dataclass(frozen=True, slots=True)
class Dataset:
    """A generated dataset on disk."""

    records: int
    pages: int
    root: Path

    @property
    def page_dir(self) -> Path:
        return self.root / "pages"

    def page_path(self, number: int) -> Path:
        return self.page_dir / f"{number}.json"

    @property
    def bytes(self) -> int:
        return sum(self.page_path(n).stat().st_size for n in range(1, self.pages + 1))


def page_document(number: int, total_records: int, page_size: int = PAGE_SIZE) -> dict[str, Any]:
    pages = -(-total_records // page_size)
    start = (number - 1) * page_size + 1
    stop = min(start + page_size, total_records + 1)
    return {
        "data": [record(index) for index in range(start, stop)],
        "meta": {"page": number, "total_pages": pages, "total": total_records},
    }


def ensure_dataset(
    records: int, root: Path = DATA_ROOT, page_size: int = PAGE_SIZE, log: Any = print
) -> Dataset:
    """Write the pages unless a complete copy is already there (checked by a marker file)."""
    pages = -(-records // page_size)
    dataset = Dataset(records, pages, root / f"{records}x{page_size}")
    marker = dataset.root / "complete"
    if marker.exists():
        return dataset
    log(f"generating {records:,} records in {pages:,} pages under {dataset.root} ...")
    dataset.page_dir.mkdir(parents=True, exist_ok=True)
    for number in range(1, pages + 1):
        dataset.page_path(number).write_bytes(
            orjson.dumps(page_document(number, records, page_size))
        )
    marker.write_text(f"{records} records, {pages} pages of {page_size}\n")
    return dataset
