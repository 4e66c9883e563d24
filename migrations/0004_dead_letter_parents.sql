-- Dead letters of child endpoints keep their parent's values, so `ingest dead-letters replay`
-- can fill the `$parent.` columns of the records it converts again.
-- Never edit a released migration; add a new numbered file instead.

-- The parent row's values (column -> value) a child endpoint's record was fetched under;
-- NULL for records of endpoints without a parent.
ALTER TABLE ingest.dead_letters ADD COLUMN parent jsonb;

-- `ingest dead-letters list/replay` read one endpoint's dead letters in id order.
CREATE INDEX dead_letters_source_endpoint_id ON ingest.dead_letters (source, endpoint, id);
