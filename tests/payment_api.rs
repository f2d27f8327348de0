//! The payment API example over real HTTP, on the memory store and on Redis:
//! one charge per key, the declined card, the crash switch.
#![cfg(feature = "redis")]

mod common;
#[path = "../examples/support/payments.rs"]
mod payments;
#[path = "../examples/support/serve.rs"]
mod serve;

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use payments::Payments;
use serde_json::Value;
use tower_idempotency::{IdempotencyLayer, InFlightPolicy, Store};

/// A payment API on a free loopback port, with its own ledger file.
struct Api {
    addr: SocketAddr,
    payments: Arc<Payments>,
    ledger: PathBuf,
    client: Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
}

impl Drop for Api {
    fn drop(&mut self) {
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", self.ledger.display()));
        }
    }
}

struct Reply {
    status: StatusCode,
    replayed: bool,
    json: Value,
}

impl Api {
    async fn start<St: Store + Clone>(layer: IdempotencyLayer<St>, latency: Duration) -> Self {
        Self::start_with(layer, latency, serve::Limits::default()).await
    }

    /// An API served as the example serves it, within `limits`.
    async fn start_with<St: Store + Clone>(
        layer: IdempotencyLayer<St>,
        latency: Duration,
        limits: serve::Limits,
    ) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let ledger = std::env::temp_dir().join(format!(
            "tower-idempotency-ledger-{}-{}.sqlite3",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let payments = Payments::open(&ledger, latency).unwrap();
        let router = payments::router(layer, payments.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve::serve(listener, router, limits, std::future::pending()));
        let client = Client::builder(TokioExecutor::new()).build_http();
        Self { addr, payments, ledger, client }
    }

    async fn request(&self, method: &str, path: &str, api_key: Option<&str>, key: Option<&str>, form: &str) -> Reply {
        let mut request = Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", self.addr))
            .header("content-type", "application/x-www-form-urlencoded");
        if let Some(api_key) = api_key {
            // A whole header value when it names its scheme.
            let value = if api_key.contains(' ') { api_key.to_owned() } else { format!("Bearer {api_key}") };
            request = request.header("authorization", value);
        }
        if let Some(key) = key {
            request = request.header("idempotency-key", key);
        }
        let request = request.body(Full::new(Bytes::from(form.to_owned()))).unwrap();
        let response = self.client.request(request).await.unwrap();
        let status = response.status();
        let replayed = response.headers().get("idempotent-replayed").is_some_and(|v| v == "true");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let json = serde_json::from_slice(&body).unwrap_or(Value::Null);
        Reply { status, replayed, json }
    }

    async fn charge(&self, api_key: &str, key: &str, form: &str) -> Reply {
        self.request("POST", "/v1/charges", Some(api_key), Some(key), form).await
    }

    async fn charges(&self, api_key: &str) -> Vec<Value> {
        let reply = self.request("GET", "/v1/charges", Some(api_key), None, "").await;
        assert_eq!(reply.json["object"], "list");
        reply.json["data"].as_array().unwrap().clone()
    }
}

const VISA: &str = "amount=500&currency=usd&source=tok_visa&description=Order+7&metadata[order_id]=7";

async fn one_charge_per_key<St: Store + Clone>(layer: IdempotencyLayer<St>) {
    let api = Api::start(layer, Duration::ZERO).await;
    let first = api.charge("sk_a", "order-7", VISA).await;
    assert_eq!(first.status, 200);
    assert_eq!(first.json["object"], "charge");
    assert!(first.json["id"].as_str().unwrap().starts_with("ch_"));
    assert_eq!((first.json["amount"].as_i64(), first.json["paid"].as_bool()), (Some(500), Some(true)));
    assert_eq!(first.json["metadata"]["order_id"], "7");
    let retry = api.charge("sk_a", "order-7", VISA).await;
    assert!(retry.replayed);
    assert_eq!(retry.json, first.json);
    let fetched = api
        .request("GET", &format!("/v1/charges/{}", first.json["id"].as_str().unwrap()), Some("sk_a"), None, "")
        .await;
    assert_eq!(fetched.json, first.json);
    assert_eq!(api.charges("sk_a").await.len(), 1);
    assert_eq!(api.payments.executions(), 1);

    let reused = api.charge("sk_a", "order-7", "amount=999&currency=usd&source=tok_visa").await;
    assert_eq!(reused.status, 422);
    let state = api.request("GET", "/v1/idempotency/order-7", Some("sk_a"), None, "").await;
    assert_eq!((state.json["state"].as_str(), state.json["status"].as_u64()), (Some("completed"), Some(200)));
}

async fn api_keys_are_scopes<St: Store + Clone>(layer: IdempotencyLayer<St>) {
    let api = Api::start(layer, Duration::ZERO).await;
    let a = api.charge("sk_a", "same-key", VISA).await;
    let b = api.charge("sk_b", "same-key", VISA).await;
    assert!(!b.replayed);
    assert_ne!(a.json["id"], b.json["id"]);
    assert_eq!((api.charges("sk_a").await.len(), api.charges("sk_b").await.len()), (1, 1));
    let unknown = api.request("GET", "/v1/idempotency/same-key", Some("sk_c"), None, "").await;
    assert_eq!(unknown.status, 404);
    assert_eq!(api.request("POST", "/v1/charges", None, Some("k"), VISA).await.status, 401);
    assert_eq!(api.request("POST", "/v1/charges", Some("sk_a"), None, VISA).await.status, 400);
}

async fn declined_card_is_replayed<St: Store + Clone>(layer: IdempotencyLayer<St>) {
    let api = Api::start(layer, Duration::ZERO).await;
    let declined = "amount=500&currency=usd&source=tok_chargeDeclined";
    let first = api.charge("sk_a", "decline-1", declined).await;
    assert_eq!(first.status, 402);
    assert_eq!(
        (first.json["error"]["type"].as_str(), first.json["error"]["code"].as_str()),
        (Some("card_error"), Some("card_declined"))
    );
    let retry = api.charge("sk_a", "decline-1", declined).await;
    assert_eq!((retry.status, retry.replayed, &retry.json), (StatusCode::PAYMENT_REQUIRED, true, &first.json));
    assert!(api.charges("sk_a").await.is_empty());
    assert_eq!(api.payments.executions(), 1);
}

async fn crash_after_charge_retry_gets_the_same_charge<St: Store + Clone>(layer: IdempotencyLayer<St>) {
    let api = Api::start(layer, Duration::ZERO).await;
    let form = "amount=900&currency=usd&source=tok_visa&metadata[simulate]=crash_after_charge";
    let crashed = api.charge("sk_a", "crash-1", form).await;
    assert_eq!(crashed.status, 500);
    let charges = api.charges("sk_a").await;
    assert_eq!(charges.len(), 1, "the charge was committed before the crash");
    let retry = api.charge("sk_a", "crash-1", form).await;
    assert_eq!(retry.status, 200);
    assert_eq!(retry.json, charges[0], "the retry answers with the committed charge");
    assert!(api.charge("sk_a", "crash-1", form).await.replayed);
    assert_eq!(api.charges("sk_a").await.len(), 1, "one order, one charge");
}

async fn the_ledger_answers_a_changed_payload_with_422_and_keeps_the_charge_for_its_owner<St: Store + Clone>(
    layer: IdempotencyLayer<St>,
) {
    let api = Api::start(layer, Duration::ZERO).await;
    let crashed =
        api.charge("sk_a", "o1", "amount=500&currency=usd&source=tok_visa&metadata[simulate]=crash_after_charge").await;
    assert_eq!(crashed.status, 500);
    let charged = api.charges("sk_a").await;
    // The key was released by the crash; the ledger holds the charge.
    let other = api.charge("sk_a", "o1", "amount=9999&currency=eur&source=tok_visa").await;
    assert_eq!(other.status, 422, "another payload under a charged key: {}", other.json);
    assert_eq!(other.json["error"]["type"], "idempotency_error");
    let retry =
        api.charge("sk_a", "o1", "amount=500&currency=usd&source=tok_visa&metadata[simulate]=crash_after_charge").await;
    assert_eq!(retry.status, 200, "the 422 was not stored: the owner's retry gets its charge");
    assert_eq!(retry.json, charged[0]);
    assert_eq!(api.charges("sk_a").await.len(), 1);
}

async fn auth_schemes_are_case_insensitive<St: Store + Clone>(layer: IdempotencyLayer<St>) {
    let api = Api::start(layer, Duration::ZERO).await;
    let first = api.charge("bearer sk_a", "scheme-1", VISA).await;
    assert_eq!(first.status, 200, "{}", first.json);
    assert!(api.charge("BEARER sk_a", "scheme-1", VISA).await.replayed, "the same API key");
    // `sk_a:` in basic auth.
    assert!(api.charge("basic c2tfYTo=", "scheme-1", VISA).await.replayed);
}

async fn concurrent_duplicates_wait_for_one_charge<St: Store + Clone>(layer: IdempotencyLayer<St>) {
    let layer = layer.with_in_flight(InFlightPolicy::Wait(Duration::from_secs(10)));
    let api = Arc::new(Api::start(layer, Duration::from_millis(200)).await);
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let api = api.clone();
            tokio::spawn(async move { api.charge("sk_a", "storm-1", VISA).await })
        })
        .collect();
    let mut ids = std::collections::HashSet::new();
    for task in tasks {
        let reply = task.await.unwrap();
        assert_eq!(reply.status, 200);
        ids.insert(reply.json["id"].as_str().unwrap().to_owned());
    }
    assert_eq!(ids.len(), 1);
    assert_eq!((api.payments.executions(), api.charges("sk_a").await.len()), (1, 1));
}

