use std::{
    collections::VecDeque,
    fmt,
    future::{Future, poll_fn},
    pin::pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, header};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use tokio::{
    sync::{mpsc, oneshot},
    time::Instant,
};
use tower_service::Service;
use tracing::Instrument;

use crate::{
    BoxError, CompletedStrategy, FailureMode, Fingerprint, IdempotencyContext, IdempotencyKey, InFlightPolicy,
    NotStored, Outcome, Record, RecordId, Rejection, RejectionKind, RequestBody, ResponseBody, ResponseFuture, Scope,
    StoreResponse,
    body::Message,
    future::{with_timeout, within},
    layer::Config,
    policy::grpc_to_http,
    record::HeaderSection,
    store::{Claim, ClaimRequest, Lease, MemoryStore, OwnerToken, Store, StoreError},
};

/// The header added to every replayed response.
pub const REPLAYED_HEADER: &str = "idempotent-replayed";
/// [`REPLAYED_HEADER`], checked once when compiled rather than on each
/// replay.
const REPLAYED: HeaderName = HeaderName::from_static(REPLAYED_HEADER);

/// Frames buffered between the recording task and a slow client.
const STREAM_BUFFER: usize = 4;
/// How much of a body that is ready at once is gathered before the head is
/// sent; past this the body streams, however fast it comes.
const EAGER_LIMIT: usize = 64 * 1024;

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
/// let request = http::Request::post("/charges").header("idempotency-key", "k1").body(String::new()).unwrap();
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
        let grpc = is_grpc(request.headers());
        let key = match IdempotencyKey::from_headers(request.headers(), &config.header) {
            Ok(Some(key)) => key,
            Ok(None) => {
                let (parts, body) = request.into_parts();
                if config.require.as_ref().is_some_and(|required| required(&parts)) {
                    return ResponseFuture::ready(config.reject(RejectionKind::MissingKey, grpc));
                }
                let request = Request::from_parts(parts, RequestBody::inner(body));
                return ResponseFuture::inner(self.inner.call(request));
            }
            Err(error) => return ResponseFuture::ready(config.reject(RejectionKind::InvalidKey(error), grpc)),
        };
        // The ready service goes into the future; a fresh clone stays behind.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let span = tracing::debug_span!("idempotency", key = tracing::field::Empty);
        let guarded = Guarded { config: self.config.clone(), grpc };
        let (parts, body) = request.into_parts();
        ResponseFuture::guarded(Box::pin(guarded.run(inner, parts, body, key).instrument(span)))
    }
}

/// Whether a request or response is gRPC (`content-type: application/grpc*`).
pub(crate) fn is_grpc(headers: &HeaderMap) -> bool {
    headers.get(header::CONTENT_TYPE).is_some_and(|value| value.as_bytes().starts_with(b"application/grpc"))
}

impl<St: Store> Config<St> {
    /// Gives the claim of `owner` back, under the store timeout; a failure
    /// is logged, as nobody waits for it.
    async fn release(&self, id: &RecordId, owner: OwnerToken) {
        if let Err(error) = with_timeout(self.store_timeout, self.store.release(id, owner)).await {
            self.store_failed(id, "release", &error);
        }
    }
}

impl<St> Config<St> {
    pub(crate) fn note(&self, outcome: Outcome, id: &RecordId) {
        self.metrics.record(outcome);
        tracing::debug!(outcome = outcome.as_str(), key = %id, "idempotency outcome");
    }

    fn store_failed(&self, id: &RecordId, call: &'static str, error: &StoreError) {
        if matches!(error, StoreError::NotOwner) {
            self.metrics.record(Outcome::StaleOwner);
            tracing::warn!(call, key = %id, "lease ran out before {call}: another request may own the key");
        } else {
            self.metrics.record(Outcome::StoreError);
            tracing::warn!(call, key = %id, %error, "idempotency store call failed");
        }
    }

    fn reject<B>(&self, kind: RejectionKind, grpc: bool) -> Response<ResponseBody<B>> {
        self.reject_with(Rejection::new(kind, grpc))
    }

    fn reject_with<B>(&self, rejection: Rejection) -> Response<ResponseBody<B>> {
        let outcome = match rejection.kind() {
            RejectionKind::KeyReused => Some(Outcome::Mismatch),
            RejectionKind::InFlight | RejectionKind::InFlightAccepted => Some(Outcome::InFlight),
            RejectionKind::StoreUnavailable | RejectionKind::HandlerPanicked => None,
            _ => Some(Outcome::Rejected),
        };
        if let Some(outcome) = outcome {
            self.metrics.record(outcome);
            tracing::debug!(
                outcome = outcome.as_str(),
                rejection = rejection.kind().problem_type(),
                "idempotency outcome"
            );
        }
        let rejection = match rejection.kind() {
            RejectionKind::InFlight | RejectionKind::InFlightAccepted | RejectionKind::StoreUnavailable => {
                rejection.with_retry_after(self.retry_after)
            }
            _ => rejection,
        };
        self.responder.respond(&rejection).map(ResponseBody::full)
    }

