//! The PostgreSQL stores, on a [`sqlx::PgPool`]: [`PostgresStore`], whose
//! records are rows of their own, and [`TransactionalStore`] (what
//! [`IdempotencyLayer::postgres`](crate::IdempotencyLayer::postgres)
//! builds), whose records commit in the request's own transaction with the
//! handler's writes.
//!
//! Both keep records in one table (default `idempotency_records`,
//! `with_table`), created by `migrate()` or by your own migrations from
//! `schema()`; a table serves one store or the other. The schema
//! (`{table}` is the table's name):
//!
#![doc = concat!("```sql\n", include_str!("queries/schema.sql"), "```")]
//!
//! Times come from the database's clock (`now()`), never the
//! application's; fencing tokens from the table's sequence. An expired
//! record acts as absent at once, and a task the store starts with its
//! first claim deletes expired records in batches of 1,000 every minute.
//!
//! # `PostgresStore`
//!
//! Each call is one statement (the queries are the `.sql` files beside
//! this one): a claim inserts the record or takes over an expired one and
//! answers what holds it otherwise, in one round trip; complete, release
//! and renew act only on a live claim of their owner. `Wait` duplicates
//! mark the record as waited for and listen (`LISTEN`, one connection per
//! store): its completion or release sends a `NOTIFY` only then, so neither
//! waiting nor completing polls (each wait lasts a second at most, so a
//! notification lost while the listening connection reconnects costs no
//! more). Behind a transaction pooler, give the listening connection a
//! direct URL or poll ([`PostgresStore::with_listen_url`]).
//!
//! # `TransactionalStore`
//!
//! It closes the window every other store leaves open: the handler commits
//! its business write, the process dies before the record is written, and
//! the retry runs the handler again. Here everything a request does is one
//! transaction, with transaction-scoped locks only, so any transaction
//! pooler is safe (PgBouncer `pool_mode = transaction`, RDS Proxy,
//! Supavisor):
//!
//! 1. The claim opens the request's transaction (`BEGIN`) and calls the
//!    table's claim function (`{table}_claim`, in the schema), which takes
//!    two advisory locks without waiting (`pg_try_advisory_xact_lock`):
//!    first one keyed by the record and the request's fingerprint, then the
//!    record's own. Whoever holds the record's lock so holds its
//!    fingerprint's too: a duplicate that finds the record's lock held but
//!    its own fingerprint's free knows the holder sent another payload
//!    (`422`) without reading anything; one that finds its fingerprint's
//!    lock held has the same payload (`409`, or it waits). (Two duplicates
//!    with the same other payload that race each other within a round trip
//!    may get `409` before `422`: the first holds that payload's lock until
//!    its rollback. A retry gets the `422`.)
//! 2. Holding the record's lock, the function reads the completed record in
//!    a statement of its own, which starts after the lock is held (a
//!    statement that won the lock as it ran could miss a record committed
//!    just before; a volatile function's statements take their own
//!    snapshots), and takes a fencing token from the sequence. A completed
//!    record is replayed and the transaction rolls back.
//! 3. The handler writes in the transaction ([`RequestTransaction`], an
//!    axum extractor and a request extension).
//! 4. When the inner service answers, the record is written in the same
//!    transaction, which commits; only then does the client get the
//!    response. The `COMMIT` does not run under the store timeout (a slow
//!    commit still lands); a commit lost from sight (the connection dropped
//!    after it was sent, or 30 s passed) is found out before the answer:
//!    the store waits for the record's lock on another connection and looks
//!    for the record with this claim's fencing token. If that cannot be
//!    found out either, the client gets `503`
//!    [`CommitUnknown`](crate::RejectionKind::CommitUnknown), which says a
//!    retry with the same key is safe, never that nothing was kept.
//!
//! So:
//!
//! - a response that is not stored (5xx, 408, 425, 429, or what the storage
//!   rule refuses), an inner service's error or a panic rolls the
//!   transaction back and frees the key. A stored `4xx` commits the
//!   handler's writes with it (as Stripe keeps a 4xx result); have the
//!   storage rule refuse it to roll it back;
//! - the response body is kept up to the storage cap before the commit; a
//!   body over the cap commits with a record that says so (`410` to
//!   duplicates), and a body that fails commits as failed: the writes stand
//!   and the key never runs again;
//! - a commit that the database refuses (a serialization failure, a
//!   deadlock, a deferred constraint) keeps nothing and answers
//!   [`NotCommitted`](crate::RejectionKind::NotCommitted), `503` with
//!   `Retry-After`: the retry runs again;
//! - a process that dies, a terminated backend, a dropped connection: the
//!   transaction and its locks go with it, and the retry runs at once,
//!   whatever the lease. A process that dies after its commit left a record
//!   that the retry replays.
//!
//! No row exists while a request runs: each request writes its record once,
//! with no in-flight insert and update (half the WAL, no dead tuple). So
//! [`Store::lookup`] of a key in flight in another process reports it in
//! flight (from `pg_locks`) without fingerprint or fencing token. The claim
//! lives as long as its transaction: renewals send nothing, and a live
//! owner never loses its key to its lease.
//!
//! `Wait` duplicates wait on the lock itself (a shared lock on their
//! fingerprint's key, with `lock_timeout` as the wait), then claim again:
//! no polling and no `LISTEN`. Each waiter holds a pool connection while it
//! waits, so at most half the pool's connections wait at once
//! ([`TransactionalStore::with_max_waiting`]); past that a duplicate gets
//! `409`. Each request in flight holds one connection for as long as its
//! handler runs: size the pool for both. A request that cannot get a
//! connection within the store timeout gets `503`, and its claim is
//! dropped, not finished later.
//!
//! Under `REPEATABLE READ` or `SERIALIZABLE` (a database's
//! `default_transaction_isolation`), a transaction's snapshot is taken by
//! its first statement, before the claim holds its lock, so the claim also
//! writes the record's row (uncommitted, its own) to find a record
//! committed in between: that write fails with a serialization failure,
//! and the claim starts over in a new transaction. One more round trip,
//! under those isolations only.
//!
//! A first execution costs these round trips besides the handler's own:
//! `BEGIN`, the claim function, the record and the `COMMIT` (the last two
//! cannot go in one: sqlx's transactions send their own `COMMIT`, and a
//! simple query would carry the body as a literal). A replay costs two, its
//! rollback riding on the connection's return to the pool. The claim
//! function is part of the schema: `migrate()` creates it, and your own
//! migrations must carry it (`schema()`); without it every claim fails
//! (`503`).
//!
//! Bound a stuck handler with PostgreSQL's `statement_timeout`, and if you
//! use `idle_in_transaction_session_timeout`, know the trade: when the
//! server ends a session whose handler waits on an external call (a payment
//! provider), the transaction and its lock go, a retry takes the key over at
//! once, and the external call runs twice; the first request's commit
//! fails. Pass the fencing token or a key derived from the idempotency key
//! ([`IdempotencyContext`](crate::IdempotencyContext)) to the external
//! system: that is the defence. Advisory locks share one key space per
//! database: an application's own advisory locks are unlikely to meet these
//! keys, but may.
//!
//! # Behind PgBouncer
//!
//! Both stores work behind PgBouncer in `pool_mode = transaction` (tested
//! with 1.18). Before 1.21, PgBouncer keeps no prepared statement across
//! transactions: connect with sqlx's statement cache off
//! (`postgres://…?statement-cache-capacity=0`), and let sqlx's startup
//! parameter through (`ignore_startup_parameters = extra_float_digits`). The stores then prepare
//! their statements unnamed, and run each statement outside a request's
//! transaction in a transaction of its own (sqlx prepares and runs a
//! statement in two exchanges, between which the pooler may switch server
//! connections). Your own queries need the same care there: `.persistent(false)`,
//! and inside a transaction. From 1.21 on, `max_prepared_statements` lets
//! the statement cache stay on. `PostgresStore`'s `LISTEN` needs a session
//! of its own: give it a direct URL, or let it poll
//! ([`PostgresStore::with_listen_url`]).

