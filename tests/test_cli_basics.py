"""CLI basics a user and a monitoring check rely on: --version, bare `ingest`, every command's
--help (defaults and exit codes), and `ingest status` as a check that can fail."""

from __future__ import annotations

from pathlib import Path

import asyncpg
import pytest

from ingest import __version__
from ingest.cli import build_parser
from tests.gated import gated_app, gated_config
from tests.helpers import config_text
from tests.processes import run_ingest
from tests.servers import serve

COMMANDS = ("migrate", "run", "status", "validate", "backfill", "worker", "demo")


async def test_version_and_bare_ingest(cli_env: dict[str, str]) -> None:
    code, out, err = await run_ingest("--version", env=cli_env)
    assert (code, out.strip()) == (0, f"ingest {__version__}"), err
    code, out, err = await run_ingest(env=cli_env)
    assert code == 2  # a usage error: nothing was done
    assert out == ""
    assert err.startswith("usage: ingest")
    assert all(command in err for command in COMMANDS)
    assert "exit codes:" in err


@pytest.mark.parametrize("command", COMMANDS)
async def test_every_command_help_shows_defaults_and_exit_codes(
    command: str, cli_env: dict[str, str]
) -> None:
    code, out, err = await run_ingest(command, "--help", env=cli_env)
    assert code == 0, err
    level = "warning" if command == "demo" else "info"  # the demo keeps its screen clean
    assert f"(default: {level})" in " ".join(out.split())  # --log-level, in every command
    exit_codes = out[out.index("exit codes:") :]
    assert "  0  success" in exit_codes
    assert "  2  a person must fix something" in exit_codes


def test_help_defaults_are_the_parsers_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    """What --help states is what a run gets (not a hand-written copy that can drift)."""
    run = build_parser().parse_args(["run", "x.toml"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--help"])
    help_text = capsys.readouterr().out
    flat = " ".join(help_text.split())
    assert f"(default: {run.progress_interval})" in flat
    assert "(default: 127.0.0.1)" in flat
    assert "  3  skipped, not a failure" in help_text
    assert "  6  " not in help_text  # status's own code is not listed for run


async def _run(config: Path, env: dict[str, str]) -> int:
    code, _, _ = await run_ingest("run", str(config), env=env)
    return code


async def test_status_fails_a_monitoring_check_on_a_failed_run_or_lag(
    tmp_path: Path, cli_env: dict[str, str], database: str
) -> None:
    async with serve(gated_app(30, fail_at=2)) as failing, serve(gated_app(30)) as healthy:
        config = tmp_path / "shop.toml"
        config.write_text(config_text(failing, **gated_config()))
        assert await _run(config, cli_env) == 1

        code, out, err = await run_ingest("status", str(config), env=cli_env)
        assert code == 0, err  # without a check flag status only reports
        code, out, err = await run_ingest(
            "status", str(config), "--fail-on-failed-run", env=cli_env
        )
        assert code == 6, err
        assert "failed" in out
        assert err.startswith("ingest: unhealthy: test.items: last run ")
        assert "failed: endpoint items:" in err
        code, _, err = await run_ingest("status", str(config), "--max-lag", "2h", env=cli_env)
        assert (code, err.strip()) == (6, "ingest: unhealthy: test.items: no successful run yet")

        config.write_text(config_text(healthy, **gated_config()))
        assert await _run(config, cli_env) == 0
        for flags in (["--fail-on-failed-run"], ["--max-lag", "2h"], ["--max-lag", "90s"]):
            code, _, err = await run_ingest("status", str(config), *flags, env=cli_env)
            assert code == 0, (flags, err)

    connection = await asyncpg.connect(database)
    try:  # the last success, three hours ago
        await connection.execute(
            "UPDATE ingest.runs SET started_at = started_at - interval '3 hours', "
            "finished_at = finished_at - interval '3 hours'"
        )
    finally:
        await connection.close()
    code, _, err = await run_ingest("status", str(config), "--max-lag", "2h", env=cli_env)
    assert code == 6
    assert err.startswith("ingest: unhealthy: test.items: last success 3h00m ago")
    assert err.strip().endswith("more than --max-lag 2h00m")
    code, _, err = await run_ingest("status", str(config), "--max-lag", "soon", env=cli_env)
    assert code == 2
    assert "--max-lag: 'soon' is not a duration such as 90s, 30m, 2h or 1d" in err
