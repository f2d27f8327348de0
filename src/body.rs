//! The request body the inner service reads and the response body the
//! client gets.

use std::{
    collections::VecDeque,
    pin::{Pin, pin},
    task::{Context, Poll, ready},
};

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use pin_project_lite::pin_project;
use tokio::sync::mpsc;

use crate::{RejectionKind, recording::Message};

/// A boxed error, as bodies and services in the tower ecosystem use.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

pin_project! {
    /// The request body the inner service sees: the original body for
    /// requests the layer passes through, the buffered body for guarded ones.
    ///
    /// # Example
    /// ```
    /// use http_body_util::BodyExt;
    /// use tower_idempotency::RequestBody;
    ///
    /// // Inner services read it like any other body.
    /// async fn read(body: RequestBody<String>) -> bytes::Bytes {
    ///     body.collect().await.unwrap().to_bytes()
    /// }
    /// # drop(read);
    /// ```
    pub struct RequestBody<B> {
        #[pin]
        kind: RequestKind<B>,
    }
}

pin_project! {
    #[project = RequestKindProj]
    enum RequestKind<B> {
        Buffered { data: Option<Bytes>, trailers: Option<HeaderMap> },
        Inner { #[pin] body: B },
    }
}

impl<B> RequestBody<B> {
    pub(crate) fn buffered(data: Bytes, trailers: Option<HeaderMap>) -> Self {
        let data = (!data.is_empty()).then_some(data);
        Self { kind: RequestKind::Buffered { data, trailers } }
    }

    pub(crate) fn inner(body: B) -> Self {
        Self { kind: RequestKind::Inner { body } }
    }
}

impl<B> Body for RequestBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project().kind.project() {
            RequestKindProj::Buffered { data, trailers } => {
                Poll::Ready(data.take().map(Frame::data).or_else(|| trailers.take().map(Frame::trailers)).map(Ok))
            }
            RequestKindProj::Inner { body } => body.poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            RequestKind::Buffered { data, trailers } => data.is_none() && trailers.is_none(),
            RequestKind::Inner { body } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            RequestKind::Buffered { data, .. } => SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64)),
            RequestKind::Inner { body } => body.size_hint(),
        }
    }
}

/// Buffers a request body up to `limit` bytes, refusing larger ones before
/// reading them when their length is declared.
pub(crate) async fn read_body<B>(body: B, limit: usize) -> Result<(Bytes, Option<HeaderMap>), RejectionKind>
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

pin_project! {
    /// The response body the client gets: the inner service's own body when
    /// nothing is recorded, bytes held in memory for replays and rejections,
    /// or frames streamed from the task that records them.
    ///
    /// # Example
    /// ```
    /// use http_body_util::BodyExt;
    /// use tower_idempotency::ResponseBody;
    ///
    /// async fn read(body: ResponseBody<axum::body::Body>) -> bytes::Bytes {
    ///     body.collect().await.unwrap().to_bytes()
    /// }
    /// # drop(read);
    /// ```
    pub struct ResponseBody<B> {
        #[pin]
        kind: ResponseKind<B>,
    }
}