use std::{
    fmt,
    sync::{Arc, Weak},
    time::Duration,
};

use bytes::Bytes;
use sqlx::{PgPool, Row, postgres::PgRow};

mod queries;
mod transaction;
mod transactional;
mod waiters;

use self::{
    queries::{PgQuery, Queries},
    waiters::{LONGEST_WAIT, Waiters},
};
pub use self::{
    transaction::{RequestTransaction, TransactionEnded, TransactionGuard},
    transactional::TransactionalStore,
};
use super::{Claim, ClaimRequest, Lease, OwnerToken, OwnerTokens, RecordState, Store, StoreError};
use crate::{ConfigError, FencingToken, Fingerprint, Record, RecordId};

pub use sqlx;

/// Expired records deleted per statement by the background purge.
const PURGE_BATCH: i64 = 1_000;
/// How often the background purge runs.
const PURGE_EVERY: Duration = Duration::from_secs(60);
/// The table both stores use unless told otherwise.
const DEFAULT_TABLE: &str = "idempotency_records";

/// What both PostgreSQL stores keep: the pool, the table and its queries,
/// the owner tokens, and the background purge.
struct Shared {
    pool: PgPool,
    table: String,
    queries: Queries,
    /// Mixed into every advisory lock key, so that two tables' records
    /// never share one.
    lock_salt: [u8; 16],
    owners: OwnerTokens,
    purging: std::sync::Once,
}

