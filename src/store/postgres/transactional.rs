//! The transactional store: one transaction per request, which holds the
//! request's locks, carries the handler's writes and commits its record.

use std::{fmt, sync::Arc, time::Duration};

use bytes::Bytes;
use sqlx::{PgPool, Row};
use tokio::sync::Semaphore;

use super::{
    DEFAULT_TABLE, Shared,
    transaction::{OpenTransactions, Session},
};
use crate::{
    ConfigError, FencingToken, Fingerprint, Record, RecordId,
    store::{Claim, ClaimRequest, Lease, OwnerToken, RecordState, Store, StoreError},
};

/// How long a completion may take to write its record and commit before its
/// outcome is found out (BENCHMARKS.md and the module docs: never the store
/// timeout, which a slow but successful commit would outlast).
const COMMIT_PATIENCE: Duration = Duration::from_secs(30);
/// How long finding out a lost commit's outcome waits for its transaction
/// to end.
const FIND_OUT_PATIENCE: Duration = Duration::from_secs(5);
/// How many times a claim starts over when a record committed under its
/// snapshot (REPEATABLE READ and SERIALIZABLE only).
const CLAIM_TRIES: usize = 3;
/// PostgreSQL's `serialization_failure`.
const SERIALIZATION_FAILURE: &str = "40001";
/// PostgreSQL's `lock_not_available`, raised at `lock_timeout`.
const LOCK_NOT_AVAILABLE: &str = "55P03";

/// A store on PostgreSQL whose records commit in the request's own
/// transaction, with the handler's writes, or not at all; what
/// [`IdempotencyLayer::postgres`](crate::IdempotencyLayer::postgres)
/// builds. Each guarded request gets a [`RequestTransaction`](super::RequestTransaction)
/// to write in. See the module docs for the protocol and its trade-offs.
///
/// It shares the table's layout with [`PostgresStore`](super::PostgresStore),
/// but a table serves one store or the other: the transactional store keeps
/// no row while a request runs.
///
/// # Example
/// ```no_run
/// use tower_idempotency::{IdempotencyLayer, store::postgres::{TransactionalStore, sqlx::PgPool}};
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let pool = PgPool::connect("postgres://postgres@127.0.0.1/app").await.unwrap();
/// let store = TransactionalStore::new(pool);
/// store.migrate().await.unwrap();
/// let layer = IdempotencyLayer::new(store);
/// # drop(layer);
/// # });
/// ```
#[derive(Clone)]
pub struct TransactionalStore {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<Shared>,
    transactions: OpenTransactions,
    /// A permit per duplicate that may wait at once: each holds a connection.
    waiting: Arc<Semaphore>,
}

impl fmt::Debug for TransactionalStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TransactionalStore")
            .field("table", &self.inner.shared.table)
            .field("max_waiting", &self.inner.waiting.available_permits())
            .finish_non_exhaustive()
    }
}

impl TransactionalStore {
    /// A store on `pool`, in the table `idempotency_records`. At most half
    /// the pool's connections (at least one) serve waiting duplicates at
    /// once ([`TransactionalStore::with_max_waiting`]).
    ///
    /// # Example
    /// ```
    /// use tower_idempotency::store::postgres::{TransactionalStore, sqlx::PgPool};
    ///
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let pool = PgPool::connect_lazy("postgres://postgres@127.0.0.1/app").unwrap();
    /// let store = TransactionalStore::new(pool);
    /// # drop(store);
    /// # });
    /// ```
    pub fn new(pool: PgPool) -> Self {
        let max_waiting = (pool.options().get_max_connections() / 2).max(1) as usize;
        Self::on(Shared::new(pool, DEFAULT_TABLE), max_waiting)
    }

    fn on(shared: Arc<Shared>, max_waiting: usize) -> Self {
        let waiting = Arc::new(Semaphore::new(max_waiting));
        Self { inner: Arc::new(Inner { shared, transactions: OpenTransactions::default(), waiting }) }
    }

    /// Keeps the records in `table`: a plain SQL identifier (letters,
    /// digits and `_`, at most 50 bytes, not starting with a digit).
    ///
    /// # Example
    /// ```
    /// use tower_idempotency::store::postgres::{TransactionalStore, sqlx::PgPool};
    ///
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let pool = PgPool::connect_lazy("postgres://postgres@127.0.0.1/app").unwrap();
    /// let store = TransactionalStore::new(pool.clone()).with_table("payments_idempotency").unwrap();
    /// assert!(TransactionalStore::new(pool).with_table("records; DROP TABLE x").is_err());
    /// # });
    /// ```
    pub fn with_table(self, table: &str) -> Result<Self, ConfigError> {
        let shared = Shared::new(self.inner.shared.pool.clone(), Shared::checked(table)?);
        Ok(Self::on(shared, self.inner.waiting.available_permits()))
    }

