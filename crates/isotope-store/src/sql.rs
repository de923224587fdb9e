//! The SQL, once for both backends.
//!
//! Every statement is written so that SQLite and PostgreSQL accept the same text
//! (`$n` placeholders, `ON CONFLICT … DO UPDATE`, `RETURNING`, 64-bit integers
//! everywhere), and [`impl_store!`] expands one implementation of [`crate::Store`]
//! per concrete pool type. A macro rather than generic code because sqlx's
//! executor bounds, generic over the database, do not survive `async_trait`'s `Send`
//! futures; a macro keeps a single copy of each query without fighting them.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use sqlx::{ColumnIndex, Decode, Row, Type};

use crate::error::{Result, StoreError};
use crate::keys::Pepper;
use crate::store::RATE_WINDOW_MS;
use crate::types::{Account, Alert, ApiKeyRecord, KeyLimits, UsageEvent};

/// State shared by both backends besides the pools.
pub(crate) struct Common {
    pub pepper: Pepper,
    /// Window start of the last prune of `rate_counters`, so one caller prunes
    /// about once per window.
    pub last_prune_ms: AtomicI64,
}

impl Common {
    pub fn new(pepper: Pepper) -> Self {
        Common {
            pepper,
            last_prune_ms: AtomicI64::new(i64::MIN),
        }
    }

