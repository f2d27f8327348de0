//! The PostgreSQL store, on a [`sqlx::PgPool`].
//!
//! One table (default `idempotency_records`, [`PostgresStore::with_table`]),
//! created by [`PostgresStore::migrate`] or by your own migrations from
//! [`PostgresStore::schema`]:
//!
//! ```sql
//! CREATE TABLE IF NOT EXISTS idempotency_records (
//!     id BYTEA PRIMARY KEY,          -- the record id (32 bytes)
//!     owner BYTEA,                   -- the owner token while in flight, NULL once completed
//!     fencing_token BIGINT NOT NULL, -- from the sequence below
//!     fingerprint BYTEA NOT NULL,
//!     record BYTEA,                  -- the completed record's compact encoding
//!     expires_at TIMESTAMPTZ NOT NULL, -- the lease's end, or the retention's
//!     waiting BOOLEAN NOT NULL DEFAULT false -- a duplicate waits for a NOTIFY
//! );
//! CREATE SEQUENCE IF NOT EXISTS idempotency_records_fencing;
//! CREATE INDEX IF NOT EXISTS idempotency_records_expires_at ON idempotency_records (expires_at);
//! ```
//!
//! Each call is one statement (the queries are the `.sql` files beside
//! this one): a claim inserts the record or takes over an expired one and
//! answers what holds it otherwise, in one round trip; complete, release
//! and renew act only on a live claim of their owner. Times come from the
//! database's clock (`now()`), never the application's. Fencing tokens come
//! from one sequence. An expired record acts as absent at once, and a task
//! the store starts with its first claim deletes expired records in batches
//! of 1,000 every minute. `Wait` duplicates mark the record as waited for
//! and listen (`LISTEN`, one connection per store): its completion or
//! release sends a `NOTIFY` only then, so neither waiting nor completing
//! polls (each wait lasts a second at most, so a notification lost while
//! the listening connection reconnects costs no more).
//!
//! # Transactional mode
//!
//! [`PostgresStore::transactional`] (what [`IdempotencyLayer::postgres`](crate::IdempotencyLayer::postgres)
//! builds) closes the window every other store leaves open: the handler
//! commits its business write, the process dies before the record is
//! written, and the retry runs the handler again. Here the request gets a
//! transaction ([`RequestTransaction`], an axum extractor and a request
//! extension) and writes in it; when the inner service answers, the store
//! writes the completed record in that same transaction, checks there that
//! the claim is still its own, and commits, and only then does the client
//! get the response. So:
//!
//! - a response that is not stored (5xx, 408, 425, 429, or what the storage
//!   rule refuses), an inner service's error or a panic rolls the
//!   transaction back and gives the key back;
//! - the response body is kept up to the storage cap before the commit; a
//!   body over the cap commits with a record that says so (`410` to
//!   duplicates), and a body that fails commits as failed: the writes stand
//!   and the key never runs again;
//! - a commit that fails (a serialization failure, a deadlock, the database
//!   gone) keeps nothing and answers
//!   [`NotCommitted`](crate::RejectionKind::NotCommitted), `503` with
//!   `Retry-After`: the retry runs again;
//! - a stale owner's commit fails its owner check, and its writes roll back.
//!
//! The claim's liveness follows the owner's database session, not only its
//! lease. The claim statement takes a session-level advisory lock on the
//! record (one 64-bit key from the record id and the table's name) in the
//! same statement that writes the in-flight record, and the request's
//! `BEGIN` turns it into a transaction-level lock of the same key, held
//! until the commit or rollback. A process that dies before its commit
//! loses its session, so PostgreSQL rolls its writes back and frees the
//! lock; the next claim of the key finds the record in flight with its lock
//! free and takes it over at once, without waiting for the lease. A process
//! that dies after the commit left a completed record: the retry gets the
//! replay. Duplicates that find the lock held see the record in flight with
//! its fingerprint (`422` still beats `409`), for as long as the owner's
//! session lives, even past its lease: a live owner never loses its key to
//! a retry, nor its commit to its lease (the background purge leaves such a
//! claim alone for a day past its lease). Bound a stuck handler with
//! PostgreSQL's `statement_timeout` or `idle_in_transaction_session_timeout`.
//! Advisory locks share one key space per database: an application's own
//! advisory locks are unlikely to meet these keys, but may.
//!
//! A first execution costs these round trips besides the handler's own: the
//! claim (one statement), `BEGIN` (with the lock's hand-over), the record's
//! update and the `COMMIT`. The transaction holds one pool connection for
//! as long as the handler runs: size the pool for the requests in flight.
//! Transactions run at the database's default isolation (`READ
//! COMMITTED`).

