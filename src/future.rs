//! The response future of [`crate::Idempotency`].

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use http::Response;
use pin_project_lite::pin_project;

use crate::ResponseBody;

pub(crate) type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

pin_project! {
    /// The response future of [`crate::Idempotency`].
    ///
    /// # Example
    /// ```
    /// use tower_idempotency::{Idempotency, ResponseFuture};
    ///
    /// // It is the `Future` type of the service:
    /// fn _named<F, B, E>(_: ResponseFuture<F, B, E>) {}
    /// ```
    pub struct ResponseFuture<F, B, E> {
        #[pin]
        kind: Kind<F, B, E>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F, B, E> {
        Inner { #[pin] future: F },
        Ready { response: Option<Response<ResponseBody<B>>> },
        Guarded { future: BoxFuture<Result<Response<ResponseBody<B>>, E>> },
    }
}

impl<F, B, E> ResponseFuture<F, B, E> {
    pub(crate) fn inner(future: F) -> Self {
        Self { kind: Kind::Inner { future } }
    }

    pub(crate) fn ready(response: Response<ResponseBody<B>>) -> Self {
        Self { kind: Kind::Ready { response: Some(response) } }
    }

    pub(crate) fn guarded(future: BoxFuture<Result<Response<ResponseBody<B>>, E>>) -> Self {
        Self { kind: Kind::Guarded { future } }
    }
}

impl<F, B, E> Future for ResponseFuture<F, B, E>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<ResponseBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Inner { future } => future.poll(cx).map_ok(|response| response.map(ResponseBody::inner)),
            KindProj::Ready { response } => {
                Poll::Ready(Ok(response.take().expect("ResponseFuture polled after completion")))
            }
            KindProj::Guarded { future } => future.as_mut().poll(cx),
        }
    }
}