    /// How many duplicates may wait at once under
    /// [`InFlightPolicy::Wait`](crate::InFlightPolicy::Wait): each waits on
    /// the first request's lock, and holds a pool connection while it does.
    /// Past the bound a duplicate is answered as in flight (`409`). Size the
    /// pool for the requests that run plus these.
    ///
    /// # Example
    /// ```
    /// use tower_idempotency::store::postgres::{TransactionalStore, sqlx::PgPool};
    ///
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let pool = PgPool::connect_lazy("postgres://postgres@127.0.0.1/app").unwrap();
    /// let store = TransactionalStore::new(pool).with_max_waiting(4);
    /// # drop(store);
    /// # });
    /// ```
    #[must_use]
    pub fn with_max_waiting(self, max_waiting: usize) -> Self {
        Self::on(self.inner.shared.clone(), max_waiting)
    }

    /// The SQL that creates the store's table, sequence and index, for
    /// applications that run their own migrations.
    ///
    /// # Example
    /// ```
    /// use tower_idempotency::store::postgres::{TransactionalStore, sqlx::PgPool};
    ///
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let store = TransactionalStore::new(PgPool::connect_lazy("postgres://postgres@127.0.0.1/app").unwrap());
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
    /// use tower_idempotency::store::postgres::{TransactionalStore, sqlx::PgPool};
    ///
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let store = TransactionalStore::new(PgPool::connect("postgres://postgres@127.0.0.1/app").await.unwrap());
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
    /// use tower_idempotency::store::postgres::{TransactionalStore, sqlx::PgPool};
    ///
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let store = TransactionalStore::new(PgPool::connect("postgres://postgres@127.0.0.1/app").await.unwrap());
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
    /// use tower_idempotency::store::postgres::{TransactionalStore, sqlx::PgPool};
    ///
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let store = TransactionalStore::new(PgPool::connect_lazy("postgres://postgres@127.0.0.1/app").unwrap());
    /// assert_eq!(store.pool().size(), 0);
    /// # });
    /// ```
    pub fn pool(&self) -> &PgPool {
        &self.inner.shared.pool
    }

    /// One try of a claim: `None` when a record committed under the
    /// transaction's snapshot, and the claim must start over.
    async fn try_claim(&self, request: &ClaimRequest, locks: (i64, i64)) -> Result<Option<Claim>, StoreError> {
        let shared = &self.inner.shared;
        let id = request.id();
        let mut session = Session::begin(&shared.pool, None).await.map_err(StoreError::unavailable)?;
        let row = shared
            .queries
            .call_claim(locks, &id, request.replace_completed())
            .fetch_one(session.connection())
            .await
            .map_err(StoreError::unavailable)?;
        let state: String = row.try_get("state").map_err(StoreError::unavailable)?;
        let isolation: String = row.try_get("isolation").map_err(StoreError::unavailable)?;
        let record: Option<Vec<u8>> = row.try_get("record").map_err(StoreError::unavailable)?;
        let token: Option<i64> = row.try_get("fencing_token").map_err(StoreError::unavailable)?;
        let snapshot_per_statement = isolation == "read committed";
        if let Some(token) = token {
            if !snapshot_per_statement {
                let probed =
                    shared.queries.probe_claim(&id, token, &request.fingerprint()).execute(session.connection()).await;
                match probed {
                    Ok(_) => {}
                    Err(error) if has_sqlstate(&error, SERIALIZATION_FAILURE) => return Ok(None),
                    Err(error) => return Err(StoreError::unavailable(error)),
                }
            }
            let fencing_token = FencingToken::new(u64::try_from(token).map_err(|_| super::corrupt("fencing token"))?);
            session.fencing_token = token;
            let owner = shared.owners.next();
            self.inner.transactions.open(owner, session);
            return Ok(Some(Claim::Acquired(Lease::new(owner, fencing_token))));
        }
        // Not this request's: the transaction took locks only, and rolls
        // back on its way to the pool.
        drop(session);
        // Under `Rerun` a record another request holds is its to replace.
        let record = if request.replace_completed() && state != "locked" { None } else { record };
        let record = match record {
            // A failure to look is no answer: what the locks said stands.
            None if !snapshot_per_statement && !request.replace_completed() => {
                self.completed_now(&id).await.unwrap_or_default()
            }
            record => record,
        };
        Ok(Some(match (record, state.as_str()) {
            (Some(record), _) => Claim::Completed(Record::decode(Bytes::from(record))?),
            (None, "other") => Claim::InFlightMismatch,
            (None, _) => Claim::InFlight { fingerprint: request.fingerprint() },
        }))
    }

