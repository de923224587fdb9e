//! The embedded default: one SQLite file in WAL mode (or `sqlite::memory:`).
//!
//! All writes go through a pool of ONE connection. SQLite allows one writer at a
//! time anyway; queueing writers in the pool instead of in SQLite's busy handler
//! means no `SQLITE_BUSY` inside this process, and write-after-read transactions
//! cannot fail to upgrade. Reads use a separate pool and run concurrently with the
//! writer thanks to WAL. Other processes on the same file (`isotope keys create`
//! while the server runs) wait up to the busy timeout.

use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

use crate::error::{Result, StoreError};
use crate::sql::Common;
use crate::types::Backend;
use crate::StoreOptions;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// How long a statement waits for another process's write lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// [`crate::Store`] on SQLite.
pub struct SqliteStore {
    write: SqlitePool,
    read: SqlitePool,
    common: Common,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore").finish_non_exhaustive()
    }
}

fn is_memory(url: &str) -> bool {
    url == "sqlite::memory:" || url.starts_with("sqlite::memory:?") || url == "sqlite://:memory:"
}

impl SqliteStore {
    /// Opens (creating file and parent directory if missing) and migrates.
    /// `url` is `sqlite://PATH` (relative or, with a third slash, absolute) or
    /// `sqlite::memory:`, a private database that lives as long as the store.
    pub async fn open(url: &str, options: &StoreOptions) -> Result<Self> {
        let open_err = |source| StoreError::SqliteOpen {
            path: url.to_string(),
            source,
        };
        let memory = is_memory(url);
        let base = if memory {
            SqliteConnectOptions::from_str("sqlite::memory:").map_err(open_err)?
        } else {
            SqliteConnectOptions::from_str(url).map_err(open_err)?
        };
        let base = base.foreign_keys(true).busy_timeout(BUSY_TIMEOUT);

        let (write, read) = if memory {
            // Every connection to `:memory:` is a different database: one connection,
            // kept forever, serves reads and writes.
            let pool = SqlitePoolOptions::new()
                .max_connections(1)
                .min_connections(1)
                .idle_timeout(None)
                .max_lifetime(None)
                .connect_with(base)
                .await
                .map_err(open_err)?;
            (pool.clone(), pool)
        } else {
            let path = base.get_filename().to_path_buf();
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).map_err(|source| StoreError::SqliteDir {
                    dir: dir.display().to_string(),
                    source,
                })?;
            }
            let path_err = |source| StoreError::SqliteOpen {
                path: path.display().to_string(),
                source,
            };
            let opts = base
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Normal);
            let write = SqlitePoolOptions::new()
                .max_connections(1)
                .connect_with(opts.clone())
                .await
                .map_err(path_err)?;
            let read = SqlitePoolOptions::new()
                .max_connections(options.max_connections.unwrap_or(4).max(1))
                .connect_with(opts)
                .await
                .map_err(path_err)?;
            (write, read)
        };

        let common = Self::prepare(&write, &MIGRATOR, options).await?;
        Ok(SqliteStore {
            write,
            read,
            common,
        })
    }
}

crate::sql::impl_store!(SqliteStore, sqlx::Sqlite, Backend::Sqlite);
