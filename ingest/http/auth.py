"""Credentials for one source: how each auth style decorates a request, and OAuth2 tokens.

An :class:`Authenticator` only ever decorates requests to the source's own origin (the client
decides that); it never sees requests to other hosts. Every secret it holds or obtains (a
fetched OAuth2 access token included) is registered with the run's redactor first, so it is
scrubbed from logs and errors wherever it might surface.

OAuth2 client credentials (RFC 6749 section 4.4) and refresh token (section 6) grants: the
access token is fetched on first use, cached, refreshed ``refresh_margin_seconds`` before
``expires_in`` runs out, and refreshed once when the API answers 401 (a revoked or rotated
token). Concurrent requests share one refresh: a refresh asked for a token that has already been
replaced is a no-op. With the refresh token grant, a new refresh token in the token response
(rotation) replaces the configured one for the rest of the run; it is a secret like the first.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import structlog

from ingest.config import (
    ApiKeyHeaderAuth,
    ApiKeyQueryAuth,
    Auth,
    BasicAuth,
    BearerAuth,
    OAuth2ClientCredentials,
    OAuth2RefreshToken,
)
from ingest.errors import SourceError
from ingest.secrets import Redactor, Secret

log = structlog.get_logger("ingest.http")

#: Posts a form to a URL with headers and returns the parsed JSON body (the client's retrying
#: ``post_form``); kept as a callable so this module needs no HTTP session of its own.
TokenPoster = Callable[[str, dict[str, str], dict[str, str]], Awaitable[Any]]


@dataclass(frozen=True, slots=True)
class Credentials:
    """What to add to one request; ``version`` identifies the token used (for 401 refresh)."""

    headers: dict[str, str]
    params: dict[str, str]
    version: int = 0


class Authenticator(Protocol):
    #: True when a 401 may be cured by fetching a new credential (OAuth2).
    refreshable: bool

    async def credentials(self) -> Credentials:
        """Headers and query parameters for the next request to the source's origin."""

    async def refresh(self, stale: Credentials) -> None:
        """Replace the credential ``stale`` (after a 401), unless it was replaced already."""


class StaticAuth:
    """Bearer token, API key (header or query) or Basic: fixed for the whole run."""

    refreshable = False

    def __init__(self, headers: dict[str, str], params: dict[str, str]) -> None:
        self._credentials = Credentials(headers, params)

    async def credentials(self) -> Credentials:
        return self._credentials

    async def refresh(self, stale: Credentials) -> None:
        return None


class NoAuth(StaticAuth):
    def __init__(self) -> None:
        super().__init__({}, {})


