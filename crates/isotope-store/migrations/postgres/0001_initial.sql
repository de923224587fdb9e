-- isotope-store schema, PostgreSQL flavour. The SQLite flavour in ../sqlite must
-- keep the same tables, columns and meanings; only the types differ.

-- Key/value settings. Holds the API-key pepper (`isotope.pepper`), written once by
-- the first process that opens the database, so every replica and the CLI agree.
CREATE TABLE settings (
    key   TEXT PRIMARY KEY NOT NULL,
    value TEXT NOT NULL
);

CREATE TABLE accounts (
    id            BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name          TEXT NOT NULL UNIQUE,
    created_at_ms BIGINT NOT NULL
);

-- Only HMAC-SHA256(pepper, secret) is stored, never the secret.
-- `tokens_used` is the running quota counter, bumped in the same transaction as the
-- usage events that spend it, so reading it is O(1).
CREATE TABLE api_keys (
    key_id              TEXT PRIMARY KEY NOT NULL,
    account_id          BIGINT NOT NULL REFERENCES accounts (id),
    secret_hash         TEXT NOT NULL,
    created_at_ms       BIGINT NOT NULL,
    revoked_at_ms       BIGINT,
    requests_per_minute BIGINT,
    tokens_per_minute   BIGINT,
    token_quota         BIGINT,
    policy_level        TEXT,
    tokens_used         BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX api_keys_account ON api_keys (account_id);

-- Fixed 60 s windows shared by all replicas; old windows are pruned by the store.
CREATE TABLE rate_counters (
    key_id          TEXT NOT NULL,
    window_start_ms BIGINT NOT NULL,
    requests        BIGINT NOT NULL,
    tokens          BIGINT NOT NULL,
    PRIMARY KEY (key_id, window_start_ms)
);

-- Append-only log. No foreign keys on purpose: one event naming a key that was
-- never stored must not fail the group commit of the whole batch it travels in.
CREATE TABLE usage_events (
    id                BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    request_id        TEXT NOT NULL UNIQUE,
    account_id        BIGINT NOT NULL,
    api_key_id        TEXT NOT NULL,
    created_at_ms     BIGINT NOT NULL,
    endpoint          TEXT NOT NULL,
    model             TEXT NOT NULL,
    prompt_text       TEXT,
    prompt_hash       TEXT NOT NULL,
    turns             BIGINT NOT NULL,
    completion_text   TEXT,
    completion_hash   TEXT,
    prompt_tokens     BIGINT NOT NULL,
    completion_tokens BIGINT NOT NULL,
    n                 BIGINT NOT NULL,
    logprobs          BOOLEAN NOT NULL,
    top_logprobs      BIGINT,
    max_tokens        BIGINT,
    temperature       DOUBLE PRECISION,
    watermark_scheme  TEXT,
    watermark_key_id  TEXT,
    latency_ms        BIGINT NOT NULL,
    status            BIGINT NOT NULL,
    finish_reason     TEXT,
    client_addr       TEXT,
    user_agent        TEXT,
    "user"            TEXT,
    policy            TEXT,
    partial           BOOLEAN NOT NULL
);
CREATE INDEX usage_events_account_time ON usage_events (account_id, created_at_ms);
CREATE INDEX usage_events_time ON usage_events (created_at_ms);
CREATE INDEX usage_events_completion_hash ON usage_events (completion_hash);

-- `reasons` is JSON text (same representation on both backends).
CREATE TABLE alerts (
    id            BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    created_at_ms BIGINT NOT NULL,
    account_id    BIGINT,
    api_key_id    TEXT,
    level         TEXT NOT NULL,
    score         DOUBLE PRECISION NOT NULL,
    reasons       TEXT NOT NULL
);
CREATE INDEX alerts_time ON alerts (created_at_ms);
