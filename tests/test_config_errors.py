"""Config errors in a user's words: endpoints by name, what is expected in plain words, the
nearest known key or value for a typo; the CLI prints them as one line and exits 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from ingest.config import parse_config
from ingest.errors import ConfigError
from tests.processes import run_ingest

HEAD = """
[source]
name = "gh"
base_url = "https://api.example.com"
"""

ENDPOINT = """
[[endpoints]]
name = "issues"
path = "/issues"
{extra}
[endpoints.table]
name = "issues"
{table}
[endpoints.table.columns]
id = {{ path = "id", type = "bigint" }}
"""


def message(extra: str = "", table: str = 'primary_key = ["id"]', tail: str = "") -> str:
    text = HEAD + ENDPOINT.format(extra=extra, table=table) + tail
    with pytest.raises(ConfigError) as caught:
        parse_config(text, Path("gh.toml"), {})
    line = str(caught.value)
    assert "\n" not in line
    assert "Input should" not in line and "Input tag" not in line  # none of pydantic's words
    return line


def test_the_three_messages_from_the_issue() -> None:
    assert message("params = { per_page = [100] }") == (
        "gh.toml: endpoint issues: params.per_page: expected a string, a number or true/false, "
        "got a list"
    )
    assert message(table='primary_key = "id"') == (
        "gh.toml: endpoint issues: table.primary_key: expected a list, such as [\"id\"], got 'id'"
    )
    assert message(tail='[auth]\nstyle = "Bearer"\ntoken = "t"\n') == (
        "gh.toml: auth.style: unknown style 'Bearer'; expected one of: bearer, api_key_header, "
        "api_key_query, basic, oauth2_client_credentials, oauth2_refresh_token "
        "(did you mean 'bearer'?)"
    )


@pytest.mark.parametrize(
    ("extra", "table", "tail", "expected"),
    [
        (
            'paginaton = { style = "single" }',
            'primary_key = ["id"]',
            "",
            "gh.toml: endpoint issues: unknown key 'paginaton' (did you mean 'pagination'?)",
        ),
        (
            'pagination = { style = "page_number", page_parm = "p" }',
            'primary_key = ["id"]',
            "",
            "gh.toml: endpoint issues: pagination: unknown key 'page_parm' "
            "(did you mean 'page_param'?)",
        ),
        (
            'pagination = { style = "page_nubmer" }',
            'primary_key = ["id"]',
            "",
            "gh.toml: endpoint issues: pagination.style: unknown style 'page_nubmer'; expected "
            "one of: page_number, offset, cursor, next_url, link_header, single "
            "(did you mean 'page_number'?)",
        ),
        (
            "pagination = { page_size = 5 }",
            'primary_key = ["id"]',
            "",
            "gh.toml: endpoint issues: pagination.style: missing; expected one of: page_number, "
            "offset, cursor, next_url, link_header, single",
        ),
        (
            "",
            'mode = "merg"\nprimary_key = ["id"]',
            "",
            "gh.toml: endpoint issues: table.mode: expected one of: append, merge, got 'merg' "
            "(did you mean 'merge'?)",
        ),
        (
            "",
            "",
            "",
            "gh.toml: endpoint issues: table: mode 'merge' (the default) needs a primary_key "
            'such as ["id"]; or set mode = "append"',
        ),
        (
            "",
            'primary_key = ["id"]',
            "[http]\nmax_atempts = 3\n",
            "gh.toml: http: unknown key 'max_atempts' (did you mean 'max_attempts'?)",
        ),
        (
            "",
            'primary_key = ["id"]',
            "[pipline]\nconsumers = 1\n",
            "gh.toml: unknown top-level key 'pipline'; did you mean 'pipeline'?",
        ),
        (
            "",
            'primary_key = ["id"]\nstore_raw = "maybe"',
            "",
            "gh.toml: endpoint issues: table.store_raw: expected true or false, got 'maybe'",
        ),
    ],
)
def test_typos_and_wrong_types_say_what_is_expected(
    extra: str, table: str, tail: str, expected: str
) -> None:
    assert message(extra, table, tail) == expected


def test_several_problems_on_one_line_and_an_unnamed_endpoint() -> None:
    text = HEAD + '[[endpoints]]\npath = "/x"\n'
    with pytest.raises(ConfigError) as caught:
        parse_config(text, Path("gh.toml"), {})
    assert str(caught.value) == (
        "gh.toml: endpoints[0]: missing required key 'name'; "
        "endpoints[0]: missing required key 'table'"
    )
    line = message(
        'paginaton = 1\nrecords = "x"\nparams = { a = {} }', 'mode = "x"\nprimary_key = ["id"]'
    )
    assert line.count("endpoint issues:") == 3
    assert line.endswith("(and 1 more)")


async def test_cli_prints_the_plain_message_and_exits_2(
    tmp_path: Path, cli_env: dict[str, str]
) -> None:
    config = tmp_path / "gh.toml"
    config.write_text(HEAD + ENDPOINT.format(extra="paginaton = 1", table='primary_key = ["id"]'))
    code, out, err = await run_ingest("run", str(config), "--log-format", "console", env=cli_env)
    assert (code, out) == (2, "")
    assert err.strip() == (
        f"ingest: error: {config}: endpoint issues: unknown key 'paginaton' "
        "(did you mean 'pagination'?)"
    )
