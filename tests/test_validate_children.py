"""``ingest validate`` on a child endpoint requests a real parent's path, never the template."""

from __future__ import annotations

from pathlib import Path

import asyncpg
from aiohttp import web

from ingest.config import parse_config
from ingest.secrets import Redactor
from ingest.validate import validate
from tests.helpers import run
from tests.servers import REQUESTS, _app, json_response, serve

Connection = asyncpg.Connection


def github_app() -> web.Application:
    """``/repos`` and ``/repos/{id}/issues``; an unknown repo (``{id}`` itself) is a 404."""
    repos = {7: "seven", 11: "eleven"}

    async def list_repos(request: web.Request) -> web.Response:
        return json_response([{"id": key, "name": name} for key, name in repos.items()])

    async def list_issues(request: web.Request) -> web.Response:
        repo = request.match_info["id"]
        if not repo.isdigit() or int(repo) not in repos:
            return json_response({"message": "Not Found"}, status=404)
        return json_response([{"number": 1, "title": f"issue of {repo}"}])

    return _app({"/repos": list_repos, "/repos/{id}/issues": list_issues})


def github_config(base_url: str) -> str:
    return f"""
[source]
name = "gh"
base_url = "{base_url}"

[[endpoints]]
name = "repos"
path = "/repos"
[endpoints.table]
name = "repos"
primary_key = ["id"]
columns = {{ id = {{ path = "id", type = "bigint" }}, name = {{ path = "name" }} }}

[[endpoints]]
name = "issues"
path = "/repos/{{id}}/issues"
parent = "repos"
[endpoints.table]
name = "issues"
primary_key = ["repo_id", "number"]
[endpoints.table.columns]
repo_id = {{ path = "$parent.id", type = "bigint" }}
number = {{ path = "number", type = "bigint" }}
title = {{ path = "title" }}
"""


async def test_a_child_endpoint_is_probed_with_the_first_parent_row(
    database: str, tmp_path: Path
) -> None:
    app = github_app()
    async with serve(app) as base:
        config = tmp_path / "gh.toml"
        config.write_text(github_config(base))
        await run(parse_config(github_config(base), config, {}), database)
        app[REQUESTS].clear()
        result = await validate(config, database, Redactor(), environ={})
    assert [str(problem) for problem in result.problems] == []
    assert result.notes == ()
    assert result.endpoints_checked == 2
    assert sorted(request["path"] for request in app[REQUESTS]) == ["/repos", "/repos/11/issues"]


async def test_without_parent_rows_the_child_probe_is_skipped_with_a_note(
    database: str, db: Connection, tmp_path: Path
) -> None:
    app = github_app()
    async with serve(app) as base:
        config = tmp_path / "gh.toml"
        config.write_text(github_config(base))
        absent = await validate(config, database, Redactor(), environ={})
        await db.execute("CREATE TABLE repos (id bigint, name text)")
        empty = await validate(config, database, Redactor(), environ={})
    for result, why in ((absent, "does not exist yet"), (empty, "has no rows yet")):
        assert [str(problem) for problem in result.problems] == []
        assert result.endpoints_checked == 1
        assert int(result.exit_code) == 0
        [note] = result.notes
        assert note.startswith("note: endpoint issues: not requested: the parent's table ")
        assert why in note
        assert "needs a row of repos's table (public.repos)" in note
    assert [request["path"] for request in app[REQUESTS]] == ["/repos", "/repos"]
