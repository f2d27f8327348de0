//! Redis and Redis Cluster stores, on [`deadpool_redis`].
//!
//! Each record is one Redis string under a name derived from its
//! [`RecordId`]: `{prefix}{tag}:{32 hex digits}` (128 bits of the id's
//! SHA-256: collisions are out of reach in practice, and each record's name
//! is 32 bytes shorter than with all 256). The value is either an
//! in-flight claim (`F`, the 16-byte owner, the 32-byte fingerprint, a
//! one-byte count of waiters) or the completed [`Record`]'s compact
//! encoding, body as raw bytes.
//!
//! A claim runs no script: it is one transaction written at once, `MULTI`,
//! `INCR` of the fencing counter, `SET record <in-flight value> NX GET PX
//! <lease>`, `EXEC`. The `SET`'s reply is nil when it acquired, else the
//! value found (a replay or an in-flight answer); the `INCR` runs either way
//! (tokens only need to grow). So the in-flight value cannot carry the token:
//! its owner alone knows it, and a lookup reports none. A claim that needs
//! no fencing token
//! ([`IdempotencyLayer::with_fencing_tokens`](crate::IdempotencyLayer::with_fencing_tokens))
//! is the `SET` alone. A `Rerun` take-over of a completed record (rare) is a
//! script that writes the token into the value.
//!
//! Complete, release and renew are each one Lua script, sent with `EVALSHA`
//! (and `EVAL` when a server's script cache was flushed), that checks the
//! owner before it changes anything. Where the server takes `SET … IFEQ`
//! (Valkey 8.1 and later, Redis 8.4 and later), a completion is that one
//! command instead: the owner knows the in-flight value it wrote byte for
//! byte, so `IFEQ` is the owner check. When the value changed (a waiter
//! counted itself in it, the lease ran out) the script decides as before.
//! The first completion on a connection finds out whether the server takes
//! `IFEQ` (a server without it refuses the syntax and changes nothing);
//! after a refusal the store sends scripts until it reconnects. A server
//! older than 7.0 (by the `redis_version` of its `INFO`, read on every new
//! connection) refuses `SET … NX GET`: claims there run the claim script. Leases and retention are Redis
//! TTLs: a dead process's claim frees itself with no sweeper.
//!
//! Fencing tokens come from one `INCR` counter per hash slot,
//! `{prefix}{tag}:fence`, so they grow with every claim of a record across
//! releases and expired leases while costing nothing per record. The `{tag}`
//! hashtag puts a record, its counter and its waiter list in one slot, so
//! every script and transaction works unchanged on Redis Cluster. (A Redis
//! that loses its data restarts the counters: keep persistence on if you
//! rely on fencing tokens across a data loss.)
//!
//! Round trips: a first execution costs two (claim, complete) when it ends
//! within a third of its lease, a replay one, an in-flight duplicate one.
//! Every call but the blocking wait goes over one multiplexed connection
//! that the store's clones share; redis-rs writes the calls it finds queued
//! together in one system call, and reads their replies together.
//! With [`RedisStore::with_replicas`], claims that acquire and completions
//! also wait for replicas (`WAIT`), on a connection of their own so that a
//! lagging replica holds up no other call: a completion in the same round
//! trip on a single Redis (one more on a cluster), a claim in one more once
//! its reply says it wrote. Replays and in-flight answers wait for nothing.
//!
//! `Wait` duplicates block on a short per-record list (`BLPOP`, at most
//! 200 ms a call, under the client's 500 ms response timeout) that a
//! completion or release fills only when waiters registered (counted in the
//! in-flight value, so a completion without waiters reads nothing more);
//! several waiters of one record in one process share one such call. A wake
//! left unused expires within a second; if the record is claimed again
//! before that, a waiter may wake early, and simply claims and waits again.

mod keys;
mod pool;
mod script;
mod value;
mod waiters;
mod without_scripts;

use std::{
    collections::HashMap,
    fmt,
    sync::{Arc, Mutex, PoisonError, atomic::Ordering},
    time::Duration,
};

use bytes::Bytes;
use redis::{Cmd, ErrorKind, ServerErrorKind, Value};

