-- Columns inferred from the records of endpoints that declare none (issue 17): one decision per
-- column of a target table, made once and kept here so every run and every process agrees.
-- Never edit a released migration; add a new numbered file instead.

CREATE TABLE ingest.inferred_columns (
    schema_name text NOT NULL,
    table_name text NOT NULL,
    column_name text NOT NULL,
    -- The dotted path into the record the column reads (profile.plan).
    path text NOT NULL,
    -- An ingest column type (bigint, double, text, timestamptz, jsonb, ...).
    type text NOT NULL,
    -- Which endpoint's batch first carried the field, and when.
    source text NOT NULL,
    endpoint text NOT NULL,
    run_id uuid,
    decided_at timestamptz NOT NULL DEFAULT now(),
    -- Column order: the order decisions were made in.
    position bigint GENERATED ALWAYS AS IDENTITY,
    PRIMARY KEY (schema_name, table_name, column_name),
    UNIQUE (schema_name, table_name, path)
);