    fn keeps(&self, verdict: Option<StoreResponse>, status: StatusCode) -> bool {
        match verdict {
            Some(StoreResponse::Always) => true,
            Some(StoreResponse::Never) => false,
            None => (self.store_if)(status),
        }
    }
}

/// One guarded request, from its key to its response.
struct Guarded<St> {
    config: Arc<Config<St>>,
    grpc: bool,
}

/// What identifies a guarded request once its body is read.
struct Identity {
    key: IdempotencyKey,
    scope: Scope,
    id: RecordId,
    fingerprint: Fingerprint,
}

impl<St: Store> Guarded<St> {
    /// A guarded request, from its key to its response.
    ///
    /// A plain function that returns a future, not an `async fn`, which
    /// would hold each argument twice: the request's head alone is over
    /// 200 bytes, and this future is boxed for every guarded request.
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
                return Ok(config.reject(RejectionKind::MissingScope, self.grpc));
            };
            let (body, trailers) = match within(config.body_timeout, read_body(body, config.body_limit)).await {
                // Trailers are rare: boxed, they take 8 bytes of this future
                // instead of 96.
                Some(Ok((body, trailers))) => (body, trailers.map(Box::new)),
                Some(Err(kind)) => return Ok(config.reject(kind, self.grpc)),
                None => return Ok(config.reject(RejectionKind::BodyTimeout, self.grpc)),
            };
            let fingerprint = Fingerprint::of(&parts, &config.fingerprint_headers, &body);
            let id = RecordId::new(&config.namespace, &scope, &key);
            tracing::Span::current().record("key", tracing::field::display(&id));
            let wait_until = match config.in_flight {
                InFlightPolicy::Wait(timeout) => Some(Instant::now() + timeout),
                _ => None,
            };
            loop {
                let claim = ClaimRequest::new(id, fingerprint, config.lease)
                    .with_replace_completed(config.completed == CompletedStrategy::Rerun);
                let claimed = match with_timeout(config.store_timeout, PendingClaim::new(config, claim)).await {
                    Ok(claimed) => claimed,
                    Err(error) => {
                        config.store_failed(&id, "claim", &error);
                        return match config.failure {
                            FailureMode::FailOpen => {
                                config.note(Outcome::FailedOpen, &id);
                                let request =
                                    Request::from_parts(parts, RequestBody::buffered(body, trailers.map(|t| *t)));
                                let mut inner = inner;
                                // Boxed: held inline, this rare path's future
                                // would more than double the size of every
                                // guarded request's (5.3 KB against 2.1 KB).
                                Box::pin(inner.call(request)).await.map(|response| response.map(ResponseBody::inner))
                            }
                            _ => Ok(config.reject(RejectionKind::StoreUnavailable, self.grpc)),
                        };
                    }
                };
                match claimed {
                    Claim::Acquired(lease) => {
                        let request = Request::from_parts(parts, RequestBody::buffered(body, trailers.map(|t| *t)));
                        let identity = Identity { key, scope, id, fingerprint };
                        return self.execute(inner, request, identity, lease).await;
                    }
                    Claim::InFlight { fingerprint: theirs } if theirs != fingerprint => {
                        return Ok(config.reject(RejectionKind::KeyReused, self.grpc));
                    }
                    Claim::InFlight { .. } => match &config.in_flight {
                        InFlightPolicy::Conflict => return Ok(config.reject(RejectionKind::InFlight, self.grpc)),
                        InFlightPolicy::Accepted { status_url } => {
                            let location = status_url.as_deref().and_then(|url| status_location(url, &key));
                            let rejection = Rejection::new(RejectionKind::InFlightAccepted, self.grpc);
                            return Ok(config.reject_with(rejection.with_location(location)));
                        }
                        InFlightPolicy::Wait(_) => {
                            let deadline = wait_until.unwrap_or_else(Instant::now);
                            let now = Instant::now();
                            if now >= deadline {
                                return Ok(config.reject(RejectionKind::InFlight, self.grpc));
                            }
                            // Boxed: waiting is rare, and its timer and the
                            // store's wait held inline would make every
                            // guarded request's future larger.
                            let wait = config.store.wait(&id, deadline - now);
                            let _ = Box::pin(tokio::time::timeout_at(deadline, wait)).await;
                        }
                    },
                    Claim::Completed(record) if record.fingerprint() != fingerprint => {
                        return Ok(config.reject(RejectionKind::KeyReused, self.grpc));
                    }
                    Claim::Completed(_) if config.completed == CompletedStrategy::Reject => {
                        return Ok(config.reject(RejectionKind::KeyAlreadyUsed, self.grpc));
                    }
                    Claim::Completed(record) => return Ok(self.replay(record, &id)),
                }
            }
        }
    }

    fn replay<B>(&self, record: Record, id: &RecordId) -> Response<ResponseBody<B>> {
        match record.into_response() {
            Ok(stored) => {
                let (status, mut headers, body, trailers) = stored.into_parts();
                headers.insert(REPLAYED, HeaderValue::from_static("true"));
                let mut response = Response::new(ResponseBody::with_trailers(body, trailers));
                *response.status_mut() = status;
                *response.headers_mut() = headers;
                self.config.note(Outcome::Replayed, id);
                response
            }
            Err(reason) => self.config.reject(RejectionKind::ResponseNotStored(reason), self.grpc),
        }
    }

    /// Runs the inner service under the claim, and answers with its response
    /// as soon as the head is there. The execution is polled right here, with
    /// no task of its own, until the head is there; what is left of it then
    /// (a body still streaming), or all of it if this request is dropped
    /// first (the client went away), goes on on a spawned task.
    ///
    /// A plain function that returns a future, not an `async fn`: the
    /// request and the inner service are used before the first wait, so the
    /// future holds neither (an `async fn` keeps its arguments for its whole
    /// life, and the request twice over).
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
        self.config.note(Outcome::Executed, &id);
        request.extensions_mut().insert(IdempotencyContext::new(key, scope, id, lease.fencing_token()));
        let claim = Execution::new(self.config.clone(), id, lease.owner(), fingerprint);
        let (answer, mut answered) = oneshot::channel();
        // A panic in the inner service's `call` itself is caught here; one
        // in its future, in the task.
        let called = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| inner.call(request)));
        drop(inner);
        let task = Box::pin(execute_detached(called, claim, answer).instrument(tracing::Span::current()));
        let mut task = Detach(Some(task));
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
                Ok(result) => result,
                // The task ended without answering: the inner service
                // panicked. Its claim was released as the task unwound.
                Err(_) => Ok(self.config.reject(RejectionKind::HandlerPanicked, self.grpc)),
            }
        }
    }
}

