-- Child endpoints with parents = "changed": when each one's last complete walk started.
-- The next walk only visits parent rows loaded (_ingest_loaded_at) at or after that moment.
CREATE TABLE ingest.parent_walks (
    source      text        NOT NULL,
    endpoint    text        NOT NULL,
    started_at  timestamptz NOT NULL,
    run_id      uuid,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (source, endpoint)
);
