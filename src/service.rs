//! The service: which requests are guarded, the claim and what duplicates
//! get (the in-flight policies, replay), and the start of an execution.

use std::{
    fmt,
    future::{Future, poll_fn},
    sync::Arc,
    task::{Context, Poll},
};

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request, Response};
use http_body::Body;
use tokio::{sync::oneshot, time::Instant};
use tower_service::Service;
use tracing::Instrument;

use crate::{
    BoxError, CompletedStrategy, FailureMode, Fingerprint, IdempotencyContext, IdempotencyKey, InFlightPolicy, Outcome,
    Record, RecordId, Rejection, RejectionKind, RequestBody, ResponseBody, ResponseFuture, Scope,
    body::read_body,
    claim::{HeldClaim, PendingClaim},
    config::{Config, MAX_DURATION},
    metrics::{log_request, rejection_label, request_started},
    policy::is_grpc,
    recording::{DetachOnDrop, recording_task},
    response::status_location,
    store::{Claim, ClaimRequest, Lease, MemoryStore, Store, StoreError},
    timeout::{with_timeout, within},
};

/// The header added to every replayed response.
pub const REPLAYED_HEADER: &str = "idempotent-replayed";
/// [`REPLAYED_HEADER`], checked once when compiled rather than on each
/// replay.
const REPLAYED: HeaderName = HeaderName::from_static(REPLAYED_HEADER);

/// The service [`crate::IdempotencyLayer`] wraps around an inner service.
///
/// The inner service sees [`RequestBody`] request bodies; the client gets
/// [`ResponseBody`] response bodies. Store failures become responses, never
/// errors: the error type is the inner service's.
///
/// Guarded requests need a Tokio runtime. The inner service runs within the
/// request's own task; if the client disconnects before the response is
/// finished, what is left of it moves to a spawned task, so the disconnect
/// does not cancel it and its result is still stored.
///
/// # Example
/// ```
/// use tower::{ServiceBuilder, ServiceExt, service_fn};
/// use tower_idempotency::{IdempotencyLayer, RequestBody};
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let service = ServiceBuilder::new()
///     .layer(IdempotencyLayer::memory())
///     .service(service_fn(|_: http::Request<RequestBody<String>>| async {
///         Ok::<_, std::convert::Infallible>(http::Response::new(String::from("charged")))
///     }));
/// let request = http::Request::post("/charges")
///     .header("idempotency-key", "k1")
///     .header("authorization", "Bearer sk_test_1")
///     .body(String::new())
///     .unwrap();
/// let response = service.oneshot(request).await.unwrap();
/// assert_eq!(response.status(), 200);
/// # });
/// ```
pub struct Idempotency<S, St = MemoryStore> {
    inner: S,
    config: Arc<Config<St>>,
}

impl<S, St> Idempotency<S, St> {
    pub(crate) fn new(inner: S, config: Arc<Config<St>>) -> Self {
        Self { inner, config }
    }

    /// The inner service.
    ///
    /// # Example
    /// ```
    /// use tower::{Layer, service_fn};
    /// use tower_idempotency::IdempotencyLayer;
    ///
    /// let service = IdempotencyLayer::memory().layer(service_fn(|_: http::Request<()>| async { Ok::<_, ()>(()) }));
    /// let _inner = service.get_ref();
    /// ```
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    ///
    /// # Example
    /// ```
    /// use tower::{Layer, service_fn};
    /// use tower_idempotency::IdempotencyLayer;
    ///
    /// let mut service = IdempotencyLayer::memory().layer(service_fn(|_: http::Request<()>| async { Ok::<_, ()>(()) }));
    /// let _inner = service.get_mut();
    /// ```
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The inner service, without the layer.
    ///
    /// # Example
    /// ```
    /// use tower::{Layer, service_fn};
    /// use tower_idempotency::IdempotencyLayer;
    ///
    /// let service = IdempotencyLayer::memory().layer(service_fn(|_: http::Request<()>| async { Ok::<_, ()>(()) }));
    /// let _inner = service.into_inner();
    /// ```
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: Clone, St> Clone for Idempotency<S, St> {
    fn clone(&self) -> Self {
        Self { inner: self.inner.clone(), config: self.config.clone() }
    }
}

impl<S: fmt::Debug, St> fmt::Debug for Idempotency<S, St> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Idempotency").field("inner", &self.inner).finish_non_exhaustive()
    }
}

