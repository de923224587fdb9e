//! One test body per behaviour, run against every backend: SQLite in a temporary
//! directory always, PostgreSQL when `ISOTOPE_TEST_POSTGRES_URL` points at a server
//! (`scripts/postgres.sh start` prints one). Each PostgreSQL test creates its own
//! database, so tests run in parallel. Without the variable the PostgreSQL tests
//! say loudly that they skipped — except under `CI=true`, where they fail.

use std::future::Future;
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use isotope_store::{
    open, open_with, Alert, Backend, KeyLimits, StoreError, StoreOptions, UsageEvent, UsageWriter,
    RATE_WINDOW_MS,
};
use sqlx::Connection;

const PG_ENV: &str = "ISOTOPE_TEST_POSTGRES_URL";

#[derive(Clone, Copy)]
enum Target {
    Sqlite,
    Postgres,
}

/// `postgres://u@h:p/old?x` → `postgres://u@h:p/new?x`.
fn with_database(url: &str, db: &str) -> String {
    let (scheme, rest) = url.split_once("://").expect("a postgres:// URL");
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) => (r, format!("?{q}")),
        None => (rest, String::new()),
    };
    let authority = rest.split('/').next().unwrap();
    format!("{scheme}://{authority}/{db}{query}")
}

fn random_suffix() -> String {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).unwrap();
    hex::encode(b)
}

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Runs `body` with a fresh database URL of `target`, then removes the database
/// (also when the body panics).
async fn run<F, Fut>(target: Target, test: &str, body: F)
where
    F: FnOnce(String) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    match target {
        Target::Sqlite => {
            let dir = tempfile::tempdir().unwrap();
            // A nested path: `open` must create the parent directory.
            let url = format!("sqlite://{}/nested/isotope.db", dir.path().display());
            let outcome = tokio::spawn(body(url)).await;
            if let Err(e) = outcome {
                std::panic::resume_unwind(e.into_panic());
            }
        }
        Target::Postgres => {
            let Ok(admin) = std::env::var(PG_ENV) else {
                if in_ci() {
                    panic!("{PG_ENV} is not set, but CI=true: CI must run the PostgreSQL tests (scripts/postgres.sh start prints the URL)");
                }
                // Straight to the terminal, past libtest's output capture.
                let line = format!(
                    "\n*** {test}: skipped: {PG_ENV} not set (run `export {PG_ENV}=$(scripts/postgres.sh start)`) ***\n"
                );
                let _ = std::io::stderr().lock().write_all(line.as_bytes());
                return;
            };
            let db = format!("isotope_test_{}", random_suffix());
            let mut conn = sqlx::PgConnection::connect(&admin)
                .await
                .unwrap_or_else(|e| panic!("{PG_ENV}={admin} unreachable: {e}"));
            sqlx::query(&format!("CREATE DATABASE {db}"))
                .execute(&mut conn)
                .await
                .unwrap();
            let outcome = tokio::spawn(body(with_database(&admin, &db))).await;
            sqlx::query(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
                .execute(&mut conn)
                .await
                .unwrap();
            if let Err(e) = outcome {
                std::panic::resume_unwind(e.into_panic());
            }
        }
    }
}

macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::run(super::Target::Sqlite, stringify!($name), super::$name).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::run(super::Target::Postgres, concat!("postgres::", stringify!($name)), super::$name).await
                }
            )*
        }
    };
}

on_both_backends!(
    api_key_lifecycle,
    bad_tokens_never_authenticate,
    pepper_and_data_persist_across_reopen,
    concurrent_account_creation_is_get_or_create,
    rate_counters_are_atomic_under_concurrency,
    rate_windows_are_fixed_and_pruned,
    group_commit_batches_and_is_durable_on_resolve,
    failed_commit_reaches_every_waiter,
    usage_events_round_trip_every_field,
    duplicate_request_ids_are_stored_once,
    retention_purge_keeps_hashes,
    alerts_round_trip,
    settings_round_trip_and_reserve_the_pepper,
);

