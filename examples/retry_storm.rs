//! Load with concurrent retries: K keys, each sent by C concurrent clients
//! that time out at random (often before the processor finishes) and retry
//! with the same key on timeouts, 409 and 5xx. Then it checks the promise:
//! every key charged once, every client of a key given the same charge.
//!
//! ```text
//! cargo run --release --example retry_storm                 # in-process payment_api, memory store
//! cargo run --release --example retry_storm -- --redis redis://127.0.0.1:6379
//! cargo run --release --example retry_storm -- --url http://127.0.0.1:3000 --keys 500
//! ```
//!
//! Flags:
//!   --url URL                 a running payment API (default: start one in-process)
//!   --redis URL               the in-process API's store (default: memory)
//!   --keys K                  distinct idempotency keys (200)
//!   --concurrency C           clients per key, all at once (4)
//!   --rounds R                tries per client before it gives up (12)
//!   --duration SECS           the whole storm's time limit (60)
//!   --processor-latency-ms N  the in-process API's processor time (40)
//!   --timeout-ms N            each try's client timeout is random in [N/4, N] (100)
//!   --json                    machine-readable summary on stdout
//!
//! Exits 1 when a key was charged twice, its clients got two different
//! answers, or a client got no answer.

#[path = "support/logs.rs"]
mod logs;
#[path = "support/payments.rs"]
mod payments;
#[path = "support/serve.rs"]
mod serve;

use std::{
    collections::{BTreeMap, HashMap},
    hash::{BuildHasher, RandomState},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::{Value, json};
use tower_idempotency::{IdempotencyLayer, store::redis::deadpool_redis};

struct Flags {
    url: Option<String>,
    redis: Option<String>,
    keys: usize,
    concurrency: usize,
    rounds: usize,
    duration: Duration,
    processor_latency: Duration,
    timeout: Duration,
    json: bool,
}

const USAGE: &str = "usage: retry_storm [--url URL | --redis URL] [--keys K] [--concurrency C] [--rounds R] \
                     [--duration SECS] [--processor-latency-ms N] [--timeout-ms N] [--json]";

fn parse_flags() -> Result<Flags, String> {
    let mut flags = Flags {
        url: None,
        redis: None,
        keys: 200,
        concurrency: 4,
        rounds: 12,
        duration: Duration::from_secs(60),
        processor_latency: Duration::from_millis(40),
        timeout: Duration::from_millis(100),
        json: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        if flag == "--json" {
            flags.json = true;
            continue;
        }
        let value = args.next().ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))?;
        let number = |text: &str| text.parse::<u64>().map_err(|e| format!("{flag} {text}: {e}"));
        match flag.as_str() {
            "--url" => flags.url = Some(value.trim_end_matches('/').to_owned()),
            "--redis" => flags.redis = Some(value),
            "--keys" => flags.keys = number(&value)?.max(1) as usize,
            "--concurrency" => flags.concurrency = number(&value)?.max(1) as usize,
            "--rounds" => flags.rounds = number(&value)?.max(1) as usize,
            "--duration" => flags.duration = Duration::from_secs(number(&value)?.max(1)),
            "--processor-latency-ms" => flags.processor_latency = Duration::from_millis(number(&value)?),
            "--timeout-ms" => flags.timeout = Duration::from_millis(number(&value)?.max(4)),
            _ => return Err(format!("unknown flag {flag}\n{USAGE}")),
        }
    }
    Ok(flags)
}

/// What one client ended with.
#[derive(Debug, Clone)]
enum Final {
    Answer { status: u16, id: Option<String> },
    NoAnswer,
}

#[derive(Default)]
struct Tally {
    latencies: Vec<Duration>,
    statuses: BTreeMap<String, u64>,
    finals: HashMap<usize, Vec<Final>>,
}

/// A tiny xorshift generator for client timeouts.
struct Random(u64);

