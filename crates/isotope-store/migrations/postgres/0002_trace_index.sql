-- Near-duplicate index of served completions for `isotope trace`; same tables and
-- meanings as the SQLite flavour in ../sqlite (see the comments there).

CREATE TABLE trace_signatures (
    event_id  BIGINT NOT NULL,
    choice    BIGINT NOT NULL,
    shingles  BIGINT NOT NULL,
    signature BYTEA,
    PRIMARY KEY (event_id, choice)
);

CREATE TABLE trace_buckets (
    bucket   BIGINT NOT NULL,
    event_id BIGINT NOT NULL,
    choice   BIGINT NOT NULL,
    PRIMARY KEY (bucket, event_id, choice)
);
