//! Every rule of the behaviour contract, through the public API, on the
//! memory store.

#[path = "../common/mod.rs"]
mod common;

use std::{convert::Infallible, time::Duration};

use bytes::Bytes;
use common::*;
use futures_util::{StreamExt, stream};
use http::{HeaderMap, Method, Request, Response, header};
use http_body::Frame;
use http_body_util::{BodyExt, Full, StreamBody};
use tokio::sync::mpsc;
use tower::ServiceExt;
use tower_idempotency::{
    CompletedStrategy, ConfigError, FailureMode, IdempotencyContext, IdempotencyLayer, InFlightPolicy, Outcome,
    RecordId, RequestBody, Scope, StoreResponse,
    store::{Claim, ClaimRequest, MemoryStore, OwnerToken, RecordState, Store, StoreError},
};

const KEY: Option<&str> = Some("order-1");

fn streaming_body(chunks: &[&'static str], trailers: Option<HeaderMap>) -> TestBody {
    let frames: Vec<Result<Frame<Bytes>, std::io::Error>> = chunks
        .iter()
        .map(|chunk| Ok(Frame::data(Bytes::from_static(chunk.as_bytes()))))
        .chain(trailers.map(|t| Ok(Frame::trailers(t))))
        .collect();
    // Yield between frames, so the body really streams.
    let frames = stream::iter(frames).then(|frame| async move {
        tokio::task::yield_now().await;
        frame
    });
    BodyExt::boxed(StreamBody::new(frames))
}

async fn send_owned(app: App, request: Request<Full<Bytes>>) -> Answer {
    send(&app, request).await
}

fn with_auth(key: &str, token: &str, body: &'static str) -> Request<Full<Bytes>> {
    let mut request = post(Some(key), body);
    request.headers_mut().insert(header::AUTHORIZATION, format!("Bearer {token}").parse().unwrap());
    request
}

/// A layer whose handler waits at a gate, and the first request parked in it.
async fn parked(layer: IdempotencyLayer) -> (App, Gate, Calls, tokio::task::JoinHandle<Answer>) {
    let (app, gate, calls) = held_at_gate(&layer);
    let first = tokio::spawn(send_owned(app.clone(), post(KEY, "amount=100")));
    gate.entered(1).await;
    (app, gate, calls, first)
}

/// A handler that waits at the returned gate on every call, then answers
/// 201 `charge {n}`.
fn held_at_gate(layer: &IdempotencyLayer) -> (App, Gate, Calls) {
    let gate = Gate::default();
    let held = gate.clone();
    let (app, calls) = counted(layer, move |n, _| {
        let held = held.clone();
        async move {
            held.pass().await;
            respond(201, format!("charge {n}"))
        }
    });
    (app, gate, calls)
}

/// A memory store with slow calls. Its first claim answers only after
/// `first_claim`: it lands after the request that sent it has given up,
/// and, like a command already sent to Redis, even if its future is
/// dropped. Every release takes `release`.
#[derive(Clone, Default)]
struct Slowed {
    inner: MemoryStore,
    first_claim: Duration,
    release: Duration,
    /// How long each renewal takes.
    renew: Duration,
    /// From this claim on (counting from 1), claims never answer; 0: never.
    claims_hang_from: usize,
    claims: Calls,
    renewals: Calls,
    /// Signalled once the slow first claim has landed in the store.
    landed: std::sync::Arc<tokio::sync::Notify>,
}

/// Sends a request for `key` that `gate` holds in the handler, then a
/// duplicate, lets both through once the duplicate's claim reached `store`,
/// and returns both answers.
async fn first_then_waiting_duplicate(app: &App, gate: &Gate, store: &Slowed, key: &str) -> (Answer, Answer) {
    let first = tokio::spawn(send_owned(app.clone(), hold(key)));
    gate.entered(1).await;
    let duplicate = tokio::spawn(send_owned(app.clone(), hold(key)));
    store.claims_reached(2).await;
    gate.open(2);
    (first.await.unwrap(), duplicate.await.unwrap())
}

impl Slowed {
    /// Lets other tasks run until `n` claims have reached the store.
    async fn claims_reached(&self, n: usize) {
        for _ in 0..10_000 {
            if self.claims.get() >= n {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("only {} of {n} claims reached the store", self.claims.get());
    }
}

impl Store for Slowed {
    async fn claim(&self, request: ClaimRequest) -> Result<Claim, StoreError> {
        let claim = self.claims.bump();
        if self.claims_hang_from != 0 && claim >= self.claims_hang_from {
            std::future::pending::<()>().await;
        }
        if claim == 1 && !self.first_claim.is_zero() {
            let (inner, delay, landed) = (self.inner.clone(), self.first_claim, self.landed.clone());
            let sent = tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let claim = inner.claim(request).await;
                landed.notify_one();
                claim
            });
            return sent.await.unwrap_or_else(|_| Err(StoreError::unavailable("claim task failed")));
        }
        self.inner.claim(request).await
    }
    async fn complete(
        &self,
        id: &RecordId,
        owner: OwnerToken,
        record: tower_idempotency::Record,
        retention: Duration,
    ) -> Result<(), StoreError> {
        self.inner.complete(id, owner, record, retention).await
    }
    async fn release(&self, id: &RecordId, owner: OwnerToken) -> Result<(), StoreError> {
        tokio::time::sleep(self.release).await;
        self.inner.release(id, owner).await
    }
    async fn renew(&self, id: &RecordId, owner: OwnerToken, lease: Duration) -> Result<(), StoreError> {
        self.renewals.bump();
        tokio::time::sleep(self.renew).await;
        self.inner.renew(id, owner, lease).await
    }
    async fn lookup(&self, id: &RecordId) -> Result<Option<RecordState>, StoreError> {
        self.inner.lookup(id).await
    }
    async fn wait(&self, request: &ClaimRequest, timeout: Duration) -> Result<(), StoreError> {
        self.inner.wait(request, timeout).await
    }
}

mod bodies;
mod completed;
mod config;
mod failures;
mod grpc;
mod guarded;
mod identity;
mod in_flight;
mod leases;
mod limits;
mod replay;
mod store_failures;
mod stored;
