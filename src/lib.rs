//! A Tower layer that makes retried HTTP and gRPC requests safe.
//!
//! A client times out and retries, but the first attempt had already
//! charged the card: one order, two charges. [`IdempotencyLayer`] turns
//! retries into one business outcome. The first request with an
//! `Idempotency-Key` runs; its response (status, headers, body and trailers)
//! is recorded while it streams to the client; every later request with the
//! same key and the same payload gets that response again, byte for byte,
//! with `Idempotent-Replayed: true`.
//!
//! # Quick start
//!
//! ```
//! use axum::{Router, routing::post};
//! use tower_idempotency::IdempotencyLayer;
//!
//! // On the route's methods only: a keyed request that no handler runs
//! // (axum's 404 and 405) must leave nothing in the store.
//! let app: Router = Router::new()
//!     .route("/v1/charges", post(|| async { "charged once" }).route_layer(IdempotencyLayer::memory()));
//! # drop(app);
//! ```
//!
//! The examples write `axum::http`, axum's re-export of the `http` crate;
//! outside axum, depend on `http` itself.
//!
//! Under `axum::Router::layer`, axum's fallback answers for unknown paths
//! and methods (404, 405) would pass through the layer and be stored: a
//! flood of keyed requests to paths that do not exist would fill a store,
//! and a key first sent to a wrong path would answer 422 on the right one.
//! `MethodRouter::route_layer` keeps both out (`Router::route_layer` keeps
//! out 404s only).
//!
//! The layer works the same in tonic's `Server::builder().layer(..)` (an
//! unknown method's `UNIMPLEMENTED` counts as 501, not stored), and around any `tower::Service` that takes
//! `http::Request<B>` with `B: http_body::Body<Data = Bytes>`.
//!
//! # Behaviour
//!
//! | request | response |
//! |---|---|
//! | method not guarded (default: not `POST`/`PATCH`), or no key | passed through untouched |
//! | no key, key required | 400 `missing-key` |
//! | no key, reaching a handler that takes [`IdempotencyContext`] | 400 `missing-key` from the extractor (not counted) |
//! | empty, over 255 bytes, non-ASCII, control or space characters, two key fields | 400 `invalid-key` |
//! | no `Authorization` header (the default scope), or the scope function returns `None` | 400 `missing-scope` |
//! | body over the cap (default 1 MiB) | 413 `body-too-large`, nothing runs |
//! | body slower than its timeout (default 30 s) | 408 `body-timeout`, nothing runs |
//! | first request with a key | runs; response stored unless 5xx, 408, 425, 429 |
//! | same key, same payload, finished | stored response replayed, `Idempotent-Replayed: true` |
//! | same key, different payload (in flight or finished) | 422 `key-reused` |
//! | same key, same payload, still running | 409 + `Retry-After`; or 202; or wait and replay |
//! | finished key, [`CompletedStrategy::Reject`] | 409 `key-already-used` |
//! | finished key whose response was not stored (too large, body failed) | 410 `response-not-stored` |
//! | memory store full | completed records of the scope holding the most dropped, closest to expiry first ([`Outcome::Evicted`], per [`EvictionReason`]) |
//! | store down or slow, [`FailureMode::FailClosed`] | 503 `store-unavailable` + `Retry-After`, nothing runs |
//! | store slow while every connection of its pool is busy (PostgreSQL), `FailClosed` | 503 `pool-exhausted` + `Retry-After`, nothing runs ([`Outcome::PoolExhausted`]) |
//! | memory store full of in-flight records | 503 `store-full` + `Retry-After`, nothing runs |
//! | store down or slow, [`FailureMode::FailOpen`] | runs unguarded, counted |
//! | inner service panics | 500 `handler-panicked`, key released |
//! | PostgreSQL, transactional: the request's transaction does not commit | 503 `not-committed` + `Retry-After`, nothing kept, key released |
//!
//! Rejections are `application/problem+json` (RFC 9457), one `type` per
//! case; gRPC requests get a gRPC status in a trailers-only response instead
//! (see [`RejectionKind`]). [`IdempotencyLayer::with_responder`] replaces
//! them.
//!
//! # Identity
//!
//! A record is identified by (namespace, scope, key), hashed with SHA-256
//! ([`RecordId`]): key bytes never reach a store's key names. The default
//! scope is the SHA-256 of the `Authorization` header, so two API keys never
//! share records; a guarded request without one is refused (400
//! `missing-scope`). If your callers authenticate otherwise, set
//! [`IdempotencyLayer::with_scope`]; `with_scope(|_| Some(Scope::anonymous()))`
//! is the opt-in for a public endpoint whose callers share one scope.
//!
//! The [`Fingerprint`] covers method, path and query, the body and the
//! `content-type` header ([`IdempotencyLayer::with_fingerprint_headers`]).
//!
//! # Executions
//!
//! The inner service runs on its own Tokio task under a claim with a lease
//! (default 30 s) that is renewed while it runs, up to a ceiling. A client
//! that disconnects does not stop it: its response is still recorded, and
//! the retry gets the replay. A panic releases the claim. The handler sees
//! an [`IdempotencyContext`] (key, scope, fencing token) in the request's
//! extensions.
//!
//! Responses stream to the client as the inner service produces them; a copy
//! is kept up to the storage cap. The end of the body reaches the client
//! only once the record is stored, so a client that read a whole response
//! and sends the key again always gets the replay.
//!
//! # Stores
//!
//! [`store::MemoryStore`] is built in; `store::redis` holds the Redis and
//! Redis Cluster stores (feature `redis`), `store::postgres` the PostgreSQL
//! store (feature `postgres`); other stores implement [`store::Store`].
//!
//! # Observability
//!
//! One `tracing` event per guarded request at `debug`, when its response
//! (or a streaming response's head) is ready: its [`Outcome`], status and
//! duration, in a span that names the key only as its hashed [`RecordId`].
//! Store failures and stale owners at `warn`. Counters per outcome through
//! [`IdempotencyLayer::metrics`].
//!
//! # Features
//!
//! - `redis` (on by default): the Redis and Redis Cluster stores, on
//!   deadpool-redis, and [`IdempotencyLayer::redis`] and
//!   [`IdempotencyLayer::redis_cluster`].
//! - `axum` (on by default): [`IdempotencyContext`] as an axum extractor.
//! - `postgres`: the PostgreSQL stores (`store::postgres`), on sqlx, and
//!   `IdempotencyLayer::postgres` (a `TransactionalStore`), whose handlers
//!   write in the request's transaction, committed with the record; safe
//!   behind a transaction pooler.
#![forbid(unsafe_code)]
#![warn(missing_docs, unreachable_pub)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod body;
mod claim;
mod config;
mod context;
#[cfg(feature = "axum")]
mod extract;
mod fingerprint;
mod future;
#[cfg(feature = "guard")]
pub mod guard;
mod key;
mod layer;
mod metrics;
pub mod policy;
mod record;
mod recording;
mod response;
mod service;
pub mod store;
mod timeout;

pub use body::{BoxError, RequestBody, ResponseBody};
pub use config::{ConfigError, MAX_DURATION};
pub use context::IdempotencyContext;
pub use fingerprint::Fingerprint;
pub use future::ResponseFuture;
pub use key::{IdempotencyKey, KeyError, MAX_KEY_LEN, RecordId, Scope};
pub use layer::IdempotencyLayer;
pub use metrics::{EvictionReason, Metrics, Outcome};
pub use policy::{CompletedStrategy, FailureMode, InFlightPolicy, StoreResponse};
pub use record::{DecodeError, NotStored, Record, StoredResponse};
pub use response::{DefaultResponder, Rejection, RejectionKind, Responder};
pub use service::{Idempotency, REPLAYED_HEADER};
pub use store::{FencingToken, Store};

/// The README's examples, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