impl Shared {
    fn new(pool: PgPool, table: &str) -> Arc<Self> {
        let salt = <sha2::Sha256 as sha2::Digest>::digest(table.as_bytes());
        Arc::new(Self {
            queries: Queries::for_table(table, !statement_cache_off(&pool)),
            lock_salt: std::array::from_fn(|i| salt[i]),
            pool,
            table: table.to_owned(),
            owners: OwnerTokens::new(),
            purging: std::sync::Once::new(),
        })
    }

    /// `table`, checked: a plain SQL identifier.
    fn checked(table: &str) -> Result<&str, ConfigError> {
        let plain = table.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if table.is_empty() || table.len() > 50 || !plain || table.as_bytes()[0].is_ascii_digit() {
            return Err(ConfigError::InvalidName("table"));
        }
        Ok(table)
    }

    /// The advisory lock key of a record: a request's transaction holds it
    /// while the record is the request's.
    fn record_lock(&self, id: &RecordId) -> i64 {
        let bytes = id.as_bytes();
        i64::from_be_bytes(std::array::from_fn(|i| bytes[i] ^ self.lock_salt[i]))
    }

    /// The advisory lock key of a record and a fingerprint: the record's
    /// holder holds it for its own fingerprint.
    fn fingerprint_lock(&self, id: &RecordId, fingerprint: &Fingerprint) -> i64 {
        let (id, fingerprint) = (id.as_bytes(), fingerprint.as_bytes());
        i64::from_be_bytes(std::array::from_fn(|i| id[8 + i] ^ fingerprint[i] ^ self.lock_salt[8 + i]))
    }

    /// Runs a statement outside the request's transactions. With the
    /// statement cache off (behind a transaction pooler), in a transaction
    /// of its own: sqlx prepares and runs a statement in two exchanges, and
    /// between them, outside a transaction, the pooler may hand the session
    /// to another client.
    async fn fetch_optional(&self, query: PgQuery<'_>) -> Result<Option<PgRow>, StoreError> {
        if self.queries.persistent {
            return query.fetch_optional(&self.pool).await.map_err(StoreError::unavailable);
        }
        let mut transaction = self.pool.begin().await.map_err(StoreError::unavailable)?;
        let row = query.fetch_optional(&mut *transaction).await.map_err(StoreError::unavailable)?;
        transaction.commit().await.map_err(StoreError::unavailable)?;
        Ok(row)
    }

    /// As [`Shared::fetch_optional`], for a statement that answers one row.
    async fn fetch_one(&self, query: PgQuery<'_>) -> Result<PgRow, StoreError> {
        self.fetch_optional(query).await?.ok_or_else(|| StoreError::unavailable("a statement answered no row"))
    }

    /// As [`Shared::fetch_optional`], for a statement that answers how many
    /// rows it changed.
    async fn execute(&self, query: PgQuery<'_>) -> Result<u64, StoreError> {
        if self.queries.persistent {
            let done = query.execute(&self.pool).await.map_err(StoreError::unavailable)?;
            return Ok(done.rows_affected());
        }
        let mut transaction = self.pool.begin().await.map_err(StoreError::unavailable)?;
        let done = query.execute(&mut *transaction).await.map_err(StoreError::unavailable)?;
        transaction.commit().await.map_err(StoreError::unavailable)?;
        Ok(done.rows_affected())
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        sqlx::raw_sql(sqlx::AssertSqlSafe(self.queries.schema.clone()))
            .execute(&self.pool)
            .await
            .map_err(StoreError::unavailable)?;
        Ok(())
    }