fn full_event(i: u32, account_id: i64, key_id: &str) -> UsageEvent {
    UsageEvent {
        id: 0,
        request_id: format!("req-{i}"),
        account_id,
        api_key_id: key_id.to_string(),
        created_at_ms: 1_700_000_000_000 + i64::from(i),
        endpoint: "/v1/chat/completions".into(),
        model: "smollm2-135m".into(),
        prompt_text: Some(format!("prompt {i} — ünïcødé ✓")),
        prompt_hash: format!("{:064x}", i),
        turns: 3,
        completion_text: Some(format!("completion {i}")),
        completion_hash: Some(format!("c{:063x}", i)),
        prompt_tokens: 11 + i,
        completion_tokens: 7,
        n: 2,
        logprobs: true,
        top_logprobs: Some(5),
        max_tokens: Some(256),
        temperature: Some(0.7),
        watermark_scheme: Some("kgw:gamma=0.25,delta=2,h=4,seeding=left".into()),
        watermark_key_id: Some("wk_abc".into()),
        latency_ms: 1234,
        status: 200,
        finish_reason: Some("stop".into()),
        client_addr: Some("10.0.0.1:5555".into()),
        user_agent: Some("curl/8".into()),
        user: Some("end-user-42".into()),
        policy: Some(r#"{"level":"normal"}"#.into()),
        partial: false,
    }
}

fn sparse_event(i: u32, account_id: i64, key_id: &str) -> UsageEvent {
    UsageEvent {
        prompt_text: None,
        completion_text: None,
        completion_hash: None,
        logprobs: false,
        top_logprobs: None,
        max_tokens: None,
        temperature: None,
        watermark_scheme: None,
        watermark_key_id: None,
        status: 499,
        finish_reason: None,
        client_addr: None,
        user_agent: None,
        user: None,
        policy: None,
        partial: true,
        ..full_event(i, account_id, key_id)
    }
}

async fn api_key_lifecycle(url: String) {
    let store = open(&url).await.unwrap();
    let limits = KeyLimits {
        requests_per_minute: Some(60),
        tokens_per_minute: None,
        token_quota: Some(5_000_000_000),
    };
    let new = store.create_api_key("acme", limits).await.unwrap();
    assert!(new.token.starts_with("isk_"));
    assert!(new.record.key_id.starts_with("ik_"));
    assert!(new.token.contains(&new.record.key_id["ik_".len()..]));
    let debug = format!("{new:?}");
    assert!(
        !debug.contains(&new.token) && debug.contains("redacted"),
        "{debug}"
    );

    let acme = store.create_account("acme").await.unwrap();
    assert_eq!(acme.id, new.record.account_id, "get-or-create by name");
    assert_eq!(
        store.account_by_name("acme").await.unwrap(),
        Some(acme.clone())
    );
    assert_eq!(store.account_by_name("nobody").await.unwrap(), None);
    assert!(matches!(
        store.create_account("  ").await,
        Err(StoreError::InvalidInput(_))
    ));

    let auth = store
        .authenticate(&new.token)
        .await
        .unwrap()
        .expect("fresh key authenticates");
    assert_eq!(auth, new.record);
    assert_eq!(auth.account_name, "acme");
    assert_eq!(auth.limits, limits);

    let other = store
        .create_api_key("globex", KeyLimits::default())
        .await
        .unwrap();
    let keys = store.list_api_keys().await.unwrap();
    assert_eq!(keys.len(), 2);
    assert_eq!(store.list_accounts().await.unwrap().len(), 2);

    let new_limits = KeyLimits {
        requests_per_minute: None,
        tokens_per_minute: Some(10_000),
        token_quota: None,
    };
    assert!(store
        .set_key_limits(&new.record.key_id, new_limits)
        .await
        .unwrap());
    assert!(!store
        .set_key_limits("ik_unknown", new_limits)
        .await
        .unwrap());
    assert!(store
        .set_key_policy_level(&new.record.key_id, Some("restricted".into()))
        .await
        .unwrap());
    let auth = store.authenticate(&new.token).await.unwrap().unwrap();
    assert_eq!(auth.limits, new_limits);
    assert_eq!(auth.policy_level.as_deref(), Some("restricted"));
    assert!(store
        .set_key_policy_level(&new.record.key_id, None)
        .await
        .unwrap());
    let rec = store.api_key(&new.record.key_id).await.unwrap().unwrap();
    assert_eq!(rec.policy_level, None);

    assert!(store.revoke_api_key(&new.record.key_id).await.unwrap());
    assert!(
        !store.revoke_api_key(&new.record.key_id).await.unwrap(),
        "already revoked"
    );
    assert!(!store.revoke_api_key("ik_aaaaaaaaaaaa").await.unwrap());
    assert_eq!(store.authenticate(&new.token).await.unwrap(), None);
    let revoked = store.api_key(&new.record.key_id).await.unwrap().unwrap();
    assert!(revoked.revoked_at_ms.is_some());
    assert!(
        store.authenticate(&other.token).await.unwrap().is_some(),
        "other key unaffected"
    );
    store.close().await;
}

async fn bad_tokens_never_authenticate(url: String) {
    let store = open(&url).await.unwrap();
    let key = store
        .create_api_key("acme", KeyLimits::default())
        .await
        .unwrap();
    let (id_part, secret) = key.token["isk_".len()..].split_once('_').unwrap();
    let mut flipped = secret.as_bytes().to_vec();
    flipped[63] = if flipped[63] == b'0' { b'1' } else { b'0' };
    let flipped = String::from_utf8(flipped).unwrap();
    let bad = [
        String::new(),
        "Bearer x".into(),
        "isk_".into(),
        key.token[..key.token.len() - 2].to_string(),
        format!("{}x", key.token),
        key.token.to_uppercase(),
        // Right id, wrong secret: the HMAC comparison fails.
        format!("isk_{id_part}_{flipped}"),
        // Unknown id with the right secret: compared against the dummy hash,
        // same work, still None.
        format!("isk_aaaaaaaaaaaa_{secret}"),
        format!("isk_{id_part}_{}", "0".repeat(64)),
        "isk_aaaaaaaaaaaa_' OR 1=1 --".into(),
    ];
    for token in &bad {
        assert_eq!(store.authenticate(token).await.unwrap(), None, "{token:?}");
    }
    assert!(store.authenticate(&key.token).await.unwrap().is_some());

    // A token hashed under another pepper does not authenticate.
    store.close().await;
    let other = open_with(
        &url,
        &StoreOptions {
            pepper: Some([9u8; 32]),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(other.authenticate(&key.token).await.unwrap(), None);
    other.close().await;
}

async fn pepper_and_data_persist_across_reopen(url: String) {
    let store = open(&url).await.unwrap();
    let key = store
        .create_api_key("acme", KeyLimits::default())
        .await
        .unwrap();
    let e = full_event(1, key.record.account_id, &key.record.key_id);
    store
        .insert_usage_events(std::slice::from_ref(&e))
        .await
        .unwrap();
    store.set_setting("sentinel.cursor", "17").await.unwrap();
    store.close().await;
    drop(store);

    let store = open(&url).await.unwrap();
    let auth = store.authenticate(&key.token).await.unwrap();
    assert_eq!(
        auth.map(|r| r.key_id),
        Some(key.record.key_id.clone()),
        "pepper persisted"
    );
    assert_eq!(store.count_usage_events().await.unwrap(), 1);
    assert_eq!(
        store.tokens_used_total(&key.record.key_id).await.unwrap(),
        12 + 7
    );
    assert_eq!(
        store
            .get_setting("sentinel.cursor")
            .await
            .unwrap()
            .as_deref(),
        Some("17")
    );
    // Several handles at once (CLI and server on one database) agree too.
    let second = open(&url).await.unwrap();
    assert!(second.authenticate(&key.token).await.unwrap().is_some());
    second.close().await;
    store.close().await;
}

async fn concurrent_account_creation_is_get_or_create(url: String) {
    let store = open(&url).await.unwrap();
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move { store.create_account("race").await.unwrap().id })
        })
        .collect();
    let mut ids = Vec::new();
    for t in tasks {
        ids.push(t.await.unwrap());
    }
    ids.dedup();
    assert_eq!(ids.len(), 1, "{ids:?}");
    assert_eq!(store.list_accounts().await.unwrap().len(), 1);
    store.close().await;
}

