"""Auth styles, OAuth2 client credentials, and secrets kept out of logs, errors and the DB."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiohttp import web

from ingest.config import parse_config
from ingest.errors import ConfigError, InterruptedRun, SourceError
from ingest.events import NullObserver
from ingest.secrets import Redactor
from tests.helpers import config_text, ids, make_config, run
from tests.http_support import captured_logs, database_text
from tests.processes import run_ingest
from tests.servers import json_response, make_records, serve

CLIENT_ID = "ingest-client"
CLIENT_SECRET = "cs-9f8e7d6c5b4a-very-secret"
TOKEN_PREFIX = "at-Zq81mXk2-"
PAGE_SIZE = 10


class OAuthServer:
    """A token endpoint plus a paginated API that only accepts the tokens it issued.

    ``revoke_after``: after that many successful API pages every issued token is revoked once
    (a rotation); ``reject_all_after``: after that many pages every token is refused.
    """

    def __init__(
        self,
        records: list[dict[str, Any]],
        *,
        expires_in: float | None = 3600,
        revoke_after: int | None = None,
        reject_all_after: int | None = None,
    ) -> None:
        self.records = records
        self.expires_in = expires_in
        self.revoke_after = revoke_after
        self.reject_all_after = reject_all_after
        self.valid: set[str] = set()
        self.issued: list[str] = []
        self.pages_served = 0
        self.unauthorized = 0
        self.counter = itertools.count(1)
        self.app = web.Application()
        self.app.router.add_post("/oauth/token", self.token)
        self.app.router.add_get("/items", self.items)

    async def token(self, request: web.Request) -> web.Response:
        expected = "Basic " + base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
        form = await request.post()
        if request.headers.get("Authorization") != expected:
            return json_response({"error": "invalid_client"}, status=401)
        assert form["grant_type"] == "client_credentials"
        assert form["scope"] == "read:items"
        token = f"{TOKEN_PREFIX}{next(self.counter):04d}-opaque"
        self.valid.add(token)
        self.issued.append(token)
        body: dict[str, Any] = {"access_token": token, "token_type": "Bearer"}
        if self.expires_in is not None:
            body["expires_in"] = self.expires_in
        return json_response(body)

    async def items(self, request: web.Request) -> web.Response:
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        rejecting = self.reject_all_after is not None and self.pages_served >= self.reject_all_after
        if token not in self.valid or rejecting:
            self.unauthorized += 1
            # A careless server echoing the credential back: it must not reach logs or errors.
            return json_response({"error": "invalid_token", "token": token}, status=401)
        if self.revoke_after is not None and self.pages_served == self.revoke_after:
            self.revoke_after = None
            self.valid.clear()
            self.unauthorized += 1
            return json_response({"error": "token revoked", "token": token}, status=401)
        self.pages_served += 1
        page = int(request.query.get("page", "1"))
        items = self.records[(page - 1) * PAGE_SIZE : page * PAGE_SIZE]
        return json_response({"data": items, "total": len(self.records)})


def _oauth_config(base: str, pages_ahead: int = 1, **auth: Any) -> str:
    """``pages_ahead = 1`` by default: the exact 401 counts below are a serial walk's."""
    text = config_text(
        base,
        records_path="data",
        pagination={"style": "page_number", "total_path": "total"},
        http={"backoff_initial": 0.01, "backoff_max": 0.02, "pages_ahead": pages_ahead},
    )
    settings = {
        "style": "oauth2_client_credentials",
        "token_url": f"{base}/oauth/token",
        "client_id": CLIENT_ID,
        "client_secret": "${TEST_CLIENT_SECRET}",
        "scope": "read:items",
        **auth,
    }
    lines = ["[auth]", *(f'{key} = "{value}"' for key, value in settings.items())]
    return text + "\n".join(lines) + "\n"


def _assert_no_secrets(text: str, secrets: list[str]) -> None:
    for secret in secrets:
        assert secret not in text


async def test_oauth2_token_is_cached_and_refreshed_once_on_a_401_mid_run(
    database: str, db: asyncpg.Connection
) -> None:
    server = OAuthServer(make_records(95), revoke_after=4)
    redactor = Redactor()
    async with serve(server.app) as base:
        loaded = parse_config(
            _oauth_config(base), Path("oauth.toml"), {"TEST_CLIENT_SECRET": CLIENT_SECRET}
        )
        with captured_logs(redactor) as logs:
            result = await run(loaded, database, redactor=redactor)
    assert await ids(db) == list(range(1, 96))
    assert len(server.issued) == 2  # cached for 9 of 10 pages, fetched again once after the 401
    assert server.unauthorized == 1
    assert result.retries["auth_refresh"] == 1
    text = logs.getvalue()
    assert "unauthorized_refreshing_token" in text
    assert text.count("oauth2_token_fetched") == 2
    _assert_no_secrets(text + await database_text(db), [CLIENT_SECRET, *server.issued])


