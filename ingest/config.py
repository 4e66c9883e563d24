"""Load a source config (TOML), validate it, and return frozen objects.

Why pydantic: it turns a nested TOML document into typed, frozen objects and reports *where* a
value is wrong (``endpoints[1].table.columns.id.type``), which is what a user needs in a one-line
error. Every error raised here names the file and the field.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ingest.config_errors import explain
from ingest.cursor import CursorFormat, CursorKind
from ingest.errors import ConfigError
from ingest.secrets import SENSITIVE_PARAMS, Secret

IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
#: ``{column}`` placeholders in a child endpoint's path, filled from its parent's rows.
PATH_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
#: Column paths starting with this read the parent row of a child endpoint, not the record.
PARENT_PREFIX = "$parent."
# Header names whose values are credentials even when written literally in the file.
SENSITIVE_HEADERS = frozenset(
    {"authorization", "proxy-authorization", "cookie", "x-api-key", "api-key", "x-auth-token"}
)

ColumnType = Literal[
    "text",
    "bigint",
    "integer",
    "double",
    "numeric",
    "boolean",
    "timestamptz",
    "date",
    "jsonb",
    "text[]",
    "bigint[]",
    "integer[]",
    "double[]",
    "numeric[]",
    "boolean[]",
    "timestamptz[]",
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
    #: Declared columns; none: columns are inferred from the records (:mod:`ingest.evolve`).
    columns: dict[str, Column] = Field(default_factory=dict)
    #: True when the config declares no columns: they are inferred and kept in
    #: ``ingest.inferred_columns``; set by the loader, never by the user.
    inferred: bool = False
    #: Inferred tables: what a field no column holds does (``evolve``: a new column; ``freeze``:
    #: the record is a dead letter; ``discard``: ignored, kept in the raw record).
    contract: Literal["evolve", "freeze", "discard"] = "evolve"
    #: Inferred tables: levels of nested objects flattened into columns (deeper: jsonb).
    infer_depth: int = Field(default=2, ge=0, le=8)
    store_raw: bool = True
    #: Who converts records to rows: ``python`` (RowBuilder + COPY) or ``server`` (PostgreSQL
    #: unpacks each page's JSON; see :mod:`ingest.server_load`).
    load: Literal["python", "server"] = "python"

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return check_identifier(value, "table name")

    @field_validator("schema_")
    @classmethod
    def _schema(cls, value: str) -> str:
        return check_identifier(value, "schema name")

    @model_validator(mode="before")
    @classmethod
    def _inferred(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = {**data, "inferred": not data.get("columns")}
            if not data["inferred"]:
                for key, default in (("contract", "evolve"), ("infer_depth", 2)):
                    if data.get(key, default) != default:
                        raise ValueError(
                            f"{key} applies to inferred columns only; with declared columns "
                            "unknown fields stay in the raw record (_ingest_raw)"
                        )
        return data

    @field_validator("columns")
    @classmethod
    def _columns(cls, value: dict[str, Column]) -> dict[str, Column]:
        for name in value:
            check_identifier(name, "column name")
            if name.startswith("_ingest"):
                raise ValueError(f"column name {name!r} is reserved (prefix _ingest)")
        return value

    @model_validator(mode="after")
    def _keys(self) -> Table:
        for key in self.primary_key:
            if self.inferred:
                check_identifier(key, "primary_key column")
            elif key not in self.columns:
                raise ValueError(f"primary_key column {key!r} is not declared in columns")
            declared = self.columns.get(key)
            if declared is not None and declared.type.endswith("[]"):
                raise ValueError(f"primary_key column {key!r} cannot be an array")
        if self.mode == "merge" and not self.primary_key:
            raise ValueError(
                "mode 'merge' (the default) needs a primary_key such as [\"id\"]; "
                'or set mode = "append"'
            )
        return self


class PageNumberPagination(_Frozen):
    """``?page=N``: pages counted from ``start_page``."""

    style: Literal["page_number"]
    page_param: str = "page"
    start_page: int = 1
    page_size_param: str | None = None
    page_size: int | None = Field(default=None, gt=0)
    total_path: str | None = None
    total_header: str | None = None
    total_pages_path: str | None = None
    total_pages_header: str | None = None
    has_more_path: str | None = None
    #: The body names the next page's number (``{"next": 3}``); absent or null: the last page.
    next_page_path: str | None = None
    stop_on_empty: bool = True
    #: "body": ``page_param``/``page_size_param`` are dotted paths into the POST body.
    location: Literal["query", "body"] = "query"


class OffsetPagination(_Frozen):
    """``?offset=N&limit=M``: the offset advances by the records actually received."""

    style: Literal["offset"]
    offset_param: str = "offset"
    limit_param: str = "limit"
    limit: int = Field(default=100, gt=0)
    start_offset: int = 0
    total_path: str | None = None
    total_header: str | None = None
    has_more_path: str | None = None
    stop_on_empty: bool = True
    #: "body": ``offset_param``/``limit_param`` are dotted paths into the POST body.
    location: Literal["query", "body"] = "query"


class CursorPagination(_Frozen):
    """A token read from the body (``cursor_path``) and sent back as ``cursor_param``."""

    style: Literal["cursor"]
    cursor_path: str
    cursor_param: str = "cursor"
    has_more_path: str | None = None
    stop_on_empty: bool = True
    #: "body": ``cursor_param`` is a dotted path into the POST body (``variables.after``).
    location: Literal["query", "body"] = "query"


class NextUrlPagination(_Frozen):
    """The body carries the URL of the next page (``next_url_path``)."""

    style: Literal["next_url"]
    next_url_path: str
    has_more_path: str | None = None
    stop_on_empty: bool = True
    #: Send the endpoint's query parameters with every next URL too (those the URL lacks), for
    #: servers whose next URLs drop them. Default: the next URL is requested as given.
    carry_params: bool = False


class LinkHeaderPagination(_Frozen):
    """RFC 8288 ``Link: <...>; rel="next"`` response header."""

    style: Literal["link_header"]
    rel: str = "next"
    stop_on_empty: bool = True
    #: As for next_url: send the endpoint's query parameters with every ``Link`` target too.
    carry_params: bool = False


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


class Incremental(_Frozen):
    """Fetch only what changed: a cursor field in the records and how its lower bound is sent.

    The next walk starts from the highest value of ``cursor_path`` seen by the last completed walk,
    minus ``lookback``; the first walk starts from ``start`` (or fetches everything without it).
    ``end_param`` sends the upper bound of a backfill window.
    """

    cursor_path: str
    param: str
    end_param: str | None = None
    format: CursorFormat = "iso8601"
    lookback: str | int = 0
    start: str | int | None = None
    #: Cursor, next_url and link_header walks with ``end_param``: cut a large run into this many
    #: slices walked at once ("auto": from the range and the first page; "off": serial).
    slices: Literal["auto", "off"] | Annotated[int, Field(ge=1, le=64)] = "auto"

    @model_validator(mode="after")
    def _values(self) -> Incremental:
        kind = self.kind()
        try:
            kind.parse_step(self.lookback)
        except ValueError as exc:
            raise ValueError(f"lookback: {exc}") from None
        if self.start is not None:
            try:
                kind.parse_bound(self.start)
            except ValueError as exc:
                raise ValueError(f"start: {exc}") from None
        return self

    def kind(self) -> CursorKind:
        return CursorKind(self.format)


class Endpoint(_Frozen):
    """One paginated resource of the source and the table it lands in.

    A child endpoint (``parent = "customers"``) is walked once per row of its parent's table, its
    ``path`` filled from that row (``/customers/{id}/orders``); columns with a ``$parent.`` path
    store the parent's values on the child rows.
    """

    name: str
    path: str
    params: dict[str, str | int | float | bool] = Field(default_factory=dict)
    #: "POST": every page is a POST with ``body`` (a JSON template) as its JSON body.
    method: Literal["GET", "POST"] = "GET"
    body: dict[str, Any] | None = None
    records_path: str = ""
    pagination: Pagination = SinglePage(style="single")
    incremental: Incremental | None = None
    parent: str | None = None
    #: For a child endpoint: walk every parent row ("all"), or only those (re)loaded since the
    #: child's last complete walk started ("changed", by the parent table's _ingest_loaded_at).
    parents: Literal["all", "changed"] = "all"
    table: Table
    #: Pages fetched ahead at once for page_number/offset styles; ``None``: ``http.pages_ahead``.
    pages_ahead: int | None = Field(default=None, ge=1, le=64)
    #: For a child endpoint: parents walked at once; ``None``: the source's ``max_concurrency``
    #: (1: one parent after the other).
    parallel_parents: int | None = Field(default=None, ge=1, le=64)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return check_identifier(value, "endpoint name")

    @model_validator(mode="after")
    def _method(self) -> Endpoint:
        if self.body is not None and self.method != "POST":
            raise ValueError('body needs method = "POST"')
        if getattr(self.pagination, "location", "query") == "body" and self.method != "POST":
            raise ValueError('pagination.location = "body" needs method = "POST"')
        return self

    @model_validator(mode="after")
    def _placeholders(self) -> Endpoint:
        if self.table.inferred and (self.parent is not None or self.table.load == "server"):
            raise ValueError(
                'a child endpoint or table.load = "server" needs declared table.columns '
                "(inferred columns are for top-level endpoints loaded in Python)"
            )
        if self.parent is None and self.parents != "all":
            raise ValueError('parents = "changed" needs a parent endpoint')
        if self.parent is None:
            if PATH_PLACEHOLDER.search(self.path):
                raise ValueError(f"path {self.path!r} has placeholders but no parent endpoint")
            for name, column in self.table.columns.items():
                if column.path.startswith(PARENT_PREFIX):
                    raise ValueError(f"column {name} reads {column.path!r} but there is no parent")
        elif self.table.load == "server":
            for name, column in self.table.columns.items():
                if column.path.startswith(PARENT_PREFIX):
                    raise ValueError(
                        f'column {name} reads {column.path!r}, which table.load = "server" '
                        'cannot do (PostgreSQL sees only the page); use load = "python"'
                    )
        return self

    def parent_columns(self) -> dict[str, str]:
        """Child column -> parent column, for columns whose path is ``$parent.<column>``."""
        return {
            name: column.path.removeprefix(PARENT_PREFIX)
            for name, column in self.table.columns.items()
            if column.path.startswith(PARENT_PREFIX)
        }


class HttpSettings(_Frozen):
    """Per-source HTTP behaviour: timeouts, retries, rate and concurrency limits, prefetch."""

    connect_timeout: float = Field(default=10.0, gt=0)
    read_timeout: float = Field(default=60.0, gt=0)
    total_timeout: float = Field(default=120.0, gt=0)
    max_attempts: int = Field(default=5, ge=1)
    max_retry_seconds: float = Field(default=300.0, gt=0)
    backoff_initial: float = Field(default=0.5, ge=0)
    backoff_max: float = Field(default=30.0, ge=0)
    #: Requests of the source in flight at once, at most: prefetch, child walks, slices and
    #: endpoints all share it (adaptive concurrency moves below it). 8: enough to hide a 100 ms
    #: round trip behind ~12 ms of work per page, and as many connections as common API clients
    #: open to one host; a server that refuses concurrency is handled by the adaptive limit.
    max_concurrency: int = Field(default=8, ge=1)
    max_response_bytes: int = Field(default=64 * 1024 * 1024, gt=0)
    verify_tls: bool = True
    ca_bundle: str | None = None
    #: Token bucket over all requests of the source (retries included); ``None``: unlimited.
    max_requests_per_second: float | None = Field(default=None, gt=0)
    #: Bucket size: how many requests may go out at once after a quiet spell (default: 1 second's
    #: worth, at least 1).
    rate_limit_burst: int | None = Field(default=None, ge=1)
    #: AIMD bounds: concurrency starts at 2 and doubles per round trip up to ``max_concurrency``,
    #: halves on 429, timeouts or a latency rise, then grows by one per window of successes (and
    #: only rarely back to where the server pushed back), never below ``min_concurrency``.
    min_concurrency: int = Field(default=1, ge=1)
    adaptive_concurrency: bool = True
    latency_spike_factor: float = Field(default=4.0, gt=1)
    decrease_factor: float = Field(default=0.5, gt=0, lt=1)
    #: Rate-limit headers: seconds (or epoch) until the window resets, and requests left in it.
    rate_limit_reset_header: str = "X-RateLimit-Reset"
    rate_limit_remaining_header: str = "X-RateLimit-Remaining"
    #: Hosts ("host" or "host:port") that next links and redirects may lead to. Requests to them
    #: carry no credentials; any other foreign host is refused.
    allow_hosts: tuple[str, ...] = ()
    max_redirects: int = Field(default=10, ge=0)
    #: Pages fetched ahead for page_number/offset styles (1: one page at a time). ``None``
    #: (default): twice ``max_concurrency``, so a slow page at the head of the walk does not idle
    #: the other slots; requests in flight stay within the concurrency limit either way.
    pages_ahead: int | None = Field(default=None, ge=1, le=64)

    def default_pages_ahead(self) -> int:
        """``pages_ahead`` as set, else twice ``max_concurrency`` (at most 64)."""
        if self.pages_ahead is not None:
            return self.pages_ahead
        return max(1, min(64, 2 * self.max_concurrency))

    @field_validator("allow_hosts")
    @classmethod
    def _hosts(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for host in value:
            if not re.match(r"^[A-Za-z0-9.\-\[\]:]+$", host) or "/" in host:
                raise ValueError(f"allow_hosts entry {host!r} must be a host or host:port")
        return tuple(host.lower() for host in value)

    @model_validator(mode="after")
    def _bounds(self) -> HttpSettings:
        if self.min_concurrency > self.max_concurrency:
            raise ValueError(
                f"min_concurrency {self.min_concurrency} exceeds max_concurrency "
                f"{self.max_concurrency}"
            )
        return self


class BearerAuth(_Frozen):
    """``Authorization: Bearer <token>``."""

    style: Literal["bearer"]
    token: Secret


class ApiKeyHeaderAuth(_Frozen):
    """An API key in a request header (``X-Api-Key`` by default)."""

    style: Literal["api_key_header"]
    header: str = "X-Api-Key"
    key: Secret


class ApiKeyQueryAuth(_Frozen):
    """An API key in a query parameter (``api_key`` by default); redacted from logged URLs."""

    style: Literal["api_key_query"]
    param: str = "api_key"
    key: Secret


class BasicAuth(_Frozen):
    """HTTP Basic: ``Authorization: Basic base64(username:password)``."""

    style: Literal["basic"]
    username: str
    password: Secret


class _OAuth2Grant(_Frozen):
    """What the OAuth 2.0 grants share: their ``token_url`` (declared by each) must be an
    absolute http(s) URL, since credentials are sent there."""

    @field_validator("token_url", check_fields=False)
    @classmethod
    def _token_url(cls, value: str) -> str:
        if not re.match(r"^https?://[^/\s]+", value):
            raise ValueError(f"token_url {value!r} must start with http:// or https:// and a host")
        return value


class OAuth2ClientCredentials(_OAuth2Grant):
    """OAuth 2.0 client credentials grant (RFC 6749 section 4.4); the token is cached."""

    style: Literal["oauth2_client_credentials"]
    token_url: str
    client_id: str
    client_secret: Secret
    scope: str | None = None
    audience: str | None = None
    #: "basic": client id/secret in an Authorization header (RFC 6749's default); "body": form.
    client_auth: Literal["basic", "body"] = "basic"
    #: Refresh this many seconds before ``expires_in`` runs out.
    refresh_margin_seconds: float = Field(default=60.0, ge=0)


class OAuth2RefreshToken(_OAuth2Grant):
    """OAuth 2.0 refresh token grant (RFC 6749 section 6): a long-lived refresh token is traded
    for access tokens; a new refresh token in the answer (rotation) is used for the next one."""

    style: Literal["oauth2_refresh_token"]
    token_url: str
    refresh_token: Secret
    #: A confidential client's id and secret (sent as ``client_auth`` says); a public client
    #: gives only ``client_id`` (sent in the form), or neither.
    client_id: str | None = None
    client_secret: Secret | None = None
    scope: str | None = None
    client_auth: Literal["basic", "body"] = "basic"
    refresh_margin_seconds: float = Field(default=60.0, ge=0)

    @model_validator(mode="after")
    def _client(self) -> OAuth2RefreshToken:
        if self.client_secret is not None and not self.client_id:
            raise ValueError("client_secret needs client_id")
        return self


Auth = Annotated[
    BearerAuth
    | ApiKeyHeaderAuth
    | ApiKeyQueryAuth
    | BasicAuth
    | OAuth2ClientCredentials
    | OAuth2RefreshToken,
    Field(discriminator="style"),
]
#: Fields of the [auth] table that hold credentials; each may also be given as ``<name>_file``.
AUTH_SECRET_FIELDS = ("token", "key", "password", "client_secret", "refresh_token")


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
    #: Decode pages straight into rows with msgspec where the table allows it (ingest.typed);
    #: false: every page through orjson and the Python row loop (same rows, ~2x the CPU).
    typed_decode: bool = True
    #: Processes that convert and write batches (ingest.offload), so a run uses more than one
    #: core; 0: all in the run's own process. Each holds one PostgreSQL connection.
    writer_processes: int = Field(default=0, ge=0, le=64)


class Source(_Frozen):
    """A whole config file: one source, its endpoints and settings."""

    name: str
    base_url: str
    headers: dict[str, Secret | str] = Field(default_factory=dict)
    endpoints: tuple[Endpoint, ...]
    http: HttpSettings = HttpSettings()
    pipeline: PipelineSettings = PipelineSettings()
    auth: Auth | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return check_identifier(value, "source name")

    def secrets(self) -> list[Secret]:
        """Every credential in the config, for the run's :class:`~ingest.secrets.Redactor`."""
        found = [value for value in self.headers.values() if isinstance(value, Secret)]
        if self.auth is not None:
            found += [
                value
                for name in AUTH_SECRET_FIELDS
                if isinstance(value := getattr(self.auth, name, None), Secret)
            ]
        return found

    def credential_params(self) -> frozenset[str]:
        """Query parameters that carry credentials: never stored in checkpoints."""
        if isinstance(self.auth, ApiKeyQueryAuth):
            return frozenset({self.auth.param})
        return frozenset()

    def pages_ahead(self, endpoint: Endpoint) -> int:
        return endpoint.pages_ahead or self.http.default_pages_ahead()

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
        by_name = {endpoint.name: endpoint for endpoint in value}
        for endpoint in value:
            _check_parent(endpoint, by_name)
        return value

    def endpoint(self, name: str) -> Endpoint:
        for endpoint in self.endpoints:
            if endpoint.name == name:
                return endpoint
        known = ", ".join(endpoint.name for endpoint in self.endpoints)
        raise ConfigError(f"no endpoint named {name!r} in source {self.name!r} (known: {known})")


