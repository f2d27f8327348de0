//! The pools the Redis store runs on, and the one multiplexed connection
//! that its calls share.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU8, Ordering},
    },
    time::Duration,
};

use redis::{Cmd, Pipeline, RedisError, Value, aio::ConnectionLike};

use super::{
    IFEQ_UNKNOWN,
    keys::{Key, slot_of},
};
use crate::store::StoreError;

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

    /// Sends `wait` (a `WAIT`) to the primary that holds `key`, after the
    /// writes this connection made to it; returns how many replicas
    /// acknowledged.
    #[doc(hidden)]
    fn wait_for(
        connection: &mut Self::Shared,
        wait: Cmd,
        key: &str,
    ) -> impl Future<Output = Result<i64, RedisError>> + Send;
}

impl RedisPool for deadpool_redis::Pool {
    type Connection = deadpool_redis::Connection;
    type Shared = redis::aio::MultiplexedConnection;

    async fn connection(&self) -> Result<Self::Connection, StoreError> {
        self.get().await.map_err(StoreError::unavailable)
    }

    async fn shared(&self) -> Result<Self::Shared, StoreError> {
        let mut connection = deadpool_redis::Connection::take(self.connection().await?);
        // The layer's store timeout decides when a call has failed; a reply
        // redis-rs gave up on sooner would still change the record unseen.
        connection.set_response_timeout(RESPONSE_TIMEOUT);
        Ok(connection)
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

    async fn wait_for(connection: &mut Self::Shared, wait: Cmd, _: &str) -> Result<i64, RedisError> {
        wait.query_async(connection).await.and_then(acknowledged)
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
        let reply = cmd.query_async(connection).await;
        let Some((wait, key)) = wait.filter(|_| reply.is_ok()) else { return (reply, None) };
        // In a round trip of its own.
        (reply, Some(Self::wait_for(connection, wait, key).await))
    }

    async fn wait_for(connection: &mut Self::Shared, wait: Cmd, key: &str) -> Result<i64, RedisError> {
        use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
        let route = Route::new(slot_of(key.as_bytes()), SlotAddr::Master);
        let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(route));
        connection.route_command(wait, routing).await.and_then(acknowledged)
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

/// How long the shared connection waits for a reply: far past any sensible
/// store timeout, so that the layer's applies (redis-rs's own default is
/// 500 ms, shorter than the layer's 1 s).
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(60);

/// The multiplexed connection every non-blocking call shares: taking it out
/// of the pool spares each call deadpool's health-check `PING`.
pub(super) struct SharedConnection<P: RedisPool> {
    cached: Arc<Mutex<Option<P::Shared>>>,
    /// What the server behind the current connection can do.
    facts: Arc<ServerFacts>,
    /// Idle connections for calls that wait for replicas (see
    /// [`SharedConnection::send`]).
    spare: Arc<Mutex<Vec<P::Shared>>>,
    /// Held while one call connects, so a burst of calls after a start or a
    /// failure makes one connection, not one each.
    connecting: Arc<tokio::sync::Mutex<()>>,
}

impl<P: RedisPool> Clone for SharedConnection<P> {
    fn clone(&self) -> Self {
        Self {
            cached: self.cached.clone(),
            facts: self.facts.clone(),
            spare: self.spare.clone(),
            connecting: self.connecting.clone(),
        }
    }
}

impl<P: RedisPool> Default for SharedConnection<P> {
    fn default() -> Self {
        Self { cached: Arc::default(), facts: Arc::default(), spare: Arc::default(), connecting: Arc::default() }
    }
}

/// What the connected server can do, learned again on every (re)connect, so
/// that a failover to a server of another version, or an upgrade, is seen.
#[derive(Default)]
pub(super) struct ServerFacts {
    /// How claims are sent: [`CLAIMS_UNKNOWN`] until connected.
    claims: AtomicU8,
    /// Whether the server takes `SET … IFEQ`: [`IFEQ_UNKNOWN`] until a
    /// completion tries it on this connection.
    pub(super) ifeq: AtomicU8,
}

pub(super) const CLAIMS_UNKNOWN: u8 = 0;
/// `MULTI`, `INCR`, `SET … NX GET`, `EXEC`: Redis 7.0 and later.
pub(super) const CLAIMS_TRANSACTION: u8 = 1;
/// The claim script: servers older than 7.0 refuse `SET` with both `NX`
/// and `GET`.
pub(super) const CLAIMS_SCRIPT: u8 = 2;

/// The oldest server version that takes `SET … NX GET`.
const NX_GET_SINCE: (u32, u32) = (7, 0);

impl ServerFacts {
    pub(super) fn claims(&self) -> u8 {
        self.claims.load(Ordering::Relaxed)
    }
}

impl<P: RedisPool> SharedConnection<P> {
    /// The connection, from `pool` the first time and after a failure.
    pub(super) async fn get(&self, pool: &P) -> Result<P::Shared, StoreError> {
        match self.cached() {
            Some(connection) => Ok(connection),
            // Boxed: see BENCHMARKS.md, "Future sizes".
            None => Box::pin(self.connect(pool)).await,
        }
    }

    pub(super) fn facts(&self) -> &ServerFacts {
        &self.facts
    }

    fn cached(&self) -> Option<P::Shared> {
        self.cached.lock().unwrap_or_else(|poison| poison.into_inner()).clone()
    }

    /// Takes the connection from the pool, one call at a time (see
    /// `connecting`).
    async fn connect(&self, pool: &P) -> Result<P::Shared, StoreError> {
        let _connecting = self.connecting.lock().await;
        if let Some(connection) = self.cached() {
            return Ok(connection);
        }
        let mut connection = pool.shared().await?;
        learn(&mut connection, &self.facts).await;
        *self.cached.lock().unwrap_or_else(|poison| poison.into_inner()) = Some(connection.clone());
        Ok(connection)
    }

    /// Turns a Redis error into a store error, dropping the connection when
    /// the error says it is broken, so the next call connects again (after
    /// a Redis restart, say).
    fn failed(&self, error: RedisError) -> StoreError {
        if broken(&error) {
            *self.cached.lock().unwrap_or_else(|poison| poison.into_inner()) = None;
        }
        StoreError::unavailable(error)
    }

    /// Sends `cmd` about `key`: on the shared connection, or, when it waits
    /// for replicas, on a connection of its own, so that the `WAIT` holds up
    /// no other call. Returns the command's own reply or error, and whether
    /// enough replicas acknowledged.
    pub(super) async fn send(
        &self,
        pool: &P,
        request: Request,
        key: &Key<'_>,
        wait: Option<Wait>,
    ) -> Result<(RedisResult, Replicated), StoreError> {
        let Some(wait) = wait else {
            let mut connection = self.get(pool).await?;
            return match request.send::<P>(&mut connection).await {
                Err(error) if broken(&error) => Err(self.failed(error)),
                reply => Ok((reply, Ok(()))),
            };
        };
        // Boxed: see BENCHMARKS.md, "Future sizes".
        Box::pin(self.send_replicated(pool, request, key, wait)).await
    }

    /// [`SharedConnection::send`] for a call that waits for replicas.
    async fn send_replicated(
        &self,
        pool: &P,
        request: Request,
        key: &Key<'_>,
        wait: Wait,
    ) -> Result<(RedisResult, Replicated), StoreError> {
        let mut connection = self.spare(pool).await?;
        let (name, wait_cmd) = (key.to_string(), wait_cmd(wait.replicas, wait.timeout));
        let (reply, waited) = match (wait.only_if, request) {
            // In one round trip on a single Redis: `WAIT` counts every write
            // this connection made before it.
            (None, Request::Command(cmd)) => P::query(&mut connection.connection, cmd, Some((wait_cmd, &name))).await,
            (only_if, request) => {
                let wrote = only_if.unwrap_or(|_| true);
                let reply = request.send::<P>(&mut connection.connection).await;
                let waited = match &reply {
                    Ok(value) if wrote(value) => Some(P::wait_for(&mut connection.connection, wait_cmd, &name).await),
                    _ => None,
                };
                (reply, waited)
            }
        };
        let reply = match reply {
            Err(error) if broken(&error) => {
                connection.broken = true;
                return Err(StoreError::unavailable(error));
            }
            reply => reply,
        };
        let replicated = match waited {
            Some(Ok(acknowledged)) => enough_replicas(acknowledged, wait.replicas),
            Some(Err(error)) => {
                connection.broken |= broken(&error);
                Err(StoreError::unavailable(error))
            }
            None => Ok(()),
        };
        Ok((reply, replicated))
    }

    /// A connection of this store's own, for a call that waits for
    /// replicas: an idle one, or a new one taken from `pool`.
    async fn spare(&self, pool: &P) -> Result<Spare<'_, P>, StoreError> {
        let idle = self.spare.lock().unwrap_or_else(|poison| poison.into_inner()).pop();
        let connection = match idle {
            Some(connection) => connection,
            // Boxed: see BENCHMARKS.md, "Future sizes".
            None => Box::pin(pool.shared()).await?,
        };
        Ok(Spare { connection, idle: &self.spare, broken: false })
    }
}

/// What a call sends: one command, or a transaction (`MULTI` … `EXEC`) in
/// one write.
pub(super) enum Request {
    Command(Cmd),
    Transaction(Pipeline),
}

impl Request {
    /// Sends it on `connection`; a transaction's reply is the array of its
    /// commands' replies.
    async fn send<P: RedisPool>(self, connection: &mut P::Shared) -> RedisResult {
        match self {
            Self::Command(cmd) => cmd.query_async(connection).await,
            Self::Transaction(pipeline) => pipeline.query_async(connection).await,
        }
    }
}

/// Which calls wait for replicas, with
/// [`RedisStore::with_replicas`](super::RedisStore::with_replicas).
#[derive(Clone, Copy)]
pub(super) enum Replicate {
    Never,
    /// Always, pipelined with the call: a completion.
    Always,
    /// Only when the call wrote: a claim that acquired (its reply is the
    /// fencing token), not a replay or an in-flight answer.
    IfAcquired,
    /// Only when a `SET … NX GET` wrote (its reply is nil).
    IfSet,
    /// Only when the `SET … NX GET` after the `INCR` of a transaction wrote.
    IfSetInTransaction,
}

impl Replicate {
    /// How a call waits for `replicas` within `timeout`; `None` when it
    /// never does.
    pub(super) fn wait(self, replicas: u32, timeout: Duration) -> Option<Wait> {
        let only_if: Option<fn(&Value) -> bool> = match self {
            Self::Never => return None,
            Self::Always => None,
            Self::IfAcquired => Some(|reply| matches!(reply, Value::Int(_))),
            Self::IfSet => Some(|reply| matches!(reply, Value::Nil)),
            Self::IfSetInTransaction => {
                Some(|reply| matches!(reply, Value::Array(replies) if matches!(replies.get(1), Some(Value::Nil))))
            }
        };
        Some(Wait { replicas, timeout, only_if })
    }
}

/// When a call waits for replicas to take its write (`WAIT`).
#[derive(Clone, Copy)]
pub(super) struct Wait {
    pub(super) replicas: u32,
    pub(super) timeout: Duration,
    /// Wait only when the reply says the command wrote (a claim that
    /// acquired); `None`: always, pipelined with the command.
    pub(super) only_if: Option<fn(&Value) -> bool>,
}

/// A connection a call that waits for replicas holds alone; back to the
/// idle ones when done, unless broken.
struct Spare<'a, P: RedisPool> {
    connection: P::Shared,
    idle: &'a Mutex<Vec<P::Shared>>,
    broken: bool,
}

