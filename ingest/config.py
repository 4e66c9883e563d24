"""Load a source config (TOML), validate it, and return frozen objects.

Why pydantic: it turns a nested TOML document into typed, frozen objects and reports *where* a
value is wrong (``endpoints[1].table.columns.id.type``), which is what a user needs in a one-line
error. Every error raised here names the file and the field.
"""

from __future__ import annotations

import hashlib
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ingest.errors import ConfigError
from ingest.secrets import Secret

IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
# Header names whose values are credentials even when written literally in the file.
SENSITIVE_HEADERS = frozenset(
    {"authorization", "proxy-authorization", "cookie", "x-api-key", "api-key", "x-auth-token"}
)

ColumnType = Literal[
    "text", "bigint", "integer", "double", "numeric", "boolean", "timestamptz", "date", "jsonb"
]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def check_identifier(value: str, what: str) -> str:
    """Reject anything that is not a plain SQL identifier (quoted later as well)."""
    if not IDENTIFIER.match(value):
        raise ValueError(
            f"{what} {value!r} is not a valid identifier "
            "(letters, digits and _, not starting with a digit, at most 63 characters)"
        )
    return value


class Column(_Frozen):
    """A typed target column taken from a dotted path into the record."""

    path: str
    type: ColumnType = "text"
    nullable: bool = True


class Table(_Frozen):
    """Where an endpoint's records land."""

    name: str
    schema_: str = Field(default="public", alias="schema")
    mode: Literal["append", "merge"] = "merge"
    primary_key: tuple[str, ...] = ()
    columns: dict[str, Column]
    store_raw: bool = True

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return check_identifier(value, "table name")

    @field_validator("schema_")
    @classmethod
    def _schema(cls, value: str) -> str:
        return check_identifier(value, "schema name")

    @field_validator("columns")
    @classmethod
    def _columns(cls, value: dict[str, Column]) -> dict[str, Column]:
        if not value:
            raise ValueError("declare at least one column")
        for name in value:
            check_identifier(name, "column name")
            if name.startswith("_ingest"):
                raise ValueError(f"column name {name!r} is reserved (prefix _ingest)")
        return value

    @model_validator(mode="after")
    def _keys(self) -> Table:
        for key in self.primary_key:
            if key not in self.columns:
                raise ValueError(f"primary_key column {key!r} is not declared in columns")
        if self.mode == "merge" and not self.primary_key:
            raise ValueError("mode 'merge' needs a primary_key")
        return self


class PageNumberPagination(_Frozen):
    """``?page=N``: pages counted from ``start_page``."""

    style: Literal["page_number"]
    page_param: str = "page"
    start_page: int = 1
    page_size_param: str | None = None
    page_size: int | None = Field(default=None, gt=0)
    total_path: str | None = None
    total_pages_path: str | None = None
    has_more_path: str | None = None
    stop_on_empty: bool = True


class OffsetPagination(_Frozen):
    """``?offset=N&limit=M``: the offset advances by the records actually received."""

    style: Literal["offset"]
    offset_param: str = "offset"
    limit_param: str = "limit"
    limit: int = Field(default=100, gt=0)
    start_offset: int = 0
    total_path: str | None = None
    has_more_path: str | None = None
    stop_on_empty: bool = True


class CursorPagination(_Frozen):
    """A token read from the body (``cursor_path``) and sent back as ``cursor_param``."""

    style: Literal["cursor"]
    cursor_path: str
    cursor_param: str = "cursor"
    has_more_path: str | None = None
    stop_on_empty: bool = True


class NextUrlPagination(_Frozen):
    """The body carries the URL of the next page (``next_url_path``)."""

    style: Literal["next_url"]
    next_url_path: str
    has_more_path: str | None = None
    stop_on_empty: bool = True


class LinkHeaderPagination(_Frozen):
    """RFC 8288 ``Link: <...>; rel="next"`` response header."""

    style: Literal["link_header"]
    rel: str = "next"
    stop_on_empty: bool = True


class SinglePage(_Frozen):
    """The endpoint answers in one response."""

    style: Literal["single"]


Pagination = Annotated[
    PageNumberPagination
    | OffsetPagination
    | CursorPagination
    | NextUrlPagination
    | LinkHeaderPagination
    | SinglePage,
    Field(discriminator="style"),
]


class Endpoint(_Frozen):
    """One paginated resource of the source and the table it lands in."""

    name: str
    path: str
    params: dict[str, str | int | float | bool] = Field(default_factory=dict)
    records_path: str = ""
    pagination: Pagination = SinglePage(style="single")
    table: Table

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return check_identifier(value, "endpoint name")


class HttpSettings(_Frozen):
    """Per-source HTTP behaviour: timeouts and retries."""

    connect_timeout: float = Field(default=10.0, gt=0)
    read_timeout: float = Field(default=60.0, gt=0)
    total_timeout: float = Field(default=120.0, gt=0)
    max_attempts: int = Field(default=5, ge=1)
    max_retry_seconds: float = Field(default=300.0, gt=0)
    backoff_initial: float = Field(default=0.5, ge=0)
    backoff_max: float = Field(default=30.0, ge=0)
    max_concurrency: int = Field(default=4, ge=1)
    max_response_bytes: int = Field(default=64 * 1024 * 1024, gt=0)
    verify_tls: bool = True
    ca_bundle: str | None = None


