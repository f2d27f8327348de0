//! Redis and Redis Cluster stores, on [`deadpool_redis`].
//!
//! Each record is one Redis string under a name derived from its
//! [`RecordId`]: `{prefix}{tag}:{32 hex digits}` (128 bits of the id's
//! SHA-256: collisions are out of reach in practice, and each record's name
//! is 32 bytes shorter than with all 256). The value is either an
//! in-flight claim (`F`, the 16-byte owner, the 32-byte fingerprint, a
//! one-byte count of waiters, the fencing token in decimal) or the completed
//! [`Record`]'s compact encoding,
//! body as raw bytes. Claim, complete, release and renew are each one Lua
//! script, sent with `EVALSHA` (and `EVAL` when a server's script cache was
//! flushed), that checks the owner before it changes anything. Leases and
//! retention are Redis TTLs: a dead process's claim frees itself with no
//! sweeper.
//!
//! Fencing tokens come from one `INCR` counter per hash slot,
//! `{prefix}{tag}:fence`, so they grow with every claim of a record across
//! releases and expired leases while costing nothing per record. The `{tag}`
//! hashtag puts a record, its counter and its waiter list in one slot, so
//! every script works unchanged on Redis Cluster. (A Redis that loses its
//! data restarts the counters: keep persistence on if you rely on fencing
//! tokens across a data loss.)
//!
//! Round trips: a first execution costs two (claim, complete) when it ends
//! within a third of its lease, a replay one, an in-flight duplicate one.
//! Every call but the blocking wait goes over one multiplexed connection
//! that the store's clones share; redis-rs writes the calls it finds queued
//! together in one system call, and reads their replies together.
//! With [`RedisStore::with_replicas`], claims and completions also wait for
//! replicas (`WAIT`): in the same round trip on a single Redis, in one more
//! on a cluster.
//!
//! `Wait` duplicates block on a short per-record list (`BLPOP`, at most
//! 200 ms a call, under the client's 500 ms response timeout) that a
//! completion or release fills only when waiters registered (counted in the
//! in-flight value, so a completion without waiters reads nothing more);
//! several waiters of one record in one process share one such call. A wake
//! left unused expires within a second; if the record is claimed again
//! before that, a waiter may wake early, and simply claims and waits again.

use std::{
    collections::HashMap,
    fmt,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use redis::{Cmd, ErrorKind, RedisError, ServerErrorKind, Value, aio::ConnectionLike};
use tokio::sync::watch;

use super::{Claim, ClaimRequest, Lease, OwnerToken, RecordState, Store, StoreError};
use crate::{FencingToken, Fingerprint, IdempotencyLayer, Record, RecordId};

pub use deadpool_redis;

const IN_FLIGHT: u8 = b'F';
/// The longest a waiter blocks in one `BLPOP`, below the connection's
/// 500 ms response timeout.
const BLOCK: Duration = Duration::from_millis(200);

mod sealed {
    pub trait Sealed {}
    impl Sealed for deadpool_redis::Pool {}
    impl Sealed for deadpool_redis::cluster::Pool {}
}

/// A deadpool-redis pool the Redis store can run on: a single Redis
/// ([`deadpool_redis::Pool`]) or a Redis Cluster
/// ([`deadpool_redis::cluster::Pool`]).
///
/// # Example
/// ```
/// use tower_idempotency::store::redis::{RedisPool, deadpool_redis};
///
/// fn takes_any_pool<P: RedisPool>(_: P) {}
/// let pool = deadpool_redis::Config::from_url("redis://127.0.0.1:6379")
///     .create_pool(Some(deadpool_redis::Runtime::Tokio1))
///     .unwrap();
/// takes_any_pool(pool);
/// ```
pub trait RedisPool: sealed::Sealed + Clone + Send + Sync + 'static {
    /// A pooled connection, for calls that block.
    #[doc(hidden)]
    type Connection: ConnectionLike + Send;
    /// A multiplexed connection taken out of the pool and shared by clones.
    #[doc(hidden)]
    type Shared: ConnectionLike + Clone + Send + Sync + 'static;

    #[doc(hidden)]
    fn connection(&self) -> impl Future<Output = Result<Self::Connection, StoreError>> + Send;

    #[doc(hidden)]
    fn shared(&self) -> impl Future<Output = Result<Self::Shared, StoreError>> + Send;

    /// Sends `cmd` and, with `wait` (a `WAIT` and the key whose primary it
    /// must reach), waits for replicas to take the writes made so far.
    /// Returns the command's reply and, if it waited, how many replicas
    /// acknowledged.
    #[doc(hidden)]
    fn query(
        connection: &mut Self::Shared,
        cmd: Cmd,
        wait: Option<(Cmd, &str)>,
    ) -> impl Future<Output = (RedisResult, Option<Result<i64, RedisError>>)> + Send;
}