impl Random {
    fn new() -> Self {
        Self(RandomState::new().hash_one(Instant::now()) | 1)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

#[tokio::main]
async fn main() {
    logs::init();
    let flags = match parse_flags() {
        Ok(flags) => flags,
        Err(message) => {
            eprintln!("{message}");
            std::process::exit(2);
        }
    };
    match storm(flags).await {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(error) => {
            eprintln!("retry_storm: {error}");
            std::process::exit(2);
        }
    }
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

async fn storm(flags: Flags) -> Result<bool, Box<dyn std::error::Error>> {
    // The in-process API lives as long as the storm, its ledger in a
    // scratch file removed at the end.
    let mut scratch = None;
    let (url, target) = match &flags.url {
        Some(url) => (url.clone(), format!("{url} (remote)")),
        None => {
            let ledger = std::env::temp_dir().join(format!("retry-storm-{}.sqlite3", std::process::id()));
            let payments = payments::Payments::open(&ledger, flags.processor_latency)?;
            scratch = Some(ledger);
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let addr = listener.local_addr()?;
            let (router, store) = match &flags.redis {
                Some(redis) => {
                    let pool = deadpool_redis::Config::from_url(redis.as_str())
                        .create_pool(Some(deadpool_redis::Runtime::Tokio1))?;
                    (payments::router(IdempotencyLayer::redis(pool), payments), "Redis")
                }
                None => (payments::router(IdempotencyLayer::memory(), payments), "memory store"),
            };
            tokio::spawn(serve::serve(listener, router, serve::Limits::default(), std::future::pending()));
            let latency = flags.processor_latency.as_millis();
            (format!("http://{addr}"), format!("in-process payment_api on {addr}, {store}, processor {latency} ms"))
        }
    };
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let api_key = format!("sk_storm_{:x}", RandomState::new().hash_one(Instant::now()));
    let run = format!("{:x}", RandomState::new().hash_one((Instant::now(), 1u8)));
    let executions_before = executions(&client, &url, &api_key).await;

    let clients = (flags.keys * flags.concurrency) as u64;
    let progress = if flags.json { ProgressBar::hidden() } else { ProgressBar::new(clients) };
    progress.set_draw_target(if flags.json { ProgressDrawTarget::hidden() } else { ProgressDrawTarget::stderr() });
    progress.set_style(
        ProgressStyle::with_template("{spinner} {elapsed_precise} [{bar:40}] {pos}/{len} clients done {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );

    let tally = Arc::new(Mutex::new(Tally::default()));
    let deadline = Instant::now() + flags.duration;
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(clients as usize);
    for key in 0..flags.keys {
        for _ in 0..flags.concurrency {
            let (client, url, api_key, tally, progress) =
                (client.clone(), url.clone(), api_key.clone(), tally.clone(), progress.clone());
            let (rounds, timeout, idempotency_key) = (flags.rounds, flags.timeout, format!("storm-{run}-{key}"));
            tasks.push(tokio::spawn(async move {
                let result =
                    one_client(&client, &url, &api_key, &idempotency_key, key, rounds, timeout, deadline, &tally).await;
                tally.lock().unwrap_or_else(|p| p.into_inner()).finals.entry(key).or_default().push(result);
                progress.inc(1);
            }));
        }
    }
    for task in tasks {
        task.await?;
    }
    let elapsed = started.elapsed();
    progress.finish_and_clear();

    // What the server says happened.
    let executions = match (executions_before, executions(&client, &url, &api_key).await) {
        (Some(before), Some(after)) => Some(after - before),
        _ => None,
    };
    let charges = ledger(&client, &url, &api_key).await?;
    let mut charges_per_key: HashMap<String, u64> = HashMap::new();
    for charge in &charges {
        if let Some(key) = charge["metadata"]["storm_key"].as_str() {
            *charges_per_key.entry(key.to_owned()).or_default() += 1;
        }
    }
    let tally = tally.lock().unwrap_or_else(|p| p.into_inner());
    let double_charged: Vec<String> =
        charges_per_key.iter().filter(|(_, n)| **n > 1).map(|(key, _)| format!("storm-{run}-{key}")).collect();
    let mut split = Vec::new();
    let mut unanswered = 0u64;
    for (key, finals) in &tally.finals {
        let mut answers = std::collections::HashSet::new();
        for result in finals {
            match result {
                Final::Answer { status, id } => {
                    answers.insert((*status, id.clone()));
                }
                Final::NoAnswer => unanswered += 1,
            }
        }
        if answers.len() > 1 {
            split.push(*key);
        }
    }
    let requests = tally.latencies.len() as u64 + tally.statuses.get("timeout").copied().unwrap_or(0);
    let mut latencies = tally.latencies.clone();
    latencies.sort();
    let percentile = |p: f64| -> f64 {
        if latencies.is_empty() {
            return 0.0;
        }
        let index = ((latencies.len() as f64 - 1.0) * p).round() as usize;
        latencies[index].as_secs_f64() * 1000.0
    };
    let ok = double_charged.is_empty() && split.is_empty() && unanswered == 0;
    let summary = json!({
        "target": target,
        "keys": flags.keys,
        "clients_per_key": flags.concurrency,
        "requests": requests,
        "seconds": elapsed.as_secs_f64(),
        "requests_per_second": requests as f64 / elapsed.as_secs_f64(),
        "latency_ms": { "p50": percentile(0.50), "p95": percentile(0.95), "p99": percentile(0.99) },
        "statuses": tally.statuses,
        "handler_executions": executions,
        "distinct_keys": flags.keys,
        "ledger_charges": charges_per_key.values().sum::<u64>(),
        "double_charged_keys": double_charged,
        "keys_with_two_answers": split.iter().map(|key| format!("storm-{run}-{key}")).collect::<Vec<_>>(),
        "clients_without_answer": unanswered,
        "ok": ok,
    });
    if flags.json {
        println!("{summary}");
    } else {
        print_summary(&summary);
    }
    if let Some(ledger) = scratch {
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", ledger.display()));
        }
    }
    Ok(ok)
}

/// One client of one key: tries until it has an answer (200 or 402), for
/// at most `rounds` tries and until `deadline`.
#[allow(clippy::too_many_arguments)]
async fn one_client(
    client: &HttpClient,
    url: &str,
    api_key: &str,
    idempotency_key: &str,
    key: usize,
    rounds: usize,
    timeout: Duration,
    deadline: Instant,
    tally: &Mutex<Tally>,
) -> Final {
    let mut random = Random::new();
    let body = format!("amount={}&currency=usd&source=tok_visa&metadata[storm_key]={key}", 100 + key);
    for round in 0..rounds {
        if Instant::now() >= deadline {
            break;
        }
        let quarter = timeout.as_millis() as u64 / 4;
        let this_timeout = Duration::from_millis(quarter + random.below(timeout.as_millis() as u64 - quarter + 1));
        let request = Request::post(format!("{url}/v1/charges"))
            .header("authorization", format!("Bearer {api_key}"))
            .header("idempotency-key", idempotency_key)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(Full::new(Bytes::from(body.clone())));
        let Ok(request) = request else { return Final::NoAnswer };
        let sent = Instant::now();
        // Dropping the request on timeout is the client hanging up.
        let outcome = tokio::time::timeout(this_timeout, async {
            let response = client.request(request).await?;
            let status = response.status();
            let bytes = response.into_body().collect().await?.to_bytes();
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>((status, bytes))
        })
        .await;
        let status_label = match &outcome {
            Err(_) => "timeout".to_owned(),
            Ok(Err(_)) => "error".to_owned(),
            Ok(Ok((status, _))) => status.as_u16().to_string(),
        };
        {
            let mut tally = tally.lock().unwrap_or_else(|p| p.into_inner());
            *tally.statuses.entry(status_label).or_default() += 1;
            if matches!(outcome, Ok(Ok(_))) {
                tally.latencies.push(sent.elapsed());
            }
        }
        if let Ok(Ok((status, bytes))) = outcome {
            if status == StatusCode::OK || status == StatusCode::PAYMENT_REQUIRED {
                let json: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                let id = json["id"].as_str().map(str::to_owned);
                return Final::Answer { status: status.as_u16(), id };
            }
            if status.is_client_error() && status != StatusCode::CONFLICT && status != StatusCode::TOO_MANY_REQUESTS {
                // A final refusal (400, 422): an answer, though not a charge.
                return Final::Answer { status: status.as_u16(), id: None };
            }
        }
        // Back off exponentially (10 ms, 20 ms, ... at most 320 ms), with
        // jitter, as a well-behaved client does.
        let base = 10u64 << round.min(5);
        let backoff = base + random.below(base);
        tokio::time::sleep(Duration::from_millis(backoff)).await;
    }
    Final::NoAnswer
}

async fn get_json(client: &HttpClient, url: &str, api_key: &str) -> Option<Value> {
    let request =
        Request::get(url).header("authorization", format!("Bearer {api_key}")).body(Full::new(Bytes::new())).ok()?;
    let response = client.request(request).await.ok()?;
    if !response.status().is_success() {
        return None;
    }
    let bytes = response.into_body().collect().await.ok()?.to_bytes();
    serde_json::from_slice(&bytes).ok()
}

async fn executions(client: &HttpClient, url: &str, api_key: &str) -> Option<u64> {
    get_json(client, &format!("{url}/internal/stats"), api_key).await?["executions"].as_u64()
}

async fn ledger(client: &HttpClient, url: &str, api_key: &str) -> Result<Vec<Value>, String> {
    let list = get_json(client, &format!("{url}/v1/charges"), api_key).await.ok_or("GET /v1/charges failed")?;
    Ok(list["data"].as_array().cloned().unwrap_or_default())
}

fn print_summary(summary: &Value) {
    let number = |path: &[&str]| path.iter().fold(summary, |v, p| &v[*p]).as_f64().unwrap_or(0.0);
    println!("retry storm against {}", summary["target"].as_str().unwrap_or("?"));
    println!("  load         {} keys x {} concurrent clients", summary["keys"], summary["clients_per_key"]);
    println!(
        "  requests     {} in {:.2} s ({:.0} req/s)",
        summary["requests"],
        number(&["seconds"]),
        number(&["requests_per_second"])
    );
    println!(
        "  latency      p50 {:.1} ms, p95 {:.1} ms, p99 {:.1} ms (answered tries)",
        number(&["latency_ms", "p50"]),
        number(&["latency_ms", "p95"]),
        number(&["latency_ms", "p99"])
    );
    let statuses: Vec<String> = summary["statuses"]
        .as_object()
        .map(|map| map.iter().map(|(status, n)| format!("{status}: {n}")).collect())
        .unwrap_or_default();
    println!("  statuses     {}", statuses.join(", "));
    let executions = summary["handler_executions"].as_u64().map_or("unknown".to_owned(), |n| n.to_string());
    println!("  executions   {executions} handler runs for {} distinct keys", summary["distinct_keys"]);
    println!("  ledger       {} charges", summary["ledger_charges"]);
    let listed = |name: &str| summary[name].as_array().cloned().unwrap_or_default();
    let (double, split) = (listed("double_charged_keys"), listed("keys_with_two_answers"));
    println!(
        "  violations   {} keys charged twice, {} keys with two answers, {} clients without an answer",
        double.len(),
        split.len(),
        summary["clients_without_answer"]
    );
    for (what, keys) in [("charged twice", &double), ("two answers", &split)] {
        for key in keys.iter().take(10) {
            println!("    {what}: {}", key.as_str().unwrap_or("?"));
        }
    }
    if summary["ok"].as_bool() == Some(true) {
        println!("OK: every key charged once, and all its clients got the same answer");
    } else {
        println!("FAILED: the storm broke the one-outcome-per-key promise");
    }
}
