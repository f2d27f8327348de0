//! The request's transaction, under a transactional [`PostgresStore`]: the
//! claim that opens it on the connection holding the record's lock, what
//! the inner service writes in, and the commit of the record in it.
//!
//! [`PostgresStore`]: super::PostgresStore

use std::{
    collections::HashMap,
    fmt,
    ops::{Deref, DerefMut},
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use sqlx::{PgConnection, Postgres, Row};
use tokio::sync::{Mutex as AsyncMutex, OwnedMappedMutexGuard, OwnedMutexGuard};

use super::{PostgresStore, fencing_token, fingerprint_column, millis, record_of};
use crate::{
    RecordId,
    store::{Claim, ClaimRequest, Lease, OwnerToken, StoreError},
};

type Transaction = sqlx::Transaction<'static, Postgres>;

/// The database transaction of a request that runs under a transactional
/// [`PostgresStore`](super::PostgresStore): write the request's business
/// changes in it, and they commit together with its idempotency record,
/// once the response is known, or not at all.
///
/// The layer puts it in the request's extensions; axum handlers take it as
/// an extractor (feature `axum`). It exists only for requests the layer
/// guards (those with an idempotency key); a handler that also serves
/// requests without one takes `Option<RequestTransaction>`.
///
/// Do not keep it past the response: the layer takes the transaction back
/// to commit it, and waits (up to the store timeout) for a handler that
/// still holds it locked.
///
/// # Example
/// ```no_run
/// use axum::{Router, routing::post};
/// use tower_idempotency::{IdempotencyLayer, store::postgres::{RequestTransaction, sqlx}};
///
/// async fn charge(transaction: RequestTransaction) -> Result<&'static str, http::StatusCode> {
///     let mut connection = transaction.lock().await.map_err(|_| http::StatusCode::INTERNAL_SERVER_ERROR)?;
///     sqlx::query("INSERT INTO charges (amount) VALUES (100)")
///         .execute(&mut *connection)
///         .await
///         .map_err(|_| http::StatusCode::SERVICE_UNAVAILABLE)?;
///     Ok("charged")
/// }
///
/// # async fn run() {
/// let pool = sqlx::PgPool::connect("postgres://postgres@127.0.0.1/app").await.unwrap();
/// let app: Router = Router::new().route("/charges", post(charge)).layer(IdempotencyLayer::postgres(pool));
/// # drop(app);
/// # }
/// ```
///
/// Any tower service finds it in the request's extensions:
///
/// ```
/// use tower_idempotency::{RequestBody, store::postgres::RequestTransaction};
///
/// fn transaction_of<B>(request: &http::Request<RequestBody<B>>) -> Option<&RequestTransaction> {
///     request.extensions().get::<RequestTransaction>()
/// }
/// ```
#[derive(Clone)]
pub struct RequestTransaction {
    open: Arc<AsyncMutex<Option<Transaction>>>,
}

impl fmt::Debug for RequestTransaction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RequestTransaction").finish_non_exhaustive()
    }
}

impl RequestTransaction {
    fn new(transaction: Transaction) -> Self {
        Self { open: Arc::new(AsyncMutex::new(Some(transaction))) }
    }

    /// The transaction's connection, for as long as the guard lives: pass
    /// `&mut *guard` to sqlx as the executor. Fails once the transaction
    /// is over (the response was answered).
    ///
    /// # Example
    /// ```
    /// use tower_idempotency::store::postgres::{RequestTransaction, TransactionEnded, sqlx};
    ///
    /// async fn record_charge(transaction: &RequestTransaction) -> Result<(), Box<dyn std::error::Error>> {
    ///     let mut connection = transaction.lock().await?;
    ///     sqlx::query("INSERT INTO charges (amount) VALUES ($1)").bind(100_i64).execute(&mut *connection).await?;
    ///     Ok(())
    /// }
    /// ```
    pub async fn lock(&self) -> Result<TransactionGuard, TransactionEnded> {
        let guard = self.open.clone().lock_owned().await;
        OwnedMutexGuard::try_map(guard, Option::as_mut).map(TransactionGuard).map_err(|_| TransactionEnded)
    }

    /// Takes the transaction out, to commit or roll it back: waits for a
    /// handler that still holds it.
    async fn take(&self) -> Option<Transaction> {
        self.open.lock().await.take()
    }

    /// Takes the transaction out if no handler holds it; one that does
    /// rolls it back when it lets go of the last handle.
    fn try_take(&self) -> Option<Transaction> {
        self.open.try_lock().ok()?.take()
    }
}

