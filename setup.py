"""Only the optional C extension; everything else is in pyproject.toml.

``optional=True``: without a C compiler the install still succeeds and ingest encodes COPY
batches with asyncpg alone (slower, same rows); see README "Installing".

``INGEST_REQUIRE_C_EXTENSION=1`` makes a failed compile fail the build instead: the Dockerfile's
build stage and tests/test_install.py set it, so a shipped wheel never silently lacks it.
"""

import os

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "ingest._copyenc",
            sources=["ingest/_copyenc.c"],
            extra_compile_args=["-O2"],
            optional=os.environ.get("INGEST_REQUIRE_C_EXTENSION") != "1",
        )
    ]
)
