"""OAuth2 refresh token grant: rotation honoured, secrets never logged or stored, and the refresh
token and client credentials sent only to the token URL (a separate local server here)."""

from __future__ import annotations

import base64
import itertools
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiohttp import web

from ingest.config import OAuth2RefreshToken, parse_config
from ingest.errors import SourceError
from ingest.secrets import Redactor
from tests.helpers import config_text, ids, run
from tests.http_support import captured_logs, database_text
from tests.servers import json_response, make_records, serve

CLIENT_ID = "ingest-app"
CLIENT_SECRET = "cs-refresh-7a6b5c4d-secret"
FIRST_REFRESH = "rt-0000-first-refresh-token"
PAGE_SIZE = 10


class TokenServer:
    """``POST /token``: the refresh token grant; every answer rotates the refresh token (the old
    one stops working), unless ``rotate`` is false."""

    def __init__(self, *, rotate: bool = True, public: bool = False) -> None:
        self.rotate = rotate
        self.public = public
        self.valid_refresh = {FIRST_REFRESH}
        self.refreshes_used: list[str] = []
        self.issued: list[str] = []
        self.rotated: list[str] = []
        self.forms: list[dict[str, str]] = []
        self.counter = itertools.count(1)
        self.app = web.Application()
        self.app.router.add_post("/token", self.token)

    async def token(self, request: web.Request) -> web.Response:
        form = {key: str(value) for key, value in (await request.post()).items()}
        self.forms.append(form)
        if self.public:
            if form.get("client_id") != CLIENT_ID or "Authorization" in request.headers:
                return json_response({"error": "invalid_client"}, status=401)
        else:
            expected = "Basic " + base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
            if request.headers.get("Authorization") != expected:
                return json_response({"error": "invalid_client"}, status=401)
        assert form["grant_type"] == "refresh_token"
        used = form.get("refresh_token", "")
        self.refreshes_used.append(used)
        if used not in self.valid_refresh:
            # Echoes the token: the error must still not show it.
            return json_response({"error": "invalid_grant", "refresh_token": used}, status=400)
        number = next(self.counter)
        access = f"at-{number:04d}-access"
        self.issued.append(access)
        body: dict[str, Any] = {"access_token": access, "token_type": "Bearer", "expires_in": 600}
        if self.rotate:
            self.valid_refresh.discard(used)
            fresh = f"rt-{number:04d}-rotated-refresh"
            self.valid_refresh.add(fresh)
            self.rotated.append(fresh)
            body["refresh_token"] = fresh
        return json_response(body)


class Api:
    """``GET /items?page=N`` accepting only issued access tokens, each for ``pages_per_token``
    pages (then 401: the client refreshes)."""

    def __init__(self, tokens: TokenServer, records: list[dict[str, Any]]) -> None:
        self.tokens = tokens
        self.records = records
        self.pages_per_token = 3
        self.served: dict[str, int] = {}
        self.requests: list[dict[str, Any]] = []
        self.app = web.Application()
        self.app.router.add_get("/items", self.items)

    async def items(self, request: web.Request) -> web.Response:
        self.requests.append({"headers": dict(request.headers), "query": dict(request.query)})
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        if token not in self.tokens.issued or self.served.get(token, 0) >= self.pages_per_token:
            return json_response({"error": "invalid_token"}, status=401)
        self.served[token] = self.served.get(token, 0) + 1
        page = int(request.query.get("page", "1"))
        items = self.records[(page - 1) * PAGE_SIZE : page * PAGE_SIZE]
        return json_response({"data": items, "total": len(self.records)})


def _config(api: str, token_url: str, **auth: Any) -> str:
    text = config_text(
        api,
        records_path="data",
        pagination={"style": "page_number", "total_path": "total"},
        # One page at a time: the API's "3 pages per token" then decides exactly when the
        # client refreshes (concurrent refreshes are test_http_auth's subject).
        http={"backoff_initial": 0.01, "backoff_max": 0.02, "pages_ahead": 1},
    )
    settings: dict[str, Any] = {
        "style": "oauth2_refresh_token",
        "token_url": token_url,
        "refresh_token": "${TEST_REFRESH_TOKEN}",
        "client_id": CLIENT_ID,
        "client_secret": "${TEST_CLIENT_SECRET}",
        **auth,
    }
    lines = ["[auth]"]
    lines += [f'{key} = "{value}"' for key, value in settings.items() if value is not None]
    return text + "\n".join(lines) + "\n"


