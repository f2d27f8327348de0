//! End-to-end HTTP benchmark: one axum handler served bare, behind the layer
//! on the memory store, and behind the layer on Redis (a `redis-server` this
//! benchmark starts on a free loopback port). Each is driven by the same
//! number of keep-alive connections for the same time, with fresh keys
//! (first executions) and with 1,000 hot keys (replays). One table: requests
//! per second, p50/p99, the ratio to bare, CPU per request (this process,
//! and Redis), and Redis calls per request.
//!
//! `cargo bench --bench e2e` (10 s a scenario), `-- --quick` (1 s, for CI).
//! It fails only on correctness: a key that ran twice, or an unexpected
//! status. Client and server share this process and its two cores, so read
//! the ratios, which compare like with like, rather than absolute rates.

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
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tower_idempotency::{IdempotencyLayer, Store};

const CONNECTIONS: usize = 16;
const HOT_KEYS: u64 = 1_000;

#[derive(Clone, Copy, PartialEq)]
enum Keys {
    Fresh,
    Hot,
}

struct Row {
    name: String,
    requests: u64,
    seconds: f64,
    p50: Duration,
    p99: Duration,
    cpu_per_request: Duration,
    redis_cpu_per_request: Option<Duration>,
    redis_calls_per_request: Option<f64>,
}

/// The handler every server runs: counts its executions.
fn router(executions: Arc<AtomicU64>) -> Router {
    Router::new().route(
        "/v1/charges",
        post(move || {
            let executions = executions.clone();
            async move {
                let n = executions.fetch_add(1, Ordering::Relaxed);
                ([("content-type", "application/json")], format!(r#"{{"id":"ch_{n:016x}","amount":500}}"#))
            }
        }),
    )
}

async fn serve(router: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await });
    addr
}

/// CPU time this process used so far (user + system).
fn process_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let ticks: u64 = fields.get(11..13).map_or(0, |f| f.iter().filter_map(|v| v.parse::<u64>().ok()).sum());
    Duration::from_micros(ticks * 10_000)
}

struct Redis {
    port: u16,
    process: Child,
}