type Answer<ResB, E> = oneshot::Sender<Result<Response<ResponseBody<ResB>>, E>>;

/// An execution polled inline: dropped unfinished (the head is answered but
/// the body still streams, or the request was dropped), it goes on on a
/// spawned task.
struct Detach(Option<crate::future::BoxFuture<()>>);

impl Drop for Detach {
    fn drop(&mut self) {
        let Some(task) = self.0.take() else { return };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn(task)),
            // No runtime to finish on: dropping the execution releases its
            // claim, so a retry runs.
            Err(_) => drop(task),
        }
    }
}

type FrameResult = Result<Frame<Bytes>, BoxError>;

type Panic = Box<dyn std::any::Any + Send>;

/// The task that runs the inner service's future (`called`, or the panic
/// its `call` raised) while the claim's lease is renewed, then records its
/// response while it streams to the client, and completes or releases the
/// claim. It runs to the end even when the client has gone.
fn execute_detached<F, St, ResB, E>(
    called: Result<F, Panic>,
    claim: Execution<St>,
    answer: Answer<ResB, E>,
) -> impl Future<Output = ()>
where
    F: Future<Output = Result<Response<ResB>, E>>,
    St: Store,
    ResB: Body<Data = Bytes>,
    ResB::Error: Into<BoxError>,
{
    let then = move |called, claim| record(called, claim, answer);
    match called {
        Ok(future) => Executing::Calling { future, renewal: None, next: Some((claim, then)) },
        Err(panic) => Executing::Then { rest: then(Err(panic), claim) },
    }
}

