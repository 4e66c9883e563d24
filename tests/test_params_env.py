"""``${VAR}`` in an endpoint's params is expanded like base_url and headers; unset is an error."""

from __future__ import annotations

from pathlib import Path

import asyncpg
import pytest
from aiohttp import web

from ingest.config import parse_config
from ingest.errors import ConfigError
from tests.helpers import config_text
from tests.processes import run_ingest
from tests.servers import REQUESTS, _app, json_response, serve

TOKEN = "tok-params-5f1e9a7c3b2d"
PAGINATION = {"style": "page_number", "total_path": "total"}


def _orgs_app() -> web.Application:
    """Answers only when ``org`` arrives expanded: a literal ``${GH_ORG}`` gets a 400."""

    async def repos(request: web.Request) -> web.Response:
        if request.query.get("org") != "acme-corp" or request.query.get("scope") != "acme-corp/x":
            return json_response({"error": f"unknown org {request.query.get('org')}"}, status=400)
        return json_response({"data": [{"id": 1, "name": "one"}, {"id": 2, "name": "two"}]})

    return _app({"/repos": repos})


async def test_params_are_expanded_and_sent_to_the_server(
    tmp_path: Path, cli_env: dict[str, str], database: str
) -> None:
    app = _orgs_app()
    async with serve(app) as base:
        config = tmp_path / "orgs.toml"
        config.write_text(
            config_text(
                base,
                source={"headers": {"Authorization": "Bearer ${GH_TOKEN}"}},
                records_path="data",
                path="/repos",
                params={"org": "${GH_ORG}", "scope": "${GH_ORG}/x", "per_page": 50},
                pagination={"style": "single"},
            )
        )
        env = {**cli_env, "GH_ORG": "acme-corp", "GH_TOKEN": TOKEN}
        code, out, err = await run_ingest("run", str(config), "--log-format", "json", env=env)
    assert code == 0, out + err
    assert [request["query"] for request in app[REQUESTS]] == [
        {"org": "acme-corp", "scope": "acme-corp/x", "per_page": "50"}
    ]
    assert TOKEN not in out + err
    connection = await asyncpg.connect(database)
    try:
        assert await connection.fetchval("SELECT count(*) FROM items") == 2
    finally:
        await connection.close()


async def test_an_unset_variable_in_params_is_a_config_error_naming_the_field(
    tmp_path: Path, cli_env: dict[str, str]
) -> None:
    app = _orgs_app()
    async with serve(app) as base:
        config = tmp_path / "orgs.toml"
        config.write_text(
            config_text(
                base, path="/repos", params={"org": "${GH_ORG}"}, pagination={"style": "single"}
            )
        )
        env = {key: value for key, value in cli_env.items() if key != "GH_ORG"}
        code, out, err = await run_ingest("run", str(config), "--log-format", "console", env=env)
    assert code == 2, out + err
    assert err.strip().splitlines() == [
        f"ingest: error: {config}: endpoints.items.params.org: environment variable GH_ORG "
        "is not set (export GH_ORG=... before running)"
    ]
    assert app[REQUESTS] == []


def _config(**overrides: object) -> str:
    options: dict[str, object] = {"pagination": PAGINATION, **overrides}
    return config_text("http://127.0.0.1:9", **options)  # type: ignore[arg-type]


def test_a_credential_named_param_may_not_come_from_a_variable() -> None:
    text = _config(params={"api_key": "${API_KEY}"})
    with pytest.raises(ConfigError) as caught:
        parse_config(text, Path("a.toml"), {"API_KEY": TOKEN})
    assert str(caught.value) == (
        "a.toml: endpoints.items.params.api_key: a credential in params would be stored in "
        'checkpoints; send it with [auth] style = "api_key_query" instead'
    )
    assert TOKEN not in str(caught.value)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"path": "/orgs/${GH_ORG}/repos"}, "endpoints.items.path"),
        ({"records_path": "${WHERE}"}, "endpoints.items.records_path"),
        ({"table": "t_${SUFFIX}"}, "endpoints.items.table.name"),
        ({"pagination": {**PAGINATION, "page_param": "${P}"}}, "endpoints.items.pagination"),
        ({"source": {"name": "${NAME}"}}, "source.name"),
    ],
)
def test_a_variable_where_none_is_expanded_is_a_config_error(
    overrides: dict[str, object], field: str
) -> None:
    """It would be used literally (a path or name containing ``${X}``), so it is refused."""
    with pytest.raises(ConfigError) as caught:
        parse_config(_config(**overrides), Path("a.toml"), {})
    message = str(caught.value)
    assert message.startswith(f"a.toml: {field}")
    assert "is not expanded in this field" in message
    assert "\n" not in message


def test_non_string_params_and_plain_strings_are_kept() -> None:
    text = _config(params={"per_page": 100, "sort": "updated", "flag": True})
    loaded = parse_config(text, Path("a.toml"), {})
    assert loaded.source.endpoints[0].params == {"per_page": 100, "sort": "updated", "flag": True}