def _check_parent(endpoint: Endpoint, by_name: Mapping[str, Endpoint]) -> None:
    """A child's parent exists, the chain has no cycle, and every parent column it reads exists."""
    if endpoint.parent is None:
        return
    where = f"endpoint {endpoint.name}"
    parent = by_name.get(endpoint.parent)
    if parent is None:
        raise ValueError(f"{where}: parent {endpoint.parent!r} is not an endpoint of this source")
    seen = {endpoint.name}
    ancestor: Endpoint | None = parent
    while ancestor is not None:
        if ancestor.name in seen:
            raise ValueError(f"{where}: parent chain loops through {ancestor.name!r}")
        seen.add(ancestor.name)
        ancestor = by_name.get(ancestor.parent) if ancestor.parent else None
    if parent.table.inferred:
        raise ValueError(
            f"{where}: parent {parent.name!r} must declare table.columns (a child reads its "
            "parent's columns; inferred ones are not known before a run)"
        )
    available = set(parent.table.columns)
    used = PATH_PLACEHOLDER.findall(endpoint.path) + list(endpoint.parent_columns().values())
    for column in used:
        if column not in available:
            raise ValueError(
                f"{where}: parent column {column!r} is not a column of {parent.name}'s table "
                f"(known: {', '.join(sorted(available))})"
            )


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