/// What an execution does once the inner service's future is over:
/// `called` is its output, or its panic.
///
/// A plain function that returns a future, not an `async fn`, which would
/// hold each argument twice.
#[allow(clippy::manual_async_fn, reason = "an `async fn` would hold each argument twice")]
fn record<St, ResB, E>(
    called: Result<Result<Response<ResB>, E>, Panic>,
    mut claim: Execution<St>,
    answer: Answer<ResB, E>,
) -> impl Future<Output = ()>
where
    St: Store,
    ResB: Body<Data = Bytes>,
    ResB::Error: Into<BoxError>,
{
    async move {
        // A panic in the inner service was caught, so the claim is released
        // before the client hears of it: a retry sent at once runs, never
        // 409.
        let response = match called {
            Ok(Ok(response)) => response,
            Ok(Err(error)) => {
                claim.release().await;
                let _ = answer.send(Err(error));
                return;
            }
            Err(_panic) => {
                tracing::error!(key = %claim.id, "inner service panicked: its idempotency key is released");
                claim.release().await;
                // Dropping `answer` tells the waiting request: it answers 500.
                return;
            }
        };
        let (parts, body) = response.into_parts();
        let verdict = parts.extensions.get::<StoreResponse>().copied();
        if !claim.config.keeps(verdict, effective_status(parts.status, &parts.headers)) {
            claim.release().await;
            let _ = answer.send(Ok(Response::from_parts(parts, ResponseBody::inner(body))));
            return;
        }
        let mut recorder = Recorder::new(&parts, claim.config.response_limit, verdict);
        let mut body = pin!(body);

        // Take what the body has ready without waiting: a body that is complete
        // at once is stored before the client sees it, and sent in one piece.
        let mut early = VecDeque::new();
        let mut early_len = 0;
        let mut ended = false;
        while early_len <= EAGER_LIMIT {
            let polled: Result<Poll<Option<FrameResult>>, _> =
                CatchUnwind { future: poll_fn(|cx| Poll::Ready(body.as_mut().poll_frame(cx).map_err(Into::into))) }
                    .await;
            let Ok(polled) = polled else {
                // The body panicked before anything was sent: release, then
                // drop `answer` (a 500).
                claim.body_panicked().await;
                return;
            };
            match polled {
                Poll::Pending => break,
                Poll::Ready(Some(Ok(frame))) => {
                    // Kept in `early` alone until the body turns out to stream.
                    recorder.observe(&frame);
                    match frame.into_data() {
                        Ok(data) => {
                            early_len += data.len();
                            early.push_back(data);
                        }
                        // Trailers end a body.
                        Err(_) => {
                            ended = true;
                            break;
                        }
                    }
                }
                Poll::Ready(None) => {
                    ended = true;
                    break;
                }
                Poll::Ready(Some(Err(error))) => {
                    // Boxed: a rare path, kept out of every execution's task.
                    let retry = Box::pin(claim.fail()).await;
                    let (client, frames) = mpsc::channel(1);
                    let _ = client.try_send(Message::Error(error));
                    let _ = answer.send(Ok(Response::from_parts(parts, ResponseBody::streamed(early, frames))));
                    claim.settle_later(retry).await;
                    return;
                }
            }
        }
        if ended {
            // The body finished without ever waiting.
            // Boxed: held inline, the completion's future would take this
            // task past the size that glibc's malloc serves from its
            // per-thread cache (see the test at the end of this file).
            let retry = Box::pin(claim.finish(&recorder, early.make_contiguous())).await;
            let trailers = recorder.trailers.as_deref().cloned();
            let _ = answer.send(Ok(Response::from_parts(parts, ResponseBody::buffered(early, trailers))));
            claim.settle_later(retry).await;
            return;
        }

        // The body streams. Boxed: streaming is the rarer case, and its
        // state would make every execution's task larger.
        Box::pin(stream(&mut claim, body, recorder, early, parts, answer)).await;
    }
}

/// Records a body that streams: sends the head and what came so far, then
/// each frame as it comes. The end reaches the client only once the record
/// is settled, so a client that has the whole response and sends the same
/// key again gets the replay, never a 409.
async fn stream<St, ResB, E>(
    claim: &mut Execution<St>,
    mut body: std::pin::Pin<&mut ResB>,
    mut recorder: Recorder,
    early: VecDeque<Bytes>,
    parts: http::response::Parts,
    answer: Answer<ResB, E>,
) where
    St: Store,
    ResB: Body<Data = Bytes>,
    ResB::Error: Into<BoxError>,
{
    let (frames, client_frames) = mpsc::channel(STREAM_BUFFER);
    recorder.adopt(&early);
    let head = Response::from_parts(parts, ResponseBody::streamed(early, client_frames));
    let mut client = answer.send(Ok(head)).is_ok().then_some(frames);
    loop {
        let Ok(frame) = CatchUnwind { future: claim.alive(body.frame()) }.await else {
            // The body panicked midway: release the key before the client
            // sees its response break, so its retry runs.
            claim.body_panicked().await;
            claim.send(&mut client, Message::Error("the response body panicked".into())).await;
            return;
        };
        let frame = frame.map(|frame| frame.map_err(Into::<BoxError>::into));
        match frame {
            Some(Ok(frame)) => {
                recorder.push(&frame);
                if frame.is_trailers() || body.is_end_stream() || recorder.reached_declared_length() {
                    let retry = claim.finish(&recorder, &recorder.chunks).await;
                    claim.send(&mut client, Message::Frame(frame)).await;
                    claim.send(&mut client, Message::End).await;
                    claim.settle_later(retry).await;
                    return;
                }
                claim.send(&mut client, Message::Frame(frame)).await;
            }
            None => {
                let retry = claim.finish(&recorder, &recorder.chunks).await;
                claim.send(&mut client, Message::End).await;
                claim.settle_later(retry).await;
                return;
            }
            Some(Err(error)) => {
                let retry = claim.fail().await;
                claim.send(&mut client, Message::Error(error)).await;
                claim.settle_later(retry).await;
                return;
            }
        }
    }
}