ENVIRON = {"TEST_REFRESH_TOKEN": FIRST_REFRESH, "TEST_CLIENT_SECRET": CLIENT_SECRET}


@pytest.mark.parametrize("rotate", [True, False])
async def test_refresh_token_grant_uses_each_rotated_token_and_leaks_nothing(
    database: str, db: asyncpg.Connection, rotate: bool
) -> None:
    tokens = TokenServer(rotate=rotate)
    api = Api(tokens, make_records(95))
    redactor = Redactor()
    async with serve(tokens.app) as token_base, serve(api.app) as api_base:
        loaded = parse_config(
            _config(api_base, f"{token_base}/token"), Path("refresh.toml"), ENVIRON
        )
        with captured_logs(redactor) as logs:
            result = await run(loaded, database, redactor=redactor)
    assert await ids(db) == list(range(1, 96))
    # 10 pages, 3 per access token: 4 tokens, the first on first use, then one per 401.
    assert len(tokens.issued) == 4
    assert result.retries["auth_refresh"] == 3
    expected = [FIRST_REFRESH, *tokens.rotated[:3]] if rotate else [FIRST_REFRESH] * 4
    assert tokens.refreshes_used == expected
    text = logs.getvalue()
    assert text.count("oauth2_refresh_token_rotated") == (4 if rotate else 0)
    secrets = [FIRST_REFRESH, CLIENT_SECRET, *tokens.rotated, *tokens.issued]
    for secret in secrets:
        assert secret not in text
        assert secret not in await database_text(db)
    # The API saw access tokens only: no refresh token, no client credentials, anywhere.
    for request in api.requests:
        seen = repr(request)
        assert "Basic " not in seen
        for secret in [FIRST_REFRESH, CLIENT_SECRET, *tokens.rotated]:
            assert secret not in seen


async def test_a_public_client_sends_its_id_in_the_form(database: str) -> None:
    tokens = TokenServer(public=True)
    api = Api(tokens, make_records(25))
    async with serve(tokens.app) as token_base, serve(api.app) as api_base:
        loaded = parse_config(
            _config(api_base, f"{token_base}/token", client_secret=None),
            Path("refresh.toml"),
            ENVIRON,
        )
        result = await run(loaded, database)
    assert result.endpoints["items"].records == 25
    assert all(form["client_id"] == CLIENT_ID for form in tokens.forms)
    assert all("client_secret" not in form for form in tokens.forms)


async def test_a_refused_refresh_token_fails_in_one_line_without_showing_it(
    database: str,
) -> None:
    tokens = TokenServer()
    tokens.valid_refresh.clear()  # revoked before the run
    api = Api(tokens, make_records(5))
    redactor = Redactor()
    async with serve(tokens.app) as token_base, serve(api.app) as api_base:
        loaded = parse_config(
            _config(api_base, f"{token_base}/token"), Path("refresh.toml"), ENVIRON
        )
        with captured_logs(redactor) as logs, pytest.raises(SourceError) as caught:
            await run(loaded, database, redactor=redactor)
    message = str(caught.value)
    assert "\n" not in message
    assert "token request failed" in message and "invalid_grant" in message
    assert FIRST_REFRESH not in message and FIRST_REFRESH not in logs.getvalue()
    assert api.requests == []


def test_refresh_token_config_errors() -> None:
    text = _config("http://127.0.0.1:1", "http://127.0.0.1:2/token", client_id=None)
    with pytest.raises(Exception, match="client_secret needs client_id"):
        parse_config(text, Path("refresh.toml"), ENVIRON)
    text = _config("http://127.0.0.1:1", "ftp://x/token")
    with pytest.raises(Exception, match="token_url 'ftp://x/token' must start with http"):
        parse_config(text, Path("refresh.toml"), ENVIRON)


def test_the_refresh_token_may_come_from_a_file(tmp_path: Path) -> None:
    secret_file = tmp_path / "refresh"
    secret_file.write_text(FIRST_REFRESH + "\n")
    text = _config("http://127.0.0.1:1", "http://127.0.0.1:2/token").replace(
        'refresh_token = "${TEST_REFRESH_TOKEN}"', f'refresh_token_file = "{secret_file}"'
    )
    loaded = parse_config(text, tmp_path / "refresh.toml", ENVIRON)
    auth = loaded.source.auth
    assert isinstance(auth, OAuth2RefreshToken)
    assert auth.refresh_token.reveal() == FIRST_REFRESH
    assert FIRST_REFRESH not in repr(auth)
