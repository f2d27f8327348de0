//! `Wait` duplicates: one `LISTEN` connection per store, woken by the
//! `NOTIFY` that a completion or release sends only when a duplicate marked
//! the record as waited for.

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

/// The waiting duplicates of this process, by record.
#[derive(Default)]
pub(super) struct Waiters {
    by_record: Mutex<HashMap<RecordId, Arc<Notify>>>,
    /// Set once the listening connection has run `LISTEN`.
    listening: OnceCell<()>,
}

impl Waiters {
    /// Makes sure this store listens on `channel`, starting the listening
    /// task the first time; an error when it cannot connect.
    pub(super) async fn listen(self: &Arc<Self>, pool: &PgPool, channel: &str) -> Result<(), sqlx::Error> {
        self.listening
            .get_or_try_init(|| async {
                let mut listener = PgListener::connect_with(pool).await?;
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

    /// Forgets `id`'s signal once no waiter holds it.
    pub(super) fn done(&self, id: &RecordId, signal: Arc<Notify>) {
        let mut by_record = self.by_record.lock().unwrap_or_else(|poison| poison.into_inner());
        // The map's handle and this one: no other waiter.
        if Arc::strong_count(&signal) <= 2 {
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