pin_project_lite::pin_project! {
    /// An execution's task: the inner service's future, run while its
    /// claim's lease is renewed and with its panics caught, then `then` with
    /// its output and the claim. Written out by hand so that the inner
    /// service's future, the largest part of an execution, is held once and
    /// is gone before what follows it starts.
    #[project = ExecutingProj]
    enum Executing<F, St: Store, T, R> {
        Calling {
            #[pin]
            future: F,
            renewal: Option<Renewal>,
            // The claim and `then`, taken once when `future` is over.
            next: Option<(Execution<St>, T)>,
        },
        Then {
            #[pin]
            rest: R,
        },
    }
}

impl<F, St, T, R> Future for Executing<F, St, T, R>
where
    F: Future,
    St: Store,
    T: FnOnce(Result<F::Output, Panic>, Execution<St>) -> R,
    R: Future<Output = ()>,
{
    type Output = ();

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            match self.as_mut().project() {
                ExecutingProj::Calling { future, renewal, next } => {
                    // Only reached once, after which `next` is taken.
                    let Some((claim, _)) = next.as_mut() else { return Poll::Ready(()) };
                    // The renewals too: a panic in either is caught.
                    let polled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        claim.poll_alive(future, renewal, cx)
                    }));
                    let output = match polled {
                        Ok(Poll::Pending) => return Poll::Pending,
                        Ok(Poll::Ready(output)) => Ok(output),
                        Err(panic) => Err(panic),
                    };
                    let Some((claim, then)) = next.take() else { return Poll::Ready(()) };
                    let rest = then(output, claim);
                    self.set(Executing::Then { rest });
                }
                ExecutingProj::Then { rest } => return rest.poll(cx),
            }
        }
    }
}

pin_project_lite::pin_project! {
    /// Runs a future, turning a panic while it is polled into an `Err`.
    struct CatchUnwind<F> {
        #[pin]
        future: F,
    }
}

impl<F: Future> Future for CatchUnwind<F> {
    type Output = Result<F::Output, Panic>;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let future = self.project().future;
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| future.poll(cx))) {
            Ok(polled) => polled.map(Ok),
            Err(panic) => Poll::Ready(Err(panic)),
        }
    }
}

/// A claim on its way to the store. If it is dropped unfinished (the client
/// went away, or the store timeout fired) it finishes on its own task, and
/// gives the key back if it got it: a claim that lands after its request
/// is gone would otherwise hold the key for a whole lease, and every retry
/// would get 409.
struct PendingClaim<St: Store> {
    claim: Option<crate::future::BoxFuture<Result<Claim, StoreError>>>,
    config: Arc<Config<St>>,
    id: RecordId,
}

impl<St: Store> PendingClaim<St> {
    fn new(config: &Arc<Config<St>>, request: ClaimRequest) -> Self {
        let owned = config.clone();
        let claim = Box::pin(async move { owned.store.claim(request).await });
        Self { claim: Some(claim), config: config.clone(), id: request.id() }
    }
}

impl<St: Store> Future for PendingClaim<St> {
    type Output = Result<Claim, StoreError>;

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let Some(claim) = self.claim.as_mut() else { return Poll::Ready(Err(StoreError::unavailable("polled twice"))) };
        let output = std::task::ready!(claim.as_mut().poll(cx));
        self.claim = None;
        Poll::Ready(output)
    }
}

impl<St: Store> Drop for PendingClaim<St> {
    fn drop(&mut self) {
        let Some(claim) = self.claim.take() else { return };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        let (config, id) = (self.config.clone(), self.id);
        runtime.spawn(async move {
            if let Ok(Claim::Acquired(lease)) = claim.await {
                tracing::debug!(key = %id, "releasing a claim its request no longer waits for");
                config.release(&id, lease.owner()).await;
            }
        });
    }
}

/// The status a response counts as for the storage rule: its `grpc-status`
/// when it has one (a trailers-only gRPC response), else its HTTP status.
fn effective_status(status: StatusCode, headers: &HeaderMap) -> StatusCode {
    headers.get("grpc-status").and_then(|value| value.to_str().ok()?.parse().ok()).map_or(status, grpc_to_http)
}

/// A claim held by a running execution: renews its lease while the inner
/// service runs, and releases it if dropped unsettled (a panic).
struct Execution<St: Store> {
    config: Arc<Config<St>>,
    id: RecordId,
    owner: OwnerToken,
    fingerprint: Fingerprint,
    settled: bool,
    renew_at: Instant,
    renew_until: Instant,
    /// Until when the claim surely holds: its lease from the claim or the
    /// last renewal that the store acknowledged.
    held_until: Instant,
}

impl<St: Store> Execution<St> {
    fn new(config: Arc<Config<St>>, id: RecordId, owner: OwnerToken, fingerprint: Fingerprint) -> Self {
        let now = Instant::now();
        let renew_at = now + config.lease / 3;
        // A renewal at `t` holds the key until `t + lease`: stop renewing
        // where that would pass the ceiling.
        let renew_until = now + config.lease_ceiling.saturating_sub(config.lease);
        let held_until = now + config.lease;
        Self { config, id, owner, fingerprint, settled: false, renew_at, renew_until, held_until }
    }