use std::{
    fmt,
    sync::{Arc, Weak},
    time::Duration,
};

use bytes::Bytes;
use sqlx::{PgPool, Row, postgres::PgRow};

mod transaction;
mod waiters;

pub use self::transaction::{RequestTransaction, TransactionEnded, TransactionGuard};
use self::{
    transaction::OpenTransactions,
    waiters::{LONGEST_WAIT, Waiters},
};
use super::{Claim, ClaimRequest, Lease, OwnerToken, OwnerTokens, RecordState, Store, StoreError};
use crate::{ConfigError, FencingToken, Fingerprint, Record, RecordId};

pub use sqlx;

type PgQuery<'q> = sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>;

/// Expired records deleted per statement by the background purge.
const PURGE_BATCH: i64 = 1_000;
/// How often the background purge runs.
const PURGE_EVERY: Duration = Duration::from_secs(60);

/// A store on PostgreSQL: every instance of the application that shares the
/// database shares the records.
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
    pool: PgPool,
    table: String,
    queries: Queries,
    /// Transactional mode: the executing claims' transactions.
    transactions: Option<OpenTransactions>,
    /// Mixed into every advisory lock key, so that two tables' records
    /// never share one.
    lock_salt: i64,
    owners: OwnerTokens,
    purging: std::sync::Once,
    waiters: Arc<Waiters>,
}

/// The queries, with the table's name in them.
struct Queries {
    schema: String,
    claim: String,
    claim_session: String,
    complete: String,
    release: String,
    renew: String,
    lookup: String,
    purge: String,
    wait: String,
    /// The `NOTIFY` channel of completions and releases.
    channel: String,
}

impl Queries {
    fn for_table(table: &str) -> Self {
        let named = |sql: &str| sql.replace("{table}", table);
        Self {
            schema: named(include_str!("queries/schema.sql")),
            claim: named(include_str!("queries/claim.sql")),
            claim_session: named(include_str!("queries/claim_session.sql")),
            complete: named(include_str!("queries/complete.sql")),
            release: named(include_str!("queries/release.sql")),
            renew: named(include_str!("queries/renew.sql")),
            lookup: named(include_str!("queries/lookup.sql")),
            purge: named(include_str!("queries/purge.sql")),
            wait: named(include_str!("queries/wait.sql")),
            channel: format!("{table}_settled"),
        }
    }
}

