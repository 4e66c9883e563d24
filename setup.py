"""Only the optional C extension; everything else is in pyproject.toml.

``optional=True``: without a C compiler the install still succeeds and ingest encodes COPY
batches with asyncpg alone (slower, same rows); see README "Installing".
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "ingest._copyenc",
            sources=["ingest/_copyenc.c"],
            extra_compile_args=["-O2"],
            optional=True,
        )
    ]
)
