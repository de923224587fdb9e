//! Plain data the store reads and writes. No SQL here and no business rules: the
//! server decides what a limit means, the sentinel what an alert means.

use serde::{Deserialize, Serialize};

/// Per-key limits. `None` means "no limit of this kind"; the server enforces them
/// (with [`crate::Store::rate_consume`] and [`crate::Store::tokens_used_total`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyLimits {
    pub requests_per_minute: Option<u32>,
    pub tokens_per_minute: Option<u32>,
    /// Lifetime budget of prompt + completion tokens.
    pub token_quota: Option<u64>,
}

/// A customer account; API keys and usage events belong to one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    pub id: i64,
    pub name: String,
    pub created_at_ms: i64,
}

/// What the store knows about an API key, minus anything secret (the HMAC of the
/// secret never leaves the crate).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiKeyRecord {
    /// Public id, `ik_` + 12 base32 characters; also embedded in the token.
    pub key_id: String,
    pub account_id: i64,
    pub account_name: String,
    pub created_at_ms: i64,
    /// Set once the key is revoked; a revoked key never authenticates again.
    pub revoked_at_ms: Option<i64>,
    pub limits: KeyLimits,
    /// Per-key override of the sentinel's policy level (free text, the server's
    /// vocabulary).
    pub policy_level: Option<String>,
    /// Prompt + completion tokens of every usage event stored for this key.
    pub tokens_used: u64,
}

/// A freshly created API key: the only moment the token exists in clear.
///
/// `Debug` redacts the token so the value can be logged safely; print
/// [`NewApiKey::token`] once to the user and drop it.
#[derive(Clone)]
pub struct NewApiKey {
    pub record: ApiKeyRecord,
    /// `isk_<12 base32 chars of the key id>_<64 hex chars of secret>`.
    pub token: String,
}

impl std::fmt::Debug for NewApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewApiKey")
            .field("record", &self.record)
            .field("token", &"<redacted>")
            .finish()
    }
}

/// Totals of one fixed 60-second rate-limit window after a
/// [`crate::Store::rate_consume`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateWindow {
    /// Start of the window, a multiple of 60 000 ms since the Unix epoch.
    pub window_start_ms: i64,
    pub requests: u64,
    pub tokens: u64,
}

/// One served request, as the server saw it. Written in batches by
/// [`crate::UsageWriter`]; read by the sentinel and by forensics (`isotope trace`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UsageEvent {
    /// Assigned by the store; pass 0 on insert.
    pub id: i64,
    /// Unique per request; inserting the same `request_id` twice stores it once.
    pub request_id: String,
    pub account_id: i64,
    pub api_key_id: String,
    pub created_at_ms: i64,
    /// e.g. `/v1/chat/completions`.
    pub endpoint: String,
    pub model: String,
    /// `None` when the server stores hashes only, or after a retention purge.
    pub prompt_text: Option<String>,
    /// Hex SHA-256 of the prompt; kept forever.
    pub prompt_hash: String,
    pub turns: u32,
    pub completion_text: Option<String>,
    /// Hex SHA-256 of the completion; what [`crate::Store::find_completions_by_hash`]
    /// looks up.
    pub completion_hash: Option<String>,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub n: u32,
    pub logprobs: bool,
    pub top_logprobs: Option<u32>,
    pub max_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub watermark_scheme: Option<String>,
    pub watermark_key_id: Option<String>,
    pub latency_ms: u32,
    /// HTTP status returned to the client.
    pub status: u16,
    pub finish_reason: Option<String>,
    pub client_addr: Option<String>,
    pub user_agent: Option<String>,
    /// The OpenAI `user` field, as sent by the client.
    pub user: Option<String>,
    /// JSON of the output policy applied.
    pub policy: Option<String>,
    /// The client disconnected before the response was complete.
    pub partial: bool,
}

/// A sentinel finding about an account or key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Alert {
    /// Assigned by the store; pass 0 on insert.
    pub id: i64,
    pub created_at_ms: i64,
    pub account_id: Option<i64>,
    pub api_key_id: Option<String>,
    pub level: String,
    pub score: f64,
    pub reasons: serde_json::Value,
}

/// Which database a [`crate::Store`] talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        }
    }

    /// The product name, for messages.
    pub fn product(self) -> &'static str {
        match self {
            Backend::Sqlite => "SQLite",
            Backend::Postgres => "PostgreSQL",
        }
    }
}
