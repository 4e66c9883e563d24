"""A fast local static server for the dataset: nginx when installed, else a small aiohttp app.

Both serve ``GET /items?page=N`` from ``pages/N.json`` on 127.0.0.1 only, in their own process,
started and stopped by PID. nginx gets its own config and prefix in a temporary directory and a
single worker, so it takes as little of the two cores as possible.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

NGINX_CONF = """\
daemon off;
master_process on;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
    keepalive_timeout 120s;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    types {{ }}
    default_type application/json;
    server {{
        listen 127.0.0.1:{port};
        root {root};
        location = /items {{ try_files /pages/$arg_page.json =404; }}
    }}
}}
"""


@dataclass(frozen=True, slots=True)
class Served:
    base_url: str
    kind: str  # "nginx" or "aiohttp"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _wait_listening(port: int, process: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with code {process.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within 15 s")


def nginx_binary() -> str | None:
    return shutil.which("nginx") or (
        "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None
    )


@contextlib.contextmanager
def serve(root: Path, prefer: str = "auto") -> Iterator[Served]:
    """Serve ``root`` (a dataset directory); yields the base URL and which server it is."""
    nginx = nginx_binary() if prefer in ("auto", "nginx") else None
    if prefer == "nginx" and nginx is None:
        raise RuntimeError("nginx requested but not installed (apt-get install nginx-light)")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="ingest-bench-http-") as prefix:
        if nginx is not None:
            conf = Path(prefix) / "nginx.conf"
            conf.write_text(NGINX_CONF.format(prefix=prefix, port=port, root=root.resolve()))
            command = [nginx, "-p", prefix, "-c", str(conf), "-e", f"{prefix}/error.log"]
            kind = "nginx"
        else:
            command = [sys.executable, "-m", "bench.static_server", str(root), str(port)]
            kind = "aiohttp"
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL)
        try:
            _wait_listening(port, process, kind)
            yield Served(f"http://127.0.0.1:{port}", kind)
        finally:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
