//! Persistence for isotope: accounts, hashed API keys, shared rate-limit windows,
//! usage events (with a group-commit writer), sentinel alerts and settings, on
//! SQLite (embedded, the default) or PostgreSQL (fleets).
//!
//! This is the only crate that writes SQL. Callers get an `Arc<dyn Store>` from
//! [`open`] and never learn which backend is behind it. The store holds no
//! business rules: it counts tokens and requests, the server decides what the
//! limits mean; it stores alerts, the sentinel decides what they say.
//!
//! ```no_run
//! # async fn demo() -> Result<(), isotope_store::StoreError> {
//! use isotope_store::{open, KeyLimits};
//! let store = open("sqlite://isotope-data/isotope.db").await?;
//! let key = store.create_api_key("acme", KeyLimits::default()).await?;
//! println!("{}", key.token); // shown once; only its HMAC is stored
//! assert!(store.authenticate(&key.token).await?.is_some());
//! # Ok(()) }
//! ```

mod error;
mod keys;
mod postgres;
mod sql;
mod sqlite;
mod store;
mod types;
mod writer;

use std::sync::Arc;

pub use error::{redact_url, Result, StoreError};
pub use keys::{KEY_ID_PREFIX, TOKEN_PREFIX};
pub use postgres::PgStore;
pub use sqlite::SqliteStore;
pub use store::{Store, RATE_WINDOW_MS, TRACE_REREAD_OVERLAP};
pub use types::{
    Account, Alert, ApiKeyRecord, Backend, KeyLimits, Level, ManualLevel, NewApiKey, RateWindow,
    TraceCandidate, TraceEntry, UsageEvent, PIN_PREFIX,
};
pub use writer::{UsageWriter, WriterStats};

/// Knobs for [`open_with`]. The defaults suit a single server.
#[derive(Clone, Default)]
pub struct StoreOptions {
    /// Use this pepper for API-key hashes instead of the one stored in the
    /// database (generated at first open). Keys created under one pepper do not
    /// authenticate under another.
    pub pepper: Option<[u8; 32]>,
    /// Pool size: PostgreSQL connections (default 10) or SQLite reader
    /// connections (default 4; SQLite always has exactly one writer).
    pub max_connections: Option<u32>,
    /// How long to keep trying to reach PostgreSQL (or to get a pooled
    /// connection) before giving up; default 10 s, so replicas started together
    /// with their database survive its start-up.
    pub connect_timeout: Option<std::time::Duration>,
}

impl std::fmt::Debug for StoreOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreOptions")
            .field("pepper", &self.pepper.map(|_| "<redacted>"))
            .field("max_connections", &self.max_connections)
            .field("connect_timeout", &self.connect_timeout)
            .finish()
    }
}

/// Opens the database at `url` with default options and applies any pending
/// migrations. See [`open_with`].
pub async fn open(url: &str) -> Result<Arc<dyn Store>> {
    open_with(url, &StoreOptions::default()).await
}

/// Opens the database at `url` and applies any pending migrations.
///
/// - `sqlite://PATH` — a SQLite file (created, with its parent directory, if
///   missing) in WAL mode with `synchronous=NORMAL`, foreign keys on and a busy
///   timeout; `sqlite:///abs/path` for an absolute path.
/// - `sqlite::memory:` — a private in-memory database (tests, demos).
/// - `postgres://…` or `postgresql://…` — PostgreSQL (no TLS).
pub async fn open_with(url: &str, options: &StoreOptions) -> Result<Arc<dyn Store>> {
    let url = url.trim();
    if url.starts_with("sqlite:") {
        Ok(Arc::new(SqliteStore::open(url, options).await?))
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Arc::new(PgStore::open(url, options).await?))
    } else {
        Err(StoreError::UnsupportedUrl {
            url: redact_url(url),
        })
    }
}
