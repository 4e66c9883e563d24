"""`ingest demo` as a person sees it in a terminal: progress while it loads, a readable sample
with column headers, and the next step. A real pseudo-terminal, the real CLI, real PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import pty
import re
import subprocess
import sys

from ingest.demo import cell, text_table

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _run_in_a_terminal(args: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Run ``python -m ingest ARGS`` with stdout and stderr on a pty; its code and screen text."""
    main, secondary = pty.openpty()
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "ingest", *args],
            env={**env, "COLUMNS": "160", "TERM": "xterm"},
            stdin=subprocess.DEVNULL,
            stdout=secondary,
            stderr=secondary,
        )
    finally:
        os.close(secondary)
    chunks: list[bytes] = []
    try:
        while True:
            try:
                chunk = os.read(main, 65536)
            except OSError:  # EIO: every writer closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(main)
    code = process.wait(timeout=120)
    text = ANSI.sub("", b"".join(chunks).decode(errors="replace"))
    return code, text.replace("\r\n", "\n").replace("\r", "\n")


async def test_demo_in_a_terminal_shows_progress_a_table_and_the_next_step(
    cli_env: dict[str, str],
) -> None:
    code, screen = await asyncio.to_thread(_run_in_a_terminal, ["demo", "--users", "400"], cli_env)
    assert code == 0, screen
    # Where it writes, before it writes; then live bars (rich's columns) for both endpoints.
    assert screen.index("writing to database ") < screen.index("rec/s")
    assert re.search(r"users .*pages .*records .*rec/s", screen), screen
    assert re.search(r"events .*pages .*records .*rec/s", screen), screen
    # The sample: headers, a rule, escaped control characters, no Python reprs.
    lines = [line for line in screen.splitlines() if line.strip()]
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["id", "name"])
    assert lines[header].split() == ["id", "name", "email", "score", "updated_at", "plan"]
    assert set(lines[header + 1].replace(" ", "")) == {"-"}
    assert lines[header + 2].split()[:3] == ["1", "Grace\\tHopper", "#1"]
    assert "'" not in "\n".join(lines[header : header + 7])
    assert "demo_users holds 400 rows" in screen
    assert "next: copy the demo config and point it at your API:" in screen
    assert re.search(r"cp \S+/demo\.toml my_api\.toml", screen), screen


def test_sample_cells_and_table_are_plain_text() -> None:
    assert cell("Alan\nTuring\t\x07") == "Alan\\nTuring\\t\\x07"
    assert cell(None) == ""
    table = text_table(("id", "name"), [["7", "Zoë 🚀"], ["12", "x"]])
    assert table.splitlines() == [
        "  id  name",
        "  --  ------",  # the rocket takes two columns
        "   7  Zoë 🚀",
        "  12  x",
    ]