def _resolve_params(raw: Any, environ: Mapping[str, str], file: Path) -> Any:
    """Interpolate ``${VAR}`` in every endpoint's ``params`` (strings only), as in ``base_url``.

    A credential-named parameter (``api_key``, ``token``, ...) may not come from a variable:
    params are kept in checkpoints, so a secret there would reach the database; the [auth]
    style ``api_key_query`` sends such a key on every request without storing it.
    """
    if not isinstance(raw, list):
        return raw
    endpoints: list[Any] = []
    for index, endpoint in enumerate(raw):
        params = endpoint.get("params") if isinstance(endpoint, dict) else None
        if not isinstance(params, dict):
            endpoints.append(endpoint)
            continue
        name = endpoint.get("name")
        where = f"endpoints.{name}" if isinstance(name, str) else f"endpoints[{index}]"
        resolved: dict[str, Any] = {}
        for key, value in params.items():
            field = f"{where}.params.{key}"
            if not isinstance(value, str):
                resolved[key] = value
                continue
            resolved[key], from_env = _interpolate(value, environ, file, field)
            if from_env and key.lower() in SENSITIVE_PARAMS:
                raise ConfigError(
                    f"{file}: {field}: a credential in params would be stored in checkpoints; "
                    'send it with [auth] style = "api_key_query" instead'
                )
        endpoints.append({**endpoint, "params": resolved})
    return endpoints