macro_rules! on_each_store {
    ($($test:ident),*) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test(tower_idempotency::IdempotencyLayer::memory()).await;
                }
            )*
        }
        mod redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    let server = crate::common::redis::shared_server();
                    // A namespace per test: they share one server.
                    let layer = tower_idempotency::IdempotencyLayer::redis(server.pool()).with_namespace(stringify!($test));
                    super::$test(layer).await;
                }
            )*
        }
    };
}

on_each_store!(
    one_charge_per_key,
    api_keys_are_scopes,
    declined_card_is_replayed,
    crash_after_charge_retry_gets_the_same_charge,
    the_ledger_answers_a_changed_payload_with_422_and_keeps_the_charge_for_its_owner,
    auth_schemes_are_case_insensitive,
    concurrent_duplicates_wait_for_one_charge
);

/// Keyed requests that no handler runs (an unknown path, a method the
/// route does not take) are answered by the router's fallback, outside the
/// layer: they leave no record that could crowd out a real one.
#[tokio::test]
async fn keyed_requests_no_handler_runs_record_nothing() {
    let store = tower_idempotency::store::MemoryStore::new();
    let api = Api::start(IdempotencyLayer::new(store.clone()), Duration::ZERO).await;
    for n in 0..20 {
        let key = format!("stray-{n}");
        assert_eq!(api.request("POST", "/v1/nothing-here", Some("sk_a"), Some(&key), VISA).await.status, 404);
        assert_eq!(api.request("PATCH", "/v1/charges", Some("sk_a"), Some(&key), VISA).await.status, 405);
        assert_eq!(api.request("POST", "/v1/charges/ch_1", Some("sk_a"), Some(&key), VISA).await.status, 405);
    }
    assert_eq!(store.len(), 0, "a request no handler ran left a record");
    assert_eq!(api.charge("sk_a", "real", VISA).await.status, 200);
    assert_eq!(store.len(), 1);
}

#[tokio::test]
async fn clients_that_send_their_headers_slowly_are_cut_off_and_others_served() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let limits = serve::Limits { header_read_timeout: Duration::from_millis(300), max_connections: 2 };
    let api = Api::start_with(IdempotencyLayer::memory(), Duration::ZERO, limits).await;
    // Two clients take every connection the server serves, and send their
    // headers a few bytes at a time, never finishing.
    let mut slow = Vec::new();
    for _ in 0..2 {
        let mut stream = tokio::net::TcpStream::connect(api.addr).await.unwrap();
        stream.write_all(b"POST /v1/charges HTTP/1.1\r\nHost: x\r\n").await.unwrap();
        slow.push(stream);
    }
    for stream in &mut slow {
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest)).await;
        assert!(closed.is_ok(), "a client slow with its headers still holds a connection after 5 s");
    }
    let reply = api.charge("sk_a", "after-slow-clients", VISA).await;
    assert_eq!(reply.status, 200);
}
