-- Incremental cursors and backfill partitions with leases.
-- Never edit a released migration; add a new numbered file instead.

-- The highest cursor value seen by the walk in progress, committed with each batch's checkpoint.
-- It becomes the endpoint's high-water mark (ingest.cursors) when the walk completes.
ALTER TABLE ingest.checkpoints ADD COLUMN cursor_max text;

-- One row per incremental endpoint: the highest cursor value of its last completed walk.
-- The next walk starts from this value minus the endpoint's lookback.
CREATE TABLE ingest.cursors (
    source      text        NOT NULL,
    endpoint    text        NOT NULL,
    value       text        NOT NULL,
    run_id      uuid,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (source, endpoint)
);

-- One row per backfill partition (a window of the cursor range). Workers claim rows with
-- SELECT ... FOR UPDATE SKIP LOCKED and hold them by a lease they renew with heartbeats; a lease
-- that is not renewed expires and any worker may take the partition over. Progress inside a
-- partition is the checkpoint row (source, endpoint, partition).
CREATE TABLE ingest.partitions (
    source            text        NOT NULL,
    endpoint          text        NOT NULL,
    partition         text        NOT NULL,
    lower_bound       text        NOT NULL,
    upper_bound       text        NOT NULL,
    status            text        NOT NULL DEFAULT 'pending'
                      CHECK (status IN ('pending', 'running', 'done', 'failed')),
    attempts          integer     NOT NULL DEFAULT 0,
    lease_owner       text,
    lease_expires_at  timestamptz,
    heartbeat_at      timestamptz,
    error             text,
    created_at        timestamptz NOT NULL DEFAULT now(),
    started_at        timestamptz,
    finished_at       timestamptz,
    PRIMARY KEY (source, endpoint, partition)
);
CREATE INDEX partitions_claimable ON ingest.partitions (source, status, lease_expires_at);
