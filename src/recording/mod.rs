//! The recording task: runs the inner service's future under its held
//! claim, records the response while it streams to the client, and
//! completes or releases the claim. It runs to the end even when the client
//! has gone.

mod commit;

use std::{
    future::{Future, poll_fn},
    panic::AssertUnwindSafe,
    pin::{Pin, pin},
    sync::Arc,
    task::{Context, Poll},
};

use bytes::Bytes;
use futures_util::FutureExt as _;
use http::{HeaderMap, HeaderName, Response, StatusCode, header};
use http_body::{Body, Frame};
use http_body_util::BodyExt as _;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};

use crate::{
    BoxError, Fingerprint, NotStored, Record, ResponseBody, StoreResponse,
    body::Chunks,
    claim::HeldClaim,
    future::BoxFuture,
    policy::{GRPC_STATUS, effective_status, is_grpc, is_stored},
    record::HeaderSection,
    store::Store,
};

/// Frames a slow client may leave unread once the claim is settled; before
/// that the recording task never waits for the client.
const STREAM_BUFFER: usize = 4;
/// How much of a body that is ready at once is gathered before the head is
/// sent; past this the body streams, however fast it comes.
const EAGER_LIMIT: usize = 64 * 1024;

/// What the recording task sends to the client-facing body.
pub(crate) enum Message {
    /// A frame, and what it holds of the client's pace: its permit goes back
    /// when the client has taken the frame.
    Frame(Frame<Bytes>, Option<OwnedSemaphorePermit>),
    Error(BoxError),
    End,
}

/// Where the recording task sends the response's head (or the inner
/// service's error) to the request waiting for it.
pub(crate) type Answer<ResB, E> = oneshot::Sender<Result<Response<ResponseBody<ResB>>, E>>;

pub(crate) type Panic = Box<dyn std::any::Any + Send>;

type FrameResult = Result<Frame<Bytes>, BoxError>;

/// The recording task, polled inline by its request: dropped unfinished
/// (the head is answered but the body still streams, or the request was
/// dropped), it goes on on a spawned task.
pub(crate) struct DetachOnDrop(pub(crate) Option<BoxFuture<()>>);

impl Drop for DetachOnDrop {
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

/// The recording task of one execution: the inner service's future
/// (`called`, or the panic its `call` raised) run while the claim's lease
/// is renewed, then [`record_response`].
pub(crate) fn recording_task<F, St, ResB, E>(
    called: Result<F, Panic>,
    claim: HeldClaim<St>,
    answer: Answer<ResB, E>,
) -> impl Future<Output = ()>
where
    F: Future<Output = Result<Response<ResB>, E>>,
    St: Store,
    ResB: Body<Data = Bytes>,
    ResB::Error: Into<BoxError>,
{
    let then = move |called, claim| record_response(called, claim, answer);
    match called {
        Ok(future) => RecordingTask::Calling { future, next: Some((claim, then)) },
        Err(panic) => RecordingTask::Recording { rest: then(Err(panic), claim) },
    }
}

pin_project_lite::pin_project! {
    /// A recording task's states: the inner service's future, run while its
    /// claim's lease is renewed and with its panics caught, then `then` with
    /// its output and the claim. Written by hand so that the inner service's
    /// future is held once and is gone before what follows starts (see
    /// BENCHMARKS.md, "Future sizes").
    #[project = RecordingTaskProj]
    enum RecordingTask<F, St: Store, T, R> {
        Calling {
            #[pin]
            future: F,
            // The claim and `then`, taken once when `future` is over.
            next: Option<(HeldClaim<St>, T)>,
        },
        Recording {
            #[pin]
            rest: R,
        },
    }
}

impl<F, St, T, R> Future for RecordingTask<F, St, T, R>
where
    F: Future,
    St: Store,
    T: FnOnce(Result<F::Output, Panic>, HeldClaim<St>) -> R,
    R: Future<Output = ()>,
{
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            match self.as_mut().project() {
                RecordingTaskProj::Calling { future, next } => {
                    // Only reached once, after which `next` is taken.
                    let Some((claim, _)) = next.as_mut() else { return Poll::Ready(()) };
                    // The renewals too: a panic in either is caught.
                    let polled = std::panic::catch_unwind(AssertUnwindSafe(|| claim.poll_renewing(future, cx)));
                    let output = match polled {
                        Ok(Poll::Pending) => return Poll::Pending,
                        Ok(Poll::Ready(output)) => Ok(output),
                        Err(panic) => Err(panic),
                    };
                    let Some((claim, then)) = next.take() else { return Poll::Ready(()) };
                    let rest = then(output, claim);
                    self.set(RecordingTask::Recording { rest });
                }
                RecordingTaskProj::Recording { rest } => return rest.poll(cx),
            }
        }
    }
}