    /// The completed record of `id`, read in a statement of its own (its
    /// own snapshot, whatever the isolation).
    async fn completed_now(&self, id: &RecordId) -> Result<Option<Vec<u8>>, StoreError> {
        let shared = &self.inner.shared;
        let Some(row) = shared.fetch_optional(shared.queries.lookup(id)).await? else { return Ok(None) };
        let completed: bool = row.try_get("completed").map_err(StoreError::unavailable)?;
        if !completed {
            return Ok(None);
        }
        row.try_get("record").map_err(StoreError::unavailable)
    }

    /// Writes the record in the session's transaction and commits it.
    async fn commit(&self, session: &mut Session, id: &RecordId, record: &Record, retention: Duration) -> Committed {
        let queries = &self.inner.shared.queries;
        if !session.in_own_transaction() {
            // The handler's savepoint helpers ended the transaction (sqlx rolls
            // it all back when a savepoint fails): what follows committed alone.
            return Committed::No(StoreError::unavailable("the request's transaction was ended by its handler"));
        }
        let encoded = record.encode();
        let write = queries.commit_record(id, session.fencing_token, &record.fingerprint(), &encoded, retention);
        match write.execute(session.connection()).await {
            Ok(_) => {}
            // No `COMMIT` was sent: nothing of the transaction stays.
            Err(error) => return Committed::No(StoreError::unavailable(error)),
        }
        match session.commit().await {
            Ok(()) => Committed::Yes,
            Err(sqlx::Error::Database(error)) if !connection_lost(error.code().as_deref()) => {
                // The server refused: a serialization failure, a deferred
                // constraint, a deadlock. It rolled back.
                Committed::No(StoreError::unavailable(error))
            }
            // The connection went (a pooler reports it as an error of its own).
            Err(error) => Committed::Unknown(error.into()),
        }
    }

    /// Whether the completion of `id` with `fencing_token` committed, once
    /// the transaction that sent it is over (the record's lock is free):
    /// `Ok` if it did, an error that says so if not, and
    /// [`StoreError::OutcomeUnknown`] if that cannot be found out.
    async fn find_out(
        &self,
        id: &RecordId,
        fingerprint: Fingerprint,
        fencing_token: i64,
        lost: Box<dyn std::error::Error + Send + Sync>,
    ) -> Result<(), StoreError> {
        let shared = &self.inner.shared;
        let locks = (shared.fingerprint_lock(id, &fingerprint), shared.record_lock(id));
        let begin = shared.queries.begin_find_out(locks, FIND_OUT_PATIENCE);
        let check = async {
            let mut session = Session::begin(&shared.pool, Some(begin)).await?;
            let row = shared.queries.committed(id, fencing_token).fetch_one(session.connection()).await?;
            session.rollback().await;
            row.try_get::<bool, _>("committed")
        };
        match tokio::time::timeout(FIND_OUT_PATIENCE * 2, check).await {
            Ok(Ok(true)) => {
                tracing::info!(key = %id, error = %lost, "a commit lost from sight had landed");
                Ok(())
            }
            Ok(Ok(false)) => Err(StoreError::unavailable(format!("the transaction did not commit: {lost}"))),
            Ok(Err(error)) => {
                tracing::error!(key = %id, error = %lost, check = %error, "a commit's outcome is unknown");
                Err(StoreError::OutcomeUnknown(lost))
            }
            Err(_) => {
                tracing::error!(key = %id, error = %lost, "a commit's outcome is unknown: the database did not answer");
                Err(StoreError::OutcomeUnknown(lost))
            }
        }
    }
}

/// What became of a commit.
enum Committed {
    Yes,
    No(StoreError),
    /// Sent, and then the connection was lost.
    Unknown(Box<dyn std::error::Error + Send + Sync>),
}

/// Whether an error answered to `COMMIT` may have come after the commit: a
/// lost connection (SQLSTATE class 08, as a pooler reports it), the server
/// shutting down or failing (57, 58, XX), or no code at all.
fn connection_lost(code: Option<&str>) -> bool {
    code.is_none_or(|code| ["08", "57", "58", "XX"].iter().any(|class| code.starts_with(class)))
}

/// Whether `error` is a database error with SQLSTATE `code`.
fn has_sqlstate(error: &sqlx::Error, code: &str) -> bool {
    matches!(error, sqlx::Error::Database(error) if error.code().as_deref() == Some(code))
}