impl RedisPool for deadpool_redis::Pool {
    type Connection = deadpool_redis::Connection;
    type Shared = redis::aio::MultiplexedConnection;

    async fn connection(&self) -> Result<Self::Connection, StoreError> {
        self.get().await.map_err(StoreError::unavailable)
    }

    async fn shared(&self) -> Result<Self::Shared, StoreError> {
        Ok(deadpool_redis::Connection::take(self.connection().await?))
    }

    async fn query(
        connection: &mut Self::Shared,
        cmd: Cmd,
        wait: Option<(Cmd, &str)>,
    ) -> (RedisResult, Option<Result<i64, RedisError>>) {
        let Some((wait, _)) = wait else { return (cmd.query_async(connection).await, None) };
        // In one round trip: the connection writes a pipeline whole, and
        // `WAIT` counts every write this connection made before it.
        let mut pipeline = redis::pipe();
        pipeline.add_command(cmd).add_command(wait).ignore_errors();
        match pipeline.query_async::<Vec<Value>>(connection).await {
            Ok(replies) => {
                let mut replies = replies.into_iter();
                let reply = replies.next().unwrap_or(Value::Nil).extract_error();
                (reply, Some(replies.next().unwrap_or(Value::Nil).extract_error().and_then(acknowledged)))
            }
            Err(error) => (Err(error), None),
        }
    }
}

impl RedisPool for deadpool_redis::cluster::Pool {
    type Connection = deadpool_redis::cluster::Connection;
    type Shared = redis::cluster_async::ClusterConnection;

    async fn connection(&self) -> Result<Self::Connection, StoreError> {
        self.get().await.map_err(StoreError::unavailable)
    }

    async fn shared(&self) -> Result<Self::Shared, StoreError> {
        Ok(deadpool_redis::cluster::Connection::take(self.connection().await?))
    }

    async fn query(
        connection: &mut Self::Shared,
        cmd: Cmd,
        wait: Option<(Cmd, &str)>,
    ) -> (RedisResult, Option<Result<i64, RedisError>>) {
        use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
        let reply = cmd.query_async(connection).await;
        let Some((wait, key)) = wait.filter(|_| reply.is_ok()) else { return (reply, None) };
        // In a round trip of its own, to the primary that holds `key`.
        let route = Route::new(slot_of(key.as_bytes()), SlotAddr::Master);
        let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(route));
        (reply, Some(connection.route_command(wait, routing).await.and_then(acknowledged)))
    }
}

/// The number of replicas a `WAIT` reply says acknowledged.
fn acknowledged(value: Value) -> Result<i64, RedisError> {
    redis::from_redis_value(value).map_err(RedisError::from)
}

fn wait_cmd(replicas: u32, timeout: Duration) -> Cmd {
    let mut cmd = redis::cmd("WAIT");
    cmd.arg(replicas).arg(timeout.as_millis().max(1) as u64);
    cmd
}

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
    /// The multiplexed connection every non-blocking call shares: taking it
    /// out of the pool spares each call deadpool's health-check `PING`.
    shared: Arc<Mutex<Option<P::Shared>>>,
    /// Held while one call connects, so a burst of calls after a start or a
    /// failure makes one connection, not one each.
    connecting: Arc<tokio::sync::Mutex<()>>,
}

/// A [`RedisStore`] on a Redis Cluster.
pub type RedisClusterStore = RedisStore<deadpool_redis::cluster::Pool>;

struct Inner {
    prefix: String,
    replicas: Option<(u32, Duration)>,
    /// Makes owner tokens unique to this store instance (see
    /// [`RedisStore::next_owner`]).
    nonce: u64,
    /// Claims made so far, for owner tokens.
    claims: AtomicU64,
    /// One blocking wait per record in this process; others watch it.
    waits: Mutex<HashMap<RecordId, watch::Receiver<()>>>,
}

impl<P: RedisPool> Clone for RedisStore<P> {
    fn clone(&self) -> Self {
        Self {
            pool: self.pool.clone(),
            inner: self.inner.clone(),
            shared: self.shared.clone(),
            connecting: self.connecting.clone(),
        }
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
        Self {
            pool,
            inner: Arc::new(Inner {
                prefix: "idem:".to_owned(),
                replicas: None,
                nonce: fresh_nonce(),
                claims: AtomicU64::new(0),
                waits: Mutex::default(),
            }),
            shared: Arc::default(),
            connecting: Arc::default(),
        }
    }