class OAuth2Auth:
    """Client credentials or refresh token grant, with a cached, proactively refreshed access
    token."""

    refreshable = True

    def __init__(
        self,
        config: OAuth2ClientCredentials | OAuth2RefreshToken,
        redactor: Redactor,
        post: TokenPoster,
    ):
        self.config = config
        self.redactor = redactor
        self._post = post
        #: The refresh token the next refresh sends (rotated ones replace it).
        self._refresh_token = (
            config.refresh_token if isinstance(config, OAuth2RefreshToken) else None
        )
        #: Refresh tokens the server rotated in this run; tests and logs read it.
        self.rotations = 0
        self._token: Secret | None = None
        self._version = 0
        self._expires_at: float | None = None
        self._lock = asyncio.Lock()
        #: Tokens fetched in this run (the first one included); tests and logs read it.
        self.fetches = 0

    async def credentials(self) -> Credentials:
        async with self._lock:
            if self._token is None or self._expiring():
                await self._fetch("expired" if self._token is not None else "first use")
            assert self._token is not None
            return Credentials(
                {"Authorization": f"Bearer {self._token.reveal()}"}, {}, self._version
            )

    async def refresh(self, stale: Credentials) -> None:
        async with self._lock:
            if stale.version == self._version:
                await self._fetch("401 from the API")

    def _expiring(self) -> bool:
        return self._expires_at is not None and time.monotonic() >= self._expires_at

    def _request(self) -> tuple[dict[str, str], dict[str, str]]:
        """The token request's headers and form for this grant (client authentication too)."""
        config = self.config
        headers: dict[str, str] = {}
        if isinstance(config, OAuth2RefreshToken):
            assert self._refresh_token is not None
            form = {"grant_type": "refresh_token", "refresh_token": self._refresh_token.reveal()}
            if config.client_id and config.client_secret is None:  # a public client
                form["client_id"] = config.client_id
        else:
            form = {"grant_type": "client_credentials"}
            if config.audience:
                form["audience"] = config.audience
        if config.client_id and config.client_secret is not None:
            secret = config.client_secret.reveal()
            if config.client_auth == "basic":
                pair = f"{config.client_id}:{secret}".encode()
                basic = "Basic " + base64.b64encode(pair).decode()
                self.redactor.add(Secret(basic))
                headers["Authorization"] = basic
            else:
                form |= {"client_id": config.client_id, "client_secret": secret}
        if config.scope:
            form["scope"] = config.scope
        return headers, form

    async def _fetch(self, why: str) -> None:
        config = self.config
        headers, form = self._request()
        document = await self._post(config.token_url, headers, form)
        token = document.get("access_token") if isinstance(document, dict) else None
        if not isinstance(token, str) or not token:
            keys = ", ".join(sorted(document)) if isinstance(document, dict) else "not an object"
            raise SourceError(
                f"auth: token_url {self.redactor.url(config.token_url)} answered without an "
                f"access_token (keys: {keys})"
            )
        self.redactor.add(Secret(token))
        current = self._refresh_token
        rotated = document.get("refresh_token") if current is not None else None
        if isinstance(rotated, str) and rotated and current and rotated != current.reveal():
            self.redactor.add(Secret(rotated))  # before anything could log it
            self._refresh_token = Secret(rotated)
            self.rotations += 1
            log.info("oauth2_refresh_token_rotated", rotations=self.rotations)
        self._token = Secret(token)
        self._version += 1
        self.fetches += 1
        expires_in = _number(document.get("expires_in"))
        self._expires_at = None
        if expires_in is not None and expires_in > 0:
            margin = min(config.refresh_margin_seconds, expires_in / 2)
            self._expires_at = time.monotonic() + expires_in - margin
        log.info("oauth2_token_fetched", why=why, expires_in=expires_in, version=self._version)


def _number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def make_authenticator(auth: Auth | None, redactor: Redactor, post: TokenPoster) -> Authenticator:
    """The authenticator for a source's ``[auth]`` table; its secrets go to ``redactor`` first."""
    match auth:
        case None:
            return NoAuth()
        case BearerAuth():
            redactor.add(auth.token)
            return StaticAuth({"Authorization": f"Bearer {auth.token.reveal()}"}, {})
        case ApiKeyHeaderAuth():
            redactor.add(auth.key)
            return StaticAuth({auth.header: auth.key.reveal()}, {})
        case ApiKeyQueryAuth():
            redactor.add(auth.key)
            return StaticAuth({}, {auth.param: auth.key.reveal()})
        case BasicAuth():
            redactor.add(auth.password)
            pair = f"{auth.username}:{auth.password.reveal()}".encode()
            basic = "Basic " + base64.b64encode(pair).decode()
            redactor.add(Secret(basic))
            return StaticAuth({"Authorization": basic}, {})
        case OAuth2ClientCredentials():
            redactor.add(auth.client_secret)
            return OAuth2Auth(auth, redactor, post)
        case OAuth2RefreshToken():
            redactor.add(auth.refresh_token)
            if auth.client_secret is not None:
                redactor.add(auth.client_secret)
            return OAuth2Auth(auth, redactor, post)
    raise AssertionError(f"unhandled auth style {auth!r}")
