//! Logs, in a test binary of their own: `tracing` caches whether anyone
//! listens at each call site, and tests running beside this one without a
//! subscriber would race it.

mod common;

use common::*;
use tower_idempotency::{IdempotencyLayer, Outcome, RecordId};

/// A `tracing` writer that keeps everything in memory.
#[derive(Clone, Default)]
struct Logs(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    /// Keeps what this thread logs at `level` and above, until the guard
    /// goes.
    fn capture(level: tracing::Level) -> (Self, tracing::subscriber::DefaultGuard) {
        let logs = Self::default();
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(level)
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        (logs, tracing::subscriber::set_default(subscriber))
    }

    fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }
}

#[tokio::test]
async fn every_outcome_is_logged_and_counted_with_the_key_only_hashed() {
    let (logs, _guard) = Logs::capture(tracing::Level::DEBUG);

    let layer = IdempotencyLayer::memory();
    let (app, _) = counting(&layer);
    let secret = Some("secret-order-key-42");
    send(&app, post(secret, "a")).await; // executed
    send(&app, post(secret, "a")).await; // replayed
    send(&app, post(secret, "b")).await; // mismatch
    send(&app, post(Some(""), "a")).await; // rejected

    let metrics = layer.metrics();
    let counts: Vec<u64> =
        [Outcome::Executed, Outcome::Replayed, Outcome::Mismatch, Outcome::Rejected].map(|o| metrics.get(o)).to_vec();
    assert_eq!(counts, [1, 1, 1, 1]);
    let logs = logs.text();
    for outcome in ["executed", "replayed", "mismatch", "rejected"] {
        assert!(logs.contains(&format!("outcome=\"{outcome}\"")), "no {outcome} event in:\n{logs}");
    }
    let id = RecordId::new("", &test_scope(), &"secret-order-key-42".parse().unwrap());
    assert!(logs.contains(&id.to_string()), "events name the hashed key");
    assert!(!logs.contains("secret-order-key-42"), "the key leaked into the logs:\n{logs}");
    // One line per request, at its end, with its status and duration, and
    // the key once (in the request's span).
    let lines: Vec<&str> = logs.lines().filter(|line| line.contains("idempotency request")).collect();
    assert_eq!(lines.len(), 4, "{logs}");
    for line in &lines {
        assert!(line.contains("status=") && line.contains("elapsed_ms="), "{line}");
        assert!(line.matches(&id.to_string()).count() <= 1, "the key twice: {line}");
    }
    assert!(lines[0].contains("outcome=\"executed\"") && lines[0].contains("status=201"), "{}", lines[0]);
}

#[cfg(feature = "redis")]
#[tokio::test]
async fn a_redis_that_may_evict_records_is_warned_about_on_connecting() {
    use common::redis::RedisServer;

    let (logs, _guard) = Logs::capture(tracing::Level::WARN);

    let keeps = RedisServer::start_with(&["--maxmemory-policy", "noeviction"]);
    let (app, _) = counting(&IdempotencyLayer::redis(keeps.pool()));
    assert_eq!(send(&app, post(Some("k"), "")).await.status, 201);
    let quiet = logs.text();
    assert!(!quiet.contains("maxmemory-policy"), "noeviction is what the store wants:\n{quiet}");

    let evicts = RedisServer::start_with(&["--maxmemory-policy", "volatile-lru"]);
    let (app, _) = counting(&IdempotencyLayer::redis(evicts.pool()));
    assert_eq!(send(&app, post(Some("k"), "")).await.status, 201);
    let logs = logs.text();
    assert!(logs.contains("WARN") && logs.contains("maxmemory-policy") && logs.contains("volatile-lru"), "{logs}");
}

/// A healthy storm: `keys` keys, each sent by `duplicates` at once that
/// wait for the first; every tenth key's handler fails (500, not stored),
/// so its claim is given back and a waiting duplicate takes the key over.
/// Nothing in it calls for an operator: it must log no warning.
async fn healthy_storm_logs_no_warning<St: tower_idempotency::Store + Clone>(
    layer: IdempotencyLayer<St>,
    keys: usize,
    duplicates: usize,
) {
    let (logs, _guard) = Logs::capture(tracing::Level::WARN);
    // A loaded machine must not turn a store call into a timeout: this is
    // about warnings in a healthy storm, not about speed.
    let layer = layer
        .with_in_flight(tower_idempotency::InFlightPolicy::Wait(std::time::Duration::from_secs(20)))
        .with_store_timeout(std::time::Duration::from_secs(10))
        .unwrap();
    let (app, calls) = counted(&layer, |_, request: HandlerRequest| async move {
        let failing = request.headers()["idempotency-key"].to_str().unwrap().ends_with('0');
        tokio::task::yield_now().await;
        if failing { respond(500, "try again") } else { respond(201, "charged") }
    });
    let names: Vec<&'static str> = (0..keys).map(|n| &*Box::leak(format!("storm-{n}").into_boxed_str())).collect();
    let requests = names.iter().flat_map(|&key| (0..duplicates).map(move |_| key)).map(|key| {
        let app = app.clone();
        async move { send(&app, post(Some(key), "a")).await.status }
    });
    let statuses = futures_util::future::join_all(requests).await;
    assert!(statuses.iter().all(|&status| status == 201 || status == 500), "{statuses:?}");
    // One run per key that succeeds; the failing keys run once per duplicate.
    let failing = keys.div_ceil(10);
    assert_eq!(calls.get(), keys - failing + failing * duplicates);
    let logs = logs.text();
    assert!(!logs.contains("WARN"), "a healthy storm logged warnings:\n{logs}");
}