impl fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresStore")
            .field("table", &self.inner.table)
            .field("transactional", &self.inner.transactions.is_some())
            .finish_non_exhaustive()
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
        Self::in_table(pool, "idempotency_records".to_owned(), false)
    }

    /// A store on `pool` in transactional mode (see the module docs): each
    /// guarded request gets a [`RequestTransaction`], and its record commits
    /// in it. [`IdempotencyLayer::postgres`](crate::IdempotencyLayer::postgres) builds one.
    ///
    /// # Example
    /// ```
    /// use tower_idempotency::{IdempotencyLayer, store::postgres::{PostgresStore, sqlx::PgPool}};
    ///
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let pool = PgPool::connect_lazy("postgres://postgres@127.0.0.1/app").unwrap();
    /// let layer = IdempotencyLayer::new(PostgresStore::transactional(pool));
    /// # drop(layer);
    /// # });
    /// ```
    pub fn transactional(pool: PgPool) -> Self {
        Self::in_table(pool, "idempotency_records".to_owned(), true)
    }

    fn in_table(pool: PgPool, table: String, transactional: bool) -> Self {
        let salt = <sha2::Sha256 as sha2::Digest>::digest(table.as_bytes());
        let lock_salt = i64::from_be_bytes(std::array::from_fn(|i| salt[i]));
        Self {
            inner: Arc::new(Inner {
                queries: Queries::for_table(&table),
                transactions: transactional.then(OpenTransactions::default),
                lock_salt,
                pool,
                table,
                owners: OwnerTokens::new(),
                purging: std::sync::Once::new(),
                waiters: Arc::default(),
            }),
        }
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
        let plain = table.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if table.is_empty() || table.len() > 50 || !plain || table.as_bytes()[0].is_ascii_digit() {
            return Err(ConfigError::InvalidName("table"));
        }
        let transactional = self.inner.transactions.is_some();
        Ok(Self::in_table(self.inner.pool.clone(), table.to_owned(), transactional))
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
        &self.inner.queries.schema
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
        sqlx::raw_sql(sqlx::AssertSqlSafe(self.inner.queries.schema.clone()))
            .execute(&self.inner.pool)
            .await
            .map_err(StoreError::unavailable)?;
        Ok(())
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
        self.inner.purge(i64::from(limit)).await
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
        &self.inner.pool
    }

    fn next_owner(&self) -> OwnerToken {
        self.inner.owners.next()
    }

    /// Starts the background purge, once, on the runtime of the first claim.
    fn start_purging(&self) {
        self.inner.purging.call_once(|| {
            let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
            let inner = Arc::downgrade(&self.inner);
            runtime.spawn(purge_forever(inner));
        });
    }

    /// Runs an owner-checked update of a claim: done, or not the owner.
    async fn owned(&self, query: PgQuery<'_>) -> Result<(), StoreError> {
        let done = query.execute(&self.inner.pool).await.map_err(StoreError::unavailable)?;
        if done.rows_affected() == 1 { Ok(()) } else { Err(StoreError::NotOwner) }
    }

    /// Runs a completion or release, whose one row says whether it was done.
    async fn settled(&self, query: PgQuery<'_>) -> Result<(), StoreError> {
        let row = query.fetch_one(&self.inner.pool).await.map_err(StoreError::unavailable)?;
        let done: i64 = row.try_get("done").map_err(StoreError::unavailable)?;
        if done == 1 { Ok(()) } else { Err(StoreError::NotOwner) }
    }
}

impl Inner {
    async fn purge(&self, limit: i64) -> Result<u64, StoreError> {
        let done = sqlx::query(sqlx::AssertSqlSafe(self.queries.purge.as_str()))
            .bind(limit)
            .execute(&self.pool)
            .await
            .map_err(StoreError::unavailable)?;
        Ok(done.rows_affected())
    }
}