/// A request's transaction, locked for the caller: it dereferences to the
/// transaction's [`PgConnection`]. Made by [`RequestTransaction::lock`].
///
/// # Example
/// ```
/// use tower_idempotency::store::postgres::{RequestTransaction, sqlx};
///
/// async fn count(transaction: &RequestTransaction) -> Option<i64> {
///     let mut connection = transaction.lock().await.ok()?;
///     sqlx::query_scalar("SELECT count(*) FROM charges").fetch_one(&mut *connection).await.ok()
/// }
/// ```
pub struct TransactionGuard(OwnedMappedMutexGuard<Option<Transaction>, Transaction>);

impl fmt::Debug for TransactionGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TransactionGuard").finish_non_exhaustive()
    }
}

impl Deref for TransactionGuard {
    type Target = PgConnection;

    fn deref(&self) -> &PgConnection {
        &self.0
    }
}

impl DerefMut for TransactionGuard {
    fn deref_mut(&mut self) -> &mut PgConnection {
        &mut self.0
    }
}

/// The request's transaction is over: it was committed or rolled back when
/// the response was answered.
///
/// # Example
/// ```
/// use tower_idempotency::store::postgres::TransactionEnded;
///
/// assert!(TransactionEnded.to_string().contains("over"));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the request's transaction is over: it ended with the response")]
pub struct TransactionEnded;

/// The open transactions of a store's executing claims, by owner.
#[derive(Default)]
pub(super) struct OpenTransactions {
    by_owner: Mutex<HashMap<OwnerToken, RequestTransaction>>,
}

impl OpenTransactions {
    pub(super) fn open(&self, owner: OwnerToken, transaction: Transaction) {
        self.lock().insert(owner, RequestTransaction::new(transaction));
    }

    pub(super) fn get(&self, owner: OwnerToken) -> Option<RequestTransaction> {
        self.lock().get(&owner).cloned()
    }

    /// The transaction of `owner`, no longer open to others; waits for a
    /// handler that holds it. `None` when there is none (or it was taken).
    pub(super) async fn take(&self, owner: OwnerToken) -> Option<Option<Transaction>> {
        let open = self.lock().remove(&owner)?;
        Some(open.take().await)
    }