impl<P: RedisPool> Drop for Spare<'_, P> {
    fn drop(&mut self) {
        if !self.broken {
            // A handle to the same connection: the one here goes with `self`.
            self.idle.lock().unwrap_or_else(|poison| poison.into_inner()).push(self.connection.clone());
        }
    }
}

pub(super) type RedisResult = Result<Value, RedisError>;
/// Whether enough replicas acknowledged a write.
pub(super) type Replicated = Result<(), StoreError>;

/// Reads what a newly connected server is (`INFO`, which works where
/// `CONFIG` is disabled, as on managed Redis; one reply per node from a
/// cluster): its version decides how claims are sent, and a
/// `maxmemory-policy` that may evict keys is warned about (an evicted
/// in-flight or completed record lets a retry run the request again).
async fn learn(connection: &mut impl ConnectionLike, facts: &ServerFacts) {
    facts.ifeq.store(IFEQ_UNKNOWN, Ordering::Relaxed);
    let info = match redis::cmd("INFO").query_async::<Value>(connection).await {
        Ok(info) => info,
        Err(error) => {
            // No `INFO` (an ACL, a proxy): the claim script works on every
            // version.
            tracing::info!(%error, "INFO refused: the server's version is unknown, so claims run the claim script");
            facts.claims.store(CLAIMS_SCRIPT, Ordering::Relaxed);
            return;
        }
    };
    let mut texts = Vec::new();
    collect_texts(&info, &mut texts);
    let field = |text: &str, name: &str| {
        text.lines().find_map(|line| line.strip_prefix(name)).map(|value| value.trim().to_owned())
    };
    for policy in texts.iter().filter_map(|text| field(text, "maxmemory_policy:")) {
        if policy != "noeviction" {
            tracing::warn!(
                policy,
                "Redis runs with maxmemory-policy {policy}: under memory pressure it may evict idempotency records, \
                 and a retry of an evicted key runs again; set maxmemory-policy noeviction"
            );
        }
    }
    let oldest =
        texts.iter().filter_map(|text| field(text, "redis_version:")).min_by_key(|version| parse_version(version));
    let by_script = oldest.as_deref().is_some_and(|version| parse_version(version) < NX_GET_SINCE);
    if by_script {
        tracing::info!(
            version = oldest.as_deref().unwrap_or_default(),
            "the Redis server predates 7.0 (no SET NX GET): claims run the claim script, one more script call's CPU each"
        );
    }
    facts.claims.store(if by_script { CLAIMS_SCRIPT } else { CLAIMS_TRANSACTION }, Ordering::Relaxed);
}