def _unexpanded_reference(document: Any, field: str = "") -> tuple[str, str] | None:
    """The first ``${VAR}`` in a field ingest does not expand: (field, reference).

    Such a value would be used literally (a path or column with ``${X}`` in it), so it is
    refused instead. Expanded fields are ``source.base_url``, ``source.headers.*``,
    ``endpoints.*.params.*`` and the ``[auth]`` table.
    """
    if isinstance(document, str):
        match = ENV_REFERENCE.search(document)
        return (field, match.group(0)) if match else None
    if isinstance(document, dict):
        items: list[tuple[str, Any]] = [(str(key), value) for key, value in document.items()]
    elif isinstance(document, list):
        items = [(_item_label(index, value), value) for index, value in enumerate(document)]
    else:
        return None
    for key, value in items:
        child = f"{field}{key}" if key.startswith("[") or not field else f"{field}.{key}"
        if child in EXPANDED_FIELDS or PARAMS_FIELD.match(child):
            continue
        found = _unexpanded_reference(value, child)
        if found is not None:
            return found
    return None


#: Config fields whose ``${VAR}`` references are expanded from the environment.
EXPANDED_FIELDS = frozenset({"source.base_url", "source.headers", "auth"})


PARAMS_FIELD = re.compile(r"^endpoints(\[\d+\]|\.[^.\[]+)\.params$")