impl<S, St, B, ResB> Service<Request<B>> for Idempotency<S, St>
where
    S: Service<Request<RequestBody<B>>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    St: Store,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
    ResB: Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    type Response = Response<ResponseBody<ResB>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResB, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let config = &self.config;
        if !config.methods.contains(request.method()) {
            return ResponseFuture::inner(self.inner.call(request.map(RequestBody::inner)));
        }
        let started = request_started();
        let grpc = is_grpc(request.headers());
        let key = match IdempotencyKey::from_headers(request.headers(), &config.header) {
            Ok(Some(key)) => key,
            Ok(None) => {
                let (parts, body) = request.into_parts();
                if config.require.as_ref().is_some_and(|required| required(&parts)) {
                    return ResponseFuture::ready(logged(config.reject(RejectionKind::MissingKey, grpc), started));
                }
                let request = Request::from_parts(parts, RequestBody::inner(body));
                return ResponseFuture::inner(self.inner.call(request));
            }
            Err(error) => {
                return ResponseFuture::ready(logged(config.reject(RejectionKind::InvalidKey(error), grpc), started));
            }
        };
        // The ready service goes into the future; a fresh clone stays behind.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let span = tracing::debug_span!("idempotency", key = tracing::field::Empty);
        let guarded = Guarded { config: self.config.clone(), grpc, started };
        let (parts, body) = request.into_parts();
        ResponseFuture::guarded(Box::pin(guarded.run(inner, parts, body, key).instrument(span)))
    }
}

/// One guarded request, from its key to its response.
struct Guarded<St> {
    config: Arc<Config<St>>,
    grpc: bool,
    /// When the layer took the request, for its log line.
    started: Option<Instant>,
}

impl<St> Guarded<St> {
    fn reject<B>(&self, kind: RejectionKind) -> Response<ResponseBody<B>> {
        self.reject_with(Rejection::new(kind, self.grpc))
    }

    /// The response to `rejection`, counted and logged.
    fn reject_with<B>(&self, rejection: Rejection) -> Response<ResponseBody<B>> {
        let label = rejection_label(rejection.kind());
        let response = self.config.reject_with(rejection);
        log_request(label, Some(response.status()), self.started);
        response
    }
}

/// `response` to a rejection made before the request was guarded, logged.
fn logged<B>(response: Response<ResponseBody<B>>, started: Option<Instant>) -> Response<ResponseBody<B>> {
    log_request(Outcome::Rejected.as_str(), Some(response.status()), started);
    response
}

/// What identifies a guarded request once its body is read.
struct Identity {
    key: IdempotencyKey,
    scope: Scope,
    id: RecordId,
    fingerprint: Fingerprint,
}