async def test_401s_of_pages_fetched_ahead_share_one_token_refresh(
    database: str, db: asyncpg.Connection
) -> None:
    """Several pages in flight when the token is revoked: each gets a 401, one new token."""
    server = OAuthServer(make_records(95), revoke_after=4)
    async with serve(server.app) as base:
        loaded = parse_config(
            _oauth_config(base, pages_ahead=8),
            Path("oauth.toml"),
            {"TEST_CLIENT_SECRET": CLIENT_SECRET},
        )
        await run(loaded, database)
    assert await ids(db) == list(range(1, 96))
    assert len(server.issued) == 2
    assert server.unauthorized >= 1


async def test_second_401_after_a_token_refresh_fails_with_one_clean_line(
    database: str, db: asyncpg.Connection
) -> None:
    server = OAuthServer(make_records(95), reject_all_after=3)
    redactor = Redactor()
    async with serve(server.app) as base:
        loaded = parse_config(
            _oauth_config(base), Path("oauth.toml"), {"TEST_CLIENT_SECRET": CLIENT_SECRET}
        )
        with captured_logs(redactor) as logs, pytest.raises(SourceError) as caught:
            await run(loaded, database, redactor=redactor)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("endpoint items: http://127.0.0.1:")
    assert "HTTP 401 again after fetching a new OAuth2 token" in message
    assert len(server.issued) == 2
    assert server.unauthorized == 2
    _assert_no_secrets(
        message + logs.getvalue() + await database_text(db), [CLIENT_SECRET, *server.issued]
    )


async def test_oauth2_token_is_refreshed_before_it_expires(database: str) -> None:
    server = OAuthServer(make_records(40), expires_in=0.0001)
    async with serve(server.app) as base:
        loaded = parse_config(
            _oauth_config(base, refresh_margin_seconds=0),
            Path("oauth.toml"),
            {"TEST_CLIENT_SECRET": CLIENT_SECRET},
        )
        await run(loaded, database)
    assert server.unauthorized == 0
    assert len(server.issued) >= 3  # proactively, never by hitting a 401


async def test_wrong_client_secret_fails_with_one_line_naming_the_token_url(
    database: str,
) -> None:
    server = OAuthServer(make_records(5))
    redactor = Redactor()
    async with serve(server.app) as base:
        loaded = parse_config(
            _oauth_config(base), Path("oauth.toml"), {"TEST_CLIENT_SECRET": "wrong-secret-123"}
        )
        with captured_logs(redactor) as logs, pytest.raises(SourceError) as caught:
            await run(loaded, database, redactor=redactor)
    message = str(caught.value)
    assert message.startswith("auth: token request failed: token_url http://127.0.0.1:")
    assert "HTTP 401" in message and "invalid_client" in message
    assert "wrong-secret-123" not in message + logs.getvalue()


def _echo_app(seen: list[dict[str, Any]], records: list[dict[str, Any]]) -> web.Application:
    """Serves one page and records headers and query; answers 403 if no credential came."""

    async def handler(request: web.Request) -> web.Response:
        seen.append({"headers": dict(request.headers), "query": dict(request.query)})
        credentials = (
            request.headers.get("Authorization")
            or request.headers.get("X-Api-Key")
            or request.query.get("api_key")
        )
        if not credentials:
            return json_response({"error": "no credentials"}, status=403)
        return json_response({"data": records})

    app = web.Application()
    app.router.add_get("/items", handler)
    return app


SECRET = "s3cr3t-Kp29xLq7Wm"
STATIC_STYLES = {
    "bearer": ({"token": "${TEST_SECRET}"}, "Authorization", f"Bearer {SECRET}"),
    "api_key_header": ({"key_file": "SECRET_FILE"}, "X-Api-Key", SECRET),
    "api_key_query": ({"key": "${TEST_SECRET}"}, "?api_key", SECRET),
    "basic": (
        {"username": "reader", "password_file": "SECRET_FILE"},
        "Authorization",
        "Basic " + base64.b64encode(f"reader:{SECRET}".encode()).decode(),
    ),
}


@pytest.mark.parametrize("style", sorted(STATIC_STYLES))
async def test_static_auth_styles_send_the_credential_and_never_log_or_store_it(
    database: str, db: asyncpg.Connection, tmp_path: Path, style: str
) -> None:
    settings, where, expected = STATIC_STYLES[style]
    secret_file = tmp_path / "secret.txt"
    secret_file.write_text(SECRET + "\n")
    settings = {
        key: str(secret_file) if value == "SECRET_FILE" else value
        for key, value in settings.items()
    }
    seen: list[dict[str, Any]] = []
    redactor = Redactor()
    async with serve(_echo_app(seen, make_records(3))) as base:
        text = config_text(base, records_path="data", pagination={"style": "single"})
        text += "[auth]\n" + f'style = "{style}"\n'
        text += "".join(f'{key} = "{value}"\n' for key, value in settings.items())
        loaded = parse_config(text, Path("auth.toml"), {"TEST_SECRET": SECRET})
        assert SECRET not in repr(loaded)
        with captured_logs(redactor) as logs:
            await run(loaded, database, redactor=redactor)
    assert await ids(db) == [1, 2, 3]
    sent = seen[0]["query"]["api_key"] if where == "?api_key" else seen[0]["headers"][where]
    assert sent == expected
    stored = logs.getvalue() + await database_text(db)
    assert SECRET not in stored
    assert "run_id" in stored  # the capture did see the run