def _item_label(index: int, item: Any) -> str:
    """An endpoint is named by its name (``endpoints.issues``), anything else by its index."""
    name = item.get("name") if isinstance(item, dict) else None
    return name if isinstance(name, str) and name else f"[{index}]"


#: What an unread ``*_file`` secret holds in an offline parse (``ingest status``, validate).
OFFLINE_SECRET = "unset"


def read_secret_file(path: str, file: Path, field: str) -> str:
    """A ``<field>_file`` secret's content, its trailing newline dropped; never empty."""
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8").rstrip("\r\n")
    except OSError as exc:
        raise ConfigError(
            f"{file}: {field}: cannot read secret file {path}: {exc.strerror}"
        ) from None
    if not text:
        raise ConfigError(f"{file}: {field}: secret file {path} is empty")
    return text


def _resolve_auth(
    raw: Any, environ: Mapping[str, str], file: Path, *, offline: bool = False
) -> dict[str, Any]:
    """Interpolate ``${VAR}`` in the [auth] table and read ``*_file`` secrets; wrap credentials.

    Credential fields become :class:`Secret` whichever way they were given, so they are hidden
    in ``repr`` and registered with the redactor; a file's trailing newline is dropped.
    ``offline``: ``*_file`` secrets are not read (commands that only need names: status).
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"{file}: auth: expected a table with style = ...")
    resolved: dict[str, Any] = {}
    for key, value in raw.items():
        if not isinstance(value, str):
            resolved[key] = value
            continue
        name = key
        text, _ = _interpolate(value, environ, file, f"auth.{name}")
        base = name.removesuffix("_file")
        if name.endswith("_file") and base in AUTH_SECRET_FIELDS:
            if base in raw:
                raise ConfigError(f"{file}: auth.{name}: give either {base} or {name}, not both")
            text = OFFLINE_SECRET if offline else read_secret_file(text, file, f"auth.{name}")
            name = base
        resolved[name] = Secret(text) if name in AUTH_SECRET_FIELDS else text
    return resolved


def parse_config(
    text: str, file: Path, environ: Mapping[str, str] | None = None, *, offline: bool = False
) -> LoadedConfig:
    """Validate config text; ``file`` is only used in messages.

    ``offline``: secret files of the [auth] table are left unread (their content is not needed
    to name the source and endpoints); see :func:`ingest.validate.check_config`.
    """
    environment = os.environ if environ is None else environ
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{file}: not valid TOML: {exc}") from None
    source_table = document.get("source")
    if not isinstance(source_table, dict):
        raise ConfigError(f"{file}: missing [source] table (name, base_url, headers)")
    sections = ("source", "endpoints", "http", "pipeline", "auth")
    unknown = sorted(set(document) - set(sections))
    if unknown:
        close = difflib.get_close_matches(unknown[0], sections, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f" (known: {', '.join(sections)})"
        raise ConfigError(f"{file}: unknown top-level key {unknown[0]!r}{hint}")
    if unexpanded := _unexpanded_reference(document):
        field, reference = unexpanded
        raise ConfigError(
            f"{file}: {field}: {reference} is not expanded in this field (only in "
            "source.base_url, source.headers, endpoints' params and [auth])"
        )
    data = dict(source_table)
    if isinstance(data.get("base_url"), str):
        data["base_url"], _ = _interpolate(data["base_url"], environment, file, "source.base_url")
    data["headers"] = _resolve_headers(source_table.get("headers"), environment, file)
    data["endpoints"] = _resolve_params(document.get("endpoints", []), environment, file)
    for section in ("http", "pipeline"):
        if section in document:
            data[section] = document[section]
    if "auth" in document:
        data["auth"] = _resolve_auth(document["auth"], environment, file, offline=offline)
    try:
        source = Source.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{file}: {explain(exc, data, Source)}") from None
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
