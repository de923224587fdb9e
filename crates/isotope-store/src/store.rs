//! The [`Store`] trait: everything the rest of isotope may ask of the database.

use async_trait::async_trait;

use crate::error::Result;
use crate::types::{
    Account, Alert, ApiKeyRecord, Backend, KeyLimits, NewApiKey, RateWindow, TraceCandidate,
    TraceEntry, UsageEvent,
};

/// Length of a rate-limit window. Windows are fixed (aligned to multiples of this
/// since the Unix epoch) so every replica computes the same row for the same instant.
pub const RATE_WINDOW_MS: i64 = 60_000;

/// How far below the highest indexed event id [`Store::trace_unindexed_events`] looks
/// for events it has not indexed yet. On PostgreSQL an id is taken at insert time but
/// becomes visible at commit, so a slow transaction can surface below ids already
/// indexed; the gap is bounded by the events in flight across replicas (group commits
/// of a few hundred), far below this.
pub const TRACE_REREAD_OVERLAP: i64 = 10_000;

/// Storage for accounts, API keys, rate-limit counters, usage events, alerts and
/// settings. Object-safe: the server holds an `Arc<dyn Store>` and does not know
/// which backend is behind it. Every method is one short transaction (or none),
/// so concurrent callers — in one process or many replicas — see consistent data.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Which database this is.
    fn backend(&self) -> Backend;

    /// Gets the account called `name`, creating it if it does not exist.
    async fn create_account(&self, name: &str) -> Result<Account>;

    /// The account called `name`, if any.
    async fn account_by_name(&self, name: &str) -> Result<Option<Account>>;

    /// All accounts, oldest first.
    async fn list_accounts(&self) -> Result<Vec<Account>>;

    /// Creates a key for `account_name` (creating the account if needed). The
    /// returned token is the only copy of the secret anywhere.
    async fn create_api_key(&self, account_name: &str, limits: KeyLimits) -> Result<NewApiKey>;

    /// The key a bearer token belongs to. `None` for a malformed token, an unknown
    /// key id, a wrong secret or a revoked key — deliberately indistinguishable, and
    /// the unknown-id path does the same HMAC and comparison as a known one.
    async fn authenticate(&self, token: &str) -> Result<Option<ApiKeyRecord>>;

    /// One key by id (revoked or not).
    async fn api_key(&self, key_id: &str) -> Result<Option<ApiKeyRecord>>;

    /// All keys, revoked ones included, oldest first.
    async fn list_api_keys(&self) -> Result<Vec<ApiKeyRecord>>;

    /// Revokes a key. `true` if a live key was revoked now, `false` if the id is
    /// unknown or the key was already revoked.
    async fn revoke_api_key(&self, key_id: &str) -> Result<bool>;

    /// Replaces a key's limits. `false` if the id is unknown.
    async fn set_key_limits(&self, key_id: &str, limits: KeyLimits) -> Result<bool>;

    /// Sets (or with `None` clears) the per-key override of the sentinel policy
    /// level. `false` if the id is unknown.
    async fn set_key_policy_level(&self, key_id: &str, level: Option<String>) -> Result<bool>;

    /// Atomically adds `requests` and `tokens` to the key's counter for the fixed
    /// [`RATE_WINDOW_MS`] window containing `now_unix_ms` and returns the totals
    /// after adding. One upsert, so concurrent replicas never lose an update. Call
    /// with zeros to read the current window. Windows older than the previous one
    /// are pruned about once a window.
    async fn rate_consume(
        &self,
        key_id: &str,
        now_unix_ms: i64,
        requests: u32,
        tokens: u64,
    ) -> Result<RateWindow>;

    /// Prompt + completion tokens of every usage event stored for the key (0 for an
    /// unknown key). O(1): a counter maintained by [`Store::insert_usage_events`].
    async fn tokens_used_total(&self, key_id: &str) -> Result<u64>;

    /// Stores a batch of usage events in ONE transaction, bumping each key's token
    /// counter in the same transaction. Events whose `request_id` is already stored
    /// are skipped (and not counted again), so a retried batch is harmless. `id` of
    /// the given events is ignored.
    async fn insert_usage_events(&self, events: &[UsageEvent]) -> Result<()>;

    /// Events with `id > after_id`, ascending, at most `limit` — a cursor for the
    /// sentinel. On PostgreSQL ids of concurrent transactions may become visible out
    /// of order, so a tailing reader should re-read a small overlap.
    async fn usage_events_since(&self, after_id: i64, limit: u32) -> Result<Vec<UsageEvent>>;

    /// Events of one account created at or after `since_ms`, ascending by id.
    async fn usage_events_for_account(
        &self,
        account_id: i64,
        since_ms: i64,
    ) -> Result<Vec<UsageEvent>>;

    /// The event with this `request_id`, if stored.
    async fn usage_event_by_request_id(&self, request_id: &str) -> Result<Option<UsageEvent>>;

    /// Events whose `completion_hash` equals `hash` (hex SHA-256), ascending by id —
    /// "did we serve this text, to whom, when".
    async fn find_completions_by_hash(&self, hash: &str) -> Result<Vec<UsageEvent>>;

    /// Events with these ids (unknown ids are left out), ascending by id.
    async fn usage_events_by_ids(&self, ids: &[i64]) -> Result<Vec<UsageEvent>>;

    /// Up to `limit` usage events not yet in the trace index, ascending by id. Looks
    /// back [`TRACE_REREAD_OVERLAP`] ids below the highest indexed one, so events of
    /// PostgreSQL transactions that committed out of id order are still found.
    async fn trace_unindexed_events(&self, limit: u32) -> Result<Vec<UsageEvent>>;

    /// Adds entries (signature rows and their buckets) to the trace index in ONE
    /// transaction; entries already indexed are skipped, so a retried batch is
    /// harmless and an interrupted indexing run resumes where it stopped.
    async fn insert_trace_entries(&self, entries: &[TraceEntry]) -> Result<()>;

    /// Indexed completions sharing at least one of `buckets`, most shared buckets
    /// first, at most `limit`.
    async fn trace_candidates(&self, buckets: &[i64], limit: u32) -> Result<Vec<TraceCandidate>>;

    /// Distinct usage events in the trace index.
    async fn count_trace_indexed(&self) -> Result<u64>;

    /// Number of stored usage events.
    async fn count_usage_events(&self) -> Result<u64>;

    /// Stores an alert and returns its id (`alert.id` is ignored).
    async fn insert_alert(&self, alert: &Alert) -> Result<i64>;

    /// Alerts created at or after `since_ms`, ascending by id, at most `limit`.
    async fn list_alerts(&self, since_ms: i64, limit: u32) -> Result<Vec<Alert>>;

    /// Retention: clears `prompt_text` and `completion_text` of events created
    /// before `cutoff_ms`; hashes and everything else stay. Returns how many events
    /// lost text.
    async fn purge_texts_older_than(&self, cutoff_ms: i64) -> Result<u64>;

    /// A setting, if set. Keys starting with `isotope.` are reserved for the store
    /// (the API-key pepper lives there) and are refused.
    async fn get_setting(&self, key: &str) -> Result<Option<String>>;

    /// Sets a setting (insert or replace). Keys starting with `isotope.` are refused.
    async fn set_setting(&self, key: &str, value: &str) -> Result<()>;

    /// Closes the connection pools; later calls fail. Dropping the store also
    /// closes them, but without waiting.
    async fn close(&self);
}