/// `major.minor` of a version string; (0, 0) for one that does not parse,
/// which counts as old: the claim script works on every version.
fn parse_version(version: &str) -> (u32, u32) {
    let mut parts = version.split('.').map(|part| part.parse::<u32>().ok());
    match (parts.next().flatten(), parts.next().flatten()) {
        (Some(major), Some(minor)) => (major, minor),
        _ => (0, 0),
    }
}

/// The texts of an `INFO` reply: one string, or one per node from a
/// cluster.
fn collect_texts(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::BulkString(bytes) => out.push(String::from_utf8_lossy(bytes).into_owned()),
        Value::VerbatimString { text, .. } | Value::SimpleString(text) => out.push(text.clone()),
        Value::Array(values) | Value::Set(values) => values.iter().for_each(|value| collect_texts(value, out)),
        Value::Map(pairs) => pairs.iter().for_each(|(_, value)| collect_texts(value, out)),
        _ => {}
    }
}

/// Whether `error` says the connection is broken.
fn broken(error: &RedisError) -> bool {
    error.is_io_error() || error.is_connection_dropped() || error.is_timeout() || error.is_unrecoverable_error()
}

fn enough_replicas(acknowledged: i64, replicas: u32) -> Result<(), StoreError> {
    if acknowledged < i64::from(replicas) {
        let acknowledged = u32::try_from(acknowledged).unwrap_or(0);
        return Err(StoreError::NotReplicated { acknowledged, wanted: replicas });
    }
    Ok(())
}
