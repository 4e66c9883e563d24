-- ingest's own schema: checkpoints, runs and dead letters.
-- Never edit a released migration; add a new numbered file instead.

CREATE SCHEMA IF NOT EXISTS ingest;

-- One row per (source, endpoint, partition): where the next run resumes.
-- `state` is the paginator's serialized next request; `done` marks a completed walk.
CREATE TABLE ingest.checkpoints (
    source      text        NOT NULL,
    endpoint    text        NOT NULL,
    partition   text        NOT NULL DEFAULT '',
    state       jsonb,
    done        boolean     NOT NULL DEFAULT false,
    records     bigint      NOT NULL DEFAULT 0,
    pages       bigint      NOT NULL DEFAULT 0,
    run_id      uuid,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (source, endpoint, partition)
);

-- One row per invocation of `ingest run` / `ingest backfill` / `ingest demo`.
CREATE TABLE ingest.runs (
    run_id       uuid        PRIMARY KEY,
    command      text        NOT NULL,
    source       text        NOT NULL,
    config_hash  text        NOT NULL,
    host         text        NOT NULL,
    started_at   timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz,
    status       text        NOT NULL DEFAULT 'running'
                 CHECK (status IN ('running', 'succeeded', 'failed', 'interrupted')),
    endpoints    jsonb       NOT NULL DEFAULT '{}'::jsonb,
    error        text
);
CREATE INDEX runs_source_started ON ingest.runs (source, started_at DESC);

-- Records that could not be converted to the target table's columns.
CREATE TABLE ingest.dead_letters (
    id          bigserial   PRIMARY KEY,
    run_id      uuid        NOT NULL,
    source      text        NOT NULL,
    endpoint    text        NOT NULL,
    record      text        NOT NULL,
    error       text        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX dead_letters_source_endpoint ON ingest.dead_letters (source, endpoint, created_at DESC);