pin_project! {
    #[project = ResponseKindProj]
    enum ResponseKind<B> {
        Inner { #[pin] body: B },
        Buffered { chunks: Chunks, trailers: Option<HeaderMap> },
        Streamed { chunks: Chunks, frames: mpsc::UnboundedReceiver<Message>, done: bool },
    }
}

/// A response's chunks in order, the first held inline: most bodies are one
/// chunk, and a queue of one is an allocation on every response.
#[derive(Default)]
pub(crate) struct Chunks {
    first: Option<Bytes>,
    rest: VecDeque<Bytes>,
}

impl Chunks {
    pub(crate) fn push_back(&mut self, chunk: Bytes) {
        if self.first.is_none() && self.rest.is_empty() {
            self.first = Some(chunk);
        } else {
            self.rest.push_back(chunk);
        }
    }

    fn pop_front(&mut self) -> Option<Bytes> {
        self.first.take().or_else(|| self.rest.pop_front())
    }

    fn is_empty(&self) -> bool {
        self.first.is_none() && self.rest.is_empty()
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = &Bytes> {
        self.first.iter().chain(&self.rest)
    }

    /// The chunks as one slice.
    pub(crate) fn make_contiguous(&mut self) -> &[Bytes] {
        if self.rest.is_empty() {
            return self.first.as_slice();
        }
        if let Some(first) = self.first.take() {
            self.rest.push_front(first);
        }
        self.rest.make_contiguous()
    }
}

impl<B> ResponseBody<B> {
    pub(crate) fn inner(body: B) -> Self {
        Self { kind: ResponseKind::Inner { body } }
    }

    pub(crate) fn buffered(chunks: Chunks, trailers: Option<HeaderMap>) -> Self {
        Self { kind: ResponseKind::Buffered { chunks, trailers } }
    }

    pub(crate) fn full(data: Bytes) -> Self {
        Self::with_trailers(data, None)
    }

    /// One body and its trailers, as a replay sends them.
    pub(crate) fn with_trailers(data: Bytes, trailers: Option<HeaderMap>) -> Self {
        let first = (!data.is_empty()).then_some(data);
        Self::buffered(Chunks { first, rest: VecDeque::new() }, trailers)
    }

    /// `chunks` first, then what arrives on `frames` until [`Message::End`].
    pub(crate) fn streamed(chunks: Chunks, frames: mpsc::UnboundedReceiver<Message>) -> Self {
        Self { kind: ResponseKind::Streamed { chunks, frames, done: false } }
    }
}

impl<B> Body for ResponseBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project().kind.project() {
            ResponseKindProj::Inner { body } => body.poll_frame(cx).map_err(Into::into),
            ResponseKindProj::Buffered { chunks, trailers } => Poll::Ready(
                chunks.pop_front().map(Frame::data).or_else(|| trailers.take().map(Frame::trailers)).map(Ok),
            ),
            ResponseKindProj::Streamed { chunks, frames, done } => {
                if let Some(chunk) = chunks.pop_front() {
                    return Poll::Ready(Some(Ok(Frame::data(chunk))));
                }
                if *done {
                    return Poll::Ready(None);
                }
                let message = ready!(frames.poll_recv(cx));
                Poll::Ready(match message {
                    // The permit goes back here: the client has the frame.
                    Some(Message::Frame(frame, _permit)) => Some(Ok(frame)),
                    Some(Message::Error(error)) => {
                        *done = true;
                        Some(Err(error))
                    }
                    Some(Message::End) => {
                        *done = true;
                        None
                    }
                    None => {
                        *done = true;
                        Some(Err("the response was aborted before it was complete".into()))
                    }
                })
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            ResponseKind::Inner { body } => body.is_end_stream(),
            ResponseKind::Buffered { chunks, trailers } => chunks.is_empty() && trailers.is_none(),
            ResponseKind::Streamed { chunks, done, .. } => chunks.is_empty() && *done,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            ResponseKind::Inner { body } => body.size_hint(),
            ResponseKind::Buffered { chunks, .. } => {
                SizeHint::with_exact(chunks.iter().map(|chunk| chunk.len() as u64).sum())
            }
            ResponseKind::Streamed { chunks, .. } => {
                let mut hint = SizeHint::new();
                hint.set_lower(chunks.iter().map(|chunk| chunk.len() as u64).sum());
                hint
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_keep_their_order_whichever_end_holds_them() {
        let mut chunks = Chunks::default();
        for chunk in ["a", "b"] {
            chunks.push_back(Bytes::from_static(chunk.as_bytes()));
        }
        assert_eq!(chunks.pop_front().as_deref(), Some(&b"a"[..]));
        chunks.push_back(Bytes::from_static(b"c"));
        assert_eq!(chunks.iter().map(|chunk| &chunk[..]).collect::<Vec<_>>(), [b"b", b"c"]);
        let mut one = Chunks::default();
        one.push_back(Bytes::from_static(b"x"));
        one.push_back(Bytes::from_static(b"y"));
        assert_eq!(one.make_contiguous(), [Bytes::from_static(b"x"), Bytes::from_static(b"y")]);
        assert_eq!(one.pop_front().as_deref(), Some(&b"x"[..]));
        assert!(!one.is_empty());
    }
}
