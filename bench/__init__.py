"""The ingest benchmark: one command that measures ingest against the machine's ceilings and dlt.

``python -m bench`` (standard: 1M records), ``--quick`` (100k), ``--large`` (5M). See
``docs/performance.md`` for what is measured and the numbers.
"""