    async fn purge(&self, limit: i64) -> Result<u64, StoreError> {
        self.execute(self.queries.purge(limit)).await
    }

    /// Starts the background purge, once, on the runtime of the first claim.
    fn start_purging(self: &Arc<Self>) {
        self.purging.call_once(|| {
            let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
            runtime.spawn(purge_forever(Arc::downgrade(self)));
        });
    }
}

/// Whether `pool` connects with sqlx's statement cache off
/// (`?statement-cache-capacity=0`, as behind PgBouncer before 1.21).
fn statement_cache_off(pool: &PgPool) -> bool {
    use sqlx::ConnectOptions as _;
    let url = pool.connect_options().to_url_lossy();
    url.query_pairs().any(|(name, value)| name == "statement-cache-capacity" && value == "0")
}

/// Deletes expired records in batches every [`PURGE_EVERY`], for as long as
/// the store lives.
async fn purge_forever(shared: Weak<Shared>) {
    loop {
        tokio::time::sleep(PURGE_EVERY).await;
        let Some(shared) = shared.upgrade() else { return };
        loop {
            match shared.purge(PURGE_BATCH).await {
                Ok(deleted) if deleted == PURGE_BATCH as u64 => continue,
                Ok(_) => break,
                Err(error) => {
                    tracing::warn!(%error, "purging expired idempotency records failed");
                    break;
                }
            }
        }
    }
}

/// A store on PostgreSQL: every instance of the application that shares the
/// database shares the records. Its records are rows of their own, written
/// outside the handler's transactions; [`TransactionalStore`] commits them
/// with the handler's writes.
///
/// # Example
/// ```no_run
/// use tower_idempotency::{IdempotencyLayer, store::postgres::{PostgresStore, sqlx::PgPool}};
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let pool = PgPool::connect("postgres://postgres@127.0.0.1/app").await.unwrap();
/// let store = PostgresStore::new(pool);
/// store.migrate().await.unwrap();
/// let layer = IdempotencyLayer::new(store);
/// # drop(layer);
/// # });
/// ```
#[derive(Clone)]
pub struct PostgresStore {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<Shared>,
    waiters: Arc<Waiters>,
}

impl fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresStore").field("table", &self.inner.shared.table).finish_non_exhaustive()
    }
}

impl PostgresStore {
    /// A store on `pool`, in the table `idempotency_records`.
    ///
    /// # Example
    /// ```
    /// use tower_idempotency::store::postgres::{PostgresStore, sqlx::PgPool};
    ///
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let pool = PgPool::connect_lazy("postgres://postgres@127.0.0.1/app").unwrap();
    /// let store = PostgresStore::new(pool);
    /// # drop(store);
    /// # });
    /// ```
    pub fn new(pool: PgPool) -> Self {
        Self::on(Shared::new(pool, DEFAULT_TABLE), Waiters::direct())
    }

    fn on(shared: Arc<Shared>, waiters: Waiters) -> Self {
        Self { inner: Arc::new(Inner { shared, waiters: Arc::new(waiters) }) }
    }

    /// Keeps the records in `table`: a plain SQL identifier (letters,
    /// digits and `_`, at most 50 bytes, not starting with a digit).
    ///
    /// # Example
    /// ```
    /// use tower_idempotency::store::postgres::{PostgresStore, sqlx::PgPool};
    ///
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let pool = PgPool::connect_lazy("postgres://postgres@127.0.0.1/app").unwrap();
    /// let store = PostgresStore::new(pool.clone()).with_table("payments_idempotency").unwrap();
    /// assert!(PostgresStore::new(pool).with_table("records; DROP TABLE x").is_err());
    /// # });
    /// ```
    pub fn with_table(self, table: &str) -> Result<Self, ConfigError> {
        let shared = Shared::new(self.inner.shared.pool.clone(), Shared::checked(table)?);
        Ok(Self::on(shared, self.inner.waiters.same_source()))
    }

