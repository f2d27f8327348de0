//! Store calls and request bodies under a timeout, with a timer armed only
//! when one is still pending after a yield.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

use crate::store::StoreError;

pin_project! {
    /// Runs a future for at most a timeout; made by [`within`]. Written by
    /// hand: see BENCHMARKS.md, "Future sizes".
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
        /// Boxed: see BENCHMARKS.md, "Future sizes".
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