async fn rate_counters_are_atomic_under_concurrency(url: String) {
    let store = open(&url).await.unwrap();
    let now = 1_700_000_012_345;
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move { store.rate_consume("ik_k", now, 1, 10).await.unwrap() })
        })
        .collect();
    let mut seen = Vec::new();
    for t in tasks {
        let w = t.await.unwrap();
        assert_eq!(w.window_start_ms, now - now % RATE_WINDOW_MS);
        assert_eq!(
            w.tokens,
            w.requests * 10,
            "requests and tokens move together"
        );
        seen.push(w.requests);
    }
    seen.sort_unstable();
    assert_eq!(
        seen,
        (1..=50).collect::<Vec<u64>>(),
        "every add saw a distinct total"
    );
    let total = store.rate_consume("ik_k", now, 0, 0).await.unwrap();
    assert_eq!((total.requests, total.tokens), (50, 500));
    let other = store.rate_consume("ik_other", now, 1, 1).await.unwrap();
    assert_eq!((other.requests, other.tokens), (1, 1), "keys are separate");
    store.close().await;
}

async fn rate_windows_are_fixed_and_pruned(url: String) {
    let store = open(&url).await.unwrap();
    let t0 = 1_700_000_040_000; // window [1_700_000_040_000, +60 s)
    assert_eq!(t0 % RATE_WINDOW_MS, 0);
    assert_eq!(store.rate_consume("k", t0, 1, 5).await.unwrap().requests, 1);
    assert_eq!(
        store
            .rate_consume("k", t0 + 59_999, 1, 5)
            .await
            .unwrap()
            .requests,
        2
    );
    let next = store.rate_consume("k", t0 + 60_000, 1, 5).await.unwrap();
    assert_eq!((next.window_start_ms, next.requests), (t0 + 60_000, 1));
    // Three windows later the first window is pruned: it starts again from zero.
    store
        .rate_consume("k", t0 + 3 * RATE_WINDOW_MS, 1, 1)
        .await
        .unwrap();
    let again = store.rate_consume("k", t0, 1, 5).await.unwrap();
    assert_eq!(again.requests, 1, "old window was pruned");
    // Negative times (before 1970) still align down.
    let w = store.rate_consume("k", -1, 0, 0).await.unwrap();
    assert_eq!(w.window_start_ms, -RATE_WINDOW_MS);
    store.close().await;
}

