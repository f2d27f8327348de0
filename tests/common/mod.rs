//! Helpers shared by the integration tests.
#![allow(dead_code, unreachable_pub)]

pub mod conformance;
#[cfg(feature = "postgres")]
pub mod pgbouncer;
#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "redis")]
pub mod redis;

use std::{
    convert::Infallible,
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use tokio::sync::Semaphore;
use tower::{Layer, ServiceExt, util::BoxCloneSyncService};
use tower_idempotency::{IdempotencyLayer, RequestBody, ResponseBody, Scope, Store};

/// The body test handlers answer with.
pub type TestBody = BoxBody<Bytes, std::io::Error>;
/// A request as the handler sees it.
pub type HandlerRequest = Request<RequestBody<Full<Bytes>>>;
/// A layered test service.
pub type App = BoxCloneSyncService<Request<Full<Bytes>>, Response<ResponseBody<TestBody>>, Infallible>;

pub fn full(data: impl Into<Bytes>) -> TestBody {
    Full::new(data.into()).map_err(|never| match never {}).boxed()
}

pub fn respond(status: u16, body: impl Into<Bytes>) -> Response<TestBody> {
    let mut response = Response::new(full(body));
    *response.status_mut() = StatusCode::from_u16(status).unwrap();
    response.headers_mut().insert("content-type", "application/json".parse().unwrap());
    response
}

/// Wraps `handler` in `layer`.
pub fn app<St, F, Fut>(layer: &IdempotencyLayer<St>, handler: F) -> App
where
    St: Store + Clone,
    F: Fn(HandlerRequest) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<TestBody>> + Send + 'static,
{
    let inner = tower::service_fn(move |request: HandlerRequest| {
        let handler = handler.clone();
        async move { Ok::<_, Infallible>(handler(request).await) }
    });
    BoxCloneSyncService::new(layer.layer(inner))
}

/// Wraps `handler` in `layer`, counting its calls; the handler gets the
/// call's number, from 1, and the request.
pub fn counted<St, F, Fut>(layer: &IdempotencyLayer<St>, handler: F) -> (App, Calls)
where
    St: Store + Clone,
    F: Fn(usize, HandlerRequest) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<TestBody>> + Send + 'static,
{
    let calls = Calls::default();
    let counter = calls.clone();
    (app(layer, move |request: HandlerRequest| handler(counter.bump(), request)), calls)
}

/// A handler that counts its calls and answers 201 with a body naming the
/// call number and echoing the request body.
pub fn counting<St: Store + Clone>(layer: &IdempotencyLayer<St>) -> (App, Calls) {
    let calls = Calls::default();
    let counter = calls.clone();
    let app = app(layer, move |request: HandlerRequest| {
        let n = counter.bump();
        async move {
            let body = request.into_body().collect().await.unwrap().to_bytes();
            respond(201, format!("{{\"call\":{n},\"echo\":{:?}}}", String::from_utf8_lossy(&body)))
        }
    });
    (app, calls)
}

#[derive(Clone, Default)]
pub struct Calls(Arc<AtomicUsize>);

impl Calls {
    /// Counts a call; returns its number, from 1.
    pub fn bump(&self) -> usize {
        self.0.fetch_add(1, Ordering::SeqCst) + 1
    }

    pub fn get(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

/// Lets a test hold a handler inside its call and see when it got there.
#[derive(Clone)]
pub struct Gate {
    entered: Arc<Semaphore>,
    release: Arc<Semaphore>,
}

impl Default for Gate {
    fn default() -> Self {
        Self { entered: Arc::new(Semaphore::new(0)), release: Arc::new(Semaphore::new(0)) }
    }
}

impl Gate {
    /// Called by the handler: signals entry, then waits to be let through.
    pub async fn pass(&self) {
        self.entered.add_permits(1);
        self.release.acquire().await.unwrap().forget();
    }

    /// Waits until `n` handlers have entered.
    pub async fn entered(&self, n: u32) {
        self.entered.acquire_many(n).await.unwrap().forget();
    }

    /// Lets `n` waiting (or future) handlers through.
    pub fn open(&self, n: usize) {
        self.release.add_permits(n);
    }
}

/// The credentials every test request carries: the layer's default scope
/// refuses a request without any.
pub const AUTH: &str = "Bearer sk_test";

/// The scope of requests carrying [`AUTH`].
pub fn test_scope() -> Scope {
    Scope::hashed(AUTH.as_bytes())
}

pub fn post(key: Option<&str>, body: &'static str) -> Request<Full<Bytes>> {
    let mut builder = Request::post("/v1/charges")
        .header("content-type", "application/x-www-form-urlencoded")
        .header("authorization", AUTH);
    if let Some(key) = key {
        builder = builder.header("idempotency-key", key);
    }
    builder.body(Full::new(Bytes::from_static(body.as_bytes()))).unwrap()
}

#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub trailers: Option<HeaderMap>,
}

impl Answer {
    pub fn replayed(&self) -> bool {
        self.headers.get("idempotent-replayed").is_some_and(|v| v == "true")
    }

    /// The problem `type` of a problem+json answer.
    pub fn problem(&self) -> String {
        assert_eq!(self.headers["content-type"], "application/problem+json", "not a problem: {}", self.status);
        let json: serde_json::Value = serde_json::from_slice(&self.body).unwrap();
        assert_eq!(json["status"], self.status.as_u16());
        json["type"].as_str().unwrap().trim_start_matches("urn:tower-idempotency:problem:").to_owned()
    }

    /// Headers without the replay marker, to compare a replay with the original.
    pub fn headers_but_replayed(&self) -> HeaderMap {
        let mut headers = self.headers.clone();
        headers.remove("idempotent-replayed");
        headers
    }
}

pub async fn read<B>(response: Response<B>) -> Answer
where
    B: http_body::Body<Data = Bytes>,
    B::Error: std::fmt::Debug,
{
    let (parts, body) = response.into_parts();
    let collected = body.collect().await.unwrap();
    let trailers = collected.trailers().cloned();
    Answer { status: parts.status, headers: parts.headers, body: collected.to_bytes(), trailers }
}

pub async fn send(app: &App, request: Request<Full<Bytes>>) -> Answer {
    read(app.clone().oneshot(request).await.unwrap()).await
}

/// A handler that answers 201 `call {n}`; a request to `/hold` first waits
/// at the returned gate.
pub fn gated<St: Store + Clone>(layer: &IdempotencyLayer<St>) -> (App, Gate, Calls) {
    let gate = Gate::default();
    let calls = Calls::default();
    let (held, counter) = (gate.clone(), calls.clone());
    let app = app(layer, move |request: HandlerRequest| {
        let (held, n) = (held.clone(), counter.bump());
        let hold = request.uri().path() == "/hold";
        async move {
            if hold {
                held.pass().await;
            }
            respond(201, format!("call {n}"))
        }
    });
    (app, gate, calls)
}

/// A request to `/hold` with `key`.
pub fn hold(key: &str) -> Request<Full<Bytes>> {
    Request::post("/hold").header("idempotency-key", key).header("authorization", AUTH).body(Full::default()).unwrap()
}