/// What an execution does once the inner service's future is over:
/// `called` is its output, or its panic. Not an `async fn`: see
/// BENCHMARKS.md, "Future sizes".
#[allow(clippy::manual_async_fn, reason = "an `async fn` would hold each argument twice")]
fn record_response<St, ResB, E>(
    called: Result<Result<Response<ResB>, E>, Panic>,
    mut claim: HeldClaim<St>,
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
        if !is_stored(&*claim.config.store_if, verdict, effective_status(parts.status, &parts.headers)) {
            claim.release().await;
            let _ = answer.send(Ok(Response::from_parts(parts, ResponseBody::inner(body))));
            return;
        }
        if claim.config.store.commits_handler_writes() {
            // Boxed: see BENCHMARKS.md, "Future sizes".
            Box::pin(commit::commit_then_answer(claim, body, parts, verdict, answer)).await;
            return;
        }
        let mut recorder = Recorder::new(&parts, claim.config.response_limit, verdict);
        let mut body = pin!(body);

        // Take what the body has ready without waiting: a body that is complete
        // at once is stored before the client sees it, and sent in one piece.
        let mut early = Chunks::default();
        let mut early_len = 0;
        let mut ended = false;
        while early_len <= EAGER_LIMIT {
            let polled: Result<Poll<Option<FrameResult>>, _> =
                AssertUnwindSafe(poll_fn(|cx| Poll::Ready(body.as_mut().poll_frame(cx).map_err(Into::into))))
                    .catch_unwind()
                    .await;
            // A panic is a body error: the handler ran, so it never runs again.
            let polled = polled.unwrap_or_else(|_| Poll::Ready(Some(Err(body_panicked()))));
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
                    // Boxed: see BENCHMARKS.md, "Future sizes".
                    let unsaved = Box::pin(claim.complete_failed_body()).await;
                    let (client, frames) = mpsc::unbounded_channel();
                    let _ = client.send(Message::Error(error));
                    let _ = answer.send(Ok(Response::from_parts(parts, ResponseBody::streamed(early, frames))));
                    claim.retry_completion(unsaved).await;
                    return;
                }
            }
        }
        if ended {
            // The body finished without ever waiting.
            // Boxed: see BENCHMARKS.md, "Future sizes".
            let unsaved = Box::pin(recorder.finish(&mut claim, early.make_contiguous())).await;
            let trailers = recorder.trailers.as_deref().cloned();
            let _ = answer.send(Ok(Response::from_parts(parts, ResponseBody::buffered(early, trailers))));
            claim.retry_completion(unsaved).await;
            return;
        }

        // The body streams. Boxed: see BENCHMARKS.md, "Future sizes".
        Box::pin(stream(&mut claim, body, recorder, early, parts, answer)).await;
    }
}

fn body_panicked() -> BoxError {
    tracing::error!("the response body panicked: its key is recorded as run, with no response to replay");
    "the response body panicked".into()
}