async fn group_commit_batches_and_is_durable_on_resolve(url: String) {
    let store = open(&url).await.unwrap();
    let key = store
        .create_api_key("acme", KeyLimits::default())
        .await
        .unwrap();
    let writer = UsageWriter::spawn(store.clone(), 64, Duration::from_millis(20));
    const N: u32 = 300;
    let tasks: Vec<_> = (0..N)
        .map(|i| {
            let (store, writer) = (store.clone(), writer.clone());
            let e = full_event(i, key.record.account_id, &key.record.key_id);
            tokio::spawn(async move {
                writer.record(e).await.unwrap();
                // Resolved ⇒ committed ⇒ visible to any reader.
                let stored = store
                    .usage_event_by_request_id(&format!("req-{i}"))
                    .await
                    .unwrap();
                assert!(
                    stored.is_some(),
                    "event {i} not visible after record resolved"
                );
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let stats = writer.stats();
    assert_eq!(stats.events_committed, u64::from(N));
    assert_eq!(stats.batches_failed, 0);
    assert!(
        stats.batches_committed < u64::from(N) / 4,
        "events did not share transactions: {stats:?}"
    );
    assert_eq!(store.count_usage_events().await.unwrap(), u64::from(N));
    let expected: u64 = (0..N).map(|i| u64::from(11 + i + 7)).sum();
    assert_eq!(
        store.tokens_used_total(&key.record.key_id).await.unwrap(),
        expected
    );
    let record = store.api_key(&key.record.key_id).await.unwrap().unwrap();
    assert_eq!(record.tokens_used, expected);

    // Shutdown flushes what is queued and refuses later events.
    let late: Vec<_> = (N..N + 10)
        .map(|i| {
            let writer = writer.clone();
            let e = full_event(i, key.record.account_id, &key.record.key_id);
            tokio::spawn(async move { writer.record(e).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(5)).await;
    writer.shutdown().await;
    let mut accepted = 0;
    for t in late {
        match t.await.unwrap() {
            Ok(()) => accepted += 1,
            Err(StoreError::WriterClosed) => {}
            Err(e) => panic!("unexpected {e}"),
        }
    }
    assert_eq!(
        store.count_usage_events().await.unwrap(),
        u64::from(N) + accepted
    );
    let after = writer
        .record(full_event(
            N + 100,
            key.record.account_id,
            &key.record.key_id,
        ))
        .await;
    assert!(matches!(after, Err(StoreError::WriterClosed)), "{after:?}");
    writer.shutdown().await; // idempotent
    store.close().await;
}

async fn failed_commit_reaches_every_waiter(url: String) {
    let store = open(&url).await.unwrap();
    let writer = UsageWriter::spawn(store.clone(), 16, Duration::from_millis(20));
    store.close().await; // every statement now fails
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let writer = writer.clone();
            tokio::spawn(async move { writer.record(full_event(i, 1, "ik_x")).await })
        })
        .collect();
    for t in tasks {
        let err = t.await.unwrap().unwrap_err();
        assert!(matches!(err, StoreError::BatchFailed { .. }), "{err:?}");
        assert!(err.to_string().contains("usage events failed"), "{err}");
    }
    assert!(writer.stats().batches_failed >= 1);
    assert_eq!(writer.stats().events_committed, 0);
    writer.shutdown().await;
}

async fn usage_events_round_trip_every_field(url: String) {
    let store = open(&url).await.unwrap();
    let a = store
        .create_api_key("acme", KeyLimits::default())
        .await
        .unwrap()
        .record;
    let b = store
        .create_api_key("globex", KeyLimits::default())
        .await
        .unwrap()
        .record;
    let mut events = vec![
        full_event(1, a.account_id, &a.key_id),
        sparse_event(2, a.account_id, &a.key_id),
        full_event(3, b.account_id, &b.key_id),
    ];
    events[2].completion_hash = events[0].completion_hash.clone(); // same text served twice
    events[2].temperature = Some(1.337);
    events[2].status = u16::MAX;
    events[2].prompt_tokens = u32::MAX;
    store.insert_usage_events(&events).await.unwrap();
    store.insert_usage_events(&[]).await.unwrap();

    let stored = store.usage_events_since(0, 100).await.unwrap();
    assert_eq!(stored.len(), 3);
    assert!(stored.windows(2).all(|w| w[0].id < w[1].id));
    for (got, want) in stored.iter().zip(&events) {
        assert!(got.id > 0);
        assert_eq!(
            got,
            &UsageEvent {
                id: got.id,
                ..want.clone()
            }
        );
    }
    let json = serde_json::to_string(&stored[0]).unwrap();
    let back: UsageEvent = serde_json::from_str(&json).unwrap();
    assert_eq!(back, stored[0]);

    assert_eq!(
        store.usage_events_since(stored[0].id, 1).await.unwrap(),
        vec![stored[1].clone()]
    );
    assert!(store
        .usage_events_since(stored[2].id, 10)
        .await
        .unwrap()
        .is_empty());

    let of_a = store
        .usage_events_for_account(a.account_id, 0)
        .await
        .unwrap();
    assert_eq!(of_a, stored[..2].to_vec());
    let later = store
        .usage_events_for_account(a.account_id, events[1].created_at_ms)
        .await
        .unwrap();
    assert_eq!(later, vec![stored[1].clone()]);

    let hash = events[0].completion_hash.clone().unwrap();
    let served = store.find_completions_by_hash(&hash).await.unwrap();
    assert_eq!(served, vec![stored[0].clone(), stored[2].clone()]);
    assert!(store
        .find_completions_by_hash("nope")
        .await
        .unwrap()
        .is_empty());
    assert_eq!(store.count_usage_events().await.unwrap(), 3);
    assert_eq!(
        store.tokens_used_total(&a.key_id).await.unwrap(),
        12 + 7 + 13 + 7
    );
    assert_eq!(
        store.tokens_used_total(&b.key_id).await.unwrap(),
        u64::from(u32::MAX) + 7
    );
    assert_eq!(store.tokens_used_total("ik_unknown").await.unwrap(), 0);
    store.close().await;
}

async fn duplicate_request_ids_are_stored_once(url: String) {
    let store = open(&url).await.unwrap();
    let k = store
        .create_api_key("acme", KeyLimits::default())
        .await
        .unwrap()
        .record;
    let e = full_event(1, k.account_id, &k.key_id);
    store
        .insert_usage_events(&[e.clone(), e.clone()])
        .await
        .unwrap();
    store
        .insert_usage_events(std::slice::from_ref(&e))
        .await
        .unwrap(); // a retried batch
    assert_eq!(store.count_usage_events().await.unwrap(), 1);
    assert_eq!(store.tokens_used_total(&k.key_id).await.unwrap(), 12 + 7);
    store.close().await;
}

async fn retention_purge_keeps_hashes(url: String) {
    let store = open(&url).await.unwrap();
    let events: Vec<_> = (0..5).map(|i| full_event(i, 1, "ik_x")).collect();
    store.insert_usage_events(&events).await.unwrap();
    let cutoff = events[3].created_at_ms; // events 0..=2 are older
    assert_eq!(store.purge_texts_older_than(cutoff).await.unwrap(), 3);
    assert_eq!(
        store.purge_texts_older_than(cutoff).await.unwrap(),
        0,
        "idempotent"
    );
    let stored = store.usage_events_since(0, 10).await.unwrap();
    for (i, e) in stored.iter().enumerate() {
        let purged = i < 3;
        assert_eq!(e.prompt_text.is_none(), purged, "{i}");
        assert_eq!(e.completion_text.is_none(), purged, "{i}");
        assert_eq!(e.prompt_hash, events[i].prompt_hash);
        assert_eq!(e.completion_hash, events[i].completion_hash);
        assert_eq!(e.user, events[i].user);
    }
    let by_hash = store
        .find_completions_by_hash(events[0].completion_hash.as_deref().unwrap())
        .await
        .unwrap();
    assert_eq!(by_hash.len(), 1, "purged events are still found by hash");
    store.close().await;
}

async fn alerts_round_trip(url: String) {
    let store = open(&url).await.unwrap();
    let mut alerts = vec![
        Alert {
            id: 0,
            created_at_ms: 1_000,
            account_id: Some(7),
            api_key_id: Some("ik_abc".into()),
            level: "high".into(),
            score: 0.93,
            reasons: serde_json::json!({"coverage": 0.8, "features": ["breadth", "n>1"]}),
        },
        Alert {
            id: 0,
            created_at_ms: 2_000,
            account_id: None,
            api_key_id: None,
            level: "cluster".into(),
            score: -1.5e-3,
            reasons: serde_json::json!([1, 2, 3]),
        },
    ];
    for a in &mut alerts {
        a.id = store.insert_alert(a).await.unwrap();
        assert!(a.id > 0);
    }
    assert_eq!(store.list_alerts(0, 10).await.unwrap(), alerts);
    assert_eq!(
        store.list_alerts(1_500, 10).await.unwrap(),
        alerts[1..].to_vec()
    );
    assert_eq!(store.list_alerts(0, 1).await.unwrap(), alerts[..1].to_vec());
    store.close().await;
}

async fn settings_round_trip_and_reserve_the_pepper(url: String) {
    let store = open(&url).await.unwrap();
    assert_eq!(store.get_setting("x").await.unwrap(), None);
    store.set_setting("x", "1").await.unwrap();
    store.set_setting("x", "2").await.unwrap();
    assert_eq!(store.get_setting("x").await.unwrap().as_deref(), Some("2"));
    let err = store.get_setting("isotope.pepper").await.unwrap_err();
    assert!(err.to_string().contains("reserved"), "{err}");
    assert!(store.set_setting("isotope.pepper", "00").await.is_err());
    let expected = if url.starts_with("sqlite") {
        Backend::Sqlite
    } else {
        Backend::Postgres
    };
    assert_eq!(store.backend(), expected);
    store.close().await;
}

// ---- backend-independent checks ------------------------------------------------

#[tokio::test]
async fn unknown_scheme_names_the_accepted_forms() {
    for url in ["mysql://x/y", "isotope.db", "", "http://localhost"] {
        let err = open(url).await.err().expect("must fail");
        let msg = err.to_string();
        assert!(matches!(err, StoreError::UnsupportedUrl { .. }), "{msg}");
        for form in ["sqlite://", "sqlite::memory:", "postgres://"] {
            assert!(msg.contains(form), "{msg}");
        }
    }
}

#[tokio::test]
async fn memory_database_works_and_is_private() {
    let a = open("sqlite::memory:").await.unwrap();
    let b = open("sqlite::memory:").await.unwrap();
    let key = a
        .create_api_key("acme", KeyLimits::default())
        .await
        .unwrap();
    assert!(a.authenticate(&key.token).await.unwrap().is_some());
    assert!(
        b.list_api_keys().await.unwrap().is_empty(),
        "separate databases"
    );
    let writer = UsageWriter::spawn(a.clone(), 8, Duration::ZERO);
    let rec = key.record;
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let (w, r) = (writer.clone(), rec.clone());
            tokio::spawn(async move { w.record(full_event(i, r.account_id, &r.key_id)).await })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    writer.shutdown().await;
    assert_eq!(a.count_usage_events().await.unwrap(), 20);
}

#[tokio::test]
async fn sqlite_errors_say_where() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("plain-file");
    std::fs::write(&file, b"not a directory").unwrap();
    let url = format!("sqlite://{}/sub/isotope.db", file.display());
    let err = open(&url).await.err().unwrap().to_string();
    assert!(
        err.contains("cannot create directory") && err.contains("plain-file"),
        "{err}"
    );

    let not_db = dir.path().join("garbage.db");
    std::fs::write(&not_db, vec![b'x'; 4096]).unwrap();
    let err = open(&format!("sqlite://{}", not_db.display()))
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("garbage.db"), "{err}");
}

#[tokio::test]
async fn unreachable_postgres_is_reported_without_the_password() {
    // Port 1 on localhost: nothing listens there.
    let options = StoreOptions {
        connect_timeout: Some(Duration::from_millis(500)),
        ..Default::default()
    };
    let err = open_with("postgres://isotope:hunter2@127.0.0.1:1/isotope", &options)
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("PostgreSQL at") && err.contains("unreachable"),
        "{err}"
    );
    assert!(!err.contains("hunter2"), "{err}");
    assert!(err.contains("isotope:***@127.0.0.1:1"), "{err}");
}

#[test]
fn options_debug_redacts_the_pepper() {
    let o = StoreOptions {
        pepper: Some([0xab; 32]),
        ..Default::default()
    };
    let s = format!("{o:?}");
    assert!(
        !s.contains("171") && !s.to_lowercase().contains("abab"),
        "{s}"
    );
}

#[allow(dead_code)]
fn assert_object_safe(_: Arc<dyn isotope_store::Store>) {}
