"""Where the SQL migrations and the example configs are, in a checkout and in an installed wheel.

The top-level ``migrations/`` and ``config/`` folders are the source of truth. A wheel carries
them inside the package as ``ingest/_migrations`` and ``ingest/_config`` (a setuptools
``package-dir`` mapping in pyproject.toml), because a wheel can only install files under a
package; a checkout or an editable install (``pip install -e``) reads the folders in place, so
editing a migration needs no reinstall. The copy inside the package wins when both exist: an
installed ingest must never pick up a ``migrations`` folder that merely sits next to it.

Why plain paths next to ``__file__`` rather than ``importlib.resources`` traversables: callers
need real files (``load_config`` reads a path and names it in errors), and ingest is never
imported from a zip (its C extension could not load from one), so the package is always a
directory on disk and a traversable would add nothing but an ``as_file`` dance.
"""

from __future__ import annotations

from pathlib import Path

from ingest.errors import ConfigError

PACKAGE = Path(__file__).resolve().parent
#: (name inside the package in a wheel, top-level folder of a checkout)
MIGRATIONS = ("_migrations", "migrations")
CONFIGS = ("_config", "config")


def bundled(folder: tuple[str, str]) -> Path:
    """The folder shipped with this ingest: the wheel's copy, else the checkout's."""
    packaged = PACKAGE / folder[0]
    if packaged.is_dir():
        return packaged
    checkout = PACKAGE.parent / folder[1]
    if checkout.is_dir():
        return checkout
    raise ConfigError(
        f"{folder[1]}/ is neither inside the installed package ({packaged}) nor next to it "
        f"({checkout}): reinstall ingest (pip install . or a wheel)"
    )


def migrations_dir() -> Path:
    return bundled(MIGRATIONS)


def example_config(name: str) -> Path:
    """A config shipped in ``config/`` (``demo.toml``)."""
    return bundled(CONFIGS) / name