impl<St: Store> Guarded<St> {
    /// A guarded request, from its key to its response. Not an `async fn`:
    /// see BENCHMARKS.md, "Future sizes".
    #[allow(clippy::manual_async_fn, reason = "an `async fn` would hold each argument twice")]
    fn run<S, B, ResB>(
        self,
        inner: S,
        parts: http::request::Parts,
        body: B,
        key: IdempotencyKey,
    ) -> impl Future<Output = Result<Response<ResponseBody<ResB>>, S::Error>> + Send
    where
        S: Service<Request<RequestBody<B>>, Response = Response<ResB>> + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Send + 'static,
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
        ResB: Body<Data = Bytes> + Send + 'static,
        ResB::Error: Into<BoxError>,
    {
        async move {
            let config = &self.config;
            let Some(scope) = (config.scope)(&parts) else {
                return Ok(self.reject(RejectionKind::MissingScope));
            };
            let (body, trailers) = match within(config.body_timeout, read_body(body, config.body_limit)).await {
                // Boxed: see BENCHMARKS.md, "Future sizes".
                Some(Ok((body, trailers))) => (body, trailers.map(Box::new)),
                Some(Err(kind)) => return Ok(self.reject(kind)),
                None => return Ok(self.reject(RejectionKind::BodyTimeout)),
            };
            let fingerprint = Fingerprint::of(&parts, &config.fingerprint_headers, &body);
            let id = RecordId::new(&config.namespace, &scope, &key);
            let scope_tag = scope.tag();
            tracing::Span::current().record("key", tracing::field::display(&id));
            let wait_until = match config.in_flight {
                // Saturated: `Wait(Duration::MAX)` waits for as long as there is.
                InFlightPolicy::Wait(timeout) => Some(Instant::now() + timeout.min(MAX_DURATION)),
                _ => None,
            };
            // Once the store has answered, it is never run unguarded.
            let mut answered = false;
            let mut replace_completed = config.completed == CompletedStrategy::Rerun;
            loop {
                let claim = ClaimRequest::new(id, fingerprint, config.lease)
                    .with_replace_completed(replace_completed)
                    .with_fencing_token(config.fencing_tokens)
                    .with_scope_tag(scope_tag);
                let claimed = match with_timeout(config.store_timeout, PendingClaim::new(config, claim)).await {
                    Ok(claimed) => claimed,
                    // An answer, not a failure: the store has no room.
                    Err(StoreError::Full) => return Ok(self.reject(RejectionKind::StoreFull)),
                    Err(error) => {
                        let error = config.claim_failed(&id, error);
                        // A record the store holds but cannot read is an answer too.
                        let answered = answered || matches!(error, StoreError::Corrupt(_));
                        return match config.failure {
                            FailureMode::FailOpen if !answered => {
                                config.metrics.count(Outcome::FailedOpen);
                                let request =
                                    Request::from_parts(parts, RequestBody::buffered(body, trailers.map(|t| *t)));
                                let mut inner = inner;
                                // Boxed: see BENCHMARKS.md, "Future sizes".
                                let response = Box::pin(inner.call(request)).await;
                                let status = response.as_ref().ok().map(Response::status);
                                log_request(Outcome::FailedOpen.as_str(), status, self.started);
                                response.map(|response| response.map(ResponseBody::inner))
                            }
                            _ => Ok(self.reject(match error {
                                StoreError::PoolExhausted { size } => RejectionKind::PoolExhausted { size },
                                _ => RejectionKind::StoreUnavailable,
                            })),
                        };
                    }
                };
                answered = true;
                match claimed {
                    Claim::Acquired(lease) => {
                        let request = Request::from_parts(parts, RequestBody::buffered(body, trailers.map(|t| *t)));
                        let identity = Identity { key, scope, id, fingerprint };
                        return self.execute(inner, request, identity, lease).await;
                    }
                    Claim::InFlight { fingerprint: theirs } if theirs != fingerprint => {
                        return Ok(self.reject(RejectionKind::KeyReused));
                    }
                    Claim::InFlightMismatch => return Ok(self.reject(RejectionKind::KeyReused)),
                    Claim::InFlight { .. } => match &config.in_flight {
                        InFlightPolicy::Conflict => return Ok(self.reject(RejectionKind::InFlight)),
                        InFlightPolicy::Accepted { status_url } => {
                            let location = status_url.as_deref().and_then(|url| status_location(url, &key));
                            let rejection = Rejection::new(RejectionKind::InFlightAccepted, self.grpc);
                            return Ok(self.reject_with(rejection.with_location(location)));
                        }
                        InFlightPolicy::Wait(_) => {
                            // A waiter replays the first answer, never takes it over.
                            replace_completed = false;
                            let deadline = wait_until.unwrap_or_else(Instant::now);
                            let now = Instant::now();
                            if now >= deadline {
                                return Ok(self.reject(RejectionKind::InFlight));
                            }
                            // Boxed: see BENCHMARKS.md, "Future sizes".
                            let wait = config.store.wait(&claim, deadline - now);
                            if let Ok(Err(error)) = Box::pin(tokio::time::timeout_at(deadline, wait)).await {
                                // No room to wait (or no way): the duplicate comes back later.
                                tracing::debug!(%error, "a duplicate could not wait");
                                return Ok(self.reject(RejectionKind::InFlight));
                            }
                        }
                    },
                    Claim::Completed(record) if record.fingerprint() != fingerprint => {
                        return Ok(self.reject(RejectionKind::KeyReused));
                    }
                    Claim::Completed(_) if config.completed == CompletedStrategy::Reject => {
                        return Ok(self.reject(RejectionKind::KeyAlreadyUsed));
                    }
                    Claim::Completed(record) => return Ok(self.replay(record)),
                }
            }
        }
    }

    fn replay<B>(&self, record: Record) -> Response<ResponseBody<B>> {
        match record.into_response() {
            Ok(stored) => {
                let (status, mut headers, body, trailers) = stored.into_parts();
                headers.insert(REPLAYED, HeaderValue::from_static("true"));
                let mut response = Response::new(ResponseBody::with_trailers(body, trailers));
                *response.status_mut() = status;
                *response.headers_mut() = headers;
                self.config.metrics.count(Outcome::Replayed);
                log_request(Outcome::Replayed.as_str(), Some(status), self.started);
                response
            }
            Err(reason) => self.reject(RejectionKind::ResponseNotStored(reason)),
        }
    }

