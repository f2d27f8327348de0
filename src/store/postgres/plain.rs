//! The plain store: records are rows of their own, written outside the
//! handler's transactions, one statement per call.

use std::{fmt, sync::Arc, time::Duration};

use bytes::Bytes;
use sqlx::{PgPool, Row, postgres::PgRow};

use super::{
    DEFAULT_TABLE, Shared, corrupt,
    queries::PgQuery,
    waiters::{LONGEST_WAIT, Waiters},
};
use crate::{
    ConfigError, FencingToken, Fingerprint, Record, RecordId,
    store::{Claim, ClaimRequest, Lease, OwnerToken, RecordState, Store, StoreError},
};

/// A store on PostgreSQL: every instance of the application that shares the
/// database shares the records. Its records are rows of their own, written
/// outside the handler's transactions;
/// [`TransactionalStore`](super::TransactionalStore) commits them with the
/// handler's writes.
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
    fn pool_exhausted(&self) -> Option<u32> {
        self.inner.shared.pool_exhausted()
    }

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