    /// Runs `future` while renewing the lease.
    fn alive<F: Future>(&mut self, future: F) -> Alive<'_, St, F> {
        Alive { claim: self, future, renewal: None }
    }

    /// Polls `future`, and while it is pending moves the lease's renewals
    /// on: what [`Alive`] and [`Executing`] do on each poll.
    fn poll_alive<F: Future>(
        &mut self,
        future: std::pin::Pin<&mut F>,
        renewal: &mut Option<Renewal>,
        cx: &mut Context<'_>,
    ) -> Poll<F::Output> {
        let polled = future.poll(cx);
        if polled.is_pending() {
            self.keep_alive(renewal, cx);
        }
        polled
    }

    /// Moves the lease's renewals on: sleeps until the next one is due,
    /// sends it, and takes its answer. Returns when it has to wait, or when
    /// no renewal is left (the ceiling reached, or the key lost).
    fn keep_alive(&mut self, renewal: &mut Option<Renewal>, cx: &mut Context<'_>) {
        loop {
            match renewal {
                None if self.renew_at > self.renew_until => return,
                // Boxed, like every store call off a request's usual path:
                // held inline, a timer and a store call's future would make
                // every execution's future larger, and each is moved as it
                // starts.
                None => *renewal = Some(Renewal::Sleeping(Box::pin(tokio::time::sleep_until(self.renew_at)))),
                Some(Renewal::Sleeping(sleep)) => {
                    if sleep.as_mut().poll(cx).is_pending() {
                        return;
                    }
                    let (config, id, owner) = (self.config.clone(), self.id, self.owner);
                    let call = Box::pin(async move {
                        with_timeout(config.store_timeout, config.store.renew(&id, owner, config.lease)).await
                    });
                    *renewal = Some(Renewal::Renewing { sent: Instant::now(), call });
                }
                Some(Renewal::Renewing { sent, call }) => {
                    let Poll::Ready(renewed) = call.as_mut().poll(cx) else { return };
                    let period = self.config.lease / 3;
                    match renewed {
                        Ok(()) => self.held_until = *sent + self.config.lease,
                        Err(error) => {
                            self.config.store_failed(&self.id, "renew", &error);
                            if matches!(error, StoreError::NotOwner) {
                                // Another request owns the key: renew no more.
                                self.renew_until = self.renew_at;
                            }
                        }
                    }
                    self.renew_at += period;
                    *renewal = None;
                }
            }
        }
    }

    async fn send(&mut self, client: &mut Option<mpsc::Sender<Message>>, message: Message) {
        if let Some(sender) = client
            && self.alive(sender.send(message)).await.is_err()
        {
            // The client went away: keep recording without it.
            *client = None;
        }
    }

    /// Settles a body that ended cleanly: a `grpc-status` in its trailers
    /// meets the storage rule again, now that it is known.
    async fn finish(&mut self, recorder: &Recorder, body: &[Bytes]) -> Option<Record> {
        if let Some(status) = recorder.trailer_status()
            && !self.config.keeps(recorder.verdict, status)
        {
            self.release().await;
            return None;
        }
        let fingerprint = self.fingerprint;
        self.settle(|| recorder.record(fingerprint, body)).await
    }

    /// Settles a body that failed midway: the request ran, so its key must
    /// never run again, but there is no response to replay.
    async fn fail(&mut self) -> Option<Record> {
        let fingerprint = self.fingerprint;
        self.settle(|| Record::not_stored(fingerprint, NotStored::BodyFailed)).await
    }

    async fn body_panicked(&mut self) {
        tracing::error!(key = %self.id, "the response body panicked: its idempotency key is released");
        self.release().await;
    }

    async fn release(&mut self) {
        self.settled = true;
        Box::pin(self.config.release(&self.id, self.owner)).await;
    }

    /// Completes the claim with the record `record` makes. Returns the
    /// record again when the store failed in a way worth retrying after the
    /// client has its answer: made twice then, so that the store keeps the
    /// only handle to it otherwise (a shared handle costs the store a
    /// reference count, 32 bytes a record).
    async fn settle(&mut self, record: impl Fn() -> Record) -> Option<Record> {
        self.settled = true;
        match self.complete(record()).await {
            Ok(()) => None,
            Err(StoreError::Full) => {
                let marker = Record::not_stored(self.fingerprint, NotStored::StoreFull);
                if let Err(error) = Box::pin(self.complete(marker)).await {
                    self.config.store_failed(&self.id, "complete", &error);
                }
                None
            }
            Err(error @ StoreError::NotOwner) => {
                self.config.store_failed(&self.id, "complete", &error);
                None
            }
            Err(error) => {
                self.config.store_failed(&self.id, "complete", &error);
                Some(record())
            }
        }
    }

    /// Retries a failed completion, backing off from 100 ms to 2 s, for as
    /// long as the claim surely holds: a store that comes back (a restarted
    /// Redis that kept its data) within the lease still gets the outcome,
    /// and a retry of the request gets the replay instead of a second run.
    async fn settle_later(&mut self, record: Option<Record>) {
        if let Some(record) = record {
            Box::pin(self.retry_completion(record)).await;
        }
    }

    async fn retry_completion(&mut self, record: Record) {
        let mut backoff = Duration::from_millis(100);
        loop {
            let at = Instant::now() + backoff;
            if at >= self.held_until {
                tracing::error!(key = %self.id, "the store stayed down for the whole lease: the outcome is lost");
                return;
            }
            tokio::time::sleep_until(at).await;
            match self.complete(record.clone()).await {
                Ok(()) => return,
                Err(error) => {
                    self.config.store_failed(&self.id, "complete", &error);
                    if matches!(error, StoreError::NotOwner) {
                        return;
                    }
                }
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    /// A plain function, not an `async fn`, so the record is held once.
    fn complete(&self, record: Record) -> impl Future<Output = Result<(), StoreError>> + '_ {
        let config = &self.config;
        with_timeout(config.store_timeout, config.store.complete(&self.id, self.owner, record, config.retention))
    }
}

impl<St: Store> Drop for Execution<St> {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        // Unwinding from a panic in the inner service or its body, or the
        // runtime shutting down under the task.
        tracing::warn!(key = %self.id, "execution ended before its response: releasing the idempotency key");
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        let (config, id, owner) = (self.config.clone(), self.id, self.owner);
        runtime.spawn(async move { config.release(&id, owner).await });
    }
}

