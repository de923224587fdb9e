-- Near-duplicate index of served completions for `isotope trace` (the MinHash/LSH
-- maths and parameters live in isotope-audit's `trace` module; the parameters in use
-- are recorded in settings under `trace.minhash`). Filled incrementally from
-- usage_events; the PostgreSQL flavour in ../postgres keeps the same tables.

-- One row per indexed completion (one per choice when n > 1). Every indexed event
-- has at least one row — `signature` NULL when the event had no text (hashes-only
-- store, purged, empty) — so "not yet indexed" is an anti-join on event_id.
CREATE TABLE trace_signatures (
    event_id  INTEGER NOT NULL,
    choice    INTEGER NOT NULL,
    shingles  INTEGER NOT NULL,
    signature BLOB,
    PRIMARY KEY (event_id, choice)
);

-- LSH buckets: one row per (band key, completion). A query text looks up its own
-- band keys; completions sharing at least one are the candidates.
CREATE TABLE trace_buckets (
    bucket   INTEGER NOT NULL,
    event_id INTEGER NOT NULL,
    choice   INTEGER NOT NULL,
    PRIMARY KEY (bucket, event_id, choice)
) WITHOUT ROWID;