use self::{
    keys::{Key, KeyKind},
    pool::{CLAIMS_SCRIPT, CLAIMS_UNKNOWN, RedisResult, Replicate, Replicated, Request, SharedConnection},
    script::{CLAIM, COMPLETE, RELEASE, RENEW, Script},
    value::{IN_FLIGHT, found, parse_in_flight},
    waiters::Waiters,
};
use super::{Claim, ClaimRequest, Lease, OwnerToken, OwnerTokens, RecordState, Store, StoreError};
use crate::{FencingToken, Record, RecordId};

pub use self::pool::RedisPool;
pub use deadpool_redis;

/// A store on Redis: one Redis through [`deadpool_redis::Pool`], or a Redis
/// Cluster through [`deadpool_redis::cluster::Pool`] ([`RedisClusterStore`]).
///
/// Several application instances sharing one Redis replay each other's
/// records; records survive application restarts. See the [module
/// documentation](self) for the key layout and round trips.
///
/// # Example
/// ```no_run
/// use tower_idempotency::{IdempotencyLayer, store::redis::{RedisStore, deadpool_redis}};
///
/// let pool = deadpool_redis::Config::from_url("redis://127.0.0.1:6379")
///     .create_pool(Some(deadpool_redis::Runtime::Tokio1))
///     .unwrap();
/// let store = RedisStore::new(pool).with_prefix("shop:idem:");
/// let layer = IdempotencyLayer::new(store);
/// # drop(layer);
/// ```
pub struct RedisStore<P: RedisPool = deadpool_redis::Pool> {
    pool: P,
    inner: Arc<Inner>,
    connection: SharedConnection<P>,
}

/// A [`RedisStore`] on a Redis Cluster.
pub type RedisClusterStore = RedisStore<deadpool_redis::cluster::Pool>;

struct Inner {
    prefix: String,
    replicas: Option<(u32, Duration)>,
    owners: OwnerTokens,
    waiters: Waiters,
    /// The token each in-flight value of this store's claims carries (`None`
    /// but for a scripted take-over), by owner, while the server may take
    /// `SET … IFEQ`: with it a completion knows its in-flight value byte for
    /// byte.
    tokens: Mutex<HashMap<OwnerToken, Option<u64>>>,
}

const IFEQ_UNKNOWN: u8 = 0;
const IFEQ_YES: u8 = 1;
const IFEQ_NO: u8 = 2;
/// Claims in flight whose tokens a store keeps at most.
const MAX_REMEMBERED_TOKENS: usize = 100_000;

impl Inner {
    fn with(prefix: String, replicas: Option<(u32, Duration)>) -> Self {
        Self { prefix, replicas, owners: OwnerTokens::new(), waiters: Waiters::default(), tokens: Mutex::default() }
    }

    fn tokens(&self) -> std::sync::MutexGuard<'_, HashMap<OwnerToken, Option<u64>>> {
        // Inserts and removals never leave the map half-changed.
        self.tokens.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The token kept for a claim of `owner`, no longer kept: `None` when
    /// none was (the server takes no `IFEQ`, or it was forgotten).
    fn take_token(&self, owner: OwnerToken, ifeq: bool) -> Option<Option<u64>> {
        if !ifeq {
            return None;
        }
        self.tokens().remove(&owner)
    }

    /// Keeps the token of a claim of `owner` for its completion's `IFEQ`,
    /// while the server may take it.
    fn remember_token(&self, owner: OwnerToken, token: Option<u64>, ifeq: bool) {
        if !ifeq {
            return;
        }
        let mut tokens = self.tokens();
        // Claims never settled (the Store API used directly, then dropped)
        // cannot grow it without bound: a forgotten token only costs its
        // completion the script.
        if tokens.len() >= MAX_REMEMBERED_TOKENS {
            tokens.clear();
        }
        tokens.insert(owner, token);
    }
}

impl<P: RedisPool> Clone for RedisStore<P> {
    fn clone(&self) -> Self {
        Self { pool: self.pool.clone(), inner: self.inner.clone(), connection: self.connection.clone() }
    }
}

impl<P: RedisPool> fmt::Debug for RedisStore<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.inner.prefix)
            .field("replicas", &self.inner.replicas)
            .finish_non_exhaustive()
    }
}