    fn update(mut self, f: impl FnOnce(&mut Inner)) -> Self {
        match Arc::get_mut(&mut self.inner) {
            Some(inner) => f(inner),
            None => {
                let mut inner = Inner {
                    prefix: self.inner.prefix.clone(),
                    replicas: self.inner.replicas,
                    // A nonce of its own: sharing one with the store it was
                    // copied from, with a count of its own, would hand out
                    // the same owner tokens twice.
                    nonce: fresh_nonce(),
                    claims: AtomicU64::new(0),
                    waits: Mutex::default(),
                };
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

    /// After each claim and each completion, wait up to `timeout` for
    /// `replicas` replicas to acknowledge it (`WAIT`). When fewer do, the
    /// call fails, and the layer takes its store-failure path: a claim is
    /// given up again first, so nothing runs on a claim a failover could
    /// lose.
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

    fn key<'a>(&'a self, id: &RecordId, kind: KeyKind) -> Key<'a> {
        let mut hex = [0; 32];
        crate::key::write_hex(&mut hex, &id.as_bytes()[..16]);
        Key { prefix: &self.inner.prefix, tag: tag(id), hex, kind }
    }

    /// A new owner token: this store's random nonce, then a count of its
    /// claims, so no two claims anywhere share one.
    fn next_owner(&self) -> OwnerToken {
        let claim = self.inner.claims.fetch_add(1, Ordering::Relaxed);
        OwnerToken::from_u128((u128::from(self.inner.nonce) << 64) | u128::from(claim))
    }

    /// The shared connection, from the pool the first time and after a
    /// failure.
    async fn shared(&self) -> Result<P::Shared, StoreError> {
        match self.cached() {
            Some(connection) => Ok(connection),
            // Boxed: taking a connection from the pool is rare, and its
            // future (deadpool's, connecting included) is over 6 KB, which
            // every store call's future would otherwise be too.
            None => Box::pin(self.connect()).await,
        }
    }

    fn cached(&self) -> Option<P::Shared> {
        self.shared.lock().unwrap_or_else(|poison| poison.into_inner()).clone()
    }

    /// Takes the shared connection from the pool, one call at a time (see
    /// `connecting`).
    async fn connect(&self) -> Result<P::Shared, StoreError> {
        let _connecting = self.connecting.lock().await;
        if let Some(connection) = self.cached() {
            return Ok(connection);
        }
        let connection = self.pool.shared().await?;
        *self.shared.lock().unwrap_or_else(|poison| poison.into_inner()) = Some(connection.clone());
        Ok(connection)
    }

    /// Turns a Redis error into a store error, dropping the shared
    /// connection when the error says it is broken, so the next call
    /// connects again (after a Redis restart, say).
    fn failed(&self, error: RedisError) -> StoreError {
        if broken(&error) {
            *self.shared.lock().unwrap_or_else(|poison| poison.into_inner()) = None;
        }
        StoreError::unavailable(error)
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
        replicate: bool,
    ) -> Result<(Value, Replicated), StoreError> {
        let (reply, replicated) = match self.command(script.invoke(true, keys, args), &keys[0], replicate).await? {
            (Err(error), _) if error.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                self.command(script.invoke(false, keys, args), &keys[0], replicate).await?
            }
            sent => sent,
        };
        Ok((reply.map_err(StoreError::unavailable)?, replicated))
    }

    /// Sends `cmd` about `key` on the shared connection. With `replicate`,
    /// and replicas set by [`with_replicas`](Self::with_replicas), `WAIT`s
    /// for them after it: in the same round trip on a single Redis. Returns
    /// the command's own reply or error, and whether enough replicas
    /// acknowledged.
    async fn command(&self, cmd: Cmd, key: &Key<'_>, replicate: bool) -> Result<(RedisResult, Replicated), StoreError> {
        let replicas = self.inner.replicas.filter(|_| replicate);
        // Boxed: the cluster client's futures are kilobytes, and every store
        // call's future would otherwise be as large, and be moved as often.
        Box::pin(self.send(cmd, key, replicas)).await
    }