/// The state of a lease's next renewal, kept by [`Alive`] and [`Executing`].
enum Renewal {
    /// Waiting until it is due.
    Sleeping(std::pin::Pin<Box<tokio::time::Sleep>>),
    /// Sent at `sent`, its answer not in yet.
    Renewing { sent: Instant, call: crate::future::BoxFuture<Result<(), StoreError>> },
}

pin_project_lite::pin_project! {
    /// A future run while its claim's lease is renewed; made by
    /// [`Execution::alive`].
    ///
    /// Written out by hand rather than as an `async fn`: that would hold
    /// the future twice (its argument and the pinned copy of it) beside a
    /// renewal loop's state, and the inner service's future is the largest
    /// part of an execution. Nothing is armed until the future is found
    /// pending: a handler that answers at once never touches a timer.
    struct Alive<'a, St: Store, F> {
        claim: &'a mut Execution<St>,
        #[pin]
        future: F,
        renewal: Option<Renewal>,
    }
}

impl<St: Store, F: Future> Future for Alive<'_, St, F> {
    type Output = F::Output;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        this.claim.poll_alive(this.future, this.renewal, cx)
    }
}

/// Keeps a copy of the response as it streams, up to the storage cap.
struct Recorder {
    status: StatusCode,
    /// The end-to-end headers, already in the record's encoding.
    headers: HeaderSection,
    verdict: Option<StoreResponse>,
    chunks: Vec<Bytes>,
    len: usize,
    limit: usize,
    too_large: bool,
    /// Boxed: trailers are rare, and the recorder is part of every
    /// execution's task.
    trailers: Option<Box<HeaderMap>>,
    declared_length: Option<u64>,
    seen: u64,
}

impl Recorder {
    fn new(parts: &http::response::Parts, limit: usize, verdict: Option<StoreResponse>) -> Self {
        // A body that may still send trailers is not over at its last byte.
        let may_have_trailers = parts.headers.contains_key(header::TRAILER) || is_grpc(&parts.headers);
        let declared_length = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .filter(|_| !may_have_trailers)
            .and_then(|value| value.to_str().ok()?.parse().ok());
        Self {
            status: parts.status,
            headers: end_to_end(&parts.headers),
            verdict,
            chunks: Vec::new(),
            len: 0,
            limit,
            too_large: false,
            trailers: None,
            declared_length,
            seen: 0,
        }
    }

    /// Records a frame whose data the caller keeps.
    fn observe(&mut self, frame: &Frame<Bytes>) {
        if let Some(data) = frame.data_ref() {
            self.seen += data.len() as u64;
            if self.too_large {
                return;
            }
            self.len += data.len();
            if self.len > self.limit {
                self.too_large = true;
                self.chunks = Vec::new();
            }
        } else if let Some(trailers) = frame.trailers_ref() {
            self.trailers = Some(Box::new(trailers.clone()));
        }
    }

    /// Records a frame, keeping its data.
    fn push(&mut self, frame: &Frame<Bytes>) {
        self.observe(frame);
        if let Some(data) = frame.data_ref()
            && !self.too_large
            && !data.is_empty()
        {
            self.chunks.push(data.clone());
        }
    }

