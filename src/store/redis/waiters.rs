//! `Wait` duplicates: one blocking wait per record in this process, on the
//! record's wake queue, that the other waiters of the record watch.

use std::{collections::HashMap, sync::Mutex, time::Duration};

use redis::Value;
use tokio::sync::watch;

use super::{RedisStore, Replicate, keys::KeyKind, pool::RedisPool, script::WAIT};
use crate::{RecordId, store::StoreError};

/// The longest a waiter blocks in one `BLPOP`, below the connection's
/// 500 ms response timeout.
const BLOCK: Duration = Duration::from_millis(200);

/// The blocking waits of this process, by record.
#[derive(Default)]
pub(super) struct Waiters(Mutex<HashMap<RecordId, watch::Receiver<()>>>);

impl Waiters {
    /// Returns when the record `id` of `store` may have left the in-flight
    /// state, or after `timeout`: joins the blocking wait another request of
    /// this process already runs for the record, or starts one.
    pub(super) async fn wait<P: RedisPool>(&self, store: &RedisStore<P>, id: &RecordId, timeout: Duration) {
        let (mut woken, leader) = {
            let mut waits = self.0.lock().unwrap_or_else(|poison| poison.into_inner());
            match waits.get(id) {
                Some(receiver) if receiver.has_changed().is_ok() => (receiver.clone(), None),
                _ => {
                    let (sender, receiver) = watch::channel(());
                    waits.insert(*id, receiver.clone());
                    (receiver, Some(sender))
                }
            }
        };
        let Some(wake) = leader else {
            let _ = tokio::time::timeout(timeout, woken.changed()).await;
            return;
        };
        // However this wait ends (woken, timed out, or dropped with its
        // request), the record's entry goes and its followers are woken.
        let _leader = Leader { waiters: self, id: *id, wake };
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let now = tokio::time::Instant::now();
            if now >= deadline {
                break;
            }
            let block = BLOCK.min(deadline - now);
            // Boxed: see BENCHMARKS.md, "Future sizes".
            match Box::pin(block_once(store, id, block)).await {
                Ok(true) => break,
                Ok(false) => {}
                // A failing store: let the caller's claim find out.
                Err(_) => break,
            }
        }
    }
}

/// The one blocking wait of a record in this process.
struct Leader<'a> {
    waiters: &'a Waiters,
    id: RecordId,
    wake: watch::Sender<()>,
}

impl Drop for Leader<'_> {
    fn drop(&mut self) {
        self.waiters.0.lock().unwrap_or_else(|poison| poison.into_inner()).remove(&self.id);
        let _ = self.wake.send(());
    }
}

/// Registers as a waiter and blocks for at most `block` on the record's
/// queue. True when the record left the in-flight state.
async fn block_once<P: RedisPool>(store: &RedisStore<P>, id: &RecordId, block: Duration) -> Result<bool, StoreError> {
    let record = store.key(id, KeyKind::Record);
    match store.script(&WAIT, &[record], &[], Replicate::Never).await?.0 {
        Value::Int(1) => {}
        // Already completed, released or expired.
        _ => return Ok(true),
    }
    // BLPOP blocks its connection: a pooled one, not the shared one.
    let mut connection = store.pool().connection().await?;
    let seconds = format!("{:.3}", block.as_secs_f64());
    let popped: Option<(String, String)> = redis::cmd("BLPOP")
        .arg(record.sibling(KeyKind::Queue))
        .arg(seconds)
        .query_async(&mut connection)
        .await
        .map_err(StoreError::unavailable)?;
    Ok(popped.is_some())
}
