//! Authentication and rate limiting, as one axum middleware layer in front of `/v1/*`.
//!
//! Bearer token → API key record (the store compares an HMAC of the secret in constant
//! time) → the key's risk level and output policy → request and token limits counted in
//! the store, so that every replica of a fleet shares them → the request proceeds with
//! a [`Caller`] extension, and the response gets `x-ratelimit-*` headers.

use std::time::{SystemTime, UNIX_EPOCH};

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;
use crate::policy::{effective_level, Level, LevelPolicy};
use crate::AppState;

/// Who is calling, attached to the request by [`authenticate`].
#[derive(Clone, Debug)]
pub struct Caller {
    pub api_key_id: String,
    pub account_id: i64,
    pub account: String,
    pub level: Level,
    pub policy: LevelPolicy,
    /// Effective tokens-per-minute limit (after the policy's divisor).
    pub tokens_per_minute: Option<u32>,
    /// The client's IP address, when the listener knows it.
    pub client_addr: Option<String>,
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

const WINDOW_MS: i64 = 60_000;

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get("authorization")?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// The first address of `X-Forwarded-For` (the client, as the proxy saw it).
fn forwarded_for(headers: &HeaderMap) -> Option<String> {
    let v = headers.get("x-forwarded-for")?.to_str().ok()?;
    let first = v.split(',').next()?.trim();
    first
        .parse::<std::net::IpAddr>()
        .ok()
        .map(|ip| ip.to_string())
}

fn set(headers: &mut HeaderMap, name: &'static str, value: String) {
    if let Ok(v) = HeaderValue::from_str(&value) {
        headers.insert(name, v);
    }
}

struct RateHeaders {
    rpm: Option<u32>,
    tpm: Option<u32>,
    requests: u64,
    tokens: u64,
    reset_secs: f64,
}

impl RateHeaders {
    fn apply(&self, headers: &mut HeaderMap) {
        if let Some(rpm) = self.rpm {
            set(headers, "x-ratelimit-limit-requests", rpm.to_string());
            set(
                headers,
                "x-ratelimit-remaining-requests",
                (rpm as u64).saturating_sub(self.requests).to_string(),
            );
            set(
                headers,
                "x-ratelimit-reset-requests",
                format!("{:.0}s", self.reset_secs.ceil()),
            );
        }
        if let Some(tpm) = self.tpm {
            set(headers, "x-ratelimit-limit-tokens", tpm.to_string());
            set(
                headers,
                "x-ratelimit-remaining-tokens",
                (tpm as u64).saturating_sub(self.tokens).to_string(),
            );
            set(
                headers,
                "x-ratelimit-reset-tokens",
                format!("{:.0}s", self.reset_secs.ceil()),
            );
        }
    }
}

/// The `/v1/*` guard.
pub async fn authenticate(State(app): State<AppState>, mut req: Request, next: Next) -> Response {
    match admit(&app, req.headers()).await {
        Ok((mut caller, rate)) => {
            let forwarded = app
                .cfg
                .trust_forwarded_for
                .then(|| forwarded_for(req.headers()))
                .flatten();
            caller.client_addr = forwarded.or_else(|| {
                req.extensions()
                    .get::<ConnectInfo<SocketAddr>>()
                    .map(|c| c.0.ip().to_string())
            });
            req.extensions_mut().insert(caller);
            let mut resp = next.run(req).await;
            rate.apply(resp.headers_mut());
            resp
        }
        Err(e) => e.into_response(),
    }
}

async fn admit(app: &AppState, headers: &HeaderMap) -> Result<(Caller, RateHeaders), ApiError> {
    let token = bearer(headers).ok_or_else(ApiError::unauthorized)?;
    let key = app
        .store
        .authenticate(token)
        .await?
        .ok_or_else(ApiError::unauthorized)?;
    let sentinel = app
        .sentinel
        .as_ref()
        .map(|s| s.level(key.account_id))
        .unwrap_or(Level::Observe);
    let level = effective_level(key.manual_level(), sentinel);
    let policy = app.cfg.policy.for_level(level).clone();
    if policy.block {
        return Err(ApiError::forbidden(
            "This API key's account is blocked. Contact the provider.",
        ));
    }
    let divisor = policy.rate_divisor.max(1);
    let defaults = &app.cfg.default_limits;
    let rpm = key
        .limits
        .requests_per_minute
        .or(defaults.requests_per_minute)
        .map(|r| (r / divisor).max(1));
    let tpm = key
        .limits
        .tokens_per_minute
        .or(defaults.tokens_per_minute)
        .map(|t| (t / divisor).max(1));
    let quota = key.limits.token_quota.or(defaults.token_quota);

    let now = now_ms();
    let window = app.store.rate_consume(&key.key_id, now, 1, 0).await?;
    let reset_secs = ((window.window_start_ms + WINDOW_MS - now).max(0) as f64) / 1000.0;
    let rate = RateHeaders {
        rpm,
        tpm,
        requests: window.requests,
        tokens: window.tokens,
        reset_secs,
    };
    let retry = reset_secs.ceil() as u64;
    if let Some(rpm) = rpm {
        if window.requests > rpm as u64 {
            let mut e = ApiError::rate_limited(
                format!(
                    "Rate limit reached for requests: limit {rpm} per minute. Try again in \
                     {retry}s."
                ),
                retry,
            );
            rate.apply(&mut e.headers);
            return Err(e);
        }
    }
    if let Some(tpm) = tpm {
        if window.tokens >= tpm as u64 {
            let mut e = ApiError::rate_limited(
                format!(
                    "Rate limit reached for tokens: limit {tpm} per minute. Try again in \
                     {retry}s."
                ),
                retry,
            );
            rate.apply(&mut e.headers);
            return Err(e);
        }
    }
    if let Some(quota) = quota {
        let used = app.store.tokens_used_total(&key.key_id).await?;
        if used >= quota {
            return Err(ApiError::quota_exceeded(format!(
                "You exceeded your token quota ({quota} tokens). Ask the provider to raise it."
            )));
        }
    }
    Ok((
        Caller {
            api_key_id: key.key_id.clone(),
            account_id: key.account_id,
            account: key.account_name.clone(),
            level,
            policy,
            tokens_per_minute: tpm,
            client_addr: None,
        },
        rate,
    ))
}