impl<P: RedisPool> RedisStore<P> {
    /// A store on `pool`, with key prefix `idem:`.
    ///
    /// # Example
    /// ```
    /// use tower_idempotency::store::redis::{RedisStore, deadpool_redis};
    ///
    /// let pool = deadpool_redis::Config::from_url("redis://127.0.0.1:6379")
    ///     .create_pool(Some(deadpool_redis::Runtime::Tokio1))
    ///     .unwrap();
    /// let store = RedisStore::new(pool);
    /// # drop(store);
    /// ```
    pub fn new(pool: P) -> Self {
        Self { pool, inner: Arc::new(Inner::with("idem:".to_owned(), None)), connection: SharedConnection::default() }
    }

    fn update(mut self, f: impl FnOnce(&mut Inner)) -> Self {
        match Arc::get_mut(&mut self.inner) {
            Some(inner) => f(inner),
            None => {
                // A nonce of its own: sharing one with the store it was
                // copied from, with a count of its own, would hand out the
                // same owner tokens twice.
                let mut inner = Inner::with(self.inner.prefix.clone(), self.inner.replicas);
                f(&mut inner);
                self.inner = Arc::new(inner);
            }
        }
        self
    }

    /// The prefix of every Redis key the store writes (default `idem:`).
    ///
    /// # Example
    /// ```
    /// # use tower_idempotency::store::redis::{RedisStore, deadpool_redis};
    /// # let pool = deadpool_redis::Config::from_url("redis://127.0.0.1:6379").create_pool(Some(deadpool_redis::Runtime::Tokio1)).unwrap();
    /// let store = RedisStore::new(pool).with_prefix("payments:idem:");
    /// # drop(store);
    /// ```
    pub fn with_prefix(self, prefix: &str) -> Self {
        let prefix = prefix.to_owned();
        self.update(|inner| inner.prefix = prefix)
    }

    /// After each claim that acquires and each completion, wait up to
    /// `timeout` for `replicas` replicas to acknowledge it (`WAIT`, on a
    /// connection of its own: other calls never queue behind it). When fewer
    /// do, the call fails with [`StoreError::NotReplicated`]: a claim is
    /// given up again first, so nothing runs on a claim a failover could
    /// lose, and the layer takes its store-failure path; a completion is
    /// written, and the layer waits for the replicas again (the same record
    /// completed again is no stale owner) for as long as the claim could
    /// have been held.
    ///
    /// What it changes on failover (a primary lost, a replica promoted):
    /// without it, a record the primary acknowledged but had not yet
    /// replicated is lost with the primary, and the client's retry runs the
    /// request a second time. With it, every claim and every replayed
    /// response the client saw is on `replicas` replicas first; a lagging
    /// replica makes requests fail (503 when failing closed) instead of
    /// risking a second execution. (`WAIT` is not consensus: a promoted
    /// replica that was not among those that acknowledged can still lack a
    /// record. Promote the most up-to-date replica, as Sentinel and Cluster
    /// do.)
    ///
    /// # Example
    /// ```
    /// # use std::time::Duration;
    /// # use tower_idempotency::store::redis::{RedisStore, deadpool_redis};
    /// # let pool = deadpool_redis::Config::from_url("redis://127.0.0.1:6379").create_pool(Some(deadpool_redis::Runtime::Tokio1)).unwrap();
    /// let store = RedisStore::new(pool).with_replicas(1, Duration::from_millis(100));
    /// # drop(store);
    /// ```
    pub fn with_replicas(self, replicas: u32, timeout: Duration) -> Self {
        self.update(|inner| inner.replicas = (replicas > 0).then_some((replicas, timeout)))
    }

    /// The pool the store runs on.
    ///
    /// # Example
    /// ```
    /// # use tower_idempotency::store::redis::{RedisStore, deadpool_redis};
    /// # let pool = deadpool_redis::Config::from_url("redis://127.0.0.1:6379").create_pool(Some(deadpool_redis::Runtime::Tokio1)).unwrap();
    /// let store = RedisStore::new(pool);
    /// assert_eq!(store.pool().status().size, 0);
    /// ```
    pub fn pool(&self) -> &P {
        &self.pool
    }

    /// The Redis key that holds the record `id`.
    ///
    /// # Example
    /// ```
    /// # use tower_idempotency::{RecordId, store::redis::{RedisStore, deadpool_redis}};
    /// # let pool = deadpool_redis::Config::from_url("redis://127.0.0.1:6379").create_pool(Some(deadpool_redis::Runtime::Tokio1)).unwrap();
    /// let store = RedisStore::new(pool);
    /// let key = store.record_key(&RecordId::from_bytes([0xab; 32]));
    /// assert!(key.starts_with("idem:{") && key.ends_with(&format!(":{}", "ab".repeat(16))));
    /// ```
    pub fn record_key(&self, id: &RecordId) -> String {
        self.key(id, KeyKind::Record).to_string()
    }

