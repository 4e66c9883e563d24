"""`ingest reset`: clear endpoints' checkpoint, cursor and child-walk state; keep the tables.

Real CLI subprocesses (a pseudo-terminal for the prompt), a real local API, a real PostgreSQL.
The source: test_parents_changed's shop, customers incremental on ``updated``, orders a child
walked for changed parents only.
"""

from __future__ import annotations

import asyncio
import os
import pty
import subprocess
import sys
from pathlib import Path
from typing import Any

import asyncpg

from tests.processes import run_ingest
from tests.servers import REQUESTS, serve
from tests.test_parents_changed import config, versioned_customers_app

Connection = asyncpg.Connection


async def state(db: Connection) -> dict[str, Any]:
    """Every state row of the shop, by table and endpoint."""
    return {
        "checkpoints": sorted(
            (row["endpoint"], row["done"])
            for row in await db.fetch("SELECT endpoint, done FROM ingest.checkpoints")
        ),
        "cursors": sorted(
            (row["endpoint"], row["value"])
            for row in await db.fetch("SELECT endpoint, value FROM ingest.cursors")
        ),
        "parent_walks": sorted(
            row["endpoint"] for row in await db.fetch("SELECT endpoint FROM ingest.parent_walks")
        ),
    }


async def loaded_shop(tmp_path: Path, cli_env: dict[str, str]) -> Path:
    """A config whose first run loaded 5 customers and their orders."""
    async with serve(versioned_customers_app(5)) as base:
        path = tmp_path / "shop.toml"
        path.write_text(config(base))
        code, _, err = await run_ingest("run", str(path), env=cli_env)
        assert code == 0, err
    return path


FULL = {
    "checkpoints": [("customers", True), ("orders", True)],
    "cursors": [("customers", "5")],
    "parent_walks": ["orders"],
}


async def test_reset_of_one_endpoint_leaves_the_others_state_and_every_table(
    tmp_path: Path, cli_env: dict[str, str], db: Connection
) -> None:
    path = await loaded_shop(tmp_path, cli_env)
    assert await state(db) == FULL
    customers = await db.fetch("SELECT * FROM customers ORDER BY id")
    orders = await db.fetch("SELECT * FROM orders ORDER BY order_id")

    code, out, err = await run_ingest(
        "reset", str(path), "--endpoint", "orders", "--yes", env=cli_env
    )
    assert code == 0, err
    assert "orders  checkpoint (complete, " in out
    assert "changed-parents mark " in out
    assert "Loaded tables are kept" in out
    assert out.splitlines()[-1] == (
        "source shop: reset orders; the next `ingest run` walks them from the start (tables kept)"
    )
    assert await state(db) == {
        "checkpoints": [("customers", True)],
        "cursors": [("customers", "5")],
        "parent_walks": [],
    }
    assert await db.fetch("SELECT * FROM customers ORDER BY id") == customers
    assert await db.fetch("SELECT * FROM orders ORDER BY order_id") == orders

    code, out, err = await run_ingest(
        "reset", str(path), "--endpoint", "customers", "--yes", env=cli_env
    )
    assert code == 0, err
    assert "customers  checkpoint (complete, 5 records), cursor 5" in out
    assert await state(db) == {"checkpoints": [], "cursors": [], "parent_walks": []}
    assert await db.fetchval("SELECT count(*) FROM orders") == len(orders)

    code, out, err = await run_ingest("reset", str(path), "--yes", env=cli_env)
    assert code == 0, err
    assert "customers  nothing stored" in out
    assert (
        out.splitlines()[-1]
        == "source shop: nothing to reset (no state stored for the endpoint(s))"
    )


