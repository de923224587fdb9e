//! PostgreSQL, for fleets: replicas share keys, quotas, rate-limit windows, usage
//! events and alerts through one database. No TLS is compiled in; reach the
//! database over a trusted network or a local socket proxy.

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

use crate::error::{redact_url, Result, StoreError};
use crate::sql::Common;
use crate::types::Backend;
use crate::StoreOptions;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// [`crate::Store`] on PostgreSQL. Reads and writes share one pool: PostgreSQL
/// handles concurrent writers itself (row locks, `ON CONFLICT`).
pub struct PgStore {
    write: PgPool,
    read: PgPool,
    common: Common,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore").finish_non_exhaustive()
    }
}

impl PgStore {
    /// Connects to `postgres://…` or `postgresql://…` and migrates. Concurrent
    /// replicas may open at once: migrations take an advisory lock.
    pub async fn open(url: &str, options: &StoreOptions) -> Result<Self> {
        let connect_err = |source| StoreError::PgConnect {
            url: redact_url(url),
            source,
        };
        let opts = PgConnectOptions::from_str(url).map_err(connect_err)?;
        let pool = PgPoolOptions::new()
            .max_connections(options.max_connections.unwrap_or(10).max(1))
            .acquire_timeout(options.connect_timeout.unwrap_or(Duration::from_secs(10)))
            .connect_with(opts)
            .await
            .map_err(connect_err)?;
        let common = Self::prepare(&pool, &MIGRATOR, options).await?;
        Ok(PgStore {
            write: pool.clone(),
            read: pool,
            common,
        })
    }
}

crate::sql::impl_store!(PgStore, sqlx::Postgres, Backend::Postgres);