class PipelineSettings(_Frozen):
    """Memory and throughput knobs: memory is bounded by queue_size x page size + batch_size.

    Defaults chosen on the benchmark (docs/performance.md): 10k-record batches and 16 queued
    pages ran ~25 % faster than 5k and 8 at ~100 MB peak RSS; 20k batches gained little more and
    cost ~35 MB.
    """

    queue_size: int = Field(default=16, ge=1)
    batch_size: int = Field(default=10_000, ge=1)
    batch_seconds: float = Field(default=2.0, gt=0)
    consumers: int = Field(default=2, ge=1)


class Source(_Frozen):
    """A whole config file: one source, its endpoints and settings."""

    name: str
    base_url: str
    headers: dict[str, Secret | str] = Field(default_factory=dict)
    endpoints: tuple[Endpoint, ...]
    http: HttpSettings = HttpSettings()
    pipeline: PipelineSettings = PipelineSettings()

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return check_identifier(value, "source name")

    @field_validator("base_url")
    @classmethod
    def _base_url(cls, value: str) -> str:
        if not re.match(r"^https?://[^/\s]+", value):
            raise ValueError(f"base_url {value!r} must start with http:// or https:// and a host")
        return value.rstrip("/")

    @field_validator("endpoints")
    @classmethod
    def _endpoints(cls, value: tuple[Endpoint, ...]) -> tuple[Endpoint, ...]:
        if not value:
            raise ValueError("declare at least one [[endpoints]] entry")
        names = [endpoint.name for endpoint in value]
        duplicated = sorted({name for name in names if names.count(name) > 1})
        if duplicated:
            raise ValueError(f"endpoint names must be unique; repeated: {', '.join(duplicated)}")
        return value

    def endpoint(self, name: str) -> Endpoint:
        for endpoint in self.endpoints:
            if endpoint.name == name:
                return endpoint
        known = ", ".join(endpoint.name for endpoint in self.endpoints)
        raise ConfigError(f"no endpoint named {name!r} in source {self.name!r} (known: {known})")


class LoadedConfig(BaseModel):
    """A validated source plus where it came from and a hash of its text (for run records)."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    path: Path
    source: Source
    config_hash: str


def _interpolate(
    value: str, environ: Mapping[str, str], file: Path, field: str
) -> tuple[str, bool]:
    """Replace ``${VAR}`` references; report whether any were used (they make a value secret)."""
    missing = [name for name in ENV_REFERENCE.findall(value) if not environ.get(name)]
    if missing:
        raise ConfigError(
            f"{file}: {field}: environment variable {missing[0]} is not set "
            f"(export {missing[0]}=... before running)"
        )
    used = bool(ENV_REFERENCE.search(value))
    return ENV_REFERENCE.sub(lambda match: environ[match.group(1)], value), used


def _resolve_headers(raw: Any, environ: Mapping[str, str], file: Path) -> dict[str, Secret | str]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{file}: source.headers: expected a table of name = value")
    headers: dict[str, Secret | str] = {}
    for name, value in raw.items():
        if not isinstance(value, str):
            raise ConfigError(f"{file}: source.headers.{name}: expected a string")
        resolved, from_env = _interpolate(value, environ, file, f"source.headers.{name}")
        sensitive = from_env or name.lower() in SENSITIVE_HEADERS
        headers[name] = Secret(resolved) if sensitive else resolved
    return headers


def _location(error: Any) -> str:
    parts: list[str] = []
    for item in error["loc"]:
        if isinstance(item, int):
            parts[-1:] = [f"{parts[-1]}[{item}]"] if parts else [f"[{item}]"]
        elif item in {"page_number", "offset", "cursor", "next_url", "link_header", "single"}:
            continue  # pydantic's discriminated-union branch name, not a user field
        else:
            parts.append(str(item))
    return ".".join(parts)


def parse_config(text: str, file: Path, environ: Mapping[str, str] | None = None) -> LoadedConfig:
    """Validate config text; ``file`` is only used in messages."""
    environment = os.environ if environ is None else environ
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{file}: not valid TOML: {exc}") from None
    source_table = document.get("source")
    if not isinstance(source_table, dict):
        raise ConfigError(f"{file}: missing [source] table (name, base_url, headers)")
    unknown = sorted(set(document) - {"source", "endpoints", "http", "pipeline"})
    if unknown:
        raise ConfigError(f"{file}: unknown top-level key {unknown[0]!r}")
    data = dict(source_table)
    if isinstance(data.get("base_url"), str):
        data["base_url"], _ = _interpolate(data["base_url"], environment, file, "source.base_url")
    data["headers"] = _resolve_headers(source_table.get("headers"), environment, file)
    data["endpoints"] = document.get("endpoints", [])
    for section in ("http", "pipeline"):
        if section in document:
            data[section] = document[section]
    try:
        source = Source.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        location = _location(first)
        message = str(first["msg"]).removeprefix("Value error, ")
        extra = f" ({len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
        raise ConfigError(f"{file}: {location}: {message}{extra}") from None
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    return LoadedConfig(path=file, source=source, config_hash=digest)


def load_config(path: str | Path, environ: Mapping[str, str] | None = None) -> LoadedConfig:
    """Read and validate a config file; every failure is a one-line :class:`ConfigError`."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{file}: no such config file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{file}: cannot read config: {exc}") from None
    return parse_config(text, file, environ)