    async fn send(
        &self,
        cmd: Cmd,
        key: &Key<'_>,
        replicas: Option<(u32, Duration)>,
    ) -> Result<(RedisResult, Replicated), StoreError> {
        let mut connection = self.shared().await?;
        let name = replicas.map(|_| key.to_string());
        let wait = replicas.zip(name.as_deref()).map(|((replicas, timeout), name)| (wait_cmd(replicas, timeout), name));
        let (reply, waited) = P::query(&mut connection, cmd, wait).await;
        let reply = match reply {
            Err(error) if broken(&error) => return Err(self.failed(error)),
            reply => reply,
        };
        let replicated = match (replicas, waited) {
            (Some((replicas, timeout)), Some(Ok(acknowledged))) => enough_replicas(acknowledged, replicas, timeout),
            (Some(_), Some(Err(error))) => Err(self.failed(error)),
            _ => Ok(()),
        };
        Ok((reply, replicated))
    }
}

/// A random 64-bit number, for [`Inner::nonce`].
fn fresh_nonce() -> u64 {
    std::hash::BuildHasher::hash_one(&std::collections::hash_map::RandomState::new(), 0u8)
}

type RedisResult = Result<Value, RedisError>;
/// Whether enough replicas acknowledged a write.
type Replicated = Result<(), StoreError>;

/// Whether `error` says the connection is broken.
fn broken(error: &RedisError) -> bool {
    error.is_io_error() || error.is_connection_dropped() || error.is_timeout() || error.is_unrecoverable_error()
}

fn enough_replicas(acknowledged: i64, replicas: u32, timeout: Duration) -> Result<(), StoreError> {
    if acknowledged < i64::from(replicas) {
        return Err(StoreError::unavailable(format!(
            "only {acknowledged} of {replicas} replicas acknowledged within {timeout:?}"
        )));
    }
    Ok(())
}

impl<P: RedisPool> RedisStore<P> {
    /// Runs an owner-checked script; 1 means done, 0 not the owner.
    async fn owned(
        &self,
        script: &Script,
        keys: &[Key<'_>],
        args: &[&[u8]],
        replicate: bool,
    ) -> Result<(), StoreError> {
        match self.script(script, keys, args, replicate).await? {
            (Value::Int(1), replicated) => replicated,
            (Value::Int(0), _) => Err(StoreError::NotOwner),
            (other, _) => Err(unexpected(&other)),
        }
    }
}

/// One of a record's Redis keys, written straight into a command's
/// arguments: building each as a string of its own first cost an allocation
/// per key per call.
#[derive(Clone, Copy)]
struct Key<'a> {
    prefix: &'a str,
    tag: &'static str,
    /// The first 16 bytes of the record id, in hex.
    hex: [u8; 32],
    kind: KeyKind,
}

#[derive(Clone, Copy)]
enum KeyKind {
    /// `{prefix}{tag}:{32 hex digits}`: the record.
    Record,
    /// The record's key and `:q`: its wake queue.
    Queue,
    /// `{prefix}{tag}:fence`: the fencing counter of the record's hash slot.
    Fence,
}

impl Key<'_> {
    /// The record's other key of `kind`, without encoding its id again.
    fn sibling(self, kind: KeyKind) -> Self {
        Self { kind, ..self }
    }

    /// The key's bytes, in pieces.
    fn parts(&self) -> [&[u8]; 6] {
        let (name, suffix): (&[u8], &[u8]) = match self.kind {
            KeyKind::Record => (&self.hex, b""),
            KeyKind::Queue => (&self.hex, b":q"),
            KeyKind::Fence => (b"fence", b""),
        };
        [self.prefix.as_bytes(), b"{", self.tag.as_bytes(), b"}:", name, suffix]
    }

    fn len(&self) -> usize {
        self.parts().iter().map(|part| part.len()).sum()
    }
}

impl fmt::Display for Key<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Every part is UTF-8: the prefix is a `str`, the rest ASCII.
        self.parts().iter().try_for_each(|part| f.write_str(&String::from_utf8_lossy(part)))
    }
}

