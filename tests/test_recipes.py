"""The cron recipe works as copied: its exact command line, run by a shell as cron runs it.

The command is read from the documentation's ```cron block, its absolute paths moved under a
temporary folder, and run with a cron-like environment (no DATABASE_URL, no secrets): everything
ingest needs comes from the env file, written as plain ``KEY=value`` lines, the format the
systemd recipe's ``EnvironmentFile=`` reads too.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest
from aiohttp import web

from tests.conftest import ROOT
from tests.helpers import config_text
from tests.servers import REQUESTS, _app, json_response, serve

TOKEN = "tok-cron-6b1d8e2f9a4c"
ABSOLUTE = re.compile(r"(?<![\w/.])/(etc|opt|var)/")


def cron_command() -> str:
    """The command of the one schedule line in the docs' cron block."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    blocks = [
        block
        for page in pages
        for block in re.findall(r"```cron\n(.*?)```", page.read_text(), re.DOTALL)
    ]
    assert len(blocks) == 1, "expected exactly one ```cron block in README.md and docs/"
    [line] = [line for line in blocks[0].splitlines() if line and not line.startswith("#")]
    return str(line.split(maxsplit=5)[5])


def _app_expecting_token() -> web.Application:
    async def accounts(request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return json_response({"error": "unauthorized"}, status=401)
        return json_response({"data": [{"id": 1, "name": "a b"}, {"id": 2, "name": "c"}]})

    return _app({"/accounts": accounts})


def _shell_run(shell: str, command: str, root: Path) -> subprocess.CompletedProcess[str]:
    cron_like = {"PATH": "/usr/bin:/bin", "HOME": str(root), "SHELL": shell, "LANG": "C.UTF-8"}
    return subprocess.run(
        [shell, "-c", command],
        env=cron_like,
        cwd=root,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


def _install_layout(root: Path, base: str, database: str) -> None:
    """/etc/ingest/crm.{env,toml}, /opt/ingest/bin/ingest and the output folders, under root."""
    etc = root / "etc" / "ingest"
    etc.mkdir(parents=True)
    (etc / "crm.env").write_text(
        "# /etc/ingest/crm.env: plain KEY=value lines (systemd EnvironmentFile= reads it too)\n"
        f"DATABASE_URL={database}\n"
        f"CRM_URL={base}\n"
        f"CRM_TOKEN={TOKEN}\n"
    )
    (etc / "crm.toml").write_text(
        config_text(
            "${CRM_URL}",
            source={"headers": {"Authorization": "Bearer ${CRM_TOKEN}"}},
            path="/accounts",
            records_path="data",
            pagination={"style": "single"},
            table="accounts",
        )
    )
    bin_dir = root / "opt" / "ingest" / "bin"
    bin_dir.mkdir(parents=True)
    # Stands for the installed script; runs this checkout, with nothing from the caller's env.
    script = bin_dir / "ingest"
    script.write_text(
        f'#!/bin/sh\nPYTHONPATH={ROOT} exec {sys.executable} -m ingest "$@"\n', encoding="utf-8"
    )
    script.chmod(0o755)
    (root / "var" / "lib" / "node_exporter" / "textfile").mkdir(parents=True)
    (root / "var" / "log" / "ingest").mkdir(parents=True)


@pytest.mark.parametrize("shell", ["/bin/sh", "/bin/bash"])
async def test_the_cron_recipe_runs_as_copied(shell: str, database: str, tmp_path: Path) -> None:
    if shutil.which(shell) is None:
        pytest.skip(f"{shell} is not installed")
    command = ABSOLUTE.sub(lambda match: f"{tmp_path}/{match.group(1)}/", cron_command())
    assert f"{tmp_path}/etc/ingest/crm.env" in command
    app = _app_expecting_token()
    async with serve(app) as base:
        await asyncio.to_thread(_install_layout, tmp_path, base, database)
        completed = await asyncio.to_thread(_shell_run, shell, command, tmp_path)
    log = (tmp_path / "var" / "log" / "ingest" / "crm.log").read_text()
    assert completed.returncode == 0, completed.stdout + completed.stderr + log
    assert [request["headers"].get("Authorization") for request in app[REQUESTS]] == [
        f"Bearer {TOKEN}"
    ]
    assert TOKEN not in log
    assert re.search(r"^run [0-9a-f-]{36}: succeeded$", log, re.MULTILINE), log
    metrics = tmp_path / "var" / "lib" / "node_exporter" / "textfile" / "ingest_crm.prom"
    assert metrics.exists()
    connection = await asyncpg.connect(database)
    try:
        assert await connection.fetchval("SELECT count(*) FROM accounts") == 2
    finally:
        await connection.close()


async def test_sourcing_the_env_file_without_set_a_exports_nothing(
    database: str, tmp_path: Path
) -> None:
    """Why the recipe says ``set -a``: plain ``KEY=value`` lines only set shell variables."""
    recipe = "set -a; . /etc/ingest/crm.env; set +a;"
    assert recipe in cron_command()
    old = cron_command().replace(recipe, ". /etc/ingest/crm.env &&")
    command = ABSOLUTE.sub(lambda match: f"{tmp_path}/{match.group(1)}/", old)
    async with serve(_app_expecting_token()) as base:
        await asyncio.to_thread(_install_layout, tmp_path, base, database)
        completed = await asyncio.to_thread(_shell_run, "/bin/sh", command, tmp_path)
    log = (tmp_path / "var" / "log" / "ingest" / "crm.log").read_text()
    assert completed.returncode == 2, log
    assert "environment variable CRM_URL is not set" in log


def test_the_kubernetes_recipes_command_lines_parse() -> None:
    """Every ``args: [...]`` of the docs' Kubernetes manifests is a valid ingest command line
    (the image's entry point is ``ingest``); no cluster runs them here."""
    from ingest.cli import build_parser  # noqa: PLC0415

    text = (ROOT / "docs" / "operations.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", text, re.DOTALL)
    command_lines = [
        json.loads(f"[{args}]")
        for block in blocks
        for args in re.findall(r"\bargs: \[(.*?)\]", block, re.DOTALL)
    ]
    commands = [args[0] for args in command_lines]
    assert commands == ["run", "backfill", "worker"], commands
    for args in command_lines:
        build_parser().parse_args(args)  # argparse exits on an unknown flag
    worker = command_lines[-1]
    assert "--drain" in worker
    assert "--plan-only" in command_lines[1]
