"""Fallback static server (aiohttp) for when nginx is not installed: ``/items?page=N``."""

from __future__ import annotations

import sys
from pathlib import Path

from aiohttp import web


def build_app(root: Path) -> web.Application:
    pages = root / "pages"

    async def items(request: web.Request) -> web.StreamResponse:
        page = request.query.get("page", "1")
        if not page.isdigit():
            raise web.HTTPNotFound()
        path = pages / f"{int(page)}.json"
        if not path.exists():
            raise web.HTTPNotFound()
        return web.Response(body=path.read_bytes(), content_type="application/json")

    app = web.Application()
    app.router.add_get("/items", items)
    return app


def main() -> None:
    root, port = Path(sys.argv[1]), int(sys.argv[2])
    web.run_app(build_app(root), host="127.0.0.1", port=port, access_log=None, print=None)


if __name__ == "__main__":
    main()