    /// How waiting duplicates ([`InFlightPolicy::Wait`](crate::InFlightPolicy::Wait))
    /// learn that a record settled. By default the store listens on a
    /// connection of its pool (`LISTEN`). Behind a transaction pooler
    /// (PgBouncer `pool_mode = transaction`) a `LISTEN` does not stay on
    /// one server connection: give it a URL straight to the database with
    /// `Some(url)`, or `None` to poll instead (a duplicate reads the record
    /// every 100 ms, for as long as it waits).
    ///
    /// # Example
    /// ```
    /// use tower_idempotency::store::postgres::{PostgresStore, sqlx::PgPool};
    ///
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let pool = PgPool::connect_lazy("postgres://postgres@127.0.0.1:6432/app?statement-cache-capacity=0").unwrap();
    /// let store = PostgresStore::new(pool).with_listen_url(Some("postgres://postgres@127.0.0.1:5432/app"));
    /// # drop(store);
    /// # });
    /// ```
    #[must_use]
    pub fn with_listen_url(self, url: Option<&str>) -> Self {
        let waiters = match url {
            Some(url) => Waiters::at(url),
            None => Waiters::polling(),
        };
        Self::on(self.inner.shared.clone(), waiters)
    }

    /// The SQL that creates the store's table, sequence and index, for
    /// applications that run their own migrations.
    ///
    /// # Example
    /// ```
    /// use tower_idempotency::store::postgres::{PostgresStore, sqlx::PgPool};
    ///
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let store = PostgresStore::new(PgPool::connect_lazy("postgres://postgres@127.0.0.1/app").unwrap());
    /// assert!(store.schema().contains("CREATE TABLE IF NOT EXISTS idempotency_records"));
    /// # });
    /// ```
    pub fn schema(&self) -> &str {
        &self.inner.shared.queries.schema
    }

    /// Creates the table, sequence and index if they are missing: safe to
    /// run at every start.
    ///
    /// # Example
    /// ```no_run
    /// use tower_idempotency::store::postgres::{PostgresStore, sqlx::PgPool};
    ///
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let store = PostgresStore::new(PgPool::connect("postgres://postgres@127.0.0.1/app").await.unwrap());
    /// store.migrate().await.unwrap();
    /// # });
    /// ```
    pub async fn migrate(&self) -> Result<(), StoreError> {
        self.inner.shared.migrate().await
    }

    /// Deletes up to `limit` expired records; returns how many. The store
    /// does this by itself every minute; call it to purge at other times.
    ///
    /// # Example
    /// ```no_run
    /// use tower_idempotency::store::postgres::{PostgresStore, sqlx::PgPool};
    ///
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let store = PostgresStore::new(PgPool::connect("postgres://postgres@127.0.0.1/app").await.unwrap());
    /// let deleted = store.purge_expired(10_000).await.unwrap();
    /// # drop(deleted);
    /// # });
    /// ```
    pub async fn purge_expired(&self, limit: u32) -> Result<u64, StoreError> {
        self.inner.shared.purge(i64::from(limit)).await
    }

    /// The pool the store runs on.
    ///
    /// # Example
    /// ```
    /// use tower_idempotency::store::postgres::{PostgresStore, sqlx::PgPool};
    ///
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let store = PostgresStore::new(PgPool::connect_lazy("postgres://postgres@127.0.0.1/app").unwrap());
    /// assert_eq!(store.pool().size(), 0);
    /// # });
    /// ```
    pub fn pool(&self) -> &PgPool {
        &self.inner.shared.pool
    }

    /// Runs an owner-checked update of a claim: done, or not the owner.
    async fn owned(&self, query: PgQuery<'_>) -> Result<(), StoreError> {
        if self.inner.shared.execute(query).await? == 1 { Ok(()) } else { Err(StoreError::NotOwner) }
    }

    /// Runs a completion or release, whose one row says whether it was done.
    async fn settled(&self, query: PgQuery<'_>) -> Result<(), StoreError> {
        let row = self.inner.shared.fetch_one(query).await?;
        let done: i64 = row.try_get("done").map_err(StoreError::unavailable)?;
        if done == 1 { Ok(()) } else { Err(StoreError::NotOwner) }
    }
}

fn fingerprint_of(bytes: &[u8]) -> Result<Fingerprint, StoreError> {
    let bytes: [u8; 32] = bytes.try_into().map_err(|_| corrupt("fingerprint"))?;
    Ok(Fingerprint::from_bytes(bytes))
}

fn corrupt(what: &'static str) -> StoreError {
    StoreError::Corrupt(crate::DecodeError::Malformed(what))
}

fn fencing_token(row: &PgRow) -> Result<FencingToken, StoreError> {
    let token: i64 = row.try_get("fencing_token").map_err(StoreError::unavailable)?;
    Ok(FencingToken::new(u64::try_from(token).map_err(|_| corrupt("fencing token"))?))
}

