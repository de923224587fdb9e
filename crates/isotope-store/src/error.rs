//! The one error type of the store. Every variant names what failed and, where the
//! user can act, what to fix. No variant ever carries a token, secret or pepper, and
//! database URLs pass through [`redact_url`] before they land in a message.

use std::sync::Arc;

/// Everything that can go wrong in `isotope-store`.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The URL names no backend this crate knows.
    #[error(
        "unsupported database URL `{url}`: expected `sqlite://PATH`, `sqlite::memory:`, \
         `postgres://USER@HOST:PORT/DB` or `postgresql://…`"
    )]
    UnsupportedUrl { url: String },

    /// The parent directory of a SQLite file could not be created.
    #[error("cannot create directory {dir} for the SQLite database: {source}")]
    SqliteDir {
        dir: String,
        #[source]
        source: std::io::Error,
    },

    /// SQLite refused to open (permissions, not a database, locked, …).
    #[error("cannot open SQLite database at {path}: {source}")]
    SqliteOpen {
        path: String,
        #[source]
        source: sqlx::Error,
    },

    /// PostgreSQL could not be reached or refused the login.
    #[error(
        "PostgreSQL at {url} unreachable: {source} (is the server running, and do the \
         user, password and database in the URL exist?)"
    )]
    PgConnect {
        url: String,
        #[source]
        source: sqlx::Error,
    },

    /// Applying the embedded migrations failed.
    #[error(
        "migrating the {backend} schema failed: {source} (a database written by a newer \
         isotope cannot be opened by an older one)"
    )]
    Migrate {
        backend: &'static str,
        #[source]
        source: sqlx::migrate::MigrateError,
    },

    /// A statement failed; `op` says which store operation it belonged to.
    #[error("{op} failed: {source}")]
    Query {
        op: &'static str,
        #[source]
        source: sqlx::Error,
    },

    /// A value read back from the database is out of range for its Rust type, or a
    /// setting the store wrote itself is malformed: the database was edited by hand
    /// or by something else.
    #[error("corrupt data in the database: {0}")]
    Corrupt(String),

    /// The caller passed something the store cannot accept.
    #[error("invalid input: {0}")]
    InvalidInput(String),

    /// The [`crate::UsageWriter`] has shut down; the event was not recorded.
    #[error("the usage writer has shut down; the usage event was not recorded")]
    WriterClosed,

    /// The group commit that carried this event failed; every event of the batch
    /// gets the same error, and none of them was stored.
    #[error("committing a batch of {events} usage events failed: {source}")]
    BatchFailed {
        events: usize,
        #[source]
        source: Arc<StoreError>,
    },
}

/// Shorthand used throughout the crate.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Builds the `map_err` closure for a failed statement.
pub(crate) fn query_err(op: &'static str) -> impl FnOnce(sqlx::Error) -> StoreError {
    move |source| StoreError::Query { op, source }
}

/// Hides the password of a URL (`postgres://user:secret@host` →
/// `postgres://user:***@host`) so it can go into error messages and logs.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _password)) => format!("{scheme}://{user}:***@{host}{tail}"),
            None => url.to_string(),
        },
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_url("postgres://u:hunter2@db:5432/x?sslmode=disable"),
            "postgres://u:***@db:5432/x?sslmode=disable"
        );
        assert_eq!(redact_url("postgres://u@db/x"), "postgres://u@db/x");
        assert_eq!(redact_url("sqlite://a/b.db"), "sqlite://a/b.db");
        assert_eq!(redact_url("sqlite::memory:"), "sqlite::memory:");
    }
}