    fn key(&self, id: &RecordId, kind: KeyKind) -> Key<'_> {
        Key::new(&self.inner.prefix, id, kind)
    }

    /// Whether completions may try `SET … IFEQ` on the current connection.
    fn ifeq(&self) -> bool {
        self.connection.facts().ifeq.load(Ordering::Relaxed) != IFEQ_NO
    }

    /// Whether claims run the claim script (a server older than 7.0),
    /// connecting first if no connection has told yet.
    async fn claims_by_script(&self) -> Result<bool, StoreError> {
        if self.connection.facts().claims() == CLAIMS_UNKNOWN {
            self.connection.get(&self.pool).await?;
        }
        Ok(self.connection.facts().claims() == CLAIMS_SCRIPT)
    }

    fn next_owner(&self) -> OwnerToken {
        self.inner.owners.next()
    }

    /// Runs `script`: by its SHA-1, and in full when the server does not
    /// know it (first use, `SCRIPT FLUSH`, a restarted or new node). Returns
    /// its reply, and whether enough replicas took what it wrote (see
    /// [`command`](Self::command)).
    async fn script(
        &self,
        script: &Script,
        keys: &[Key<'_>],
        args: &[&[u8]],
        wait: Replicate,
    ) -> Result<(Value, Replicated), StoreError> {
        let (reply, replicated) = match self.command(script.invoke(true, keys, args), &keys[0], wait).await? {
            (Err(error), _) if error.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                self.command(script.invoke(false, keys, args), &keys[0], wait).await?
            }
            sent => sent,
        };
        Ok((reply.map_err(StoreError::unavailable)?, replicated))
    }

    /// Sends `cmd` about `key`. With replicas set by
    /// [`with_replicas`](Self::with_replicas) and `wait` asking for them,
    /// `WAIT`s for them after it on a connection of its own. Returns the
    /// command's own reply or error, and whether enough replicas
    /// acknowledged.
    async fn command(&self, cmd: Cmd, key: &Key<'_>, wait: Replicate) -> Result<(RedisResult, Replicated), StoreError> {
        self.send(Request::Command(cmd), key, wait).await
    }

    async fn send(
        &self,
        request: Request,
        key: &Key<'_>,
        wait: Replicate,
    ) -> Result<(RedisResult, Replicated), StoreError> {
        let wait = self.inner.replicas.and_then(|(replicas, timeout)| wait.wait(replicas, timeout));
        // Boxed: see BENCHMARKS.md, "Future sizes".
        Box::pin(self.connection.send(&self.pool, request, key, wait)).await
    }

    /// Runs an owner-checked script; 1 means done, 0 not the owner.
    async fn owned(
        &self,
        script: &Script,
        keys: &[Key<'_>],
        args: &[&[u8]],
        wait: Replicate,
    ) -> Result<(), StoreError> {
        match self.script(script, keys, args, wait).await? {
            (Value::Int(1), replicated) => replicated,
            (Value::Int(0), _) => Err(StoreError::NotOwner),
            (other, _) => Err(unexpected(&other)),
        }
    }
}

fn unexpected(value: &Value) -> StoreError {
    StoreError::unavailable(format!("unexpected reply from Redis: {value:?}"))
}

fn owner_bytes(owner: OwnerToken) -> [u8; 16] {
    owner.as_u128().to_be_bytes()
}

fn millis(duration: Duration) -> Vec<u8> {
    duration.as_millis().clamp(1, u128::from(u64::MAX)).to_string().into_bytes()
}