    /// As [`OpenTransactions::take`], without waiting.
    pub(super) fn try_take(&self, owner: OwnerToken) -> Option<Transaction> {
        self.lock().remove(&owner)?.try_take()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<OwnerToken, RequestTransaction>> {
        // A panic never leaves the map half-changed.
        self.by_owner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl PostgresStore {
    /// The advisory lock key of `id`'s claims in transactional mode.
    fn lock_key(&self, id: &RecordId) -> i64 {
        let bytes = id.as_bytes();
        i64::from_be_bytes(std::array::from_fn(|i| bytes[i])) ^ self.inner.lock_salt
    }

    /// A claim in transactional mode: on a connection of its own, which
    /// holds the record's lock from the claim statement on and, when the
    /// claim is granted, carries the request's transaction.
    pub(super) async fn claim_in_session(
        &self,
        request: ClaimRequest,
        transactions: &OpenTransactions,
    ) -> Result<Claim, StoreError> {
        let owner = self.next_owner();
        let id = request.id();
        let lock = self.lock_key(&id);
        let mut connection = MayHoldLock(Some(self.inner.pool.acquire().await.map_err(StoreError::unavailable)?));
        // The lock was busy but no record in sight: a concurrent claim
        // between its lock and its commit, or a duplicate's brief look.
        // Tries again a little later, for up to two seconds.
        let mut pause = Duration::from_micros(200);
        let give_up = tokio::time::Instant::now() + Duration::from_secs(2);
        while tokio::time::Instant::now() < give_up {
            let row = sqlx::query(sqlx::AssertSqlSafe(self.inner.queries.claim_session.as_str()))
                .bind(id.as_bytes().as_slice())
                .bind(owner.as_u128().to_be_bytes().as_slice())
                .bind(request.fingerprint().as_bytes().as_slice())
                .bind(millis(request.lease()))
                .bind(request.replace_completed())
                .bind(lock)
                .fetch_one(connection.get()?)
                .await
                .map_err(StoreError::unavailable)?;
            let state: Option<String> = row.try_get("state").map_err(StoreError::unavailable)?;
            if state.as_deref().is_some_and(|state| state != "acquired") {
                // The statement kept no lock, and the connection is done.
                connection.release();
            }
            return match state.as_deref() {
                None => {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(10));
                    continue;
                }
                Some("acquired") => {
                    let lease = Lease::new(owner, fencing_token(&row)?);
                    // The session's lock becomes the transaction's: it goes
                    // with the commit, the rollback or the session.
                    let begin =
                        format!("BEGIN; SELECT pg_advisory_xact_lock({lock}); SELECT pg_advisory_unlock({lock})");
                    let begin = sqlx::SqlSafeStr::into_sql_str(sqlx::AssertSqlSafe(begin));
                    // From its first poll on, `BEGIN` is queued on the
                    // connection: dropped then, sqlx flushes it and rolls back
                    // before pooling the connection. (`Transaction::begin` is
                    // hidden in sqlx's docs, but public: its pool begins
                    // transactions on a connection it holds the same way.)
                    let connection = connection.release().ok_or_else(|| StoreError::unavailable("no connection"))?;
                    match sqlx::Transaction::begin(connection, Some(begin)).await {
                        Ok(transaction) => {
                            transactions.open(owner, transaction);
                            Ok(Claim::Acquired(lease))
                        }
                        Err(error) => {
                            let _ = self.release_row(&id, owner).await;
                            Err(StoreError::unavailable(error))
                        }
                    }
                }
                Some("in_flight") => Ok(Claim::InFlight { fingerprint: fingerprint_column(&row)? }),
                Some(_) => Ok(Claim::Completed(record_of(&row)?)),
            };
        }
        Err(StoreError::unavailable("a claim found the record's lock held and no record for two seconds"))
    }

    /// Completes a claim in its request's transaction, and commits.
    pub(super) async fn commit(
        &self,
        transaction: Option<sqlx::Transaction<'static, sqlx::Postgres>>,
        id: &RecordId,
        owner: OwnerToken,
        record: &[u8],
        retention: Duration,
    ) -> Result<(), StoreError> {
        let Some(mut transaction) = transaction else {
            return Err(StoreError::unavailable("the request's transaction was ended by its handler"));
        };
        let row = sqlx::query(sqlx::AssertSqlSafe(self.inner.queries.complete.as_str()))
            .bind(id.as_bytes().as_slice())
            .bind(owner.as_u128().to_be_bytes().as_slice())
            .bind(record)
            .bind(millis(retention))
            .fetch_one(&mut *transaction)
            .await
            .map_err(StoreError::unavailable)?;
        let done: i64 = row.try_get("done").map_err(StoreError::unavailable)?;
        if done != 1 {
            // Another owner holds the key: nothing this request wrote stays.
            let _ = transaction.rollback().await;
            return Err(StoreError::NotOwner);
        }
        transaction.commit().await.map_err(StoreError::unavailable)
    }

    /// Deletes the in-flight record of `owner`.
    pub(super) async fn release_row(&self, id: &RecordId, owner: OwnerToken) -> Result<(), StoreError> {
        let query = sqlx::query(sqlx::AssertSqlSafe(self.inner.queries.release.as_str()))
            .bind(id.as_bytes().as_slice())
            .bind(owner.as_u128().to_be_bytes().as_slice());
        self.settled(query).await
    }
}

/// A pooled connection whose session may hold a record's advisory lock (a
/// claim statement in flight): if dropped so, it is closed rather than
/// pooled, so that its session ends and frees the lock. A claim whose
/// future is dropped mid-statement would otherwise lock its key out for as
/// long as the pool keeps the connection.
struct MayHoldLock(Option<sqlx::pool::PoolConnection<sqlx::Postgres>>);

impl MayHoldLock {
    fn get(&mut self) -> Result<&mut sqlx::PgConnection, StoreError> {
        self.0.as_deref_mut().ok_or_else(|| StoreError::unavailable("the claim's connection was given back"))
    }

    /// The connection, known to hold no lock of its own any more (or
    /// handing it to a transaction).
    fn release(&mut self) -> Option<sqlx::pool::PoolConnection<sqlx::Postgres>> {
        self.0.take()
    }
}

impl Drop for MayHoldLock {
    fn drop(&mut self) {
        if let Some(connection) = &mut self.0 {
            connection.close_on_drop();
        }
    }
}

#[cfg(feature = "axum")]
mod extract {
    use axum_core::{
        extract::{FromRequestParts, OptionalFromRequestParts},
        response::Response,
    };
    use http::request::Parts;

    use super::RequestTransaction;
    use crate::context::extract::missing_key;

    const EXTRACTOR_DETAIL: &str = "Send an Idempotency-Key header with this request: its handler writes in the \
                                    request's transaction, which only requests the idempotency layer guards have \
                                    (with a key, and while its store answers).";

    impl<S: Send + Sync> FromRequestParts<S> for RequestTransaction {
        type Rejection = Response;

        async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
            parts
                .extensions
                .get::<Self>()
                .cloned()
                .ok_or_else(|| missing_key(parts, "RequestTransaction", EXTRACTOR_DETAIL))
        }
    }

    impl<S: Send + Sync> OptionalFromRequestParts<S> for RequestTransaction {
        type Rejection = std::convert::Infallible;

        async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Option<Self>, Self::Rejection> {
            Ok(parts.extensions.get::<Self>().cloned())
        }
    }
}