    /// Whether the caller should prune now: the first call in each new window wins.
    pub fn should_prune(&self, window_start_ms: i64) -> bool {
        let last = self.last_prune_ms.load(Ordering::Relaxed);
        last < window_start_ms
            && self
                .last_prune_ms
                .compare_exchange(last, window_start_ms, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }
}

/// Name of the setting that holds the pepper (hex).
pub(crate) const PEPPER_SETTING: &str = "isotope.pepper";

pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

pub(crate) fn window_start(now_unix_ms: i64) -> i64 {
    now_unix_ms - now_unix_ms.rem_euclid(RATE_WINDOW_MS)
}

/// Unsigned counters are stored as signed 64-bit (PostgreSQL has no unsigned);
/// saturate rather than wrap.
pub(crate) fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

pub(crate) fn check_setting_key(key: &str) -> Result<()> {
    if key.starts_with("isotope.") {
        return Err(StoreError::InvalidInput(format!(
            "setting `{key}` is reserved for the store (keys starting with `isotope.`)"
        )));
    }
    Ok(())
}

pub(crate) fn check_account_name(name: &str) -> Result<&str> {
    let name = name.trim();
    if name.is_empty() {
        return Err(StoreError::InvalidInput(
            "an account name must not be empty".into(),
        ));
    }
    Ok(name)
}

/// `$first, $first+1, …` (`n` placeholders), for IN lists built at run time.
pub(crate) fn placeholders(first: usize, n: usize) -> String {
    (first..first + n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Reads column `col`, mapping decode failures to [`StoreError::Query`].
fn get<'r, R, T>(row: &'r R, col: &str) -> Result<T>
where
    R: Row,
    T: Decode<'r, R::Database> + Type<R::Database>,
    for<'a> &'a str: ColumnIndex<R>,
{
    row.try_get(col).map_err(|source| StoreError::Query {
        op: "decode row",
        source,
    })
}

fn narrow<T: TryFrom<i64>>(v: i64, col: &str) -> Result<T> {
    T::try_from(v).map_err(|_| StoreError::Corrupt(format!("column {col} holds {v}, out of range")))
}

fn get_u32<R>(row: &R, col: &str) -> Result<u32>
where
    R: Row,
    for<'r> i64: Decode<'r, R::Database> + Type<R::Database>,
    for<'a> &'a str: ColumnIndex<R>,
{
    narrow(get::<R, i64>(row, col)?, col)
}

fn get_opt_u32<R>(row: &R, col: &str) -> Result<Option<u32>>
where
    R: Row,
    for<'r> i64: Decode<'r, R::Database> + Type<R::Database>,
    for<'a> &'a str: ColumnIndex<R>,
{
    get::<R, Option<i64>>(row, col)?
        .map(|v| narrow(v, col))
        .transpose()
}

/// The columns of `usage_events`, in [`event_from_row`]'s and the insert's order.
macro_rules! event_columns {
    () => {
        "id, request_id, account_id, api_key_id, created_at_ms, endpoint, model, \
         prompt_text, prompt_hash, turns, completion_text, completion_hash, prompt_tokens, \
         completion_tokens, n, logprobs, top_logprobs, max_tokens, temperature, \
         watermark_scheme, watermark_key_id, latency_ms, status, finish_reason, \
         client_addr, user_agent, \"user\", policy, partial"
    };
}
pub(crate) use event_columns;

pub(crate) fn event_from_row<R>(row: &R) -> Result<UsageEvent>
where
    R: Row,
    for<'r> i64: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> String: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> bool: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> f64: Decode<'r, R::Database> + Type<R::Database>,
    for<'a> &'a str: ColumnIndex<R>,
{
    Ok(UsageEvent {
        id: get(row, "id")?,
        request_id: get(row, "request_id")?,
        account_id: get(row, "account_id")?,
        api_key_id: get(row, "api_key_id")?,
        created_at_ms: get(row, "created_at_ms")?,
        endpoint: get(row, "endpoint")?,
        model: get(row, "model")?,
        prompt_text: get(row, "prompt_text")?,
        prompt_hash: get(row, "prompt_hash")?,
        turns: get_u32(row, "turns")?,
        completion_text: get(row, "completion_text")?,
        completion_hash: get(row, "completion_hash")?,
        prompt_tokens: get_u32(row, "prompt_tokens")?,
        completion_tokens: get_u32(row, "completion_tokens")?,
        n: get_u32(row, "n")?,
        logprobs: get(row, "logprobs")?,
        top_logprobs: get_opt_u32(row, "top_logprobs")?,
        max_tokens: get_opt_u32(row, "max_tokens")?,
        // Stored as f64: f32 → f64 → f32 is exact.
        temperature: get::<R, Option<f64>>(row, "temperature")?.map(|t| t as f32),
        watermark_scheme: get(row, "watermark_scheme")?,
        watermark_key_id: get(row, "watermark_key_id")?,
        latency_ms: get_u32(row, "latency_ms")?,
        status: narrow(get::<R, i64>(row, "status")?, "status")?,
        finish_reason: get(row, "finish_reason")?,
        client_addr: get(row, "client_addr")?,
        user_agent: get(row, "user_agent")?,
        user: get(row, "user")?,
        policy: get(row, "policy")?,
        partial: get(row, "partial")?,
    })
}

pub(crate) fn key_from_row<R>(row: &R) -> Result<ApiKeyRecord>
where
    R: Row,
    for<'r> i64: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> String: Decode<'r, R::Database> + Type<R::Database>,
    for<'a> &'a str: ColumnIndex<R>,
{
    Ok(ApiKeyRecord {
        key_id: get(row, "key_id")?,
        account_id: get(row, "account_id")?,
        account_name: get(row, "account_name")?,
        created_at_ms: get(row, "created_at_ms")?,
        revoked_at_ms: get(row, "revoked_at_ms")?,
        limits: KeyLimits {
            requests_per_minute: get_opt_u32(row, "requests_per_minute")?,
            tokens_per_minute: get_opt_u32(row, "tokens_per_minute")?,
            token_quota: get::<R, Option<i64>>(row, "token_quota")?
                .map(|v| narrow(v, "token_quota"))
                .transpose()?,
        },
        policy_level: get(row, "policy_level")?,
        tokens_used: narrow(get::<R, i64>(row, "tokens_used")?, "tokens_used")?,
    })
}

pub(crate) fn account_from_row<R>(row: &R) -> Result<Account>
where
    R: Row,
    for<'r> i64: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> String: Decode<'r, R::Database> + Type<R::Database>,
    for<'a> &'a str: ColumnIndex<R>,
{
    Ok(Account {
        id: get(row, "id")?,
        name: get(row, "name")?,
        created_at_ms: get(row, "created_at_ms")?,
    })
}

pub(crate) fn alert_from_row<R>(row: &R) -> Result<Alert>
where
    R: Row,
    for<'r> i64: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> String: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> f64: Decode<'r, R::Database> + Type<R::Database>,
    for<'a> &'a str: ColumnIndex<R>,
{
    let reasons: String = get(row, "reasons")?;
    Ok(Alert {
        id: get(row, "id")?,
        created_at_ms: get(row, "created_at_ms")?,
        account_id: get(row, "account_id")?,
        api_key_id: get(row, "api_key_id")?,
        level: get(row, "level")?,
        score: get(row, "score")?,
        reasons: serde_json::from_str(&reasons)
            .map_err(|e| StoreError::Corrupt(format!("alert reasons are not JSON: {e}")))?,
    })
}

/// Implements [`crate::Store`] for a struct with fields `write: Pool<DB>` (all
/// writes; a single connection on SQLite), `read: Pool<DB>` and `common: Common`.
macro_rules! impl_store {
    ($store:ty, $db:ty, $backend:expr) => {
        impl $store {
            /// Applies pending migrations, then settles the pepper: the one in
            /// `options`, else the stored one.
            async fn prepare(
                pool: &sqlx::Pool<$db>,
                migrator: &sqlx::migrate::Migrator,
                options: &$crate::StoreOptions,
            ) -> $crate::error::Result<$crate::sql::Common> {
                migrator
                    .run(pool)
                    .await
                    .map_err(|source| $crate::error::StoreError::Migrate {
                        backend: $backend.product(),
                        source,
                    })?;
                let pepper = match options.pepper {
                    Some(p) => zeroize::Zeroizing::new(p),
                    None => Self::load_or_create_pepper(pool).await?,
                };
                Ok($crate::sql::Common::new(pepper))
            }

            /// Loads the pepper, or stores a fresh one if this is the first open. The
            /// insert is a no-op when another process won the race, and everyone
            /// then reads the one stored value.
            async fn load_or_create_pepper(
                pool: &sqlx::Pool<$db>,
            ) -> $crate::error::Result<$crate::keys::Pepper> {
                use $crate::error::query_err;
                let fresh = $crate::keys::random_bytes::<32>()?;
                let fresh_hex = zeroize::Zeroizing::new(hex::encode(fresh.as_ref()));
                sqlx::query(
                    "INSERT INTO settings (key, value) VALUES ($1, $2) \
                     ON CONFLICT (key) DO NOTHING",
                )
                .bind($crate::sql::PEPPER_SETTING)
                .bind(fresh_hex.as_str())
                .execute(pool)
                .await
                .map_err(query_err("store the API-key pepper"))?;
                let stored: zeroize::Zeroizing<String> = zeroize::Zeroizing::new(
                    sqlx::query_scalar("SELECT value FROM settings WHERE key = $1")
                        .bind($crate::sql::PEPPER_SETTING)
                        .fetch_one(pool)
                        .await
                        .map_err(query_err("load the API-key pepper"))?,
                );
                $crate::keys::pepper_from_hex(&stored)
            }

            async fn account_in_tx(
                tx: &mut sqlx::Transaction<'_, $db>,
                name: &str,
            ) -> $crate::error::Result<$crate::types::Account> {
                use $crate::error::query_err;
                sqlx::query(
                    "INSERT INTO accounts (name, created_at_ms) VALUES ($1, $2) \
                     ON CONFLICT (name) DO NOTHING",
                )
                .bind(name)
                .bind($crate::sql::now_ms())
                .execute(&mut **tx)
                .await
                .map_err(query_err("create account"))?;
                let row =
                    sqlx::query("SELECT id, name, created_at_ms FROM accounts WHERE name = $1")
                        .bind(name)
                        .fetch_one(&mut **tx)
                        .await
                        .map_err(query_err("create account"))?;
                $crate::sql::account_from_row(&row)
            }

            async fn fetch_events<'q>(
                &self,
                query: sqlx::query::Query<'q, $db, <$db as sqlx::Database>::Arguments<'q>>,
                op: &'static str,
            ) -> $crate::error::Result<Vec<$crate::types::UsageEvent>> {
                let rows = query
                    .fetch_all(&self.read)
                    .await
                    .map_err($crate::error::query_err(op))?;
                rows.iter().map($crate::sql::event_from_row).collect()
            }
        }

        #[async_trait::async_trait]
        impl $crate::store::Store for $store {
            fn backend(&self) -> $crate::types::Backend {
                $backend
            }

            async fn create_account(
                &self,
                name: &str,
            ) -> $crate::error::Result<$crate::types::Account> {
                use $crate::error::query_err;
                let name = $crate::sql::check_account_name(name)?;
                let mut tx = self
                    .write
                    .begin()
                    .await
                    .map_err(query_err("create account"))?;
                let account = Self::account_in_tx(&mut tx, name).await?;
                tx.commit().await.map_err(query_err("create account"))?;
                Ok(account)
            }

            async fn account_by_name(
                &self,
                name: &str,
            ) -> $crate::error::Result<Option<$crate::types::Account>> {
                let row =
                    sqlx::query("SELECT id, name, created_at_ms FROM accounts WHERE name = $1")
                        .bind(name.trim())
                        .fetch_optional(&self.read)
                        .await
                        .map_err($crate::error::query_err("look up account"))?;
                row.as_ref().map($crate::sql::account_from_row).transpose()
            }

            async fn list_accounts(&self) -> $crate::error::Result<Vec<$crate::types::Account>> {
                let rows = sqlx::query("SELECT id, name, created_at_ms FROM accounts ORDER BY id")
                    .fetch_all(&self.read)
                    .await
                    .map_err($crate::error::query_err("list accounts"))?;
                rows.iter().map($crate::sql::account_from_row).collect()
            }

            async fn create_api_key(
                &self,
                account_name: &str,
                limits: $crate::types::KeyLimits,
            ) -> $crate::error::Result<$crate::types::NewApiKey> {
                use $crate::error::query_err;
                let name = $crate::sql::check_account_name(account_name)?;
                let generated = $crate::keys::generate(&self.common.pepper)?;
                let created_at_ms = $crate::sql::now_ms();
                let mut tx = self
                    .write
                    .begin()
                    .await
                    .map_err(query_err("create API key"))?;
                let account = Self::account_in_tx(&mut tx, name).await?;
                sqlx::query(
                    "INSERT INTO api_keys (key_id, account_id, secret_hash, created_at_ms, \
                     requests_per_minute, tokens_per_minute, token_quota) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7)",
                )
                .bind(&generated.key_id)
                .bind(account.id)
                .bind(&generated.secret_hash)
                .bind(created_at_ms)
                .bind(limits.requests_per_minute.map(i64::from))
                .bind(limits.tokens_per_minute.map(i64::from))
                .bind(limits.token_quota.map($crate::sql::to_i64))
                .execute(&mut *tx)
                .await
                .map_err(query_err("create API key"))?;
                tx.commit().await.map_err(query_err("create API key"))?;
                Ok($crate::types::NewApiKey {
                    record: $crate::types::ApiKeyRecord {
                        key_id: generated.key_id,
                        account_id: account.id,
                        account_name: account.name,
                        created_at_ms,
                        revoked_at_ms: None,
                        limits,
                        policy_level: None,
                        tokens_used: 0,
                    },
                    token: generated.token,
                })
            }

            async fn authenticate(
                &self,
                token: &str,
            ) -> $crate::error::Result<Option<$crate::types::ApiKeyRecord>> {
                let Some(parsed) = $crate::keys::parse(token) else {
                    return Ok(None);
                };
                let row = sqlx::query($crate::sql::concat_key_select!(" WHERE k.key_id = $1"))
                    .bind(&parsed.key_id)
                    .fetch_optional(&self.read)
                    .await
                    .map_err($crate::error::query_err("authenticate API key"))?;
                let (stored_hash, record): (String, Option<$crate::types::ApiKeyRecord>) =
                    match &row {
                        Some(row) => (
                            sqlx::Row::try_get(row, "secret_hash")
                                .map_err($crate::error::query_err("authenticate API key"))?,
                            Some($crate::sql::key_from_row(row)?),
                        ),
                        None => ($crate::keys::DUMMY_HASH.to_string(), None),
                    };
                // Same HMAC and constant-time comparison whether or not the id exists.
                let matches =
                    $crate::keys::verify(&self.common.pepper, &parsed.secret, &stored_hash);
                Ok(record.filter(|r| matches && r.revoked_at_ms.is_none()))
            }

            async fn api_key(
                &self,
                key_id: &str,
            ) -> $crate::error::Result<Option<$crate::types::ApiKeyRecord>> {
                let row = sqlx::query($crate::sql::concat_key_select!(" WHERE k.key_id = $1"))
                    .bind(key_id)
                    .fetch_optional(&self.read)
                    .await
                    .map_err($crate::error::query_err("look up API key"))?;
                row.as_ref().map($crate::sql::key_from_row).transpose()
            }

            async fn list_api_keys(
                &self,
            ) -> $crate::error::Result<Vec<$crate::types::ApiKeyRecord>> {
                let rows = sqlx::query($crate::sql::concat_key_select!(
                    " ORDER BY k.created_at_ms, k.key_id"
                ))
                .fetch_all(&self.read)
                .await
                .map_err($crate::error::query_err("list API keys"))?;
                rows.iter().map($crate::sql::key_from_row).collect()
            }

            async fn revoke_api_key(&self, key_id: &str) -> $crate::error::Result<bool> {
                let done = sqlx::query(
                    "UPDATE api_keys SET revoked_at_ms = $1 \
                     WHERE key_id = $2 AND revoked_at_ms IS NULL",
                )
                .bind($crate::sql::now_ms())
                .bind(key_id)
                .execute(&self.write)
                .await
                .map_err($crate::error::query_err("revoke API key"))?;
                Ok(done.rows_affected() > 0)
            }

            async fn set_key_limits(
                &self,
                key_id: &str,
                limits: $crate::types::KeyLimits,
            ) -> $crate::error::Result<bool> {
                let done = sqlx::query(
                    "UPDATE api_keys SET requests_per_minute = $1, tokens_per_minute = $2, \
                     token_quota = $3 WHERE key_id = $4",
                )
                .bind(limits.requests_per_minute.map(i64::from))
                .bind(limits.tokens_per_minute.map(i64::from))
                .bind(limits.token_quota.map($crate::sql::to_i64))
                .bind(key_id)
                .execute(&self.write)
                .await
                .map_err($crate::error::query_err("set API key limits"))?;
                Ok(done.rows_affected() > 0)
            }

            async fn set_key_policy_level(
                &self,
                key_id: &str,
                level: Option<String>,
            ) -> $crate::error::Result<bool> {
                let done = sqlx::query("UPDATE api_keys SET policy_level = $1 WHERE key_id = $2")
                    .bind(level)
                    .bind(key_id)
                    .execute(&self.write)
                    .await
                    .map_err($crate::error::query_err("set API key policy level"))?;
                Ok(done.rows_affected() > 0)
            }

            async fn rate_consume(
                &self,
                key_id: &str,
                now_unix_ms: i64,
                requests: u32,
                tokens: u64,
            ) -> $crate::error::Result<$crate::types::RateWindow> {
                use $crate::error::query_err;
                let window_start_ms = $crate::sql::window_start(now_unix_ms);
                let (total_requests, total_tokens): (i64, i64) = sqlx::query_as(
                    "INSERT INTO rate_counters (key_id, window_start_ms, requests, tokens) \
                     VALUES ($1, $2, $3, $4) \
                     ON CONFLICT (key_id, window_start_ms) DO UPDATE SET \
                     requests = rate_counters.requests + excluded.requests, \
                     tokens = rate_counters.tokens + excluded.tokens \
                     RETURNING requests, tokens",
                )
                .bind(key_id)
                .bind(window_start_ms)
                .bind(i64::from(requests))
                .bind($crate::sql::to_i64(tokens))
                .fetch_one(&self.write)
                .await
                .map_err(query_err("count rate limit"))?;
                if self.common.should_prune(window_start_ms) {
                    // Keep the previous window for callers that smooth across two.
                    let pruned =
                        sqlx::query("DELETE FROM rate_counters WHERE window_start_ms < $1")
                            .bind(window_start_ms - $crate::store::RATE_WINDOW_MS)
                            .execute(&self.write)
                            .await;
                    if let Err(e) = pruned {
                        tracing::warn!("pruning old rate-limit windows failed: {e}");
                    }
                }
                Ok($crate::types::RateWindow {
                    window_start_ms,
                    requests: u64::try_from(total_requests).unwrap_or(0),
                    tokens: u64::try_from(total_tokens).unwrap_or(0),
                })
            }

            async fn tokens_used_total(&self, key_id: &str) -> $crate::error::Result<u64> {
                let used: Option<i64> =
                    sqlx::query_scalar("SELECT tokens_used FROM api_keys WHERE key_id = $1")
                        .bind(key_id)
                        .fetch_optional(&self.read)
                        .await
                        .map_err($crate::error::query_err("read token usage"))?;
                Ok(used.map_or(0, |u| u64::try_from(u).unwrap_or(0)))
            }

            async fn insert_usage_events(
                &self,
                events: &[$crate::types::UsageEvent],
            ) -> $crate::error::Result<()> {
                use $crate::error::query_err;
                if events.is_empty() {
                    return Ok(());
                }
                const OP: &str = "store usage events";
                // Sorted, so concurrent batches lock api_keys rows in the same order
                // and cannot deadlock on PostgreSQL.
                let mut spent: std::collections::BTreeMap<&str, u64> = Default::default();
                let mut tx = self.write.begin().await.map_err(query_err(OP))?;
                for e in events {
                    let inserted: Option<i64> = sqlx::query_scalar(concat!(
                        "INSERT INTO usage_events (",
                        $crate::sql::insert_event_columns!(),
                        ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, \
                         $14, $15, $16, $17, $18, $19, $20, $21, $22, $23, $24, $25, $26, \
                         $27, $28) ON CONFLICT (request_id) DO NOTHING RETURNING id"
                    ))
                    .bind(&e.request_id)
                    .bind(e.account_id)
                    .bind(&e.api_key_id)
                    .bind(e.created_at_ms)
                    .bind(&e.endpoint)
                    .bind(&e.model)
                    .bind(&e.prompt_text)
                    .bind(&e.prompt_hash)
                    .bind(i64::from(e.turns))
                    .bind(&e.completion_text)
                    .bind(&e.completion_hash)
                    .bind(i64::from(e.prompt_tokens))
                    .bind(i64::from(e.completion_tokens))
                    .bind(i64::from(e.n))
                    .bind(e.logprobs)
                    .bind(e.top_logprobs.map(i64::from))
                    .bind(e.max_tokens.map(i64::from))
                    .bind(e.temperature.map(f64::from))
                    .bind(&e.watermark_scheme)
                    .bind(&e.watermark_key_id)
                    .bind(i64::from(e.latency_ms))
                    .bind(i64::from(e.status))
                    .bind(&e.finish_reason)
                    .bind(&e.client_addr)
                    .bind(&e.user_agent)
                    .bind(&e.user)
                    .bind(&e.policy)
                    .bind(e.partial)
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(query_err(OP))?;
                    if inserted.is_some() {
                        let t = u64::from(e.prompt_tokens) + u64::from(e.completion_tokens);
                        *spent.entry(e.api_key_id.as_str()).or_default() += t;
                    }
                }
                for (key_id, tokens) in spent {
                    sqlx::query(
                        "UPDATE api_keys SET tokens_used = tokens_used + $1 WHERE key_id = $2",
                    )
                    .bind($crate::sql::to_i64(tokens))
                    .bind(key_id)
                    .execute(&mut *tx)
                    .await
                    .map_err(query_err(OP))?;
                }
                tx.commit().await.map_err(query_err(OP))
            }

            async fn usage_events_since(
                &self,
                after_id: i64,
                limit: u32,
            ) -> $crate::error::Result<Vec<$crate::types::UsageEvent>> {
                self.fetch_events(
                    sqlx::query(concat!(
                        "SELECT ",
                        $crate::sql::event_columns!(),
                        " FROM usage_events WHERE id > $1 ORDER BY id LIMIT $2"
                    ))
                    .bind(after_id)
                    .bind(i64::from(limit)),
                    "read usage events",
                )
                .await
            }

            async fn usage_events_for_account(
                &self,
                account_id: i64,
                since_ms: i64,
            ) -> $crate::error::Result<Vec<$crate::types::UsageEvent>> {
                self.fetch_events(
                    sqlx::query(concat!(
                        "SELECT ",
                        $crate::sql::event_columns!(),
                        " FROM usage_events WHERE account_id = $1 AND created_at_ms >= $2 \
                         ORDER BY id"
                    ))
                    .bind(account_id)
                    .bind(since_ms),
                    "read usage events of account",
                )
                .await
            }

            async fn usage_event_by_request_id(
                &self,
                request_id: &str,
            ) -> $crate::error::Result<Option<$crate::types::UsageEvent>> {
                let mut events = self
                    .fetch_events(
                        sqlx::query(concat!(
                            "SELECT ",
                            $crate::sql::event_columns!(),
                            " FROM usage_events WHERE request_id = $1"
                        ))
                        .bind(request_id),
                        "read usage event",
                    )
                    .await?;
                Ok(events.pop())
            }

            async fn find_completions_by_hash(
                &self,
                hash: &str,
            ) -> $crate::error::Result<Vec<$crate::types::UsageEvent>> {
                self.fetch_events(
                    sqlx::query(concat!(
                        "SELECT ",
                        $crate::sql::event_columns!(),
                        " FROM usage_events WHERE completion_hash = $1 ORDER BY id"
                    ))
                    .bind(hash),
                    "find completions by hash",
                )
                .await
            }

            async fn usage_events_by_ids(
                &self,
                ids: &[i64],
            ) -> $crate::error::Result<Vec<$crate::types::UsageEvent>> {
                let mut out = Vec::with_capacity(ids.len());
                // Bounded IN lists: PostgreSQL and SQLite both cap bind parameters.
                for chunk in ids.chunks(500) {
                    let sql = format!(
                        "SELECT {} FROM usage_events WHERE id IN ({}) ORDER BY id",
                        $crate::sql::event_columns!(),
                        $crate::sql::placeholders(1, chunk.len())
                    );
                    let mut q = sqlx::query(&sql);
                    for id in chunk {
                        q = q.bind(*id);
                    }
                    out.extend(self.fetch_events(q, "read usage events by id").await?);
                }
                out.sort_by_key(|e| e.id);
                Ok(out)
            }

            async fn trace_unindexed_events(
                &self,
                limit: u32,
            ) -> $crate::error::Result<Vec<$crate::types::UsageEvent>> {
                self.fetch_events(
                    sqlx::query(concat!(
                        "SELECT ",
                        $crate::sql::event_columns!(),
                        " FROM usage_events WHERE id > \
                         (SELECT COALESCE(MAX(event_id), 0) FROM trace_signatures) - $1 \
                         AND NOT EXISTS (SELECT 1 FROM trace_signatures s \
                         WHERE s.event_id = usage_events.id) ORDER BY id LIMIT $2"
                    ))
                    .bind($crate::store::TRACE_REREAD_OVERLAP)
                    .bind(i64::from(limit)),
                    "read unindexed usage events",
                )
                .await
            }

            async fn insert_trace_entries(
                &self,
                entries: &[$crate::types::TraceEntry],
            ) -> $crate::error::Result<()> {
                use $crate::error::query_err;
                const OP: &str = "store trace index entries";
                if entries.is_empty() {
                    return Ok(());
                }
                let mut tx = self.write.begin().await.map_err(query_err(OP))?;
                for e in entries {
                    let inserted: Option<i64> = sqlx::query_scalar(
                        "INSERT INTO trace_signatures (event_id, choice, shingles, signature) \
                         VALUES ($1, $2, $3, $4) ON CONFLICT (event_id, choice) DO NOTHING \
                         RETURNING event_id",
                    )
                    .bind(e.event_id)
                    .bind(i64::from(e.choice))
                    .bind(i64::from(e.shingles))
                    .bind(&e.signature)
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(query_err(OP))?;
                    if inserted.is_none() || e.buckets.is_empty() {
                        continue;
                    }
                    for chunk in e.buckets.chunks(256) {
                        let rows: Vec<String> = (0..chunk.len())
                            .map(|i| format!("(${}, ${}, ${})", 3 * i + 1, 3 * i + 2, 3 * i + 3))
                            .collect();
                        let sql = format!(
                            "INSERT INTO trace_buckets (bucket, event_id, choice) VALUES {} \
                             ON CONFLICT (bucket, event_id, choice) DO NOTHING",
                            rows.join(", ")
                        );
                        let mut q = sqlx::query(&sql);
                        for b in chunk {
                            q = q.bind(*b).bind(e.event_id).bind(i64::from(e.choice));
                        }
                        q.execute(&mut *tx).await.map_err(query_err(OP))?;
                    }
                }
                tx.commit().await.map_err(query_err(OP))
            }

            async fn trace_candidates(
                &self,
                buckets: &[i64],
                limit: u32,
            ) -> $crate::error::Result<Vec<$crate::types::TraceCandidate>> {
                use sqlx::Row as _;
                if buckets.is_empty() {
                    return Ok(Vec::new());
                }
                let buckets = &buckets[..buckets.len().min(1000)];
                let sql = format!(
                    "SELECT s.event_id, s.choice, h.hits, s.shingles, s.signature FROM \
                     (SELECT event_id, choice, COUNT(*) AS hits FROM trace_buckets \
                      WHERE bucket IN ({}) GROUP BY event_id, choice \
                      ORDER BY hits DESC, event_id LIMIT ${}) h \
                     JOIN trace_signatures s ON s.event_id = h.event_id AND s.choice = h.choice \
                     ORDER BY h.hits DESC, s.event_id, s.choice",
                    $crate::sql::placeholders(1, buckets.len()),
                    buckets.len() + 1
                );
                let mut q = sqlx::query(&sql);
                for b in buckets {
                    q = q.bind(*b);
                }
                let rows = q
                    .bind(i64::from(limit))
                    .fetch_all(&self.read)
                    .await
                    .map_err($crate::error::query_err("find trace candidates"))?;
                let decode = |e| $crate::error::StoreError::Query {
                    op: "decode trace candidate",
                    source: e,
                };
                rows.iter()
                    .map(|r| {
                        let num = |c: &str| -> $crate::error::Result<u32> {
                            let v: i64 = r.try_get(c).map_err(decode)?;
                            u32::try_from(v).map_err(|_| {
                                $crate::error::StoreError::Corrupt(format!(
                                    "trace index column {c} holds {v}"
                                ))
                            })
                        };
                        Ok($crate::types::TraceCandidate {
                            event_id: r.try_get("event_id").map_err(decode)?,
                            choice: num("choice")?,
                            hits: num("hits")?,
                            shingles: num("shingles")?,
                            signature: r.try_get("signature").map_err(decode)?,
                        })
                    })
                    .collect()
            }

            async fn count_trace_indexed(&self) -> $crate::error::Result<u64> {
                let n: i64 =
                    sqlx::query_scalar("SELECT COUNT(DISTINCT event_id) FROM trace_signatures")
                        .fetch_one(&self.read)
                        .await
                        .map_err($crate::error::query_err("count trace index"))?;
                Ok(u64::try_from(n).unwrap_or(0))
            }

            async fn count_usage_events(&self) -> $crate::error::Result<u64> {
                let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM usage_events")
                    .fetch_one(&self.read)
                    .await
                    .map_err($crate::error::query_err("count usage events"))?;
                Ok(u64::try_from(n).unwrap_or(0))
            }

            async fn insert_alert(
                &self,
                alert: &$crate::types::Alert,
            ) -> $crate::error::Result<i64> {
                sqlx::query_scalar(
                    "INSERT INTO alerts (created_at_ms, account_id, api_key_id, level, score, \
                     reasons) VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
                )
                .bind(alert.created_at_ms)
                .bind(alert.account_id)
                .bind(&alert.api_key_id)
                .bind(&alert.level)
                .bind(alert.score)
                .bind(alert.reasons.to_string())
                .fetch_one(&self.write)
                .await
                .map_err($crate::error::query_err("store alert"))
            }

            async fn list_alerts(
                &self,
                since_ms: i64,
                limit: u32,
            ) -> $crate::error::Result<Vec<$crate::types::Alert>> {
                let rows = sqlx::query(
                    "SELECT id, created_at_ms, account_id, api_key_id, level, score, reasons \
                     FROM alerts WHERE created_at_ms >= $1 ORDER BY id LIMIT $2",
                )
                .bind(since_ms)
                .bind(i64::from(limit))
                .fetch_all(&self.read)
                .await
                .map_err($crate::error::query_err("list alerts"))?;
                rows.iter().map($crate::sql::alert_from_row).collect()
            }

            async fn purge_texts_older_than(&self, cutoff_ms: i64) -> $crate::error::Result<u64> {
                let done = sqlx::query(
                    "UPDATE usage_events SET prompt_text = NULL, completion_text = NULL \
                     WHERE created_at_ms < $1 \
                     AND (prompt_text IS NOT NULL OR completion_text IS NOT NULL)",
                )
                .bind(cutoff_ms)
                .execute(&self.write)
                .await
                .map_err($crate::error::query_err("purge usage texts"))?;
                Ok(done.rows_affected())
            }

            async fn get_setting(&self, key: &str) -> $crate::error::Result<Option<String>> {
                $crate::sql::check_setting_key(key)?;
                sqlx::query_scalar("SELECT value FROM settings WHERE key = $1")
                    .bind(key)
                    .fetch_optional(&self.read)
                    .await
                    .map_err($crate::error::query_err("read setting"))
            }

            async fn set_setting(&self, key: &str, value: &str) -> $crate::error::Result<()> {
                $crate::sql::check_setting_key(key)?;
                sqlx::query(
                    "INSERT INTO settings (key, value) VALUES ($1, $2) \
                     ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                )
                .bind(key)
                .bind(value)
                .execute(&self.write)
                .await
                .map_err($crate::error::query_err("write setting"))?;
                Ok(())
            }

            async fn close(&self) {
                self.write.close().await;
                self.read.close().await;
            }
        }
    };
}
pub(crate) use impl_store;

/// The API-key select (with the account name; `secret_hash` is read only by
/// `authenticate` and never leaves the crate) followed by a literal clause, as one `&'static str`.
macro_rules! concat_key_select {
    ($tail:literal) => {
        concat!(
            "SELECT k.key_id, k.account_id, a.name AS account_name, \
             k.secret_hash, k.created_at_ms, k.revoked_at_ms, k.requests_per_minute, \
             k.tokens_per_minute, k.token_quota, k.policy_level, k.tokens_used \
             FROM api_keys k JOIN accounts a ON a.id = k.account_id",
            $tail
        )
    };
}
pub(crate) use concat_key_select;

/// [`event_columns!`] without `id`, for the insert.
macro_rules! insert_event_columns {
    () => {
        "request_id, account_id, api_key_id, created_at_ms, endpoint, model, \
         prompt_text, prompt_hash, turns, completion_text, completion_hash, prompt_tokens, \
         completion_tokens, n, logprobs, top_logprobs, max_tokens, temperature, \
         watermark_scheme, watermark_key_id, latency_ms, status, finish_reason, \
         client_addr, user_agent, \"user\", policy, partial"
    };
}
pub(crate) use insert_event_columns;
