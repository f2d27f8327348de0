//! The recording task for a store that commits the inner service's writes
//! with the record (the transactional PostgreSQL store): the response
//! reaches the client only once it is committed.

use std::{panic::AssertUnwindSafe, pin::pin, sync::Arc};

use bytes::Bytes;
use futures_util::FutureExt as _;
use http::Response;
use http_body::Body;
use http_body_util::BodyExt as _;
use tokio::sync::{Semaphore, mpsc};

use super::{Answer, Client, Message, Recorder, STREAM_BUFFER, body_panicked};
use crate::{
    BoxError, NotStored, Record, RejectionKind, ResponseBody, StoreResponse,
    body::Chunks,
    claim::HeldClaim,
    policy::{is_grpc, is_stored},
    store::{Store, StoreError},
};

/// Records a response for a store that commits the inner service's writes
/// with it: takes the body up to the storage cap, commits, and only then
/// answers, so a client never holds a response whose writes were not kept.
/// A body over the cap commits as not stored and streams on at the
/// client's pace; a body that fails commits as failed (the writes stand, the
/// key never runs again); a commit that fails answers
/// [`RejectionKind::NotCommitted`] instead, its claim given back.
pub(super) async fn commit_then_answer<St, ResB, E>(
    mut claim: HeldClaim<St>,
    body: ResB,
    parts: http::response::Parts,
    verdict: Option<StoreResponse>,
    answer: Answer<ResB, E>,
) where
    St: Store,
    ResB: Body<Data = Bytes>,
    ResB::Error: Into<BoxError>,
{
    let mut recorder = Recorder::new(&parts, claim.config.response_limit, verdict);
    let mut body = pin!(body);
    let mut taken = Chunks::default();
    let fingerprint = claim.fingerprint;
    let ended = loop {
        if recorder.too_large {
            break false;
        }
        let frame = match AssertUnwindSafe(claim.while_renewing(body.frame())).catch_unwind().await {
            Ok(frame) => frame.map(|frame| frame.map_err(Into::<BoxError>::into)),
            Err(_panic) => Some(Err(body_panicked())),
        };
        match frame {
            None => break true,
            Some(Ok(frame)) => {
                recorder.observe(&frame);
                match frame.into_data() {
                    Ok(data) => taken.push_back(data),
                    // Trailers end a body.
                    Err(_) => break true,
                }
            }
            Some(Err(error)) => {
                let failed = Record::not_stored(fingerprint, NotStored::BodyFailed);
                let response = match claim.commit(failed).await {
                    Ok(()) => {
                        let (client, frames) = mpsc::unbounded_channel();
                        let _ = client.send(Message::Error(error));
                        Response::from_parts(parts, ResponseBody::streamed(taken, frames))
                    }
                    Err(error) => not_committed(&claim, &parts, &error),
                };
                let _ = answer.send(Ok(response));
                return;
            }
        }
    };
    let record = if !ended {
        Record::not_stored(fingerprint, NotStored::TooLarge)
    } else if let Some(status) = recorder.trailer_status()
        && !is_stored(&*claim.config.store_if, recorder.verdict, status)
    {
        claim.release().await;
        let trailers = recorder.trailers.as_deref().cloned();
        let _ = answer.send(Ok(Response::from_parts(parts, ResponseBody::buffered(taken, trailers))));
        return;
    } else {
        recorder.build_record(fingerprint, taken.make_contiguous())
    };
    if let Err(error) = claim.commit(record).await {
        let _ = answer.send(Ok(not_committed(&claim, &parts, &error)));
        return;
    }
    if ended {
        let trailers = recorder.trailers.as_deref().cloned();
        let _ = answer.send(Ok(Response::from_parts(parts, ResponseBody::buffered(taken, trailers))));
        return;
    }
    // Over the cap and committed: the rest streams at the client's pace.
    let (frames, client_frames) = mpsc::unbounded_channel();
    let head = Response::from_parts(parts, ResponseBody::streamed(taken, client_frames));
    let frames = answer.send(Ok(head)).is_ok().then_some(frames);
    let mut client = Client { frames, pace: Some(Arc::new(Semaphore::new(STREAM_BUFFER))) };
    while client.frames.is_some() {
        let frame = match AssertUnwindSafe(body.frame()).catch_unwind().await {
            Ok(frame) => frame.map(|frame| frame.map_err(Into::<BoxError>::into)),
            Err(_panic) => Some(Err(body_panicked())),
        };
        let last = match frame {
            Some(Ok(frame)) => {
                client.send_all([Some(frame)]).await;
                continue;
            }
            None => Message::End,
            Some(Err(error)) => Message::Error(error),
        };
        client.put(last);
        break;
    }
}

/// The answer to a request whose commit failed, or whose outcome is
/// unknown, in its response's protocol.
fn not_committed<St, B>(
    claim: &HeldClaim<St>,
    parts: &http::response::Parts,
    error: &StoreError,
) -> Response<ResponseBody<B>>
where
    St: Store,
{
    let kind = match error {
        StoreError::OutcomeUnknown(_) => RejectionKind::CommitUnknown,
        _ => RejectionKind::NotCommitted,
    };
    claim.config.reject(kind, is_grpc(&parts.headers))
}