#[tokio::test]
async fn a_healthy_storm_on_the_memory_store_logs_no_warning() {
    healthy_storm_logs_no_warning(IdempotencyLayer::memory(), 30, 4).await;
}

#[cfg(feature = "redis")]
#[tokio::test]
async fn a_healthy_storm_on_redis_logs_no_warning() {
    let server = common::redis::RedisServer::start();
    healthy_storm_logs_no_warning(IdempotencyLayer::redis(server.pool()), 30, 4).await;
}

#[cfg(feature = "postgres")]
#[tokio::test]
async fn a_healthy_storm_on_postgresql_logs_no_warning() {
    let database = common::postgres::TestDatabase::create().await;
    // Each request in flight or waiting holds a connection: a pool for all.
    let pool = tower_idempotency::store::postgres::sqlx::postgres::PgPoolOptions::new()
        .max_connections(24)
        .connect(&database.url())
        .await
        .unwrap();
    let plain = tower_idempotency::store::postgres::PostgresStore::new(pool.clone());
    plain.migrate().await.unwrap();
    healthy_storm_logs_no_warning(IdempotencyLayer::postgres(pool.clone()), 10, 2).await;
    healthy_storm_logs_no_warning(IdempotencyLayer::new(plain).with_namespace("plain"), 10, 2).await;
    pool.close().await;
}

/// A memory store whose first completion lands but answers as if it timed
/// out (a reply lost on the way), so that the layer retries it.
#[derive(Clone, Default)]
struct LosesFirstReply {
    inner: tower_idempotency::store::MemoryStore,
    lost: std::sync::Arc<std::sync::atomic::AtomicBool>,
    lookups: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl tower_idempotency::Store for LosesFirstReply {
    async fn claim(
        &self,
        request: tower_idempotency::store::ClaimRequest,
    ) -> Result<tower_idempotency::store::Claim, tower_idempotency::store::StoreError> {
        self.inner.claim(request).await
    }

    async fn complete(
        &self,
        id: &RecordId,
        owner: tower_idempotency::store::OwnerToken,
        record: tower_idempotency::Record,
        retention: std::time::Duration,
    ) -> Result<(), tower_idempotency::store::StoreError> {
        let completed = self.inner.complete(id, owner, record, retention).await;
        if completed.is_ok() && !self.lost.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return Err(tower_idempotency::store::StoreError::Timeout(std::time::Duration::from_secs(1)));
        }
        completed
    }

    async fn release(
        &self,
        id: &RecordId,
        owner: tower_idempotency::store::OwnerToken,
    ) -> Result<(), tower_idempotency::store::StoreError> {
        self.inner.release(id, owner).await
    }

    async fn renew(
        &self,
        id: &RecordId,
        owner: tower_idempotency::store::OwnerToken,
        lease: std::time::Duration,
    ) -> Result<(), tower_idempotency::store::StoreError> {
        self.inner.renew(id, owner, lease).await
    }

    async fn lookup(
        &self,
        id: &RecordId,
    ) -> Result<Option<tower_idempotency::store::RecordState>, tower_idempotency::store::StoreError> {
        self.lookups.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.inner.lookup(id).await
    }
}

/// A completion whose first attempt landed but whose answer was lost is
/// retried; the retry finds the record its claim wrote, which is no stale
/// owner: nothing to warn about (it used to warn "lease ran out before
/// complete", for a record that was kept).
#[tokio::test]
async fn a_retried_completion_that_had_landed_is_no_stale_owner() {
    let (logs, _guard) = Logs::capture(tracing::Level::WARN);
    let store = LosesFirstReply::default();
    let layer = IdempotencyLayer::new(store.clone());
    let (app, calls) = counting(&layer);
    assert_eq!(send(&app, post(Some("k"), "a")).await.status, 201);
    let metrics = layer.metrics();
    // The retry runs after the answer, 100 ms later: bounded by 5 s.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    while store.lookups.load(std::sync::atomic::Ordering::SeqCst) == 0 && metrics.get(Outcome::StaleOwner) == 0 {
        assert!(tokio::time::Instant::now() < deadline, "the completion was not retried");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    tokio::task::yield_now().await;
    assert_eq!(metrics.get(Outcome::StaleOwner), 0);
    assert!(!logs.text().contains("lease ran out"), "{}", logs.text());
    assert!(send(&app, post(Some("k"), "a")).await.replayed());
    assert_eq!(calls.get(), 1);
}
