use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use http::Response;
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

use crate::{ResponseBody, store::StoreError};

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

pin_project! {
    /// Runs a future for at most a timeout; made by [`within`].
    ///
    /// Written out by hand rather than as an `async fn`: an `async fn`
    /// keeps its argument and its pinned copy of it both in its state, so
    /// the wrapped future (a store call, kilobytes on some stores) would be
    /// held, and moved, two or three times over.
    pub(crate) struct Within<F> {
        #[pin]
        future: F,
        timeout: Duration,
        #[pin]
        timer: Timer,
    }
}

pin_project! {
    #[project = TimerProj]
    enum Timer {
        /// Not armed; `started` is when the future was first found pending.
        Unarmed { started: Option<Instant> },
        /// Boxed: a timer is armed only for a call still pending after a
        /// yield, and held inline it would make every store call's future
        /// (and every future around one) 112 bytes larger.
        Armed { sleep: Pin<Box<Sleep>> },
    }
}

/// Runs `future` for at most `timeout`; `None` when it ran out.
///
/// The timer is armed only if the future is still pending when its task
/// runs a second time (it yields once to make sure it does): a future that
/// is ready at once (a memory store call) or as soon as the connection's
/// task has run again (a request body already in the connection's buffer)
/// never touches it, nor reads the clock. Arming a timer in an empty timer
/// wheel wakes the thread that sleeps on it, which costs more than the rest
/// of a request. The timeout counts from the first poll.
pub(crate) fn within<F: Future>(timeout: Duration, future: F) -> Within<F> {
    Within { future, timeout, timer: Timer::Unarmed { started: None } }
}

impl<F: Future> Future for Within<F> {
    type Output = Option<F::Output>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        if let Poll::Ready(output) = this.future.poll(cx) {
            return Poll::Ready(Some(output));
        }
        if let TimerProj::Unarmed { started } = this.timer.as_mut().project() {
            let Some(started) = *started else {
                // First found pending: start the clock and yield once.
                *started = Some(Instant::now());
                cx.waker().wake_by_ref();
                return Poll::Pending;
            };
            this.timer.set(Timer::Armed { sleep: Box::pin(tokio::time::sleep_until(started + *this.timeout)) });
        }
        match this.timer.project() {
            TimerProj::Armed { sleep } => sleep.as_mut().poll(cx).map(|()| None),
            // Armed just above.
            TimerProj::Unarmed { .. } => Poll::Pending,
        }
    }
}

pin_project! {
    /// A store call under a timeout; made by [`with_timeout`].
    pub(crate) struct WithTimeout<F> {
        #[pin]
        within: Within<F>,
    }
}

/// Runs a store call under `timeout` (see [`within`]): a call that runs out
/// fails with [`StoreError::Timeout`].
pub(crate) fn with_timeout<T, F>(timeout: Duration, call: F) -> WithTimeout<F>
where
    F: Future<Output = Result<T, StoreError>>,
{
    WithTimeout { within: within(timeout, call) }
}

impl<T, F> Future for WithTimeout<F>
where
    F: Future<Output = Result<T, StoreError>>,
{
    type Output = Result<T, StoreError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let within = self.project().within;
        let timeout = within.timeout;
        within.poll(cx).map(|output| output.unwrap_or(Err(StoreError::Timeout(timeout))))
    }
}
