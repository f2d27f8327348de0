//! The plain store's `Wait` duplicates: one `LISTEN` connection per store,
//! woken by the `NOTIFY` that a completion or release sends only when a
//! duplicate marked the record as waited for; or, where no session of its
//! own can listen (behind a transaction pooler without a direct URL),
//! polling.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, Weak},
    time::Duration,
};

use sqlx::{PgPool, postgres::PgListener};
use tokio::sync::{Notify, OnceCell};

use crate::RecordId;

/// The longest one wait lasts: a notification lost while the listening
/// connection reconnects costs a waiter this much, and no more.
pub(super) const LONGEST_WAIT: Duration = Duration::from_secs(1);
/// How often a polling waiter claims again.
const POLL_EVERY: Duration = Duration::from_millis(100);
/// A pause between claims while the listening connection cannot be had.
const RETRY_LISTENING: Duration = Duration::from_millis(50);

/// Where the listening connection comes from.
#[derive(Clone)]
enum Source {
    /// A connection of the store's pool.
    Pool,
    /// A connection of its own, to this URL (straight to the database, past
    /// a transaction pooler).
    Url(String),
    /// None: waiters poll.
    Polling,
}

/// The waiting duplicates of this process, by record.
pub(super) struct Waiters {
    source: Source,
    by_record: Mutex<HashMap<RecordId, Arc<Notify>>>,
    /// Set once the listening connection has run `LISTEN`.
    listening: OnceCell<()>,
}

impl Waiters {
    fn from(source: Source) -> Self {
        Self { source, by_record: Mutex::default(), listening: OnceCell::new() }
    }

    /// Listening on a connection of the store's pool.
    pub(super) fn direct() -> Self {
        Self::from(Source::Pool)
    }

    /// Listening on a connection to `url`.
    pub(super) fn at(url: &str) -> Self {
        Self::from(Source::Url(url.to_owned()))
    }

    /// Polling.
    pub(super) fn polling() -> Self {
        Self::from(Source::Polling)
    }

    /// Waiters of their own that listen the same way.
    pub(super) fn same_source(&self) -> Self {
        Self::from(self.source.clone())
    }

    /// How long a waiter pauses before it claims again, when it cannot
    /// listen.
    pub(super) fn poll_every(&self) -> Duration {
        match self.source {
            Source::Polling => POLL_EVERY,
            Source::Pool | Source::Url(_) => RETRY_LISTENING,
        }
    }

    /// Makes sure this store listens on `channel`, starting the listening
    /// task the first time; an error when it cannot connect, or polls.
    pub(super) async fn listen(self: &Arc<Self>, pool: &PgPool, channel: &str) -> Result<(), sqlx::Error> {
        self.listening
            .get_or_try_init(|| async {
                let mut listener = match &self.source {
                    Source::Pool => PgListener::connect_with(pool).await?,
                    Source::Url(url) => PgListener::connect(url).await?,
                    Source::Polling => return Err(sqlx::Error::Configuration("this store polls".into())),
                };
                listener.listen(channel).await?;
                tokio::spawn(forward(listener, Arc::downgrade(self)));
                Ok(())
            })
            .await
            .map(drop)
    }

    /// The signal for `id`, shared by this process's waiters of the record.
    pub(super) fn signal(&self, id: &RecordId) -> Arc<Notify> {
        let mut by_record = self.by_record.lock().unwrap_or_else(|poison| poison.into_inner());
        by_record.entry(*id).or_default().clone()
    }

    /// Lets go of a waiter's `signal`, and forgets `id`'s once no waiter
    /// holds it. The caller's handle goes under the lock: counted after it,
    /// two waiters leaving at once could each see the other and both keep it.
    pub(super) fn done(&self, id: &RecordId, signal: Arc<Notify>) {
        let mut by_record = self.by_record.lock().unwrap_or_else(|poison| poison.into_inner());
        drop(signal);
        if by_record.get(id).is_some_and(|kept| Arc::strong_count(kept) == 1) {
            by_record.remove(id);
        }
    }

    fn wake(&self, id: Option<&RecordId>) {
        let by_record = self.by_record.lock().unwrap_or_else(|poison| poison.into_inner());
        match id {
            Some(id) => by_record.get(id).into_iter().for_each(|signal| signal.notify_waiters()),
            None => by_record.values().for_each(|signal| signal.notify_waiters()),
        }
    }

    #[cfg(test)]
    fn records(&self) -> usize {
        self.by_record.lock().unwrap_or_else(|poison| poison.into_inner()).len()
    }
}

/// Wakes the waiters of each record a notification names, for as long as
/// the store lives. When the connection fails, every waiter is woken (to
/// claim again), and `PgListener` reconnects.
async fn forward(mut listener: PgListener, waiters: Weak<Waiters>) {
    loop {
        let received = listener.recv().await;
        let Some(waiters) = waiters.upgrade() else { return };
        match received {
            Ok(notification) => waiters.wake(record_id(notification.payload()).as_ref()),
            Err(error) => {
                tracing::warn!(%error, "the idempotency store's LISTEN connection failed; reconnecting");
                waiters.wake(None);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// The record id a notification's payload names, in hex.
fn record_id(payload: &str) -> Option<RecordId> {
    let digits = payload.as_bytes();
    if digits.len() != 64 {
        return None;
    }
    let mut bytes = [0; 32];
    for (byte, pair) in bytes.iter_mut().zip(digits.chunks(2)) {
        let hex = std::str::from_utf8(pair).ok()?;
        *byte = u8::from_str_radix(hex, 16).ok()?;
    }
    Some(RecordId::from_bytes(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waiters_that_leave_together_leave_no_signal_behind() {
        let waiters = Arc::new(Waiters::direct());
        let id = RecordId::from_bytes([1; 32]);
        for _ in 0..200 {
            let start = Arc::new(std::sync::Barrier::new(2));
            let leaving: Vec<_> = (0..2)
                .map(|_| {
                    let (waiters, start, signal) = (waiters.clone(), start.clone(), waiters.signal(&id));
                    std::thread::spawn(move || {
                        start.wait();
                        waiters.done(&id, signal);
                    })
                })
                .collect();
            leaving.into_iter().for_each(|thread| thread.join().unwrap());
            assert_eq!(waiters.records(), 0, "a signal outlived its waiters");
        }
    }

    #[test]
    fn a_waiter_that_leaves_first_keeps_the_signal_for_the_other() {
        let waiters = Waiters::direct();
        let id = RecordId::from_bytes([2; 32]);
        let (first, second) = (waiters.signal(&id), waiters.signal(&id));
        waiters.done(&id, first);
        assert_eq!(waiters.records(), 1);
        waiters.done(&id, second);
        assert_eq!(waiters.records(), 0);
    }
}
