"""structlog configuration: JSON lines when stdout is not a TTY, readable console when it is.

Every event passes through the run's :class:`~ingest.secrets.Redactor` last, so a secret that
slipped into an event (a header echoed in an error, say) is scrubbed before it is written.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Literal

import orjson
import structlog

from ingest.secrets import Redactor

LogFormat = Literal["auto", "json", "console"]


def _redacting(redactor: Redactor) -> Any:
    def processor(logger: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
        return {
            key: redactor(value) if isinstance(value, str) else value
            for key, value in event.items()
        }

    return processor


def resolved_format(fmt: LogFormat) -> Literal["json", "console"]:
    """``auto`` decided for this process: JSON unless stdout is a terminal."""
    if fmt == "auto":
        return "console" if sys.stdout.isatty() else "json"
    return fmt


def configure_logging(
    redactor: Redactor, *, level: str = "info", fmt: LogFormat = "auto", stream: Any = None
) -> None:
    """Configure structlog for this process (the CLI calls it once per command)."""
    output = stream or sys.stderr
    renderer: Any
    if resolved_format(fmt) == "json":
        renderer = structlog.processors.JSONRenderer(
            serializer=lambda obj, **_: orjson.dumps(obj, default=str).decode()
        )
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=output.isatty())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            _redacting(redactor),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(file=output),
        cache_logger_on_first_use=False,
    )