impl redis::ToRedisArgs for Key<'_> {
    fn write_redis_args<W: ?Sized + redis::RedisWrite>(&self, out: &mut W) {
        use std::io::Write as _;
        let mut arg = out.writer_for_next_arg();
        for part in self.parts() {
            // The writer appends to the command's buffer: it cannot fail.
            let _ = arg.write_all(part);
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

/// Parses an in-flight value: `F`, owner (16), fingerprint (32), waiter
/// count (1 byte, below 48), token in decimal. Values written before the
/// waiter count existed have none: their next byte is a digit.
fn parse_in_flight(value: &[u8]) -> Result<(Fingerprint, FencingToken), StoreError> {
    let corrupt = || StoreError::Corrupt(crate::DecodeError::Malformed("in-flight value"));
    if value.len() < 50 || value[0] != IN_FLIGHT {
        return Err(corrupt());
    }
    let mut fingerprint = [0; 32];
    fingerprint.copy_from_slice(&value[17..49]);
    let token = if value[49] < b'0' { &value[50..] } else { &value[49..] };
    let token = std::str::from_utf8(token).ok().and_then(|t| t.parse().ok()).ok_or_else(corrupt)?;
    Ok((Fingerprint::from_bytes(fingerprint), FencingToken::new(token)))
}

impl<P: RedisPool> Store for RedisStore<P> {
    async fn claim(&self, request: ClaimRequest) -> Result<Claim, StoreError> {
        let id = request.id();
        let owner = self.next_owner();
        let replace = if request.replace_completed() { &b"1"[..] } else { &b"0"[..] };
        let lease = millis(request.lease());
        // The fingerprint, then the in-flight value's waiter count: zero.
        let mut fingerprint = [0; 33];
        fingerprint[..32].copy_from_slice(request.fingerprint().as_bytes());
        let args: [&[u8]; 4] = [&owner_bytes(owner), &fingerprint, &lease, replace];
        let record = self.key(&id, KeyKind::Record);
        let (value, replicated) = self.script(&CLAIM, &[record, record.sibling(KeyKind::Fence)], &args, true).await?;
        match value {
            Value::Int(token) => {
                let token = u64::try_from(token).map_err(|_| unexpected(&value))?;
                let lease = Lease::new(owner, FencingToken::new(token));
                if let Err(error) = replicated {
                    // Not durable enough to run on: give the claim back.
                    // (Boxed, to keep the claim's future small.)
                    let _ = Box::pin(self.release(&id, lease.owner())).await;
                    return Err(error);
                }
                Ok(Claim::Acquired(lease))
            }
            Value::BulkString(value) if value.first() == Some(&IN_FLIGHT) => {
                Ok(Claim::InFlight { fingerprint: parse_in_flight(&value)?.0 })
            }
            Value::BulkString(record) => Ok(Claim::Completed(Record::decode(Bytes::from(record))?)),
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
        let owner = owner_bytes(owner);
        let retention = millis(retention);
        let args: [&[u8]; 3] = [&owner, &encoded, &retention];
        let record = self.key(id, KeyKind::Record);
        let keys = [record, record.sibling(KeyKind::Queue)];
        self.owned(&COMPLETE, &keys, &args, true).await
    }

    async fn release(&self, id: &RecordId, owner: OwnerToken) -> Result<(), StoreError> {
        let record = self.key(id, KeyKind::Record);
        let keys = [record, record.sibling(KeyKind::Queue)];
        self.owned(&RELEASE, &keys, &[&owner_bytes(owner)], false).await
    }

    async fn renew(&self, id: &RecordId, owner: OwnerToken, lease: Duration) -> Result<(), StoreError> {
        let key = self.key(id, KeyKind::Record);
        self.owned(&RENEW, &[key], &[&owner_bytes(owner), &millis(lease)], false).await
    }

    async fn lookup(&self, id: &RecordId) -> Result<Option<RecordState>, StoreError> {
        let key = self.key(id, KeyKind::Record);
        let mut get = Cmd::with_capacity(2, 3 + key.len());
        get.arg("GET").arg(key);
        let value = match self.command(get, &key, false).await?.0 {
            Ok(Value::Nil) => return Ok(None),
            Ok(Value::BulkString(value)) => value,
            Ok(other) => return Err(unexpected(&other)),
            Err(error) => return Err(StoreError::unavailable(error)),
        };
        if value.first() == Some(&IN_FLIGHT) {
            let (fingerprint, fencing_token) = parse_in_flight(&value)?;
            return Ok(Some(RecordState::InFlight { fingerprint, fencing_token }));
        }
        Ok(Some(RecordState::Completed(Record::decode(Bytes::from(value))?)))
    }

    async fn wait(&self, id: &RecordId, timeout: Duration) {
        // Join the blocking wait another request of this process already
        // runs for the record, or start one.
        let (mut woken, leader) = {
            let mut waits = self.inner.waits.lock().unwrap_or_else(|poison| poison.into_inner());
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
        let _leader = Leader { waits: &self.inner.waits, id: *id, wake };
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let now = tokio::time::Instant::now();
            if now >= deadline {
                break;
            }
            let block = BLOCK.min(deadline - now);
            // Boxed: blocking takes a pooled connection, whose futures are
            // kilobytes; every claim's future would otherwise be as large.
            match Box::pin(self.block_once(id, block)).await {
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
    waits: &'a Mutex<HashMap<RecordId, watch::Receiver<()>>>,
    id: RecordId,
    wake: watch::Sender<()>,
}

impl Drop for Leader<'_> {
    fn drop(&mut self) {
        self.waits.lock().unwrap_or_else(|poison| poison.into_inner()).remove(&self.id);
        let _ = self.wake.send(());
    }
}

impl<P: RedisPool> RedisStore<P> {
    /// Registers as a waiter and blocks for at most `block` on the record's
    /// queue. True when the record left the in-flight state.
    async fn block_once(&self, id: &RecordId, block: Duration) -> Result<bool, StoreError> {
        let record = self.key(id, KeyKind::Record);
        match self.script(&WAIT, &[record], &[], false).await?.0 {
            Value::Int(1) => {}
            // Already completed, released or expired.
            _ => return Ok(true),
        }
        // BLPOP blocks its connection: a pooled one, not the shared one.
        let mut connection = self.pool.connection().await?;
        let seconds = format!("{:.3}", block.as_secs_f64());
        let popped: Option<(String, String)> = redis::cmd("BLPOP")
            .arg(record.sibling(KeyKind::Queue))
            .arg(seconds)
            .query_async(&mut connection)
            .await
            .map_err(StoreError::unavailable)?;
        Ok(popped.is_some())
    }
}

impl IdempotencyLayer<RedisStore> {
    /// A layer on one Redis, shared by every instance of the application.
    ///
    /// # Example
    /// ```no_run
    /// use tower_idempotency::{IdempotencyLayer, store::redis::deadpool_redis};
    ///
    /// let pool = deadpool_redis::Config::from_url("redis://127.0.0.1:6379")
    ///     .create_pool(Some(deadpool_redis::Runtime::Tokio1))
    ///     .unwrap();
    /// let layer = IdempotencyLayer::redis(pool);
    /// # drop(layer);
    /// ```
    pub fn redis(pool: deadpool_redis::Pool) -> Self {
        Self::new(RedisStore::new(pool))
    }
}

impl IdempotencyLayer<RedisClusterStore> {
    /// A layer on a Redis Cluster.
    ///
    /// # Example
    /// ```no_run
    /// use tower_idempotency::{IdempotencyLayer, store::redis::deadpool_redis};
    ///
    /// let urls = vec!["redis://127.0.0.1:7000".to_owned(), "redis://127.0.0.1:7001".to_owned()];
    /// let pool = deadpool_redis::cluster::Config::from_urls(urls)
    ///     .create_pool(Some(deadpool_redis::Runtime::Tokio1))
    ///     .unwrap();
    /// let layer = IdempotencyLayer::redis_cluster(pool);
    /// # drop(layer);
    /// ```
    pub fn redis_cluster(pool: deadpool_redis::cluster::Pool) -> Self {
        Self::new(RedisStore::new(pool))
    }
}

/// A Lua script sent by its SHA-1, and in full when the server does not
/// know it (first use, `SCRIPT FLUSH`, a restarted or new cluster node).
struct Script {
    source: &'static str,
    sha: OnceLock<String>,
}

impl Script {
    const fn new(source: &'static str) -> Self {
        Self { source, sha: OnceLock::new() }
    }

    /// The command that runs the script: `EVALSHA` by its SHA-1, or `EVAL`
    /// with its source.
    fn invoke(&self, by_sha: bool, keys: &[Key<'_>], args: &[&[u8]]) -> Cmd {
        let (name, script) = if by_sha {
            ("EVALSHA", self.sha.get_or_init(|| redis::Script::new(self.source).get_hash().to_owned()).as_str())
        } else {
            ("EVAL", self.source)
        };
        // Sized up front: growing the command's buffers cost reallocations.
        let size = name.len()
            + script.len()
            + 1
            + keys.iter().map(Key::len).sum::<usize>()
            + args.iter().map(|arg| arg.len()).sum::<usize>();
        let mut cmd = Cmd::with_capacity(3 + keys.len() + args.len(), size);
        cmd.arg(name).arg(script).arg(keys.len());
        for key in keys {
            cmd.arg(*key);
        }
        for arg in args {
            cmd.arg(*arg);
        }
        cmd
    }
}

// KEYS: record, fence counter.
// ARGV: owner (16 bytes), fingerprint (32) and a zero waiter count (1),
// lease ms, replace flag.
// Reply: the token (an integer) when acquired, else the value found: an
// in-flight value (it starts with `F`) or a completed record.
//
// The script is kept small on purpose: every `redis.call`, string built and
// table returned costs Redis CPU on each first execution. Measured with
// redis-benchmark, this shape costs about a fifth less than one that also
// cleared the wake queue, packed the owner in Lua and answered a table
// (BENCHMARKS.md).
static CLAIM: Script = Script::new(
    r#"
local v = redis.call('GET', KEYS[1])
if v and (string.byte(v, 1) == 70 or ARGV[4] ~= '1') then return v end
local t = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], 'F' .. ARGV[1] .. ARGV[2] .. string.format('%d', t), 'PX', ARGV[3])
return t
"#,
);

/// Wakes the waiters counted in the in-flight value `v` by pushing to the
/// queue `KEYS[2]`. A count of 48 or more is an older value's first token
/// digit, not a count.
macro_rules! wake_waiters {
    () => {
        r#"
local n = string.byte(v, 50)
if n > 0 and n < 48 then
  for i = 1, n do redis.call('RPUSH', KEYS[2], '1') end
  redis.call('PEXPIRE', KEYS[2], 1000)
end
return 1
"#
    };
}

// KEYS: record, wake queue. ARGV: owner (16), record, retention ms.
static COMPLETE: Script = Script::new(concat!(
    r#"
local v = redis.call('GET', KEYS[1])
if not v or string.byte(v, 1) ~= 70 or string.sub(v, 2, 17) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
"#,
    wake_waiters!()
));

// KEYS: record, wake queue. ARGV: owner (16).
static RELEASE: Script = Script::new(concat!(
    r#"
local v = redis.call('GET', KEYS[1])
if not v or string.byte(v, 1) ~= 70 or string.sub(v, 2, 17) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
"#,
    wake_waiters!()
));

// KEYS: record. ARGV: owner (16), lease ms.
static RENEW: Script = Script::new(
    r#"
local v = redis.call('GET', KEYS[1])
if not v or string.byte(v, 1) ~= 70 or string.sub(v, 2, 17) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"#,
);

// KEYS: record. Counts one more waiter in the in-flight value (up to 47)
// and answers 1, or answers 0 when the record is not in flight.
static WAIT: Script = Script::new(
    r#"
local v = redis.call('GET', KEYS[1])
if not v or string.byte(v, 1) ~= 70 then return 0 end
local n = string.byte(v, 50)
if n < 47 then
  redis.call('SET', KEYS[1], string.sub(v, 1, 49) .. string.char(n + 1) .. string.sub(v, 51), 'KEEPTTL')
end
return 1
"#,
);

/// The hashtag of a record: a short string whose Redis hash slot is picked
/// by the record id's first bits, so records spread evenly over slots and a
/// record shares its slot with that slot's fencing counter.
fn tag(id: &RecordId) -> &'static str {
    let bytes = id.as_bytes();
    let slot = usize::from(u16::from_be_bytes([bytes[0], bytes[1]]) & 0x3fff);
    let (len, digits) = &slot_tags()[slot];
    // Hex digits: always UTF-8.
    std::str::from_utf8(&digits[..usize::from(*len)]).unwrap_or_default()
}

/// The longest tag: the search below finds every slot's first tag by
/// `0x4cd70` (a unit test checks it).
const TAG_LEN: usize = 5;

/// For each of the 16,384 slots, a short tag that hashes to it (the first
/// number, in hex, that does), as its length and digits: one table of
/// 96 KiB, so a lookup is one memory access rather than two.
fn slot_tags() -> &'static [(u8, [u8; TAG_LEN])] {
    static TAGS: OnceLock<Vec<(u8, [u8; TAG_LEN])>> = OnceLock::new();
    TAGS.get_or_init(|| {
        let mut tags = vec![(0, [0; TAG_LEN]); 16384];
        let mut missing = tags.len();
        let mut n = 0u64;
        while missing > 0 {
            let candidate = format!("{n:x}");
            let slot = usize::from(slot_of(candidate.as_bytes()));
            if tags[slot].0 == 0 && candidate.len() <= TAG_LEN {
                tags[slot].1[..candidate.len()].copy_from_slice(candidate.as_bytes());
                tags[slot].0 = candidate.len() as u8;
                missing -= 1;
            }
            n += 1;
        }
        tags
    })
}

/// Redis Cluster's hash slot of a key: CRC16 (XMODEM) of its hashtag, mod
/// 16384.
fn slot_of(key: &[u8]) -> u16 {
    let hashed = match key.iter().position(|&b| b == b'{') {
        Some(open) => match key[open + 1..].iter().position(|&b| b == b'}') {
            Some(len) if len > 0 => &key[open + 1..open + 1 + len],
            _ => key,
        },
        None => key,
    };
    crc16(hashed) & 0x3fff
}

fn crc16(bytes: &[u8]) -> u16 {
    let mut crc = 0u16;
    for &byte in bytes {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 { (crc << 1) ^ 0x1021 } else { crc << 1 };
        }
    }
    crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc16_matches_redis() {
        // Values from the Redis Cluster specification.
        assert_eq!(crc16(b"123456789"), 0x31c3);
        assert_eq!(slot_of(b"foo"), 12182);
        assert_eq!(slot_of(b"{user1000}.following"), slot_of(b"user1000"));
    }

    #[test]
    fn every_slot_has_a_tag_that_hashes_to_it() {
        assert_eq!(slot_tags().len(), 16384);
        for slot in 0..16384u16 {
            let mut id = [0; 32];
            id[..2].copy_from_slice(&slot.to_be_bytes());
            let tag = tag(&RecordId::from_bytes(id));
            assert!(!tag.is_empty() && tag.len() <= TAG_LEN, "slot {slot}: {tag:?}");
            assert_eq!(slot_of(tag.as_bytes()), slot);
        }
    }

    #[test]
    fn a_record_and_its_counter_share_a_slot() {
        let id = RecordId::from_bytes([0x5a; 32]);
        let tag = tag(&id);
        let record = format!("idem:{{{tag}}}:{}", id.to_hex());
        let fence = format!("idem:{{{tag}}}:fence");
        assert_eq!(slot_of(record.as_bytes()), slot_of(fence.as_bytes()));
    }

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
            std::mem::size_of_val(&store.wait(&id, second)),
            std::mem::size_of_val(&store.send(redis::cmd("GET"), &store.key(&id, KeyKind::Record), None)),
        ]
    }

    #[tokio::test]
    async fn store_calls_stay_small_futures() {
        // Each call's future is moved into its caller's, and boxed by the
        // layer: the Redis clients' kilobytes must stay behind a box
        // (BENCHMARKS.md: copying them took 16% of the server's CPU in
        // Redis first executions). What each call boxes is allocated per
        // call: it must not carry the rare connecting path's 6 KB either.
        let single =
            deadpool_redis::Config::from_url("redis://127.0.0.1:1").create_pool(Some(deadpool_redis::Runtime::Tokio1));
        let sizes = future_sizes(&RedisStore::new(single.unwrap()));
        assert!(sizes.iter().all(|&size| size <= 2048), "single Redis: future sizes {sizes:?}");
        let urls = vec!["redis://127.0.0.1:1".to_owned()];
        let cluster =
            deadpool_redis::cluster::Config::from_urls(urls).create_pool(Some(deadpool_redis::Runtime::Tokio1));
        let sizes = future_sizes(&RedisStore::new(cluster.unwrap()));
        assert!(sizes.iter().all(|&size| size <= 2048), "cluster: future sizes {sizes:?}");
    }

    #[test]
    fn in_flight_values_read_with_and_without_a_waiter_count() {
        let head = [&b"F"[..], &[7; 16], &[9; 32]].concat();
        let counted = [&head[..], &[3], b"42"].concat();
        let uncounted = [&head[..], b"42"].concat();
        for value in [counted, uncounted] {
            let (fingerprint, token) = parse_in_flight(&value).unwrap();
            assert_eq!((fingerprint, token), (Fingerprint::from_bytes([9; 32]), FencingToken::new(42)));
        }
        assert!(parse_in_flight(&[&head[..], &[3]].concat()).is_err(), "no token");
        assert!(parse_in_flight(&[&head[..], b"4x"].concat()).is_err(), "not a number");
    }

    #[tokio::test]
    async fn key_names_keep_their_layout() {
        // Records written by earlier versions must still be found.
        let pool =
            deadpool_redis::Config::from_url("redis://127.0.0.1:1").create_pool(Some(deadpool_redis::Runtime::Tokio1));
        let store = RedisStore::new(pool.unwrap());
        let id = RecordId::from_bytes([0x5a; 32]);
        let (tag, hex) = (tag(&id), &id.to_hex()[..32]);
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