    /// Runs the inner service under the claim, and answers with its response
    /// as soon as the head is there. The execution is polled right here, with
    /// no task of its own, until the head is there; what is left of it then
    /// (a body still streaming), or all of it if this request is dropped
    /// first (the client went away), goes on on a spawned task. Not an
    /// `async fn`: see BENCHMARKS.md, "Future sizes".
    fn execute<S, B, ResB>(
        self,
        mut inner: S,
        mut request: Request<RequestBody<B>>,
        identity: Identity,
        lease: Lease,
    ) -> impl Future<Output = Result<Response<ResponseBody<ResB>>, S::Error>> + Send
    where
        S: Service<Request<RequestBody<B>>, Response = Response<ResB>> + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Send + 'static,
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
        ResB: Body<Data = Bytes> + Send + 'static,
        ResB::Error: Into<BoxError>,
    {
        let Identity { key, scope, id, fingerprint } = identity;
        self.config.metrics.count(Outcome::Executed);
        // Without fencing tokens, every store's claims read 0, as Redis's do.
        let token = if self.config.fencing_tokens { lease.fencing_token() } else { crate::FencingToken::new(0) };
        request.extensions_mut().insert(IdempotencyContext::new(key, scope, id, token));
        self.config.store.attach(&lease, request.extensions_mut());
        let claim = HeldClaim::new(self.config.clone(), id, lease.owner(), fingerprint);
        let (answer, mut answered) = oneshot::channel();
        // A panic in the inner service's `call` itself is caught here; one
        // in its future, in the task.
        let called = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| inner.call(request)));
        drop(inner);
        let task = Box::pin(recording_task(called, claim, answer).instrument(tracing::Span::current()));
        let mut task = DetachOnDrop(Some(task));
        async move {
            let answer = poll_fn(|cx| {
                if let Some(running) = task.0.as_mut()
                    && running.as_mut().poll(cx).is_ready()
                {
                    task.0 = None;
                }
                // A finished execution has answered or dropped its sender.
                std::pin::Pin::new(&mut answered).poll(cx)
            })
            .await;
            drop(task);
            match answer {
                Ok(result) => {
                    let status = result.as_ref().ok().map(Response::status);
                    log_request(Outcome::Executed.as_str(), status, self.started);
                    result
                }
                // The task ended without answering: the inner service
                // panicked. Its claim was released as the task unwound.
                Err(_) => Ok(self.reject(RejectionKind::HandlerPanicked)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use tower_layer::Layer;

    use super::*;

    use crate::{recording::Panic, store::OwnerToken};

    /// glibc's malloc serves requests up to this size from a per-thread
    /// cache (BENCHMARKS.md, "Future sizes").
    const THREAD_CACHE_MAX: usize = 1032;

    /// The sizes of what a guarded request boxes on `store`, with an axum
    /// router as the inner service: the request's future, and its
    /// execution's task.
    fn boxed_sizes<St: Store + Clone>(store: St) -> (usize, usize) {
        let router = axum::Router::new().route("/", axum::routing::post(|| async { "charged" }));
        let service = crate::IdempotencyLayer::new(store).layer(router);
        let config = service.config.clone();
        let (parts, body) = Request::post("/").body(axum::body::Body::empty()).unwrap().into_parts();
        let key = IdempotencyKey::parse(b"k1").unwrap();
        let guarded = Guarded { config: config.clone(), grpc: false, started: None };
        let run = guarded.run(service.inner.clone(), parts, body, key).instrument(tracing::Span::none());

        let fingerprint = Fingerprint::from_bytes([2; 32]);
        let claim = HeldClaim::new(config, RecordId::from_bytes([1; 32]), OwnerToken::from_u128(1), fingerprint);
        let (answer, _answered) = oneshot::channel();
        let mut inner = service.inner.clone();
        let request = Request::post("/").body(RequestBody::inner(axum::body::Body::empty())).unwrap();
        let called: Result<_, Panic> = Ok(inner.call(request));
        let task = recording_task(called, claim, answer).instrument(tracing::Span::none());
        (std::mem::size_of_val(&run), std::mem::size_of_val(&task))
    }

    /// A check of future sizes, outside the default test run (a compiler
    /// upgrade may move them): `.ci/run` runs it with `--ignored` and
    /// prints the sizes.
    #[tokio::test]
    #[ignore = "a size check: .ci/run runs it with --ignored"]
    async fn future_sizes_fit_in_mallocs_thread_cache() {
        let mut stores = vec![("memory", boxed_sizes(MemoryStore::new()))];
        #[cfg(feature = "redis")]
        {
            use crate::store::redis::{RedisStore, deadpool_redis};
            // Nothing connects: the pool only has to exist.
            let pool = deadpool_redis::Config::from_url("redis://127.0.0.1:1")
                .create_pool(Some(deadpool_redis::Runtime::Tokio1))
                .unwrap();
            stores.push(("redis", boxed_sizes(RedisStore::new(pool))));
        }
        for (store, (run, task)) in stores {
            println!("{store}: guarded request {run} B, execution {task} B");
            assert!(run <= THREAD_CACHE_MAX, "{store}: a guarded request's future is {run} B");
            assert!(task <= THREAD_CACHE_MAX, "{store}: an execution's task is {task} B");
        }
    }
}
