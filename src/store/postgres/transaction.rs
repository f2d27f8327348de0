//! The request's transaction under a [`TransactionalStore`]: the session
//! that carries it (a pooled connection that never goes back to the pool
//! inside a transaction it cannot account for), what the inner service
//! writes in, and the open transactions of a store's executing claims.
//!
//! [`TransactionalStore`]: super::TransactionalStore

use std::{
    collections::HashMap,
    fmt,
    ops::{Deref, DerefMut},
    sync::{Arc, Mutex, PoisonError},
};

use sqlx::{PgConnection, PgPool, Postgres, pool::PoolConnection, postgres::PgTransactionManager};
use sqlx_core::transaction::TransactionManager;
use tokio::sync::{Mutex as AsyncMutex, OwnedMappedMutexGuard, OwnedMutexGuard};

use crate::store::{OwnerToken, StoreError};

/// A pooled connection that carries a transaction of this store's making.
/// sqlx counts the transaction (a handler's `begin()` on it makes a
/// savepoint, not a second `BEGIN`). Dropped while one of its own
/// statements is on its way (`BEGIN`, `COMMIT`, `ROLLBACK`: sqlx's count
/// could be wrong), the connection is closed, so that its session ends and
/// its locks with it; dropped between statements, it rolls back as it goes
/// back to the pool.
pub(super) struct Session {
    connection: PoolConnection<Postgres>,
    /// Whether none of the session's own statements is on its way.
    settled: bool,
    /// The fencing token of the claim it carries.
    pub(super) fencing_token: i64,
}

impl Session {
    /// A connection of `pool`, in a transaction opened by `BEGIN`, or by
    /// `begin` (a simple query that starts with `BEGIN`).
    pub(super) async fn begin(pool: &PgPool, begin: Option<String>) -> Result<Self, sqlx::Error> {
        let connection = pool.acquire().await?;
        let mut session = Self { connection, settled: false, fencing_token: 0 };
        let begin = begin.map(|begin| sqlx::SqlSafeStr::into_sql_str(sqlx::AssertSqlSafe(begin)));
        PgTransactionManager::begin(&mut session.connection, begin).await?;
        session.settled = true;
        Ok(session)
    }

    pub(super) fn connection(&mut self) -> &mut PgConnection {
        &mut self.connection
    }

    /// Whether the connection is in this session's transaction and no
    /// deeper: a handler's savepoint left open, or a failed one (sqlx then
    /// rolls the whole transaction back), would leave it otherwise.
    pub(super) fn in_own_transaction(&self) -> bool {
        PgTransactionManager::get_transaction_depth(&self.connection) == 1
    }

    /// Commits. On an error the connection is closed as it is dropped.
    pub(super) async fn commit(&mut self) -> Result<(), sqlx::Error> {
        self.settled = false;
        PgTransactionManager::commit(&mut self.connection).await?;
        self.settled = true;
        Ok(())
    }

    /// Rolls back. On an error the connection is closed as it is dropped,
    /// which ends the transaction too.
    pub(super) async fn rollback(mut self) {
        self.settled = false;
        if PgTransactionManager::rollback(&mut self.connection).await.is_ok() {
            self.settled = true;
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if !self.settled {
            self.connection.close_on_drop();
        } else if PgTransactionManager::get_transaction_depth(&self.connection) > 0 {
            // Sent ahead of the pool's check of the connection as it returns.
            PgTransactionManager::start_rollback(&mut self.connection);
        }
    }
}

/// The database transaction of a request that runs under a
/// [`TransactionalStore`](super::TransactionalStore): write the request's
/// business changes in it, and they commit together with its idempotency
/// record, once the response is known, or not at all.
///
/// The layer puts it in the request's extensions; axum handlers take it as
/// an extractor (feature `axum`). It exists only for requests the layer
/// guards (those with an idempotency key); a handler that also serves
/// requests without one takes `Option<RequestTransaction>`.
///
/// The layer commits it: do not run `COMMIT` or `ROLLBACK` on it yourself,
/// and do not use sqlx's `begin()` on it. That makes a savepoint, but when
/// the savepoint fails or is cancelled, sqlx rolls back the whole
/// transaction, with the key's locks: write `SAVEPOINT` and `ROLLBACK TO
/// SAVEPOINT` yourself instead. (The layer then refuses to commit, and
/// answers `503 not-committed`.) Do not keep it past the response: the layer
/// takes the transaction back to commit it, and waits for a handler that
/// still holds it locked.
///
/// # Example
/// ```no_run
/// use axum::{Router, http::StatusCode, routing::post};
/// use tower_idempotency::{IdempotencyLayer, store::postgres::{RequestTransaction, sqlx}};
///
/// async fn charge(transaction: RequestTransaction) -> Result<&'static str, StatusCode> {
///     let mut connection = transaction.lock().await.map_err(|_| StatusCode::INTERNAL_SERVER_ERROR)?;
///     sqlx::query("INSERT INTO charges (amount) VALUES (100)")
///         .execute(&mut *connection)
///         .await
///         .map_err(|_| StatusCode::SERVICE_UNAVAILABLE)?;
///     Ok("charged")
/// }
///
/// # async fn run() {
/// let pool = sqlx::PgPool::connect("postgres://postgres@127.0.0.1/app").await.unwrap();
/// let app: Router = Router::new().route("/charges", post(charge).route_layer(IdempotencyLayer::postgres(pool)));
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
    open: Arc<AsyncMutex<Option<Session>>>,
}

impl fmt::Debug for RequestTransaction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RequestTransaction").finish_non_exhaustive()
    }
}

impl RequestTransaction {
    fn new(session: Session) -> Self {
        Self { open: Arc::new(AsyncMutex::new(Some(session))) }
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
        OwnedMutexGuard::try_map(guard, |open| open.as_mut().map(Session::connection))
            .map(TransactionGuard)
            .map_err(|_| TransactionEnded)
    }

    /// Takes the session out, to commit or roll it back: waits for a
    /// handler that still holds it.
    async fn take(&self) -> Option<Session> {
        self.open.lock().await.take()
    }

    /// Takes the session out if no handler holds it; one that does rolls it
    /// back when it lets go of the last handle.
    fn try_take(&self) -> Option<Session> {
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
pub struct TransactionGuard(OwnedMappedMutexGuard<Option<Session>, PgConnection>);

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
    pub(super) fn open(&self, owner: OwnerToken, session: Session) {
        self.lock().insert(owner, RequestTransaction::new(session));
    }

    pub(super) fn get(&self, owner: OwnerToken) -> Option<RequestTransaction> {
        self.lock().get(&owner).cloned()
    }

    pub(super) fn contains(&self, owner: OwnerToken) -> bool {
        self.lock().contains_key(&owner)
    }

    /// The session of `owner`, no longer open to others; waits for a
    /// handler that holds it. `Err(NotOwner)` when there is none.
    pub(super) async fn take(&self, owner: OwnerToken) -> Result<Option<Session>, StoreError> {
        let open = self.lock().remove(&owner).ok_or(StoreError::NotOwner)?;
        Ok(open.take().await)
    }

    /// As [`OpenTransactions::take`], without waiting: `Ok(None)` when a
    /// handler holds it (it rolls back as the handler lets go).
    pub(super) fn try_take(&self, owner: OwnerToken) -> Result<Option<Session>, StoreError> {
        let open = self.lock().remove(&owner).ok_or(StoreError::NotOwner)?;
        Ok(open.try_take())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<OwnerToken, RequestTransaction>> {
        // A panic never leaves the map half-changed.
        self.by_owner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
