"""A regular install works: a wheel, installed into a fresh environment, runs demo and migrate.

The steps are the Dockerfile's (no container engine runs on the test machines, so the image
itself is not built here): the wheel is built from exactly the files the Dockerfile copies, with
the C extension required, installed as a package, and run as the installed ``ingest`` script
from a folder far from the checkout. The fresh venv borrows the test environment's dependencies
through a ``.pth`` line instead of downloading them again; a ``.pth`` line adds a folder without
running the ``.pth`` files in it, so the checkout's editable-install hook stays out, and the test
checks that every file ingest uses (package, C extension, migrations, demo config) is the
installed copy.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import site
import subprocess
import sys
import tomllib
from pathlib import Path

import asyncpg

from ingest.migrate import discover
from tests.conftest import ROOT


def _dockerfile_sources() -> list[str]:
    """What the Dockerfile's build stage copies from the build context."""
    sources: list[str] = []
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        parts = line.split()
        if parts[:1] == ["COPY"] and not any(part.startswith("--") for part in parts):
            sources += parts[1:-1]
    return sources


def _run(command: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, check=False, timeout=300
    )


def _clean_env(**extra: str) -> dict[str, str]:
    """No PYTHONPATH and no database settings of the caller: only what the test passes."""
    environment = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("PG", "DATABASE", "PYTHON", "INGEST_"))
    }
    return {**environment, **extra}


def _build_and_install(tmp_path: Path) -> Path:
    """The Dockerfile's steps: copy the sources, build the wheel, install it. Returns the venv."""
    context = tmp_path / "context"
    context.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info", "build")
    for source in _dockerfile_sources():
        origin = ROOT / source
        if origin.is_dir():
            shutil.copytree(origin, context / source, ignore=ignore)
        else:
            shutil.copy2(origin, context / source)
    wheels = tmp_path / "wheels"
    build_env = _clean_env(INGEST_REQUIRE_C_EXTENSION="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"]
    built = _run([*pip_wheel, "--wheel-dir", str(wheels), "."], context, build_env)
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = wheels.glob("ingest-*.whl")

    venv = tmp_path / "venv"
    created = _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path, build_env)
    assert created.returncode == 0, created.stderr
    (target,) = (venv / "lib").glob("python3*/site-packages")
    (target / "_test_dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    pip_install = [str(venv / "bin" / "python"), "-m", "pip", "install", "--no-deps"]
    installed = _run([*pip_install, "--no-index", str(wheel)], tmp_path, build_env)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    return venv


def _check_the_installed_copy_is_used(venv: Path, cwd: Path) -> None:
    """The package, its C extension, migrations and demo config all come from the venv."""
    where = _run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "import ingest, ingest._copyenc as c, ingest.assets as a, ingest.demo as d; "
            "print(ingest.__file__, c.__file__, a.migrations_dir(), d.DEMO_CONFIG, sep='\\n')",
        ],
        cwd,
        _clean_env(),
    )
    assert where.returncode == 0, where.stderr
    paths = [Path(line).resolve() for line in where.stdout.splitlines()]
    assert len(paths) == 4, where.stdout
    (site_packages,) = (venv / "lib").glob("python3*/site-packages")
    for path in paths:
        assert path.is_relative_to(site_packages.resolve() / "ingest"), paths
        assert path.exists(), path
    assert not paths[0].is_relative_to(ROOT)


async def test_a_wheel_installed_into_a_fresh_venv_runs_demo_and_migrate(
    tmp_path: Path, database: str, empty_database: str
) -> None:
    venv = await asyncio.to_thread(_build_and_install, tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    await asyncio.to_thread(_check_the_installed_copy_is_used, venv, elsewhere)

    demo = await asyncio.to_thread(
        _run,
        [str(venv / "bin" / "ingest"), "demo", "--users", "150"],
        elsewhere,
        _clean_env(DATABASE_URL=database),
    )
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "demo_users holds 150 rows" in demo.stdout

    migrated = await asyncio.to_thread(
        _run,
        [str(venv / "bin" / "ingest"), "migrate"],
        elsewhere,
        _clean_env(DATABASE_URL=empty_database),
    )
    assert migrated.returncode == 0, migrated.stdout + migrated.stderr
    names = [f"{migration.version:04d}_{migration.name}" for migration in discover()]
    assert migrated.stdout.splitlines()[0].startswith("writing to database ")
    assert migrated.stdout.splitlines()[-1] == f"applied: {', '.join(names)}"
    connection = await asyncpg.connect(empty_database)
    try:
        assert await connection.fetchval("SELECT count(*) FROM ingest.schema_migrations") == len(
            names
        )
    finally:
        await connection.close()


def test_pyproject_lists_every_subpackage_of_ingest() -> None:
    """The package list is explicit (for the migrations/config mapping): a new subpackage must
    be added there, or a wheel would ship without it."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    listed = set(pyproject["tool"]["setuptools"]["packages"])
    found = {
        ".".join(init.parent.relative_to(ROOT).parts) for init in (ROOT / "ingest").rglob("*.py")
    }
    found = {name for name in found if (ROOT / name.replace(".", "/") / "__init__.py").exists()}
    assert found <= listed, sorted(found - listed)
    assert pyproject["tool"]["setuptools"]["package-dir"] == {
        "ingest._migrations": "migrations",
        "ingest._config": "config",
    }


def test_the_dockerfile_copies_what_the_wheel_needs() -> None:
    sources = _dockerfile_sources()
    for needed in ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md"):
        assert needed in sources
    for needed in ("ingest", "migrations", "config"):
        assert needed in sources
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^USER \d+", text, re.MULTILINE), "the image must not run as root"
    assert 'ENTRYPOINT ["ingest"]' in text
    assert "INGEST_REQUIRE_C_EXTENSION=1" in text