/// Records a body that streams: sends the head and what came so far, then
/// each frame as it comes. The end reaches the client only once the record
/// is settled, so a client that has the whole response and sends the same
/// key again gets the replay, never a 409. Until the claim is settled the
/// task never waits for the client (what it has not read is also in the
/// record's copy), so a client that stops reading cannot hold the key in
/// flight; past the storage cap the claim is settled at once, as not
/// stored, and from there the client sets the pace.
async fn stream<St, ResB, E>(
    claim: &mut HeldClaim<St>,
    mut body: Pin<&mut ResB>,
    mut recorder: Recorder,
    early: Chunks,
    parts: http::response::Parts,
    answer: Answer<ResB, E>,
) where
    St: Store,
    ResB: Body<Data = Bytes>,
    ResB::Error: Into<BoxError>,
{
    let (frames, client_frames) = mpsc::unbounded_channel();
    recorder.adopt(&early);
    let head = Response::from_parts(parts, ResponseBody::streamed(early, client_frames));
    let mut client = Client { frames: answer.send(Ok(head)).is_ok().then_some(frames), pace: None };
    // A completion that failed, retried once the client has the end.
    let mut unsaved = None;
    // The frame that brought the body to its declared length, held back
    // until the body ends: trailers may still follow.
    let mut last_bytes = None;
    loop {
        // Renewals stop by themselves once the claim is settled.
        let frame = match AssertUnwindSafe(claim.while_renewing(body.frame())).catch_unwind().await {
            Ok(frame) => frame.map(|frame| frame.map_err(Into::<BoxError>::into)),
            Err(_panic) => Some(Err(body_panicked())),
        };
        match frame {
            Some(Ok(frame)) => {
                recorder.push(&frame);
                let ended = frame.is_trailers() || body.is_end_stream();
                if !ended && last_bytes.is_none() && recorder.reached_declared_length() {
                    last_bytes = Some(frame);
                    continue;
                }
                if ended {
                    if client.pace.is_none() {
                        unsaved = recorder.finish(claim, &recorder.chunks).await;
                    }
                    client.send_all([last_bytes.take(), Some(frame)]).await;
                    client.put(Message::End);
                    break;
                }
                if recorder.too_large && client.pace.is_none() {
                    let fingerprint = claim.fingerprint;
                    unsaved = claim.complete_with(|| Record::not_stored(fingerprint, NotStored::TooLarge)).await;
                    client.pace = Some(Arc::new(Semaphore::new(STREAM_BUFFER)));
                }
                client.send_all([last_bytes.take(), Some(frame)]).await;
            }
            None => {
                if client.pace.is_none() {
                    unsaved = recorder.finish(claim, &recorder.chunks).await;
                }
                client.send_all([last_bytes.take()]).await;
                client.put(Message::End);
                break;
            }
            Some(Err(error)) => {
                if client.pace.is_none() {
                    unsaved = claim.complete_failed_body().await;
                }
                client.put(Message::Error(error));
                break;
            }
        }
    }
    claim.retry_completion(unsaved).await;
}

/// The client's side of a streamed response, as the recording task sees it.
struct Client {
    /// `None` once the client went away: recording goes on without it.
    frames: Option<mpsc::UnboundedSender<Message>>,
    /// Set once the claim is settled: from then on, frames wait for the
    /// client to take those before them.
    pace: Option<Arc<Semaphore>>,
}

impl Client {
    /// Sends each frame, at the client's pace once there is one.
    async fn send_all<const N: usize>(&mut self, frames: [Option<Frame<Bytes>>; N]) {
        for frame in frames.into_iter().flatten() {
            let permit = match (&self.pace, &self.frames) {
                (Some(pace), Some(_)) => pace.clone().acquire_owned().await.ok(),
                _ => None,
            };
            self.put(Message::Frame(frame, permit));
        }
    }

    /// Sends `message` without waiting; a client that went away is
    /// forgotten.
    fn put(&mut self, message: Message) {
        if let Some(frames) = &self.frames
            && frames.send(message).is_err()
        {
            self.frames = None;
        }
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
    /// Boxed: see BENCHMARKS.md, "Future sizes".
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
    fn adopt(&mut self, early: &Chunks) {
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
    fn build_record(&self, fingerprint: Fingerprint, body: &[Bytes]) -> Record {
        if self.too_large {
            return Record::not_stored(fingerprint, NotStored::TooLarge);
        }
        Record::recorded(fingerprint, self.status, &self.headers, self.trailers.as_deref(), body)
    }

    /// The `grpc-status` of the trailers, as an HTTP status.
    fn trailer_status(&self) -> Option<StatusCode> {
        let trailers = self.trailers.as_deref()?;
        trailers.get(GRPC_STATUS)?;
        Some(effective_status(StatusCode::OK, trailers))
    }

    /// Settles the claim of a body that ended cleanly with `body`: a
    /// `grpc-status` in its trailers meets the storage rule again, now that
    /// it is known. Returns a record whose completion failed, to retry.
    async fn finish<St: Store>(&self, claim: &mut HeldClaim<St>, body: &[Bytes]) -> Option<Record> {
        if let Some(status) = self.trailer_status()
            && !is_stored(&*claim.config.store_if, self.verdict, status)
        {
            claim.release().await;
            return None;
        }
        let fingerprint = claim.fingerprint;
        claim.complete_with(|| self.build_record(fingerprint, body)).await
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