impl<P: RedisPool> Store for RedisStore<P> {
    async fn claim(&self, request: ClaimRequest) -> Result<Claim, StoreError> {
        let id = request.id();
        let owner = self.next_owner();
        if !request.replace_completed() && !self.claims_by_script().await? {
            // Boxed: see BENCHMARKS.md, "Future sizes".
            return Box::pin(self.claim_without_script(request, owner)).await;
        }
        let replace = if request.replace_completed() { &b"1"[..] } else { &b"0"[..] };
        let lease = millis(request.lease());
        // The fingerprint, then the in-flight value's waiter count: zero.
        let mut fingerprint = [0; 33];
        fingerprint[..32].copy_from_slice(request.fingerprint().as_bytes());
        let args: [&[u8]; 4] = [&owner_bytes(owner), &fingerprint, &lease, replace];
        let record = self.key(&id, KeyKind::Record);
        let claimed =
            self.script(&CLAIM, &[record, record.sibling(KeyKind::Fence)], &args, Replicate::IfAcquired).await;
        let (value, replicated) = match claimed {
            Ok(claimed) => claimed,
            Err(error) => {
                // The claim may have landed all the same, its reply lost:
                // give it back (owner-checked, so harmless if it did not).
                // Boxed: see BENCHMARKS.md, "Future sizes".
                let _ = Box::pin(self.release(&id, owner)).await;
                return Err(error);
            }
        };
        match value {
            Value::Int(token) => {
                let token = u64::try_from(token).map_err(|_| unexpected(&value))?;
                let lease = Lease::new(owner, FencingToken::new(token));
                self.inner.remember_token(owner, Some(token), self.ifeq());
                if let Err(error) = replicated {
                    // Not durable enough to run on: give the claim back.
                    // Boxed: see BENCHMARKS.md, "Future sizes".
                    let _ = Box::pin(self.release(&id, lease.owner())).await;
                    return Err(error);
                }
                Ok(Claim::Acquired(lease))
            }
            Value::BulkString(value) => found(value),
            other => Err(unexpected(&other)),
        }
    }

    async fn complete(
        &self,
        id: &RecordId,
        owner: OwnerToken,
        record: Record,
        retention: Duration,
    ) -> Result<(), StoreError> {
        let encoded = record.encode();
        let retention = millis(retention);
        let token = self.inner.take_token(owner, self.ifeq());
        if let Some(token) = token
            && let Some(done) = self.complete_if_equal(id, owner, token, &record, &encoded, &retention).await?
        {
            return done;
        }
        let owner = owner_bytes(owner);
        let args: [&[u8]; 3] = [&owner, &encoded, &retention];
        let record = self.key(id, KeyKind::Record);
        let keys = [record, record.sibling(KeyKind::Queue)];
        match self.script(&COMPLETE, &keys, &args, Replicate::Always).await? {
            (Value::Int(1), replicated) => replicated,
            // This very record is there: with replicas, a completion whose
            // WAIT failed, retried to wait again; otherwise a stale owner.
            (Value::Int(2), replicated) if self.inner.replicas.is_some() => replicated,
            (Value::Int(0 | 2), _) => Err(StoreError::NotOwner),
            (other, _) => Err(unexpected(&other)),
        }
    }

    async fn release(&self, id: &RecordId, owner: OwnerToken) -> Result<(), StoreError> {
        self.inner.take_token(owner, self.ifeq());
        let record = self.key(id, KeyKind::Record);
        let keys = [record, record.sibling(KeyKind::Queue)];
        self.owned(&RELEASE, &keys, &[&owner_bytes(owner)], Replicate::Never).await
    }

    async fn renew(&self, id: &RecordId, owner: OwnerToken, lease: Duration) -> Result<(), StoreError> {
        let key = self.key(id, KeyKind::Record);
        self.owned(&RENEW, &[key], &[&owner_bytes(owner), &millis(lease)], Replicate::Never).await
    }

    async fn lookup(&self, id: &RecordId) -> Result<Option<RecordState>, StoreError> {
        let key = self.key(id, KeyKind::Record);
        let mut get = Cmd::with_capacity(2, 3 + key.len());
        get.arg("GET").arg(key);
        let value = match self.command(get, &key, Replicate::Never).await?.0 {
            Ok(Value::Nil) => return Ok(None),
            Ok(Value::BulkString(value)) => value,
            Ok(other) => return Err(unexpected(&other)),
            Err(error) => return Err(StoreError::unavailable(error)),
        };
        if value.first() == Some(&IN_FLIGHT) {
            let (fingerprint, fencing_token) = parse_in_flight(&value)?;
            return Ok(Some(RecordState::InFlight { fingerprint: Some(fingerprint), fencing_token }));
        }
        Ok(Some(RecordState::Completed(Record::decode(Bytes::from(value))?)))
    }

