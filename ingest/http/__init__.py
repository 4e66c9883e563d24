"""HTTP side of ingest: one client, one retry policy, requests and responses as plain values."""