async def test_after_a_reset_the_next_run_walks_from_the_start(
    tmp_path: Path, cli_env: dict[str, str], db: Connection
) -> None:
    """Without a reset the second run asks only for customers since 5 and walks one parent;
    after one it asks from the start and walks every parent again."""
    app = versioned_customers_app(5)
    async with serve(app) as base:
        path = tmp_path / "shop.toml"
        path.write_text(config(base))
        for _ in range(2):
            code, _, err = await run_ingest("run", str(path), env=cli_env)
            assert code == 0, err
        asked = [r["query"].get("since") for r in app[REQUESTS] if r["path"] == "/customers"]
        assert asked[-1] == "5"
        app[REQUESTS].clear()
        code, _, err = await run_ingest("reset", str(path), "--yes", env=cli_env)
        assert code == 0, err
        code, _, err = await run_ingest("run", str(path), env=cli_env)
        assert code == 0, err
    first = next(r for r in app[REQUESTS] if r["path"] == "/customers")
    assert "since" not in first["query"]
    walked = {r["path"] for r in app[REQUESTS] if r["path"].endswith("/orders")}
    assert walked == {f"/customers/{index}/orders" for index in range(1, 6)}
    assert await state(db) == FULL


async def test_reset_without_a_terminal_or_yes_refuses_and_changes_nothing(
    tmp_path: Path, cli_env: dict[str, str], db: Connection
) -> None:
    path = await loaded_shop(tmp_path, cli_env)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "ingest",
        "reset",
        str(path),
        env=cli_env,
        stdin=subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await process.communicate()
    assert process.returncode == 2
    assert err.decode().strip() == (
        "ingest: error: ingest reset asks for confirmation on a terminal and stdin is not one: "
        "pass --yes to reset without asking"
    )
    assert await state(db) == FULL


async def test_reset_waits_for_no_run_it_exits_3_while_one_holds_the_source(
    tmp_path: Path, cli_env: dict[str, str], db: Connection
) -> None:
    path = await loaded_shop(tmp_path, cli_env)
    await db.execute("SELECT pg_advisory_lock(hashtextextended('ingest:source:shop', 0))")
    code, out, err = await run_ingest("reset", str(path), "--yes", env=cli_env)
    assert code == 3, out + err
    assert "advisory lock held" in err
    assert await state(db) == FULL


def _prompted(args: list[str], env: dict[str, str], answer: str) -> tuple[int, str]:
    """Run ``ingest ARGS`` on a pseudo-terminal, type ``answer`` once the prompt shows."""
    controller, terminal = pty.openpty()
    with subprocess.Popen(
        [sys.executable, "-m", "ingest", *args],
        env=env,
        stdin=terminal,
        stdout=terminal,
        stderr=terminal,
    ) as process:
        os.close(terminal)
        seen = b""
        while b"Type yes to reset: " not in seen:
            chunk = os.read(controller, 4096)
            assert chunk, seen.decode(errors="replace")
            seen += chunk
        os.write(controller, answer.encode() + b"\n")
        while True:
            try:
                chunk = os.read(controller, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            seen += chunk
        code = process.wait(timeout=60)
    os.close(controller)
    return code, seen.decode(errors="replace")


async def test_reset_on_a_terminal_asks_first(
    tmp_path: Path, cli_env: dict[str, str], db: Connection
) -> None:
    path = await loaded_shop(tmp_path, cli_env)
    args = ["reset", str(path), "--endpoint", "customers"]
    code, seen = await asyncio.to_thread(_prompted, args, cli_env, "no")
    assert code == 1, seen
    assert "reset cancelled: nothing changed" in seen
    assert await state(db) == FULL
    code, seen = await asyncio.to_thread(_prompted, args, cli_env, "yes")
    assert code == 0, seen
    assert "source shop: reset customers" in seen
    assert await state(db) == {
        "checkpoints": [("orders", True)],
        "cursors": [],
        "parent_walks": ["orders"],
    }


async def test_run_help_says_what_restart_keeps(cli_env: dict[str, str]) -> None:
    code, out, _ = await run_ingest("run", "--help", env={**cli_env, "COLUMNS": "200"})
    assert code == 0
    assert "keeps the incremental high-water mark" in out
    assert "`ingest reset` clears those" in out
