"""Config loading: valid files become frozen objects; bad ones give one line naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from ingest.config import ENV_REFERENCE, load_config, parse_config
from ingest.errors import ConfigError
from ingest.secrets import Secret

ROOT = Path(__file__).resolve().parent.parent

VALID = """
[source]
name = "shop"
base_url = "https://api.example.com/v1/"
headers = { Authorization = "Bearer ${SHOP_TOKEN}", Accept-Language = "en" }

[[endpoints]]
name = "orders"
path = "/orders"
records_path = "data"
pagination = { style = "cursor", cursor_path = "meta.next", cursor_param = "after" }

[endpoints.table]
name = "orders"
primary_key = ["id"]

[endpoints.table.columns]
id = { path = "id", type = "bigint" }
total = { path = "amounts.total", type = "numeric" }
"""


def parse(text: str, **environ: str) -> object:
    return parse_config(text, Path("shop.toml"), environ)


def error_line(text: str, **environ: str) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, Path("shop.toml"), environ)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_valid_config_is_frozen_and_header_from_env_is_secret() -> None:
    loaded = parse_config(VALID, Path("shop.toml"), {"SHOP_TOKEN": "s3cr3t-token-value"})
    source = loaded.source
    assert source.base_url == "https://api.example.com/v1"
    authorization = source.headers["Authorization"]
    assert isinstance(authorization, Secret)
    assert authorization.reveal() == "Bearer s3cr3t-token-value"
    assert "s3cr3t" not in repr(source) and "s3cr3t" not in str(source)
    assert source.headers["Accept-Language"] == "en"
    assert source.endpoints[0].table.mode == "merge"
    with pytest.raises(ValidationError):
        source.name = "other"


def test_missing_environment_variable_names_it() -> None:
    message = error_line(VALID)
    assert message == (
        "shop.toml: source.headers.Authorization: environment variable SHOP_TOKEN is not set "
        "(export SHOP_TOKEN=... before running)"
    )


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            ('style = "cursor"', 'style = "sideways"'),
            "shop.toml: endpoint orders: pagination.style: unknown style 'sideways'",
        ),
        (('name = "orders"\nprimary_key', 'name = "orders; drop"\nprimary_key'), "table name"),
        (
            ('type = "numeric"', 'type = "money"'),
            "endpoint orders: table.columns.total.type: expected one of: text, bigint",
        ),
        (('primary_key = ["id"]', 'primary_key = ["nope"]'), "primary_key column 'nope'"),
        (
            ('primary_key = ["id"]', "mode = 'merge'"),
            "mode 'merge' (the default) needs a primary_key",
        ),
        (('type = "bigint"', 'type = "bigint[]"'), "primary_key column 'id' cannot be an array"),
        (
            ('type = "numeric"', 'type = "numeric[][]"'),
            "endpoint orders: table.columns.total.type: expected one of: text, bigint",
        ),
        (('base_url = "https://api.example.com/v1/"', 'base_url = "ftp://x"'), "base_url"),
        (("[[endpoints]]", "[[endpoint]]"), "unknown top-level key 'endpoint'"),
        (
            ('path = "/orders"', 'path = "/orders"\ncolour = "red"'),
            "endpoint orders: unknown key 'colour' (known: body, incremental, method, name,",
        ),
    ],
)
def test_bad_field_gives_one_line_naming_file_and_field(
    change: tuple[str, str], expected: str
) -> None:
    text = VALID.replace(*change)
    assert text != VALID
    message = error_line(text, SHOP_TOKEN="x")
    assert message.startswith("shop.toml: ")
    assert expected in message


def test_invalid_toml_and_missing_file() -> None:
    assert "not valid TOML" in error_line("[source\nname=1")
    with pytest.raises(ConfigError, match=r"nope\.toml: no such config file"):
        load_config("nope.toml")


def test_duplicate_endpoint_names_are_rejected() -> None:
    endpoint = VALID[VALID.index("[[endpoints]]") :]
    message = error_line(VALID + endpoint, SHOP_TOKEN="x")
    assert "endpoint names must be unique; repeated: orders" in message


def test_shipped_example_configs_are_valid() -> None:
    files = sorted((ROOT / "config").glob("*.toml"))
    assert files
    for file in files:
        names = ENV_REFERENCE.findall(file.read_text())
        environ = {name: "token-value" for name in names}
        environ |= {name: "https://api.example.com" for name in names if name.endswith("URL")}
        load_config(file, environ)


def test_docs_config_reference_example_is_valid() -> None:
    reference = (ROOT / "docs" / "configuration.md").read_text()
    section = reference[reference.index("## Config reference") :]
    example = section[section.index("```toml") + len("```toml") : section.index("```\n", 10)]
    loaded = parse_config(example, Path("docs/configuration.md"), {"SHOP_TOKEN": "t0ken-value"})
    [endpoint] = loaded.source.endpoints
    assert endpoint.table.primary_key == ("id",)
    assert loaded.source.pipeline.batch_size == 10000
