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

/// One completion's entry in the near-duplicate index of `isotope trace`: its MinHash
/// signature and LSH bucket keys, computed by the caller (isotope-audit); the store
/// only keeps and looks them up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceEntry {
    /// The usage event's id.
    pub event_id: i64,
    /// Choice index within the event (0 unless the request asked for `n > 1`).
    pub choice: u32,
    /// Distinct shingles of the completion (0 when there was nothing to index).
    pub shingles: u32,
    /// Encoded signature; `None` marks an event indexed without text (hashes only,
    /// purged, empty), so it is not read again.
    pub signature: Option<Vec<u8>>,
    /// LSH bucket keys (one per band).
    pub buckets: Vec<i64>,
}

/// A completion sharing at least one LSH bucket with a query.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceCandidate {
    pub event_id: i64,
    pub choice: u32,
    /// Buckets shared with the query.
    pub hits: u32,
    pub shingles: u32,
    pub signature: Option<Vec<u8>>,
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

/// Graded response to an account's risk, mildest first: the one vocabulary of the
/// sentinel (which decides it), the server (which enforces it), the store (which keeps
/// an operator's per-key setting as this text) and the CLI (`isotope keys set-level`).
/// `FromStr`, `Display` and serde all use the lowercase names.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    /// Nothing unusual.
    #[default]
    Observe,
    /// Worth a look; alert.
    Flag,
    /// Lower rate limits.
    Throttle,
    /// Drop logprobs, shorten max tokens, stronger defences.
    Degrade,
    /// Refuse service.
    Block,
}

impl Level {
    /// All levels, mildest first.
    pub const ALL: [Level; 5] = [
        Level::Observe,
        Level::Flag,
        Level::Throttle,
        Level::Degrade,
        Level::Block,
    ];

    /// The wire (and stored) name.
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Observe => "observe",
            Level::Flag => "flag",
            Level::Throttle => "throttle",
            Level::Degrade => "degrade",
            Level::Block => "block",
        }
    }
}

impl std::fmt::Display for Level {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Level {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        Level::ALL
            .into_iter()
            .find(|l| l.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "unknown policy level `{s}`; expected observe, flag, throttle, degrade or block"
                )
            })
    }
}

/// An operator's per-key level, stored in [`ApiKeyRecord::policy_level`] as text:
/// `degrade` is a floor (the sentinel may still raise the key above it), `pin:degrade`
/// fixes the key at that level whatever the sentinel says (e.g. `pin:observe` to clear
/// a false alarm). No setting at all means "follow the sentinel".
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ManualLevel {
    /// The level set.
    pub level: Level,
    /// Whether it overrides the sentinel instead of being a floor.
    pub pinned: bool,
}

/// Prefix of a pinned [`ManualLevel`] in its text form.
pub const PIN_PREFIX: &str = "pin:";

impl std::fmt::Display for ManualLevel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.pinned {
            f.write_str(PIN_PREFIX)?;
        }
        f.write_str(self.level.as_str())
    }
}

impl std::str::FromStr for ManualLevel {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        let (pinned, rest) = match s.strip_prefix(PIN_PREFIX) {
            Some(rest) => (true, rest),
            None => (false, s),
        };
        Ok(ManualLevel {
            level: rest.parse()?,
            pinned,
        })
    }
}

impl ApiKeyRecord {
    /// The operator's level for this key; `None` when unset or unreadable (an
    /// unreadable value is ignored rather than locking the key out).
    pub fn manual_level(&self) -> Option<ManualLevel> {
        self.policy_level.as_deref().and_then(|s| s.parse().ok())
    }
}

#[cfg(test)]
mod level_tests {
    use super::*;

    #[test]
    fn levels_and_manual_levels_round_trip_through_text_and_serde() {
        for level in Level::ALL {
            assert_eq!(level.as_str().parse::<Level>().unwrap(), level);
            assert_eq!(level.to_string(), level.as_str());
            let json = serde_json::to_string(&level).unwrap();
            assert_eq!(json, format!("\"{}\"", level.as_str()));
            assert_eq!(serde_json::from_str::<Level>(&json).unwrap(), level);
            for pinned in [false, true] {
                let m = ManualLevel { level, pinned };
                assert_eq!(m.to_string().parse::<ManualLevel>().unwrap(), m);
            }
        }
        assert_eq!(
            "pin:block".parse::<ManualLevel>().unwrap().level,
            Level::Block
        );
        assert!("nope".parse::<Level>().is_err());
        assert!("pin:".parse::<ManualLevel>().is_err());
        assert!(Level::Observe < Level::Flag && Level::Degrade < Level::Block);
    }
}
