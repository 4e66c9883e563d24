"""ingest: stream records from paginated HTTP APIs into PostgreSQL, exactly once."""

__version__ = "0.1.0"