    /// Keeps the data of the frames [`Recorder::observe`] saw, once the
    /// body streams and they go to the client.
    fn adopt(&mut self, early: &VecDeque<Bytes>) {
        if !self.too_large {
            self.chunks.extend(early.iter().filter(|data| !data.is_empty()).cloned());
        }
    }

    /// Whether the body has sent all the bytes its `content-length` declared:
    /// the client considers the response complete at that point.
    fn reached_declared_length(&self) -> bool {
        self.declared_length == Some(self.seen)
    }

    /// The record of the response whose body is `body`, written in one
    /// buffer.
    fn record(&self, fingerprint: Fingerprint, body: &[Bytes]) -> Record {
        if self.too_large {
            return Record::not_stored(fingerprint, NotStored::TooLarge);
        }
        Record::recorded(fingerprint, self.status, &self.headers, self.trailers.as_deref(), body)
    }

    /// The `grpc-status` of the trailers, as an HTTP status.
    fn trailer_status(&self) -> Option<StatusCode> {
        let trailers = self.trailers.as_deref()?;
        trailers.get("grpc-status")?;
        Some(effective_status(StatusCode::OK, trailers))
    }
}

/// `headers` without the hop-by-hop ones, which belong to one connection
/// and must not be replayed on another, encoded for the record.
fn end_to_end(headers: &HeaderMap) -> HeaderSection {
    const HOP_BY_HOP: [&str; 8] = [
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "transfer-encoding",
        "upgrade",
    ];
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|name| HeaderName::try_from(name.trim()).ok())
        .collect();
    HeaderSection::of(headers, |name| !HOP_BY_HOP.contains(&name.as_str()) && !listed.contains(name))
}

/// The `Location` for the `Accepted` policy: `{key}` replaced by the key,
/// percent-encoded but for unreserved characters.
fn status_location(template: &str, key: &IdempotencyKey) -> Option<HeaderValue> {
    let mut encoded = String::with_capacity(key.as_str().len());
    for b in key.as_str().bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            encoded.push(char::from(b));
        } else {
            encoded.push_str(&format!("%{b:02X}"));
        }
    }
    HeaderValue::try_from(template.replace("{key}", &encoded)).ok()
}

/// Buffers the request body up to `limit` bytes, refusing larger ones before
/// reading them when their length is declared.
async fn read_body<B>(body: B, limit: usize) -> Result<(Bytes, Option<HeaderMap>), RejectionKind>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    if body.size_hint().lower() > limit as u64 {
        return Err(RejectionKind::BodyTooLarge);
    }
    let mut body = pin!(Limited::new(body, limit));
    // A body in one chunk (the common case) is kept as it came; more are
    // joined into one buffer.
    let (mut first, mut joined) = (Bytes::new(), BytesMut::new());
    let mut trailers: Option<HeaderMap> = None;
    while let Some(frame) = body.frame().await {
        let frame = match frame {
            Ok(frame) => frame,
            Err(error) if error.is::<LengthLimitError>() => return Err(RejectionKind::BodyTooLarge),
            Err(_) => return Err(RejectionKind::InvalidBody),
        };
        match frame.into_data() {
            Ok(data) if first.is_empty() && joined.is_empty() => first = data,
            Ok(data) => {
                if joined.is_empty() {
                    joined.reserve(first.len() + data.len());
                    joined.extend_from_slice(&std::mem::take(&mut first));
                }
                joined.extend_from_slice(&data);
            }
            Err(frame) => {
                if let Ok(more) = frame.into_trailers() {
                    trailers.get_or_insert_with(HeaderMap::new).extend(more);
                }
            }
        }
    }
    let body = if joined.is_empty() { first } else { joined.freeze() };
    Ok((body, trailers))
}

#[cfg(test)]
mod tests {
    use tower_layer::Layer;

    use super::*;

    /// glibc's malloc serves requests up to this size from a per-thread
    /// cache; larger ones take its slower, locked paths (`_int_malloc`,
    /// `malloc_consolidate`), seen in profiles of the end-to-end bench.
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
        let guarded = Guarded { config: config.clone(), grpc: false };
        let run = guarded.run(service.inner.clone(), parts, body, key).instrument(tracing::Span::none());

        let fingerprint = Fingerprint::from_bytes([2; 32]);
        let claim = Execution::new(config, RecordId::from_bytes([1; 32]), OwnerToken::from_u128(1), fingerprint);
        let (answer, _answered) = oneshot::channel();
        let mut inner = service.inner.clone();
        let request = Request::post("/").body(RequestBody::inner(axum::body::Body::empty())).unwrap();
        let called: Result<_, Panic> = Ok(inner.call(request));
        let task = execute_detached(called, claim, answer).instrument(tracing::Span::none());
        (std::mem::size_of_val(&run), std::mem::size_of_val(&task))
    }

    #[tokio::test]
    async fn what_a_guarded_request_boxes_fits_in_mallocs_thread_cache() {
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