    async fn wait(&self, request: &ClaimRequest, timeout: Duration) -> Result<(), StoreError> {
        self.inner.waiters.wait(self, &request.id(), timeout).await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Fingerprint;

    #[tokio::test]
    async fn a_store_and_a_changed_copy_never_share_owner_tokens() {
        let pool =
            deadpool_redis::Config::from_url("redis://127.0.0.1:1").create_pool(Some(deadpool_redis::Runtime::Tokio1));
        let store = RedisStore::new(pool.unwrap());
        let _held = store.clone(); // so the copy below cannot reuse `inner`
        let copy = store.clone().with_replicas(1, Duration::from_millis(10));
        let owners: std::collections::HashSet<_> =
            (0..4).flat_map(|_| [store.next_owner(), copy.next_owner()]).collect();
        assert_eq!(owners.len(), 8);
    }

    /// The sizes of the futures of a store's calls, and of what each call
    /// boxes to send its command.
    fn future_sizes<P: RedisPool>(store: &RedisStore<P>) -> [usize; 7] {
        let (id, owner, second) = (RecordId::from_bytes([1; 32]), store.next_owner(), Duration::from_secs(1));
        let fingerprint = Fingerprint::from_bytes([2; 32]);
        let record = Record::not_stored(fingerprint, crate::record::NotStored::TooLarge);
        [
            std::mem::size_of_val(&store.claim(ClaimRequest::new(id, fingerprint, second))),
            std::mem::size_of_val(&store.complete(&id, owner, record, second)),
            std::mem::size_of_val(&store.release(&id, owner)),
            std::mem::size_of_val(&store.renew(&id, owner, second)),
            std::mem::size_of_val(&store.lookup(&id)),
            std::mem::size_of_val(&store.wait(&ClaimRequest::new(id, fingerprint, second), second)),
            std::mem::size_of_val(&store.connection.send(
                &store.pool,
                Request::Command(redis::cmd("GET")),
                &store.key(&id, KeyKind::Record),
                None,
            )),
        ]
    }

    /// A check of future sizes (BENCHMARKS.md, "Future sizes"), outside the
    /// default test run: `.ci/run` runs it with `--ignored`.
    #[tokio::test]
    #[ignore = "a size check: .ci/run runs it with --ignored"]
    async fn future_sizes_of_store_calls_stay_small() {
        let single =
            deadpool_redis::Config::from_url("redis://127.0.0.1:1").create_pool(Some(deadpool_redis::Runtime::Tokio1));
        let sizes = future_sizes(&RedisStore::new(single.unwrap()));
        println!("single Redis: store call futures {sizes:?} B");
        assert!(sizes.iter().all(|&size| size <= 2048), "single Redis: future sizes {sizes:?}");
        let urls = vec!["redis://127.0.0.1:1".to_owned()];
        let cluster =
            deadpool_redis::cluster::Config::from_urls(urls).create_pool(Some(deadpool_redis::Runtime::Tokio1));
        let sizes = future_sizes(&RedisStore::new(cluster.unwrap()));
        println!("cluster: store call futures {sizes:?} B");
        assert!(sizes.iter().all(|&size| size <= 2048), "cluster: future sizes {sizes:?}");
    }

    #[tokio::test]
    async fn key_names_keep_their_layout() {
        // Records written by earlier versions must still be found.
        let pool =
            deadpool_redis::Config::from_url("redis://127.0.0.1:1").create_pool(Some(deadpool_redis::Runtime::Tokio1));
        let store = RedisStore::new(pool.unwrap());
        let id = RecordId::from_bytes([0x5a; 32]);
        let (tag, hex) = (keys::tag(&id), &id.to_hex()[..32]);
        let key = |kind| store.key(&id, kind).to_string();
        assert_eq!(key(KeyKind::Record), format!("idem:{{{tag}}}:{hex}"));
        assert_eq!(key(KeyKind::Fence), format!("idem:{{{tag}}}:fence"));
        assert_eq!(key(KeyKind::Queue), format!("idem:{{{tag}}}:{hex}:q"));
        assert_eq!(store.key(&id, KeyKind::Queue).len(), key(KeyKind::Queue).len());
        let mut cmd = Cmd::new();
        cmd.arg(store.key(&id, KeyKind::Queue));
        assert_eq!(cmd.args_iter().count(), 1, "a key is one argument");
    }
}