/// Deletes expired records in batches every [`PURGE_EVERY`], for as long as
/// the store lives.
async fn purge_forever(inner: Weak<Inner>) {
    loop {
        tokio::time::sleep(PURGE_EVERY).await;
        let Some(inner) = inner.upgrade() else { return };
        loop {
            match inner.purge(PURGE_BATCH).await {
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

fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
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
        self.start_purging();
        if let Some(transactions) = &self.inner.transactions {
            return self.claim_in_session(request, transactions).await;
        }
        let owner = self.next_owner();
        let id = request.id();
        // A claim that raced a concurrent first claim of the same record
        // finds nothing and goes again; a few tries always settle it.
        for _ in 0..3 {
            let row = sqlx::query(sqlx::AssertSqlSafe(self.inner.queries.claim.as_str()))
                .bind(id.as_bytes().as_slice())
                .bind(owner.as_u128().to_be_bytes().as_slice())
                .bind(request.fingerprint().as_bytes().as_slice())
                .bind(millis(request.lease()))
                .bind(request.replace_completed())
                .fetch_optional(&self.inner.pool)
                .await
                .map_err(StoreError::unavailable)?;
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
        if let Some(transactions) = &self.inner.transactions
            && let Some(transaction) = transactions.take(owner).await
        {
            return self.commit(transaction, id, owner, &encoded, retention).await;
        }
        let query = sqlx::query(sqlx::AssertSqlSafe(self.inner.queries.complete.as_str()))
            .bind(id.as_bytes().as_slice())
            .bind(owner.as_u128().to_be_bytes().as_slice())
            .bind(encoded.as_ref())
            .bind(millis(retention));
        self.settled(query).await
    }

    async fn release(&self, id: &RecordId, owner: OwnerToken) -> Result<(), StoreError> {
        if let Some(transaction) = self.inner.transactions.as_ref().and_then(|open| open.try_take(owner)) {
            // Ends the transaction and frees the lock; a failure here ended it too.
            let _ = transaction.rollback().await;
        }
        self.release_row(id, owner).await
    }

    fn attach(&self, lease: &Lease, extensions: &mut http::Extensions) {
        if let Some(transaction) = self.inner.transactions.as_ref().and_then(|open| open.get(lease.owner())) {
            extensions.insert(transaction);
        }
    }

    fn commits_handler_writes(&self) -> bool {
        self.inner.transactions.is_some()
    }

    async fn renew(&self, id: &RecordId, owner: OwnerToken, lease: Duration) -> Result<(), StoreError> {
        let query = sqlx::query(sqlx::AssertSqlSafe(self.inner.queries.renew.as_str()))
            .bind(id.as_bytes().as_slice())
            .bind(owner.as_u128().to_be_bytes().as_slice())
            .bind(millis(lease));
        self.owned(query).await
    }

    async fn lookup(&self, id: &RecordId) -> Result<Option<RecordState>, StoreError> {
        let row = sqlx::query(sqlx::AssertSqlSafe(self.inner.queries.lookup.as_str()))
            .bind(id.as_bytes().as_slice())
            .fetch_optional(&self.inner.pool)
            .await
            .map_err(StoreError::unavailable)?;
        let Some(row) = row else { return Ok(None) };
        let completed: bool = row.try_get("completed").map_err(StoreError::unavailable)?;
        if completed {
            return Ok(Some(RecordState::Completed(record_of(&row)?)));
        }
        Ok(Some(RecordState::InFlight {
            fingerprint: fingerprint_column(&row)?,
            fencing_token: Some(fencing_token(&row)?),
        }))
    }

    async fn wait(&self, id: &RecordId, timeout: Duration) {
        let timeout = timeout.min(LONGEST_WAIT);
        let inner = &self.inner;
        if inner.waiters.listen(&inner.pool, &inner.queries.channel).await.is_err() {
            // No listening connection: the caller claims again after a pause.
            tokio::time::sleep(timeout.min(Duration::from_millis(50))).await;
            return;
        }
        // Registered before the record is marked: a completion that follows
        // cannot be missed.
        let signal = inner.waiters.signal(id);
        {
            let mut woken = std::pin::pin!(signal.notified());
            woken.as_mut().enable();
            let marked = sqlx::query(sqlx::AssertSqlSafe(inner.queries.wait.as_str()))
                .bind(id.as_bytes().as_slice())
                .execute(&inner.pool)
                .await;
            // Not in flight any more (or the store failed): the caller
            // claims again.
            if matches!(marked, Ok(done) if done.rows_affected() == 1) {
                let _ = tokio::time::timeout(timeout, woken).await;
            }
        }
        inner.waiters.done(id, signal);
    }
}