fn record_of(row: &PgRow) -> Result<Record, StoreError> {
    let record: Option<Vec<u8>> = row.try_get("record").map_err(StoreError::unavailable)?;
    Ok(Record::decode(Bytes::from(record.ok_or_else(|| corrupt("completed record without a record"))?))?)
}

fn fingerprint_column(row: &PgRow) -> Result<Fingerprint, StoreError> {
    let fingerprint: Vec<u8> = row.try_get("fingerprint").map_err(StoreError::unavailable)?;
    fingerprint_of(&fingerprint)
}

impl Store for PostgresStore {
    async fn claim(&self, request: ClaimRequest) -> Result<Claim, StoreError> {
        let shared = &self.inner.shared;
        shared.start_purging();
        let owner = shared.owners.next();
        let owner_bytes = owner.as_u128().to_be_bytes();
        let id = request.id();
        // A claim that raced a concurrent first claim of the same record
        // finds nothing and goes again; a few tries always settle it.
        for _ in 0..3 {
            let claim = shared.queries.claim(
                &id,
                &owner_bytes,
                &request.fingerprint(),
                request.lease(),
                request.replace_completed(),
            );
            let row = shared.fetch_optional(claim).await?;
            let Some(row) = row else { continue };
            let state: String = row.try_get("state").map_err(StoreError::unavailable)?;
            return match state.as_str() {
                "acquired" => Ok(Claim::Acquired(Lease::new(owner, fencing_token(&row)?))),
                "in_flight" => Ok(Claim::InFlight { fingerprint: fingerprint_column(&row)? }),
                _ => Ok(Claim::Completed(record_of(&row)?)),
            };
        }
        Err(StoreError::unavailable("a claim found neither the record nor room for it three times"))
    }

    async fn complete(
        &self,
        id: &RecordId,
        owner: OwnerToken,
        record: Record,
        retention: Duration,
    ) -> Result<(), StoreError> {
        let encoded = record.encode();
        let owner = owner.as_u128().to_be_bytes();
        self.settled(self.inner.shared.queries.complete(id, &owner, &encoded, retention)).await
    }

    async fn release(&self, id: &RecordId, owner: OwnerToken) -> Result<(), StoreError> {
        let owner = owner.as_u128().to_be_bytes();
        self.settled(self.inner.shared.queries.release(id, &owner)).await
    }

    async fn renew(&self, id: &RecordId, owner: OwnerToken, lease: Duration) -> Result<(), StoreError> {
        let owner = owner.as_u128().to_be_bytes();
        self.owned(self.inner.shared.queries.renew(id, &owner, lease)).await
    }

    async fn lookup(&self, id: &RecordId) -> Result<Option<RecordState>, StoreError> {
        let shared = &self.inner.shared;
        let Some(row) = shared.fetch_optional(shared.queries.lookup(id)).await? else { return Ok(None) };
        let completed: bool = row.try_get("completed").map_err(StoreError::unavailable)?;
        if completed {
            return Ok(Some(RecordState::Completed(record_of(&row)?)));
        }
        Ok(Some(RecordState::InFlight {
            fingerprint: Some(fingerprint_column(&row)?),
            fencing_token: Some(fencing_token(&row)?),
        }))
    }

    async fn wait(&self, request: &ClaimRequest, timeout: Duration) -> Result<(), StoreError> {
        let timeout = timeout.min(LONGEST_WAIT);
        let (shared, waiters) = (&self.inner.shared, &self.inner.waiters);
        let id = request.id();
        if waiters.listen(&shared.pool, &shared.queries.channel).await.is_err() {
            // No listening connection (or none wanted): the caller claims
            // again after a pause.
            tokio::time::sleep(timeout.min(waiters.poll_every())).await;
            return Ok(());
        }
        // Registered before the record is marked: a completion that follows
        // cannot be missed.
        let signal = waiters.signal(&id);
        {
            let mut woken = std::pin::pin!(signal.notified());
            woken.as_mut().enable();
            let marked = shared.execute(shared.queries.wait(&id)).await;
            // Not in flight any more (or the store failed): the caller
            // claims again.
            if matches!(marked, Ok(1)) {
                let _ = tokio::time::timeout(timeout, woken).await;
            }
        }
        waiters.done(&id, signal);
        Ok(())
    }
}