impl Redis {
    fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let process = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server");
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Self { port, process }
    }

    fn info(&self, section: &str) -> String {
        let output = Command::new("redis-cli").args(["-p", &self.port.to_string(), "INFO", section]).output().unwrap();
        String::from_utf8_lossy(&output.stdout).into_owned()
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

    /// Round trips the store made: its script calls (commandstats also
    /// counts the commands scripts run inside, which are not round trips).
    fn calls(&self) -> u64 {
        self.info("commandstats")
            .lines()
            .filter(|l| l.starts_with("cmdstat_evalsha:") || l.starts_with("cmdstat_eval:"))
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

/// Drives `addr` from `CONNECTIONS` keep-alive connections for `length`.
async fn drive(addr: SocketAddr, keys: Keys, length: Duration, run: u64) -> (u64, Vec<Duration>, bool) {
    let next = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + length;
    let tasks: Vec<_> = (0..CONNECTIONS)
        .map(|_| {
            let next = next.clone();
            tokio::spawn(async move {
                let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
                let (mut sender, connection) =
                    hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
                tokio::spawn(connection);
                let (mut latencies, mut ok) = (Vec::new(), true);
                while Instant::now() < deadline {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    let key = match keys {
                        Keys::Fresh => format!("fresh-{run}-{n}"),
                        Keys::Hot => format!("hot-{run}-{}", n % HOT_KEYS),
                    };
                    let request = http::Request::post("/v1/charges")
                        .header("host", "localhost")
                        .header("idempotency-key", key)
                        .header("content-type", "application/x-www-form-urlencoded")
                        .body(Full::new(Bytes::from_static(b"amount=500&currency=usd&source=tok_visa")))
                        .unwrap();
                    let sent = Instant::now();
                    let response = sender.send_request(request).await.unwrap();
                    ok &= response.status() == 200;
                    response.into_body().collect().await.unwrap();
                    latencies.push(sent.elapsed());
                }
                (latencies, ok)
            })
        })
        .collect();
    let (mut all, mut ok) = (Vec::new(), true);
    for task in tasks {
        let (latencies, fine) = task.await.unwrap();
        all.extend(latencies);
        ok &= fine;
    }
    (all.len() as u64, all, ok)
}

async fn scenario<St: Store + Clone>(
    name: &str,
    layer: Option<IdempotencyLayer<St>>,
    keys: Keys,
    length: Duration,
    redis: Option<&Redis>,
    run: u64,
) -> (Row, bool) {
    let executions = Arc::new(AtomicU64::new(0));
    let router = router(executions.clone());
    let router = match layer {
        Some(layer) => router.layer(layer),
        None => router,
    };
    let addr = serve(router).await;
    // Warm up the connections and the scripts; for hot keys, this first
    // run executes them all, so that what is measured are replays.
    let warm_up = if keys == Keys::Hot { run } else { run + 1 };
    drive(addr, keys, Duration::from_millis(300), warm_up).await;
    executions.store(0, Ordering::Relaxed);
    let (cpu, redis_cpu, redis_calls) = (process_cpu(), redis.map(Redis::cpu), redis.map(Redis::calls));
    let started = Instant::now();
    let (requests, mut latencies, statuses_ok) = drive(addr, keys, length, run).await;
    let seconds = started.elapsed().as_secs_f64();
    let per = |d: Duration| d / requests.max(1) as u32;
    latencies.sort();
    let at = |q: f64| latencies.get(((latencies.len() as f64 - 1.0) * q) as usize).copied().unwrap_or_default();
    let executed = executions.load(Ordering::Relaxed);
    // Fresh keys: every request one execution; hot keys: each key ran in
    // the warm-up, so measured requests are replays; bare: all execute.
    let correct = statuses_ok
        && match (name.starts_with("bare"), keys) {
            (true, _) | (false, Keys::Fresh) => executed == requests,
            (false, Keys::Hot) => executed == 0,
        };
    let row = Row {
        name: name.to_owned(),
        requests,
        seconds,
        p50: at(0.50),
        p99: at(0.99),
        cpu_per_request: per(process_cpu().saturating_sub(cpu)),
        redis_cpu_per_request: redis.zip(redis_cpu).map(|(r, before)| per(r.cpu().saturating_sub(before))),
        redis_calls_per_request: redis
            .zip(redis_calls)
            .map(|(r, before)| (r.calls() - before) as f64 / requests as f64),
    };
    (row, correct)
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let length = if quick { Duration::from_secs(1) } else { Duration::from_secs(10) };
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let redis = Redis::start();
    let url = format!("redis://127.0.0.1:{}", redis.port);
    let run = process_cpu().as_nanos() as u64 ^ std::process::id() as u64;
    let (rows, ok) = runtime.block_on(async {
        let pool = || {
            tower_idempotency::store::redis::deadpool_redis::Config::from_url(url.as_str())
                .create_pool(Some(tower_idempotency::store::redis::deadpool_redis::Runtime::Tokio1))
                .unwrap()
        };
        let memory = || IdempotencyLayer::new(tower_idempotency::store::MemoryStore::with_limits(10_000_000, 8 << 30));
        let mut results = Vec::new();
        let none: Option<IdempotencyLayer> = None;
        results.push(scenario("bare", none, Keys::Fresh, length, None, run).await);
        results.push(scenario("memory, first executions", Some(memory()), Keys::Fresh, length, None, run).await);
        results.push(scenario("memory, replays", Some(memory()), Keys::Hot, length, None, run).await);
        let redis_layer = IdempotencyLayer::redis(pool());
        results
            .push(scenario("redis, first executions", Some(redis_layer), Keys::Fresh, length, Some(&redis), run).await);
        let redis_layer = IdempotencyLayer::redis(pool());
        results.push(scenario("redis, replays", Some(redis_layer), Keys::Hot, length, Some(&redis), run).await);
        let ok = results.iter().all(|(_, ok)| *ok);
        (results.into_iter().map(|(row, _)| row).collect::<Vec<_>>(), ok)
    });
    let bare = rows[0].requests as f64 / rows[0].seconds;
    println!(
        "{:<26} {:>9} {:>9} {:>9} {:>7} {:>10} {:>10} {:>9}",
        "scenario", "req/s", "p50", "p99", "x bare", "cpu/req", "redis/req", "trips/req"
    );
    for row in &rows {
        let rate = row.requests as f64 / row.seconds;
        println!(
            "{:<26} {:>9.0} {:>9.2?} {:>9.2?} {:>7.2} {:>10.2?} {:>10} {:>9}",
            row.name,
            rate,
            row.p50,
            row.p99,
            rate / bare,
            row.cpu_per_request,
            row.redis_cpu_per_request.map_or("-".to_owned(), |d| format!("{d:.2?}")),
            row.redis_calls_per_request.map_or("-".to_owned(), |c| format!("{c:.2}")),
        );
    }
    println!("({CONNECTIONS} connections, {:?} a scenario, client and server in one process)", length);
    drop(redis);
    if !ok {
        eprintln!("FAILED: a key ran twice, a replay ran, or a status was not 200");
        std::process::exit(1);
    }
}