impl Store for TransactionalStore {
    async fn claim(&self, request: ClaimRequest) -> Result<Claim, StoreError> {
        let shared = &self.inner.shared;
        shared.start_purging();
        let id = request.id();
        let locks = (shared.record_lock(&id), shared.fingerprint_lock(&id, &request.fingerprint()));
        for _ in 0..CLAIM_TRIES {
            if let Some(claim) = self.try_claim(&request, locks).await? {
                return Ok(claim);
            }
        }
        Err(StoreError::unavailable("records kept committing under the claim's snapshot"))
    }

    async fn complete(
        &self,
        id: &RecordId,
        owner: OwnerToken,
        record: Record,
        retention: Duration,
    ) -> Result<(), StoreError> {
        let taken = tokio::time::timeout(COMMIT_PATIENCE, self.inner.transactions.take(owner)).await;
        let Ok(taken) = taken else {
            // The handler keeps the transaction locked; it rolls back as the handler lets go.
            return Err(StoreError::unavailable("the handler held the request's transaction past its response"));
        };
        let Some(mut session) = taken? else {
            return Err(StoreError::unavailable("the request's transaction was ended by its handler"));
        };
        let (fencing_token, fingerprint) = (session.fencing_token, record.fingerprint());
        let committed = tokio::time::timeout(COMMIT_PATIENCE, self.commit(&mut session, id, &record, retention)).await;
        // A commit cut off here closes its connection as it is dropped.
        drop(session);
        match committed {
            Ok(Committed::Yes) => Ok(()),
            Ok(Committed::No(error)) => Err(error),
            Ok(Committed::Unknown(lost)) => self.find_out(id, fingerprint, fencing_token, lost).await,
            Err(_) => self.find_out(id, fingerprint, fencing_token, "the commit took longer than 30 s".into()).await,
        }
    }

    async fn release(&self, _id: &RecordId, owner: OwnerToken) -> Result<(), StoreError> {
        if let Some(session) = self.inner.transactions.try_take(owner)? {
            session.rollback().await;
        }
        Ok(())
    }

    fn attach(&self, lease: &Lease, extensions: &mut http::Extensions) {
        if let Some(transaction) = self.inner.transactions.get(lease.owner()) {
            extensions.insert(transaction);
        }
    }

    fn commits_handler_writes(&self) -> bool {
        true
    }

    fn pool_exhausted(&self) -> Option<u32> {
        self.inner.shared.pool_exhausted()
    }

    fn dropped_claims_hold_nothing(&self) -> bool {
        true
    }

    /// The claim lives as long as its transaction: nothing to send.
    async fn renew(&self, _id: &RecordId, owner: OwnerToken, _lease: Duration) -> Result<(), StoreError> {
        if self.inner.transactions.contains(owner) { Ok(()) } else { Err(StoreError::NotOwner) }
    }

    async fn lookup(&self, id: &RecordId) -> Result<Option<RecordState>, StoreError> {
        let shared = &self.inner.shared;
        let row = shared.fetch_one(shared.queries.lookup_locked(id, shared.record_lock(id))).await?;
        let record: Option<Vec<u8>> = row.try_get("record").map_err(StoreError::unavailable)?;
        if let Some(record) = record {
            return Ok(Some(RecordState::Completed(Record::decode(Bytes::from(record))?)));
        }
        let locked: bool = row.try_get("locked").map_err(StoreError::unavailable)?;
        Ok(locked.then_some(RecordState::InFlight { fingerprint: None, fencing_token: None }))
    }

    async fn wait(&self, request: &ClaimRequest, timeout: Duration) -> Result<(), StoreError> {
        let Ok(_permit) = self.inner.waiting.clone().try_acquire_owned() else {
            return Err(StoreError::TooManyWaiting);
        };
        let shared = &self.inner.shared;
        // Ends a little before the caller's own deadline, so that the
        // connection goes back to the pool settled.
        let timeout = timeout.saturating_sub((timeout / 10).min(Duration::from_millis(100)));
        let lock = shared.fingerprint_lock(&request.id(), &request.fingerprint());
        let wait = shared.queries.wait_unlocked(lock, timeout);
        match sqlx::raw_sql(sqlx::AssertSqlSafe(wait)).execute(&shared.pool).await {
            Ok(_) => Ok(()),
            Err(error) if has_sqlstate(&error, LOCK_NOT_AVAILABLE) => Ok(()),
            Err(error) => {
                // The caller claims again; a pause keeps a failing store from being hammered.
                tracing::debug!(%error, "waiting on a request's lock failed");
                tokio::time::sleep(timeout.min(Duration::from_millis(50))).await;
                Ok(())
            }
        }
    }
}