def test_auth_config_errors_are_one_line_naming_the_field(tmp_path: Path) -> None:
    base = "http://127.0.0.1:9"
    text = config_text(base, pagination={"style": "single"})
    with pytest.raises(ConfigError, match=r"auth\.token: environment variable NOPE is not set"):
        parse_config(text + '[auth]\nstyle = "bearer"\ntoken = "${NOPE}"\n', Path("a.toml"), {})
    missing = tmp_path / "missing.txt"
    with pytest.raises(ConfigError, match=r"a\.toml: auth\.key_file: cannot read secret file"):
        parse_config(
            text + f'[auth]\nstyle = "api_key_header"\nkey_file = "{missing}"\n',
            Path("a.toml"),
            {},
        )
    expected = r"a\.toml: auth\.style: unknown style 'kerberos'; expected one of: bearer,"
    with pytest.raises(ConfigError, match=expected):
        parse_config(text + '[auth]\nstyle = "kerberos"\n', Path("a.toml"), {})
    with pytest.raises(ConfigError, match=r"auth: missing required key 'client_secret'"):
        parse_config(
            text + '[auth]\nstyle = "oauth2_client_credentials"\n'
            'token_url = "https://id.example.com/token"\nclient_id = "x"\n',
            Path("a.toml"),
            {},
        )


def test_literal_secret_in_config_is_still_wrapped() -> None:
    loaded = make_config("http://127.0.0.1:9", pagination={"style": "single"})
    assert loaded.source.auth is None
    text = config_text("http://127.0.0.1:9", pagination={"style": "single"})
    loaded = parse_config(
        text + '[auth]\nstyle = "bearer"\ntoken = "literal-token-123"\n', Path("a.toml"), {}
    )
    assert "literal-token-123" not in repr(loaded.source)
    assert [secret.reveal() for secret in loaded.source.secrets()] == ["literal-token-123"]


async def test_api_key_echoed_into_next_links_is_never_stored_in_checkpoints(
    database: str, db: asyncpg.Connection
) -> None:
    """A server that copies ``api_key`` into its next links; the run is stopped mid-way."""
    records = make_records(30)
    seen: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(request.query.get("api_key", ""))
        if request.query.get("api_key") != SECRET:
            return json_response({"error": "bad key"}, status=403)
        start = int(request.query.get("start", "0"))
        following = start + 10
        link = f"/items?start={following}&api_key={SECRET}" if following < 30 else None
        return json_response({"data": records[start:following], "next": link})

    app = web.Application()
    app.router.add_get("/items", handler)
    stop = asyncio.Event()

    class StopAfterFirstPage(NullObserver):
        def page_fetched(self, endpoint: str, *, records: int, queue_depth: int) -> None:
            stop.set()

    async with serve(app) as base:
        text = config_text(
            base, records_path="data", pagination={"style": "next_url", "next_url_path": "next"}
        )
        text += '[auth]\nstyle = "api_key_query"\nkey = "${TEST_SECRET}"\n'
        loaded = parse_config(text, Path("auth.toml"), {"TEST_SECRET": SECRET})
        with pytest.raises(InterruptedRun):
            await run(loaded, database, stop=stop, observer=StopAfterFirstPage())
        stored = await database_text(db)
        assert "start=10" in stored  # the checkpoint is there, and without the key
        assert SECRET not in stored
        await run(loaded, database)
    assert await ids(db) == list(range(1, 31))
    assert seen == [SECRET] * 3


async def test_cli_stderr_names_the_401_in_one_line_and_shows_no_secret(
    cli_env: dict[str, str], tmp_path: Path
) -> None:
    server = OAuthServer(make_records(95), reject_all_after=3)
    secret_file = tmp_path / "client_secret"
    secret_file.write_text(CLIENT_SECRET + "\n")
    async with serve(server.app) as base:
        text = _oauth_config(base).replace(
            'client_secret = "${TEST_CLIENT_SECRET}"', f'client_secret_file = "{secret_file}"'
        )
        config = tmp_path / "oauth.toml"
        config.write_text(text)
        code, stdout, stderr = await run_ingest(
            "run", str(config), "--log-level", "debug", "--log-format", "json", env=cli_env
        )
    assert code == 2  # no retry fixes refused credentials: a person must
    errors = stderr.strip().splitlines()
    final = json.loads(errors[-1])  # JSON logs end with one structured event, not plain text
    assert final["event"] == "run_finished"
    assert (final["status"], final["exit_code"]) == ("failed", 2)
    assert final["error"].startswith("endpoint items: http://127.0.0.1:")
    assert final["error"].endswith(
        "HTTP 401 again after fetching a new OAuth2 token; check the client's grants and auth.scope"
    )
    assert any("unauthorized_refreshing_token" in line for line in errors)
    _assert_no_secrets(stdout + stderr, [CLIENT_SECRET, *server.issued])
