"""``ingest status CONFIG`` and validate's offline checks need none of the [auth] secrets."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import PYTHON
from tests.gated import gated_app, gated_config
from tests.helpers import config_text, make_config, run
from tests.servers import REQUESTS, serve

TOKEN = "tok-offline-3c9d1e7a5b"
AUTH = {
    "variable": '[auth]\nstyle = "bearer"\ntoken = "${INGEST_TEST_UNSET_GH_TOKEN}"\n',
    "file": '[auth]\nstyle = "bearer"\ntoken_file = "/nonexistent/ingest-test/gh_token"\n',
}
MISSING = {
    "variable": "auth.token: environment variable INGEST_TEST_UNSET_GH_TOKEN is not set "
    "(export INGEST_TEST_UNSET_GH_TOKEN=... before running)",
    "file": "auth.token_file: cannot read secret file /nonexistent/ingest-test/gh_token: "
    "No such file or directory",
}


def _ingest(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYTHON, "-m", "ingest", *args],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


@pytest.mark.parametrize("given", ["variable", "file"])
async def test_status_of_a_config_needs_no_auth_secret(
    given: str, database: str, cli_env: dict[str, str], tmp_path: Path
) -> None:
    async with serve(gated_app(12)) as base:
        await run(make_config(base, **gated_config()), database)
        config = tmp_path / "gh.toml"
        config.write_text(config_text(base, **gated_config()) + AUTH[given])
    completed = await asyncio.to_thread(_ingest, "status", str(config), "--json", env=cli_env)
    assert completed.returncode == 0, completed.stderr
    assert completed.stderr == ""
    [source] = json.loads(completed.stdout)["sources"]
    assert source["source"] == "test"
    [endpoint] = source["endpoints"]
    assert endpoint["endpoint"] == "items"
    assert endpoint["last_run"]["records"] == 12


@pytest.mark.parametrize("given", ["variable", "file"])
async def test_validate_without_auth_secrets_still_checks_the_rest_offline(
    given: str, cli_env: dict[str, str], tmp_path: Path
) -> None:
    """The missing secret is a problem; the other config errors are still found, the database
    is still checked, and no request goes out without the credential."""
    app = gated_app(5)
    async with serve(app) as base:
        config = tmp_path / "gh.toml"
        config.write_text(config_text(base, **gated_config()) + AUTH[given])
        completed = await asyncio.to_thread(_ingest, "validate", str(config), env=cli_env)
        broken = tmp_path / "broken.toml"
        broken.write_text(
            config_text(base, **gated_config()).replace('mode = "merge"', 'mode = "upsert"')
            + AUTH[given]
        )
        both = await asyncio.to_thread(_ingest, "validate", str(broken), env=cli_env)
    assert completed.returncode == 2, completed.stdout + completed.stderr
    assert completed.stdout.splitlines() == [
        f"{config}: {MISSING[given]}",
        "note: no endpoint was requested: the [auth] credentials are not available here "
        f"(auth.token{'_file' if given == 'file' else ''})",
    ]
    assert completed.stderr.strip() == f"ingest: 1 problem(s) in {config}"
    assert app[REQUESTS] == []
    lines = both.stdout.splitlines()
    assert both.returncode == 2
    assert lines[0] == f"{broken}: {MISSING[given]}"
    assert lines[1].startswith(f"{broken}: endpoint items: table.mode: ")


async def test_validate_with_the_secret_requests_the_endpoints(
    cli_env: dict[str, str], tmp_path: Path
) -> None:
    app = gated_app(5)
    async with serve(app) as base:
        config = tmp_path / "gh.toml"
        config.write_text(config_text(base, **gated_config()) + AUTH["variable"])
        env = {**cli_env, "INGEST_TEST_UNSET_GH_TOKEN": TOKEN}
        completed = await asyncio.to_thread(_ingest, "validate", str(config), env=env)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert [request["headers"]["Authorization"] for request in app[REQUESTS]] == [f"Bearer {TOKEN}"]
    assert TOKEN not in completed.stdout + completed.stderr


async def test_validate_sends_the_secret_file_content_when_it_is_readable(
    cli_env: dict[str, str], tmp_path: Path
) -> None:
    secret = tmp_path / "gh_token"
    secret.write_text(f"{TOKEN}\n")
    app = gated_app(5)
    async with serve(app) as base:
        config = tmp_path / "gh.toml"
        config.write_text(
            config_text(base, **gated_config())
            + f'[auth]\nstyle = "bearer"\ntoken_file = "{secret}"\n'
        )
        completed = await asyncio.to_thread(_ingest, "validate", str(config), env=cli_env)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert [request["headers"]["Authorization"] for request in app[REQUESTS]] == [f"Bearer {TOKEN}"]
    assert TOKEN not in completed.stdout + completed.stderr


async def test_a_missing_header_variable_does_not_hide_the_word_unset(
    cli_env: dict[str, str], tmp_path: Path
) -> None:
    """The placeholder of a missing header is not registered as a secret."""
    async with serve(gated_app(5)) as base:
        config = tmp_path / "gh.toml"
        config.write_text(
            config_text(
                base,
                source={"headers": {"X-Api-Key": "${INGEST_TEST_UNSET_KEY}"}},
                params={"org": "${INGEST_TEST_UNSET_ORG}"},
                **gated_config(),
            )
        )
        completed = await asyncio.to_thread(_ingest, "validate", str(config), env=cli_env)
    assert completed.returncode == 2, completed.stdout + completed.stderr
    assert "***" not in completed.stdout
    assert "note: endpoint items: not requested: a variable in its params is unset" in (
        completed.stdout
    )
