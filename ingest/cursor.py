"""Incremental cursors: read a record's cursor value, compare, step back, render as a parameter.

A cursor is either a moment (``iso8601``, ``epoch``, ``epoch_ms``, ``date``) or an increasing
integer (``integer``). Internally moments are timezone-aware UTC datetimes and integers are ints,
so "the highest value seen" is an ordinary ``max`` whatever the API sends (ISO text, epoch
numbers, numeric strings). What is stored in PostgreSQL is a canonical text form
(:meth:`CursorKind.dump`), and what is sent to the API is the configured format
(:meth:`CursorKind.render`).

Rendering rounds *down* (epoch seconds, dates), so a lower bound never skips a record; merge mode
makes the small overlap harmless.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Any, Literal

CursorFormat = Literal["iso8601", "epoch", "epoch_ms", "date", "integer"]
CursorValue = dt.datetime | int
Step = dt.timedelta | int

_DURATION = re.compile(r"^\s*(\d+)\s*(s|m|h|d|w)?\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
#: Epoch numbers above this are taken as milliseconds when the format does not say.
_EPOCH_MS_THRESHOLD = 100_000_000_000


def parse_duration(text: str | int) -> dt.timedelta:
    """``90``, ``"30s"``, ``"10m"``, ``"2h"``, ``"7d"``, ``"1w"`` (a bare number is seconds)."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise ValueError(f"duration {text!r} must not be negative")
        return dt.timedelta(seconds=text)
    match = _DURATION.match(str(text))
    if not match:
        raise ValueError(f"duration {text!r} is not like 30s, 10m, 2h, 7d or 1w")
    return dt.timedelta(seconds=int(match.group(1)) * _UNITS[match.group(2) or "s"])


class CursorKind:
    """Everything that depends on an endpoint's cursor format, in one place."""

    def __init__(self, fmt: CursorFormat) -> None:
        self.format = fmt
        self.numeric = fmt == "integer"

    def parse(self, value: Any) -> CursorValue | None:
        """A record's cursor value, or ``None`` when it is missing or unreadable (never fatal)."""
        try:
            return self._parse(value)
        except (ValueError, TypeError, OverflowError, OSError):
            return None

    def _parse(self, value: Any) -> CursorValue | None:
        if value is None or isinstance(value, bool):
            return None
        if self.numeric:
            if isinstance(value, float) and not value.is_integer():
                return None
            return int(value) if isinstance(value, int | float) else int(str(value).strip())
        if isinstance(value, int | float):
            milliseconds = self.format == "epoch_ms" or (
                self.format != "epoch" and abs(value) > _EPOCH_MS_THRESHOLD
            )
            return dt.datetime.fromtimestamp(value / 1000 if milliseconds else value, tz=dt.UTC)
        if isinstance(value, str):
            text = value.strip()
            if re.fullmatch(r"-?\d+(\.\d+)?", text):
                return self._parse(float(text) if "." in text else int(text))
            moment = dt.datetime.fromisoformat(text)
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=dt.UTC)
            return moment.astimezone(dt.UTC)
        return None

    def parse_bound(self, value: str | int) -> CursorValue:
        """A user-given bound (config ``start``, ``--from``/``--to``); raises ValueError."""
        parsed = self.parse(value)
        if parsed is None:
            expected = "an integer" if self.numeric else "a date or ISO 8601 timestamp"
            raise ValueError(f"{value!r} is not {expected}")
        return parsed

    def parse_step(self, value: str | int) -> Step:
        """A lookback or window: an integer for integer cursors, a duration for moments."""
        if self.numeric:
            try:
                step = int(value)
            except ValueError:
                raise ValueError(
                    f"{value!r} is not an integer step for an integer cursor"
                ) from None
            if step < 0:
                raise ValueError(f"step {value!r} must not be negative")
            return step
        return parse_duration(value)

    def minus(self, value: CursorValue, step: Step) -> CursorValue:
        if isinstance(value, int) and isinstance(step, int):
            return value - step
        if isinstance(value, dt.datetime) and isinstance(step, dt.timedelta):
            return value - step
        raise TypeError(f"cannot subtract {step!r} from {value!r}")

    def plus(self, value: CursorValue, step: Step) -> CursorValue:
        if isinstance(value, int) and isinstance(step, int):
            return value + step
        if isinstance(value, dt.datetime) and isinstance(step, dt.timedelta):
            return value + step
        raise TypeError(f"cannot add {step!r} to {value!r}")

    def render(self, value: CursorValue) -> str:
        """The query-parameter text in the configured format (rounded down)."""
        if isinstance(value, int):
            return str(value)
        moment = value.astimezone(dt.UTC)
        if self.format == "epoch":
            return str(int(moment.timestamp() // 1))
        if self.format == "epoch_ms":
            return str(int(moment.timestamp() * 1000 // 1))
        if self.format == "date":
            return moment.date().isoformat()
        return moment.isoformat().replace("+00:00", "Z")

    def dump(self, value: CursorValue) -> str:
        """Canonical text for storage (lossless)."""
        return str(value) if isinstance(value, int) else value.astimezone(dt.UTC).isoformat()

    def load(self, text: str) -> CursorValue:
        return self.parse_bound(text)

    def highest(self, current: CursorValue | None, values: Any) -> CursorValue | None:
        """The max of ``current`` and every readable value in ``values``."""
        best = current
        for raw in values:
            value = self.parse(raw)
            if value is not None and (best is None or value > best):  # type: ignore[operator]
                best = value
        return best
